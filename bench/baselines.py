"""Held-out perplexity and compress time of the baselines on the reference model, one run.

    python bench/baselines.py [--ratios 0.1,0.2,0.3,0.4] [--methods svd,asvd,svd-llm,rom:allocation=uniform]

A method is NAME or NAME:key=value:key=value (settings of its config, e.g. rom:center=false).

Prints a markdown table and writes bench/results/baselines.json. Every figure comes from this one
run on this machine: compare rows with each other, not with another machine's.

The general tool is ``rankdown bench`` (rankdown/benchmark/: any model, degeneration, tasks,
speed, plots); this script keeps the layout of baselines.json and adds the compress time measured
against one dense forward over the calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import rankdown
from rankdown.allocate import count_params
from rankdown.benchmark import parse_method
from rankdown.calib import calibration_data
from rankdown.eval.perplexity import perplexity


@torch.no_grad()
def forward_seconds(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """One no-grad forward of ``model`` over the calibration tokens: the yardstick of compress time."""
    t0 = time.perf_counter()
    for batch in input_ids.split(batch_size):
        model(input_ids=batch, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="svd,asvd,svd-llm")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "baselines.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tok = rankdown.load_reference()
    calib = calibration_data(tok, "reference", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    fwd = forward_seconds(model, calib.input_ids)
    print(f"dense forward over the {calib.input_ids.numel():,} calibration tokens: {fwd:.2f}s")
    t0 = time.perf_counter()
    dense = perplexity(model, tok, "reference-heldout", seqlen=args.seqlen)
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "seqlen": args.seqlen,
               "nsamples": args.nsamples, "heldout_tokens": dense.tokens,
               "dense": {"params": count_params(model), "ppl": dense.ppl, "eval_s": time.perf_counter() - t0,
                         "calib_forward_s": fwd},
               "runs": []}
    print(f"dense: {count_params(model):,} params, held-out ppl {dense.ppl:.3f} over {dense.tokens:,} tokens")
    for method in methods:
        for ratio in ratios:
            m, _ = rankdown.load_reference()
            name, settings = parse_method(method)
            cfg = rankdown.make_config(name, ratio=ratio, **settings)
            rep = rankdown.compress(m, tok, cfg, calib, run=rankdown.RunSettings(seed=args.seed), progress=False)
            res = perplexity(m, tok, "reference-heldout", seqlen=args.seqlen)
            run = {"method": method, "ratio": ratio, "ratio_achieved": rep.ratio_achieved,
                   "params": rep.params_after, "ppl": res.ppl, "compress_s": rep.seconds,
                   "compress_over_forward": rep.seconds / fwd}
            results["runs"].append(run)
            print(f"{method:8s} {ratio:.1f}: ratio {rep.ratio_achieved:.4f} ppl {res.ppl:8.3f} "
                  f"compress {rep.seconds:6.1f}s ({rep.seconds / fwd:.1f}x the forward)", flush=True)

    lines = ["| method | " + " | ".join(f"{int(r * 100)}%" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    lines.append("| dense | " + " | ".join(f"{dense.ppl:.2f}" for _ in ratios) + " |")
    for method in methods:
        cells = [f"{r['ppl']:.2f} ({r['compress_s']:.1f}s)" for r in results["runs"] if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\nheld-out perplexity (compress seconds)\n" + "\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
