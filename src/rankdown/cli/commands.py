"""rankdown generate | inspect | demo | bench: each reads its flags, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from rankdown.cli.checks import float_list, given, names
from rankdown.cli.output import table
from rankdown.loading import REFERENCE, check_folder_config, load_model, no_tokenizer


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.eval.generate import generate_text

    model, tokenizer = load_model(args.model, args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(no_tokenizer(args.model, "generation"))
    res = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(res.text)
    return {"model": args.model, **res.to_dict()}


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown import gguf_source
    from rankdown.io import read_record

    path = Path(args.dir)
    gguf_file = gguf_source.find(path)
    if gguf_file is not None:
        info = gguf_source.describe(gguf_file)
        print(f"{gguf_file}: a GGUF checkpoint ({info['architecture']}, {info['quantization']}, "
              f"{info['tensors']} tensors), not compressed by rankdown")
        return {"compressed": False, **info}
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json) nor a .gguf file")
    record = read_record(path)
    check_folder_config(path)
    if record is None:
        print(f"{path}: a plain Hugging Face model, not compressed by rankdown")
        return {"compressed": False}
    modules = record.get("structure", {}).get("modules", {})
    rows = [module_row(k, v) for k, v in sorted(modules.items(), key=lambda kv: natural_key(kv[0]))]
    print(table(rows, ["module", "type", "in", "out", "rank", "kept", "bias", "note"]) if rows else "no module replaced")
    thin = sum(1 for r in rows if r["note"])
    if thin:
        print(f"{thin} module(s) left at rank 1 (see note): each carries one direction of its input; exclude them "
              "(--exclude) or compress to a lower --ratio if that was not meant")
    print()
    prov = {k: v for k, v in record.items() if k not in ("structure", "guards", "files")}
    for key, val in prov.items():
        if key != "passes":
            print(f"{key:>16}: {json.dumps(val) if isinstance(val, (dict, list)) else val}")
    for n, p in enumerate(prov.get("passes") or [], 1):
        print(f"{f'pass {n}':>16}: {p.get('method')} at ratio {p.get('ratio_requested')}, "
              f"{p.get('params_before', 0):,} -> {p.get('params_after', 0):,} parameters")
    return {"compressed": True, "modules": len(modules), **prov}


def natural_key(name: str) -> list[Any]:
    """Sort key of a dotted module path with its numbers as numbers: layer 2 before layer 10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def module_row(name: str, rec: dict[str, Any]) -> dict[str, Any]:
    """One row of inspect's table: a replaced module's shape, rank or kept sizes, biases and a note."""
    bias = rec.get("bias", "")
    if isinstance(bias, bool):
        bias = "yes" if bias else "no"
    elif isinstance(bias, dict):  # an attention's biases per role (q, k, v, o)
        bias = ",".join(k for k, on in bias.items() if on) or "none"
    kept = ""
    if "qk_dim" in rec or "v_dim" in rec:  # MoDeGPT's reduced attention: head sizes kept of head_dim
        hd = rec.get("head_dim", "?")
        kept = f"q/k {rec.get('qk_dim', hd)}/{hd}, v {rec.get('v_dim', hd)}/{hd}"
    rank = rec.get("rank", "")
    note = "rank 1!" if rank == 1 or 1 in (rec.get("qk_dim"), rec.get("v_dim")) else ""
    return {"module": name, "type": rec.get("type", ""), "in": rec.get("in", rec.get("hidden", "")),
            "out": rec.get("out", rec.get("hidden", "")), "rank": rank, "kept": kept, "bias": bias, "note": note}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.benchmark.demo import compare_methods

    methods = names(args.methods, "--methods", "svd,rom")
    rows = []
    for row, res in compare_methods(methods, args.ratio, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    progress=not args.quiet):
        rows.append(row)
        if len(rows) == 1:
            print(f"reference model: {row['params']:,} parameters, held-out perplexity {res.ppl:.3f} "
                  f"({res.tokens:,} tokens)")
    print()
    print(table(rows, ["model", "params", "removed", "heldout_ppl", "ppl_change", "compress_s", "eval_s"]))
    return {"rows": rows}


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.benchmark import BenchSettings, run_bench
    from rankdown.config import ConfigError

    if not args.out.strip():
        raise ConfigError("--out '' names no folder: give the folder for results.json, results.md and the plots")

    settings = BenchSettings(
        model=given(args.model, REFERENCE),
        methods=[] if args.methods is None else names(args.methods, "--methods", "svd,rom"),
        ratios=float_list(args.ratios, "--ratios"), ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
        calib=args.calib, nsamples=args.nsamples, seed=args.seed, dtype=args.dtype, device=args.device,
        degeneration_tokens=args.degeneration_tokens,
        tasks=None if args.tasks is None else names(args.tasks, "--tasks", "arc_easy,piqa"),
        include_path=args.include_path, limit=args.limit, speed=args.speed, speed_batch_size=args.speed_batch_size,
        speed_prompt_len=args.speed_prompt_len, speed_new_tokens=args.speed_new_tokens,
        speed_repeats=args.repeats)
    results = run_bench(settings, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {', '.join(results['files'])} to {args.out}")
    if "ppl_vs_ratio.png" not in results["files"]:
        print("no plots: matplotlib is not installed (pip install 'rankdown[eval]')")
    return results
