"""MoDeGPT on the reference model, one run: held-out perplexity at each ratio (block-influence vs
uniform allocation, the paper's query/key rule, next to rom, svd-llm and svd), compress time, and
the CPU inference speed of the 30% models against the dense one.

    python bench/modegpt.py [--ratios 0.1,0.2,0.3,0.4,0.5] [--methods modegpt,modegpt:qk_share=1,svd]
                            [--nsamples 32] [--max-windows 40] [--speed-threads 1,2]

A method is NAME or NAME:key=value (as in bench/baselines.py); ``modegpt:qk_share=1`` is the
paper's rule (query/key lose the whole layer sparsity; rankdown's default loses a quarter of it).
Every modegpt variant at --speed-ratio is timed against the dense model in one alternating run per
thread count. Prints markdown tables and writes bench/results/modegpt.json. Every figure comes
from this one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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

DEFAULT_METHODS = "modegpt,modegpt:allocation=uniform,modegpt:qk_share=1,rom,svd-llm,svd"


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
    ap.add_argument("--speed-threads", default=None,
                    help="comma-separated torch thread counts to time speed at (default: the current count)")
    ap.add_argument("--speed-rounds", type=int, default=1,
                    help="alternating speed runs per thread count; the table gives the median ratio over them "
                         "(a loaded machine drifts by 10%% from one run to the next)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "modegpt.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    other = ratios if args.baseline_ratios is None else [float(r) for r in args.baseline_ratios.split(",")]
    threads = [torch.get_num_threads()] if args.speed_threads is None else [
        int(t) for t in args.speed_threads.split(",")]

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
    speed_models = {}
    for method in methods:
        name, settings = parse_method(method)
        for ratio in ratios if name == "modegpt" else other:
            model, _ = rankdown.load_reference()
            config = rankdown.make_config(name, ratio=ratio, **settings)
            rep = rankdown.compress(model, tok, config, calib, run=rankdown.RunSettings(seed=args.seed), progress=False)
            run = {"method": method, "ratio": ratio, "ratio_achieved": rep.ratio_achieved, "params": rep.params_after,
                   "ppl": ppl(model), "compress_s": rep.seconds, "compress_over_forward": rep.seconds / fwd}
            if name == "modegpt":
                alloc = rep.artifacts.get("modegpt_allocation.json", {})
                run.update(sparsity=alloc.get("sparsity"), qk_share=alloc.get("qk_share"), sizes={
                    "qk_v": [[m.qk_dim, m.v_dim] for m in model.modules() if type(m).__name__ == "ReducedAttention"],
                    "mlp": [layer.mlp.down_proj.in_features for layer in model.model.layers]})
                if abs(ratio - args.speed_ratio) < 1e-9:
                    speed_models[f"{method}@{ratio}"] = model
            results["runs"].append(run)
            print(f"{method:28s} {ratio:.1f}: ratio {rep.ratio_achieved:.4f} ppl {run['ppl']:8.3f} "
                  f"compress {rep.seconds:6.1f}s", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive an interruption

    if speed_models:
        results["speed"] = {}
        for n in threads:
            speed(results, dense_model, speed_models, n, args)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results, methods, ratios, dense_ppl, args)
    Path(args.out).write_text(json.dumps(results, indent=1))


def speed(results: dict, dense_model, models: dict, threads: int, args) -> None:
    """CPU prefill and decode throughput of the compressed models against the dense one, alternated;
    ``--speed-rounds`` such runs, their ratios' medians in ``median_ratios``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [compare_speed({"dense": dense_model, **models}, batch_size=1, prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed + i)
                for i in range(args.speed_rounds)]
    finally:
        torch.set_num_threads(before)
    sp = runs[0]
    keys = ("prefill_speedup", "decode_speedup")
    sp["rounds"] = [{name: {k: r[k] for k in keys} for name, r in run["ratios"].items()} for run in runs]
    sp["median_ratios"] = {name: {k: statistics.median(r[name][k] for r in sp["rounds"]) for k in keys}
                           for name in sp["ratios"]}
    layer_params = lambda m: sum(p.numel() for p in m.model.layers.parameters())  # noqa: E731
    sp["params"] = {name: {"all": count_params(m), "layers": layer_params(m)}
                    for name, m in {"dense": dense_model, **models}.items()}
    results["speed"][f"{threads} threads"] = sp
    for name_, r in sp["median_ratios"].items():
        print(f"speed ({threads} threads) {name_}: prefill {r['prefill_speedup']:.3f}x, "
              f"decode {r['decode_speedup']:.3f}x (median of {args.speed_rounds} runs)", flush=True)


def print_tables(results: dict, methods: list[str], ratios: list[float], dense_ppl: float, args) -> None:
    lines = ["| method | " + " | ".join(f"{int(round(r * 100))}%" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios), "| dense | " + " | ".join(f"{dense_ppl:.2f}" for _ in ratios) + " |"]
    for method in methods:
        runs = {r["ratio"]: r for r in results["runs"] if r["method"] == method}
        cells = [f"{runs[r]['ppl']:.2f} ({runs[r]['compress_s']:.1f}s)" if r in runs else "-" for r in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\nheld-out perplexity (compress seconds)\n" + "\n".join(lines))
    for threads, sp in results.get("speed", {}).items():
        print(f"\nCPU speed ({threads}), batch 1 x {args.prompt_len} prompt tokens, {args.new_tokens} decoded, "
              f"median of {args.repeats} (tok/s: the first run; speed-ups: median of {len(sp['rounds'])} runs):\n"
              f"| model | params | prefill tok/s | decode tok/s | prefill speed-up | decode speed-up | "
              f"proportional (all / layers) |\n|---|---|---|---|---|---|---|")
        dense = sp["params"]["dense"]
        for name, f in sp["models"].items():
            p, r = sp["params"][name], sp["median_ratios"][name]
            print(f"| {name} | {p['all']:,} | {f['prefill_tok_s']:.0f} | {f['decode_tok_s']:.1f} | "
                  f"{r['prefill_speedup']:.3f}x | {r['decode_speedup']:.3f}x | {dense['all'] / p['all']:.3f}x / "
                  f"{dense['layers'] / p['layers']:.3f}x |")


if __name__ == "__main__":
    main()
