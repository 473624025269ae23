"""Issue 32's scale law: how each stage of a compression grows with the model's shapes and the
calibration tokens, fitted on a measured run and extrapolated (docs/COST.md).

Each stage's seconds are modelled as ``k_stage * work_stage(shapes, tokens)``; ``k`` is fitted on the
measured run (one model, one machine), so only the *growth* comes from the model below:

- the unit (one dense forward of the model): T * (layers * (M + L d / 2) + d V) multiply-adds, M the
  layer's linear MACs per token, L d / 2 the causal attention's, d V the head; the ``forward`` stage
  (the engine's layer passes) the same without the head;
- statistics: a forward of every layer plus the float64 Gram/covariance accumulations,
  T * layers * (M + 2 G), G the sum of the accumulated matrices' squared sizes (float64 counted twice);
- decompositions: layers * E, E the sum of n^3 over the eigen/singular-value problems of one layer
  (independent of T);
- allocation (fisher: a forward and backward of the whole model, head included) and distillation
  (epochs of each layer's forward and backward, no head): proportional to their forwards.

    python bench/cost_model.py bench/results/cost_smollm2.json   # prints the prediction table
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    d: int  # hidden size
    f: int  # MLP intermediate size
    layers: int
    kv: int  # key/value width (heads x head size)
    vocab: int
    seqlen: int
    windows: int

    @property
    def tokens(self) -> int:
        return self.seqlen * self.windows

    @property
    def linears(self) -> list[tuple[int, int]]:  # (out, in) of q, k, v, o, gate, up, down
        d, f, kv = self.d, self.f, self.kv
        return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]

    @property
    def macs(self) -> int:
        return sum(o * i for o, i in self.linears)


SHAPES = {
    "reference": Shape(256, 768, 6, 64, 4096, 256, 32),
    "SmolLM2-135M": Shape(576, 1536, 30, 192, 49152, 256, 32),
    "Qwen2.5-0.5B": Shape(896, 4864, 24, 128, 151936, 256, 32),
    "Llama-2-7B": Shape(4096, 11008, 32, 4096, 32000, 2048, 128),
}


def gram(method: str, s: Shape) -> int:
    """Sum of the squared sizes of the statistics one layer accumulates."""
    d, f, kv = s.d, s.f, s.kv
    if method == "svd-llm":  # input Grams: attention input (q, k, v share it), o's, the MLP input, down's
        return 3 * d * d + f * f
    if method in ("rom", "lillama"):  # lillama's default init is ROM's: covariances in the smaller space
        return sum(min(o, i) ** 2 for o, i in s.linears)
    if method == "modegpt":  # the attention input, o's (V-O), the MLP's intermediate
        return 2 * d * d + f * f
    return 0


def eig(method: str, s: Shape) -> float:
    """Sum of n^3 over one layer's decompositions (an SVD of out x in counted out * in * min)."""
    if method == "svd-llm":  # per linear: the input Gram's factorisation and the whitened weight's SVD
        return sum(i ** 3 + o * i * min(o, i) for o, i in s.linears)
    if method in ("rom", "lillama"):
        return sum(min(o, i) ** 3 for o, i in s.linears)
    if method == "modegpt":  # the MLP's Nystrom on f x f, V-O's SVD, q-k's per-head CR
        return s.f ** 3 + 2 * s.d ** 3
    return 0.0


def work(stage: str, method: str, s: Shape) -> float:
    layers = s.tokens * s.layers * (s.macs + s.seqlen * s.d / 2)
    if stage in ("forward", "distillation"):  # the layers only: the engine never runs the head
        return layers
    forward = layers + s.tokens * s.d * s.vocab
    if stage == "statistics":
        return s.tokens * s.layers * (s.macs + 2 * gram(method, s))
    if stage == "decompositions":
        return s.layers * eig(method, s)
    if stage in ("calibration",):
        return s.tokens
    if stage in ("save", "other"):
        return s.layers * s.macs  # the parameters
    return forward  # allocation (fisher's loss runs the head) and the unit


def predict(runs: dict, source: str, target: str) -> dict:
    """Per method: the multiples of one dense forward per stage on ``target``, from the multiples
    measured on ``source`` (``runs``: method -> run record with ``cost``), each stage's multiple scaled by
    how much faster its work grows than the forward's. Ratios only: the machine's speed cancels."""
    a, b = SHAPES[source], SHAPES[target]
    grow_unit = work("unit", "", b) / work("unit", "", a)
    out = {}
    for method, run in runs.items():
        rows = {}
        for stage, row in run["cost"]["stages"].items():
            if stage == "total" or row["forwards"] is None:
                continue
            grow = work(stage, method, b) / max(work(stage, method, a), 1e-9)
            rows[stage] = row["forwards"] * grow / grow_unit
        out[method] = {"forwards": rows, "total": sum(rows.values())}
    return out


def forward_flops(target: str) -> float:
    """FLOPs of one dense forward over the calibration tokens (2 per multiply-add)."""
    return 2 * work("unit", "", SHAPES[target])


H100_FP32 = 50e12  # FLOP/s assumed for a float32 forward on one H100 (67 peak SXM, TF32 off)


def main(path: str, source: str = "SmolLM2-135M", target: str = "Llama-2-7B") -> None:
    runs = json.load(open(path))["runs"][source]
    p = predict(runs, source, target)
    flops = forward_flops(target)
    units = [r["cost"]["forward_seconds"] for r in runs.values()]
    rate = forward_flops(source) / min(units)  # this CPU, one thread, the least loaded of the runs
    machines = {"this CPU, 1 thread": rate, "48 such cores (ideal)": 48 * rate, "one H100 (fp32)": H100_FP32}
    print(f"{target} from {source}: one dense forward = {flops:.3g} FLOPs; this CPU's thread ran {rate / 1e9:.1f} "
          f"GFLOP/s on {source}'s forward")
    print("seconds of one forward: " + ", ".join(f"{k} {flops / r:,.0f}" for k, r in machines.items()))
    for m, row in p.items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["forwards"].items() if v >= 0.005)
        secs = ", ".join(f"{k} {row['total'] * flops / r / 60:,.0f} min" for k, r in machines.items())
        print(f"{m}: {row['total']:.2f} forwards ({stages}); {secs}")


if __name__ == "__main__":
    main(*sys.argv[1:])
