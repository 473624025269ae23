"""Lillama on the reference model: held-out perplexity against svd, svd-llm and rom, and compress time.

    python bench/lillama.py [--ratios 0.2,0.3,0.4] [--inits svd,rom] [--baselines svd,svd-llm,rom]
                            [--nsamples 128] [--epochs 1] [--lr ...] [--device cpu|cuda]

Prints a markdown table and writes bench/results/lillama.json. Compress time is given in seconds
per million calibration tokens (the tokens of one pass; Lillama's training makes about
``epochs × (1 + paths)`` passes over them per layer). Every figure comes from this one run.
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
from rankdown.calib import calibration_data
from rankdown.eval.perplexity import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.2,0.3,0.4")
    ap.add_argument("--inits", default="svd,rom")
    ap.add_argument("--baselines", default="svd,svd-llm,rom")
    ap.add_argument("--baselines-from", default=None, metavar="JSON",
                    help="take the baselines' figures from a bench/baselines.py result with the same protocol "
                         "(e.g. bench/results/baselines.json) instead of running them")
    ap.add_argument("--strategy", default="bottom")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="default: LillamaConfig's")
    ap.add_argument("--batch-size", type=int, default=2, help="lillama's training batch (windows per AdamW step)")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N held-out windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lillama.json"))
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    lil = {"epochs": args.epochs, "strategy": args.strategy, "allocation": "strategy", **({"lr": args.lr} if args.lr else {})}
    methods = [(f"lillama:init={i}", "lillama", {"init": i, **lil}) for i in args.inits.split(",") if i]
    baselines = [b for b in args.baselines.split(",") if b]
    earlier = json.loads(Path(args.baselines_from).read_text()) if args.baselines_from else None
    if earlier is None:
        methods += [(b, b, {}) for b in baselines]

    model, tok = rankdown.load_reference()
    calib = calibration_data(tok, "reference", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    mtok = calib.tokens / 1e6
    dense = perplexity(model, tok, "reference-heldout", seqlen=args.seqlen, max_windows=args.max_windows)
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "device": args.device,
               "seqlen": args.seqlen, "nsamples": args.nsamples, "calib_tokens": calib.tokens,
               "heldout_tokens": dense.tokens, "lillama": lil,
               "dense": {"params": count_params(model), "ppl": dense.ppl}, "runs": []}
    if earlier is not None:
        same = {k: earlier[k] for k in ("seqlen", "nsamples", "heldout_tokens")} == {
            "seqlen": args.seqlen, "nsamples": args.nsamples, "heldout_tokens": dense.tokens}
        if not same:
            raise SystemExit(f"{args.baselines_from} used another protocol; run the baselines here instead")
        picked = [dict(r, source=args.baselines_from) for r in earlier["runs"]
                  if r["method"] in baselines and any(abs(r["ratio"] - q) < 1e-9 for q in ratios)]
        results["runs"] += picked
        methods += [(b, b, {}) for b in baselines]
    print(f"dense: {count_params(model):,} params, held-out ppl {dense.ppl:.3f}; calibration {calib.tokens:,} tokens")
    for label, name, settings in methods:
        for ratio in ratios:
            if any(r["method"] == label and r["ratio"] == ratio for r in results["runs"]):
                continue  # taken from --baselines-from
            m, _ = rankdown.load_reference()
            cfg = rankdown.make_config(name, ratio=ratio, **settings)
            run = rankdown.RunSettings(seed=args.seed, device=args.device,
                                       batch_size=args.batch_size if name == "lillama" else None)
            t0 = time.perf_counter()
            rep = rankdown.compress(m, tok, cfg, calib, run=run, progress=False)
            seconds = time.perf_counter() - t0
            m.to("cpu")
            ppl = perplexity(m, tok, "reference-heldout", seqlen=args.seqlen, max_windows=args.max_windows).ppl
            run = {"method": label, "ratio": ratio, "ratio_achieved": rep.ratio_achieved, "params": rep.params_after,
                   "ppl": ppl, "compress_s": seconds, "s_per_mtok": seconds / mtok}
            curves = rep.artifacts.get("lillama_losses.json")
            if curves:
                run["layer_loss"] = {k: {"initial": v["eval"][0], "best": min(v["eval"]), "best_epoch": v["best_epoch"]}
                                     for k, v in curves.items()}
            results["runs"].append(run)
            print(f"{label:18s} {ratio:.1f}: ratio {rep.ratio_achieved:.4f} ppl {ppl:8.3f} compress {seconds:6.1f}s "
                  f"({seconds / mtok:,.0f} s per M tokens)", flush=True)

    lines = ["| method | " + " | ".join(f"{int(r * 100)}%" for r in ratios) + " |", "|---|" + "---|" * len(ratios),
             "| dense | " + " | ".join(f"{dense.ppl:.2f}" for _ in ratios) + " |"]
    for label, _, _ in methods:
        cells = [f"{r['ppl']:.2f}" + (f" ({r['s_per_mtok']:,.0f} s/Mtok)" if "s_per_mtok" in r else " *")
                 for r in results["runs"] if r["method"] == label]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    note = f"\n* from {args.baselines_from}" if earlier is not None else ""
    print("\nheld-out perplexity (compress seconds per million calibration tokens)\n" + "\n".join(lines) + note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
