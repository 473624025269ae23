"""MoDeGPT on the reference model, one run: held-out perplexity at each ratio (block-influence vs
uniform allocation, next to rom, svd-llm and svd), compress time, and the CPU inference speed of
the 30% model against the dense one.

    python bench/modegpt.py [--ratios 0.1,0.2,0.3,0.4,0.5] [--methods modegpt,modegpt:allocation=uniform,rom,svd-llm,svd]

A method is NAME or NAME:key=value (as in bench/baselines.py). Prints markdown tables and writes
bench/results/modegpt.json. Every figure comes from this one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import rankdown
from rankdown.allocate import count_params
from rankdown.calib import calibration_data
from rankdown.eval.perplexity import perplexity
from rankdown.eval.speed import compare_speed

sys.path.insert(0, str(Path(__file__).parent))
from baselines import forward_seconds, parse_method  # noqa: E402

DEFAULT_METHODS = "modegpt,modegpt:allocation=uniform,rom,svd-llm,svd"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--baseline-ratios", default=None,
                    help="ratios for the methods other than modegpt (default: --ratios)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None, help="held-out windows evaluated (default: all)")
    ap.add_argument("--speed-ratio", type=float, default=0.3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "modegpt.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    other = ratios if args.baseline_ratios is None else [float(r) for r in args.baseline_ratios.split(",")]

    dense_model, tok = rankdown.load_reference()
    calib = calibration_data(tok, "reference", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    fwd = forward_seconds(dense_model, calib.input_ids)

    def ppl(model) -> float:
        return perplexity(model, tok, "reference-heldout", seqlen=args.seqlen, max_windows=args.max_windows).ppl

    dense_ppl = ppl(dense_model)
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "seqlen": args.seqlen,
               "nsamples": args.nsamples, "max_windows": args.max_windows,
               "dense": {"params": count_params(dense_model), "ppl": dense_ppl, "calib_forward_s": fwd}, "runs": []}
    print(f"dense: {count_params(dense_model):,} params, held-out ppl {dense_ppl:.3f}", flush=True)
    for method in methods:
        name, settings = parse_method(method)
        for ratio in ratios if name == "modegpt" else other:
            model, _ = rankdown.load_reference()
            rep = rankdown.compress(model, tok, rankdown.make_config(name, ratio=ratio, seed=args.seed, **settings),
                                    calib, progress=False)
            run = {"method": method, "ratio": ratio, "ratio_achieved": rep.ratio_achieved, "params": rep.params_after,
                   "ppl": ppl(model), "compress_s": rep.seconds, "compress_over_forward": rep.seconds / fwd}
            if name == "modegpt":
                run["sparsity"] = rep.artifacts.get("modegpt_allocation.json", {}).get("sparsity")
            results["runs"].append(run)
            print(f"{method:28s} {ratio:.1f}: ratio {rep.ratio_achieved:.4f} ppl {run['ppl']:8.3f} "
                  f"compress {rep.seconds:6.1f}s", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive an interruption
            if method == methods[0] and abs(ratio - args.speed_ratio) < 1e-9:
                speed(results, dense_model, model, methods[0], args)

    print_tables(results, methods, ratios, dense_ppl, args)
    Path(args.out).write_text(json.dumps(results, indent=1))


def speed(results: dict, dense_model, speed_model, method: str, args) -> None:
    """CPU prefill and decode throughput of the compressed model against the dense one, alternated."""
    sp = compare_speed({"dense": dense_model, f"{method}@{args.speed_ratio}": speed_model}, batch_size=1,
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                       seed=args.seed)
    layer_params = [sum(p.numel() for p in m.model.layers.parameters()) for m in (dense_model, speed_model)]
    sp["params"] = {"dense": count_params(dense_model), "compressed": count_params(speed_model),
                    "layers_dense": layer_params[0], "layers_compressed": layer_params[1]}
    results["speed"] = sp
    for name_, fig in sp["models"].items():
        print(f"speed {name_}: prefill {fig['prefill_tok_s']:.0f} tok/s, decode {fig['decode_tok_s']:.1f} tok/s",
              flush=True)


def print_tables(results: dict, methods: list[str], ratios: list[float], dense_ppl: float, args) -> None:
    lines = ["| method | " + " | ".join(f"{int(round(r * 100))}%" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios), "| dense | " + " | ".join(f"{dense_ppl:.2f}" for _ in ratios) + " |"]
    for method in methods:
        runs = {r["ratio"]: r for r in results["runs"] if r["method"] == method}
        cells = [f"{runs[r]['ppl']:.2f} ({runs[r]['compress_s']:.1f}s)" if r in runs else "-" for r in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\nheld-out perplexity (compress seconds)\n" + "\n".join(lines))
    if "speed" in results:
        sp = results["speed"]
        names = list(sp["models"])
        print(f"\nCPU speed, batch 1 x {args.prompt_len} prompt tokens, {args.new_tokens} decoded, "
              f"median of {args.repeats}:\n| model | params | prefill tok/s | decode tok/s |\n|---|---|---|---|")
        for n, p in zip(names, (sp["params"]["dense"], sp["params"]["compressed"])):
            f = sp["models"][n]
            print(f"| {n} | {p:,} | {f['prefill_tok_s']:.0f} | {f['decode_tok_s']:.1f} |")
        r = sp["ratios"][names[1]]
        removed = 1 - sp["params"]["compressed"] / sp["params"]["dense"]
        removed_layers = 1 - sp["params"]["layers_compressed"] / sp["params"]["layers_dense"]
        print(f"speed-up: prefill {r['prefill_speedup']:.3f}x, decode {r['decode_speedup']:.3f}x; parameters removed "
              f"{removed:.3f} of all, {removed_layers:.3f} of the decoder layers (proportional speed-up "
              f"{1 / (1 - removed):.3f}x / {1 / (1 - removed_layers):.3f}x)")


if __name__ == "__main__":
    main()
