"""Command line: rankdown compress | eval | bench | generate | inspect | demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rankdown.cli_checks import check_compress, disk_advice, names
from rankdown.config import MethodConfig
from rankdown.loading import (
    REFERENCE, defaults_for, is_reference, load_model, no_tokenizer, source_record, stored_dtype,
)
from rankdown.methods import METHODS

log = logging.getLogger("rankdown")


# ----------------------------------------------------------------------------- printing
def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ----------------------------------------------------------------------------- commands
def _method_config(args: argparse.Namespace) -> MethodConfig:
    from rankdown.config import ConfigError

    cls = METHODS[args.method].config_class
    own = {f.name for f in dataclasses.fields(cls)}
    for other in METHODS.values():  # a flag of another method is a mistake, not something to ignore
        for f in dataclasses.fields(other.config_class):
            if f.name not in own and getattr(args, f.name, None) is not None:
                raise ConfigError(f"--{f.name.replace('_', '-')} is a setting of {other.config_class.method}, "
                                  f"not of {args.method}; remove it or choose --method {other.config_class.method}")
    settings = {n: getattr(args, n) for n in own if getattr(args, n, None) is not None}
    return cls.from_dict(settings)


def _run_settings(args: argparse.Namespace):
    """--device, --batch-size, --seed, --max-memory and --stats-cache as one RunSettings."""
    from rankdown.config import RUN_FIELDS, RunSettings

    return RunSettings(**{n: getattr(args, n) for n in RUN_FIELDS if getattr(args, n, None) is not None})


def _calib_defaults(args: argparse.Namespace) -> None:
    defaults = defaults_for(args.model)
    args.calib = _or(args.calib, defaults.calib)
    args.seqlen = _or(args.seqlen, defaults.seqlen)


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    import rankdown
    from rankdown import distributed

    calib_given = args.calib is not None
    _calib_defaults(args)
    config = _method_config(args)
    run = _run_settings(args)
    check_compress(args, config, calib_given)
    distributed.setup(run.device)  # under torchrun: join the other processes (see rankdown/distributed.py)
    if args.out:  # before any work: an --out that is taken, or is (or holds, or is inside) the input
        from rankdown.io import _check_out_dir, check_writable

        local = [] if is_reference(args.model) else [Path(args.model).expanduser()]
        _check_out_dir(Path(args.out).expanduser().absolute(), args.overwrite, [p for p in local if p.exists()])
        check_writable(args.out)
    if _streaming(args):
        from rankdown import heap
        from rankdown.stream import compress_folder

        def resuming(done: int, work: Path) -> None:
            print(f"resuming: {done} layers were finished by an earlier run ({work}; --restart starts over)",
                  flush=True)

        heap.map_big_blocks()  # big blocks back to the system when freed: a lower peak over a long run
        report, saved = compress_folder(args.model, args.out, config, args.calib, run=run, nsamples=args.nsamples,
                                        seqlen=args.seqlen, dtype=_torch_dtype(args.dtype),
                                        save_dtype=_save_dtype(args), overwrite=args.overwrite,
                                        progress=not args.quiet, resume=not args.restart, on_resume=resuming)
        out = str(saved)
    else:
        model, tokenizer = load_model(args.model, args.dtype)
        report = rankdown.compress(model, tokenizer, config, args.calib, run=run, nsamples=args.nsamples,
                                   seqlen=args.seqlen, progress=not args.quiet)
        out = None
        if args.out and distributed.is_main():
            model.to(_save_dtype(args))
            out = str(rankdown.save(model, tokenizer, args.out, report, overwrite=args.overwrite,
                                    source=source_record(args.model)))
    result = {**report.summary(), "out": out, "streamed": _streaming(args)}
    if not distributed.is_main():  # process 0 speaks for all
        return result
    print(table([result], ["method", "ratio_requested", "params_before", "params_after", "ratio_achieved", "seconds"]))
    if out:
        print(f"saved to {out}")
    return result


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _save_dtype(args: argparse.Namespace):
    """--save-dtype, where ``auto`` is the dtype the input model is stored in (else --dtype)."""
    if args.save_dtype != "auto":
        return _torch_dtype(args.save_dtype)
    return stored_dtype(args.model) or _torch_dtype(args.dtype)


def _streaming(args: argparse.Namespace) -> bool:
    """Whether to read the model layer by layer from its files (see rankdown/stream.py).

    Default: yes for a local folder of safetensors weights saved to --out, unless the family's
    checkpoints cannot be mapped one layer at a time (fused experts); --stream insists, --no-stream
    loads the whole model. A GGUF file is never streamed: it is dequantized whole, in memory.
    """
    if getattr(args, "_streaming", None) is not None:
        return args._streaming
    from rankdown import gguf_source
    from rankdown.config import ConfigError
    from rankdown.stream import can_stream, streamable_family

    want = args.stream
    gguf_file = None if is_reference(args.model) else gguf_source.find(args.model)
    if gguf_file is not None:
        if want:
            raise ConfigError(f"--stream reads safetensors folders layer by layer; {gguf_file.name} is a GGUF file, "
                              "which rankdown dequantizes and compresses in memory (drop --stream)")
        log.info("%s is a GGUF file: loaded whole and compressed in memory (streaming reads safetensors folders)",
                 gguf_file)
        args._streaming = False
        return False
    possible = not is_reference(args.model) and can_stream(args.model)
    if want and not possible:
        raise ConfigError("--stream reads a local model folder with safetensors weights; "
                          f"{args.model or REFERENCE!r} is not one (drop --stream)")
    if want and not args.out:
        raise ConfigError("--stream writes the model as it goes: give --out FOLDER")
    whole = METHODS[args.method].needs_loss  # a backward pass of the whole model
    if want and whole:
        raise ConfigError(f"--method {args.method} takes gradients of the model's loss, which needs the whole "
                          "model in memory: drop --stream")
    decided = bool(possible and args.out and want is not False and not whole
                   and (want or streamable_family(args.model)))
    args._streaming = decided
    return decided


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.config import ConfigError

    if args.ppl is None and args.fidelity is None and args.tasks is None and not args.speed:
        raise ConfigError("nothing to evaluate: pass --ppl SOURCE (perplexity), --fidelity ORIGINAL --texts FILE "
                          "(agreement with the original model), --tasks NAMES (lm-evaluation-harness accuracy) "
                          "and/or --speed (throughput and memory)")
    if (args.fidelity is None) != (args.texts is None):
        raise ConfigError("--fidelity ORIGINAL and --texts FILE go together: pass both "
                          "(FILE holds passages separated by blank lines)")
    if args.baseline is not None and not args.speed:
        raise ConfigError("--baseline MODEL is the dense model --speed compares against: add --speed")
    if (args.include_path is not None or args.limit is not None) and args.tasks is None:
        raise ConfigError("--include-path and --limit are settings of --tasks: add --tasks NAMES")
    manager = None
    if args.tasks is not None:  # unknown task names fail before the model is loaded
        from rankdown.eval.tasks import task_manager

        manager = task_manager(args.tasks, args.include_path)
    from rankdown.distributed import check_device

    check_device(args.device)
    if args.seqlen is not None and args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {args.seqlen}; e.g. --seqlen 2048")
    if args.ppl is not None:
        from rankdown.calib import check_source

        check_source(args.ppl)
    model, tokenizer = load_model(args.model, args.dtype)
    if args.device:  # every evaluation below runs where the model is
        model.to(args.device)
    needs = [n for n, on in (("perplexity", args.ppl), ("fidelity", args.fidelity), ("--tasks", args.tasks)) if on]
    if tokenizer is None and needs:
        raise FileNotFoundError(no_tokenizer(args.model, needs[0]))
    if args.seqlen is not None:
        from rankdown.calib import check_seqlen

        check_seqlen(model, args.seqlen)
    result: dict[str, Any] = {"model": args.model}
    if args.ppl is not None:
        from rankdown.eval.perplexity import perplexity

        seqlen = _or(args.seqlen, defaults_for(args.model).seqlen)
        res = perplexity(model, tokenizer, args.ppl, seqlen=seqlen, batch_size=_or(args.batch_size, 1),
                         device=args.device, max_windows=args.max_windows, progress=not args.quiet)
        result.update(res.to_dict())
        print(table([result], ["model", "source", "seqlen", "tokens", "ppl", "seconds"]))
    if args.fidelity is not None:
        fid = _eval_fidelity(args, model, tokenizer)
        if args.ppl is not None:  # perplexity's keys stay at the top level; fidelity's nest
            result["fidelity"] = fid
        else:
            result.update(fid)
    if args.tasks is not None:
        result["tasks"] = _eval_tasks(args, model, tokenizer, manager)
    if args.speed:
        result["speed"] = _eval_speed(args, model)
    return result


def _eval_tasks(args: argparse.Namespace, model: Any, tokenizer: Any, manager: Any) -> dict[str, Any]:
    from rankdown.eval.tasks import evaluate_tasks

    res = evaluate_tasks(model, tokenizer, args.tasks, include_path=args.include_path, limit=args.limit,
                         batch_size=_or(args.batch_size, 8), num_fewshot=args.num_fewshot, manager=manager)
    rows = [{"task": t, **{k: v for k, v in m.items() if k in ("acc", "acc_norm", "samples")}} for t, m in res.items()]
    print(table(rows, ["task", "acc", "acc_norm", "samples"]))
    return res


def _eval_speed(args: argparse.Namespace, model: Any) -> list[dict[str, Any]]:
    from rankdown.eval.speed import compare_speed

    models = {"model": model}
    if args.baseline is not None:
        baseline, _ = load_model(args.baseline, args.dtype)
        models = {"baseline": baseline, "model": model}
    runs, rows = [], []
    for b in _int_list(args.batch_sizes, "--batch-sizes"):
        for length in _int_list(args.lengths, "--lengths"):
            res = compare_speed(models, batch_size=b, prompt_len=length, new_tokens=args.new_tokens,
                                repeats=args.repeats, device=args.device or "cpu")
            runs.append(res)
            for name, f in res["models"].items():
                row = {"model": args.baseline if name == "baseline" else args.model, "batch": b, "prompt": length,
                       "prefill_tok_s": f["prefill_tok_s"], "decode_tok_s": f["decode_tok_s"],
                       "ms_per_token": f["latency_ms_per_token"], "peak_mem_MB": f["peak_mem_bytes"] / 2**20,
                       "model_MB": f["model_bytes"] / 2**20}
                if args.baseline is not None:
                    r = res["ratios"][name]
                    row.update(prefill_x=r["prefill_speedup"], decode_x=r["decode_speedup"],
                               latency_x=r["latency_ratio"], model_mem_x=r["model_bytes_ratio"])
                rows.append(row)
    cols = ["model", "batch", "prompt", "prefill_tok_s", "decode_tok_s", "ms_per_token", "peak_mem_MB", "model_MB"]
    if args.baseline is not None:
        cols += ["prefill_x", "decode_x", "latency_x", "model_mem_x"]
    kind = runs[0]["models"]["model"]["peak_mem_kind"]
    print(f"speed: {args.new_tokens} greedy decode steps after the prompt, fastest of {args.repeats} runs"
          f"{', models alternating' if args.baseline else ''}; peak_mem = {kind.replace('_', ' ')}")
    print(table(rows, cols))
    return runs


def _int_list(text: str, flag: str) -> list[int]:
    from rankdown.config import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes whole numbers separated by commas, e.g. 1,8; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes whole numbers >= 1 separated by commas, e.g. 1,8; got {text!r}")
    return values


def _eval_fidelity(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    from rankdown.eval.fidelity import fidelity, read_passages

    passages = read_passages(args.texts)
    original, _ = load_model(args.fidelity, args.dtype)
    if args.device:  # the model itself is already there (cmd_eval)
        original.to(args.device)
    res = fidelity(model, original, tokenizer, passages, seqlen=_or(args.seqlen, 512),
                   batch_size=_or(args.batch_size, 8), progress=not args.quiet)
    row = {"model": args.model, "original": args.fidelity, **res.to_dict()}
    metrics = ["kl", "top1_agreement"] if res.kind == "causal" else ["cosine", "neighbour_agreement"]
    print(table([row], ["model", "original", "passages", "tokens", *metrics, "seconds"]))
    return {"original": args.fidelity, **res.to_dict()}


def _or(value: Any, default: Any) -> Any:
    """``value`` unless it was not given (None): a given 0 reaches the validation and its error."""
    return default if value is None else value


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
    from rankdown.io import read_record

    from rankdown import gguf_source

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
    if record is None:
        print(f"{path}: a plain Hugging Face model, not compressed by rankdown")
        return {"compressed": False}
    modules = record.get("structure", {}).get("modules", {})
    rows = [{"module": k, **{c: v.get(c, "") for c in ("type", "in", "out", "rank", "bias")}} for k, v in modules.items()]
    print(table(rows, ["module", "type", "in", "out", "rank", "bias"]) if rows else "no module replaced")
    print()
    prov = {k: v for k, v in record.items() if k not in ("structure", "guards", "files")}
    for key, val in prov.items():
        if key != "passes":
            print(f"{key:>16}: {json.dumps(val) if isinstance(val, (dict, list)) else val}")
    for n, p in enumerate(prov.get("passes") or [], 1):
        print(f"{f'pass {n}':>16}: {p.get('method')} at ratio {p.get('ratio_requested')}, "
              f"{p.get('params_before', 0):,} -> {p.get('params_after', 0):,} parameters")
    return {"compressed": True, "modules": len(modules), **prov}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    import rankdown
    from rankdown.calib import check_seqlen
    from rankdown.config import ConfigError
    from rankdown.eval.perplexity import perplexity

    methods = names(args.methods, "--methods", "svd,rom")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for m in methods:  # every setting checked before the minutes of evaluation
        rankdown.make_config(m, ratio=args.ratio)
    if args.nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1 (calibration windows), got {args.nsamples}; e.g. --nsamples 128")
    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {args.seqlen}; e.g. --seqlen 256")
    model, tok = load_model(REFERENCE)
    check_seqlen(model, args.seqlen)
    t0 = time.perf_counter()
    dense = perplexity(model, tok, "reference-heldout", seqlen=args.seqlen, progress=not args.quiet)
    rows = [{"model": "dense", "params": sum(p.numel() for p in model.parameters()), "removed": 0.0,
             "heldout_ppl": dense.ppl, "ppl_change": "", "compress_s": "", "eval_s": time.perf_counter() - t0}]
    print(f"reference model: {rows[0]['params']:,} parameters, held-out perplexity {dense.ppl:.3f} "
          f"({dense.tokens:,} tokens)")
    for m in methods:
        model, tok = load_model(REFERENCE)
        cfg = rankdown.make_config(m, ratio=args.ratio)
        report = rankdown.compress(model, tok, cfg, REFERENCE, run=rankdown.RunSettings(seed=args.seed), nsamples=args.nsamples, seqlen=args.seqlen,
                                   progress=not args.quiet)
        t1 = time.perf_counter()
        res = perplexity(model, tok, "reference-heldout", seqlen=args.seqlen, progress=not args.quiet)
        rows.append({"model": m, "params": report.params_after, "removed": report.ratio_achieved,
                     "heldout_ppl": res.ppl, "ppl_change": f"{100 * (res.ppl / dense.ppl - 1):+.1f}%",
                     "compress_s": report.seconds, "eval_s": time.perf_counter() - t1})
    print()
    print(table(rows, ["model", "params", "removed", "heldout_ppl", "ppl_change", "compress_s", "eval_s"]))
    return {"rows": rows}


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.benchmark import BenchSettings, run_bench
    from rankdown.config import ConfigError

    if not args.out.strip():
        raise ConfigError("--out '' names no folder: give the folder for results.json, results.md and the plots")

    settings = BenchSettings(
        model=_or(args.model, REFERENCE),
        methods=[] if args.methods is None else names(args.methods, "--methods", "svd,rom"),
        ratios=_float_list(args.ratios, "--ratios"), ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
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


def _float_list(text: str, flag: str) -> list[float]:
    from rankdown.config import ConfigError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, e.g. 0.1,0.2; got {text!r}") from None


# ----------------------------------------------------------------------------- parser
def _add_method_flags(p: argparse.ArgumentParser) -> None:
    from rankdown.config import RunSettings

    seen: set[str] = set()
    for cls in [MethodConfig, RunSettings] + [m.config_class for m in METHODS.values()]:
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in ("device", "seed", "batch_size"):  # (their flags are made below)
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            if cls not in (MethodConfig, RunSettings):
                help_ += f" [{cls.method}]"
            if f.name == "exclude":
                p.add_argument(flag, action="append", default=None, help=help_)
            elif str(f.type) == "bool":
                p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_)
                p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=None,
                               help=f"the opposite of {flag}")
            else:
                typ = {"float": float, "int": int, "int | None": int}.get(str(f.type), str)
                p.add_argument(flag, type=typ, default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rankdown", description="Make trained language models smaller.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype the model is loaded in (a GGUF file is dequantized to it)")

    p = sub.add_parser("compress", help="compress a model to a parameter budget")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: the reference model)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    _add_method_flags(p)
    p.add_argument("--calib", default=None, help="wikitext2 | c4 | ptb | reference | FILE.txt | FILE.jsonl")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 256 for the reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the dtype the input model is stored in; "
                        "--dtype for a GGUF file)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration windows per forward pass (default 8; lillama 4: its optimiser steps)")
    p.add_argument("--out", default=None, help="folder to save the compressed model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help="read the model one layer at a time from its safetensors files and write the result "
                        "shard by shard (default when MODEL is such a folder and --out is given)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="load the whole model into memory instead")
    p.add_argument("--restart", action="store_true",
                   help="discard the finished layers a killed streaming run left beside --out instead of "
                        "resuming from them")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="evaluate a model (perplexity; fidelity to its original; "
                                          "lm-eval tasks; speed)")
    p.add_argument("model", help="hub id, local folder, .gguf file, or 'reference'")
    p.add_argument("--ppl", default=None, help="wikitext2 | c4 | ptb | reference-heldout | FILE.txt")
    p.add_argument("--fidelity", default=None, metavar="ORIGINAL",
                   help="compare with the original model (hub id, folder or 'reference'): KL and top-1 "
                        "agreement for causal LMs, embedding cosine and neighbour agreement for encoders")
    p.add_argument("--texts", default=None, metavar="FILE",
                   help="passages for --fidelity, separated by blank lines")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length (default 2048; 256 for the reference); --fidelity: tokens kept "
                        "per passage (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="windows / passages per forward (default 1 / 8)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,arc_challenge,piqa,winogrande,"
                        "hellaswag,boolq,openbookqa; hub tasks need network or the HF datasets cache)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of local task YAML files (--tasks)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (--tasks): a count, or a fraction < 1")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (--tasks; default 0)")
    p.add_argument("--speed", action="store_true",
                   help="prefill and decode tokens/s, latency per token and peak memory")
    p.add_argument("--baseline", default=None, metavar="MODEL",
                   help="with --speed: the dense model, measured in the same run (alternating); ratios printed")
    p.add_argument("--batch-sizes", default="1", help="with --speed: batch sizes, comma-separated (default 1)")
    p.add_argument("--lengths", default="512", help="with --speed: prompt lengths, comma-separated (default 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="with --speed: decode steps (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="with --speed: measured runs, the fastest kept (default 3)")
    p.add_argument("--device", default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="compress with each method at each ratio and evaluate every result")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: the reference model)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method specs, NAME or NAME:key=value:... (e.g. rom:allocation=uniform); "
                        f"default: all ({','.join(METHODS)})")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="fractions of parameters to remove")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--ppl", default=None, help="perplexity text (default: reference-heldout / wikitext2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 256 for the reference)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity on the first N windows only")
    p.add_argument("--calib", default=None, help="calibration source (default: reference / wikitext2)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--degeneration-tokens", type=int, default=64,
                   help="greedy tokens generated per prompt for the repeated-n-gram measure (0: skip)")
    p.add_argument("--tasks", default=None, metavar="NAMES", help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of local task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task")
    p.add_argument("--speed", action="store_true", help="measure speed-up vs the dense model (same run, alternating)")
    p.add_argument("--speed-batch-size", type=int, default=1)
    p.add_argument("--speed-prompt-len", type=int, default=256)
    p.add_argument("--speed-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="speed runs per model, the fastest kept")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="continue a prompt (greedy, or sampled with --sample)")
    p.add_argument("model", help="hub id, local folder, .gguf file, or 'reference'")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (nucleus) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show the ranks and provenance recorded in a compressed model folder")
    p.add_argument("dir", help="a model folder (or .gguf file)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="compress the built-in reference model and compare methods")
    p.add_argument("--methods", default=",".join(METHODS), help=f"default: all ({','.join(METHODS)})")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def _user_errors() -> tuple[type[BaseException], ...]:
    from rankdown.arch import UnsupportedModelError
    from rankdown.config import ConfigError
    from rankdown.io import ModelFolderError

    errors: list[type[BaseException]] = [ConfigError, UnsupportedModelError, ModelFolderError, FileNotFoundError,
                                         FileExistsError]
    try:
        from rankdown.calib import CalibrationError

        errors.append(CalibrationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same clean-up, one line, no traceback."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _notes(e: BaseException) -> str:
    """What the library added to an error on its way out (a partial run kept to resume from)."""
    return "".join(f"; {n}" for n in getattr(e, "__notes__", ()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only process 0 logs and prints
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level if main_process else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' own loading/saving bars drown rankdown's tables
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import signal
    import threading

    handle = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handle else None
    try:
        result = args.func(args)
        if getattr(args, "json", False) and main_process:
            print(json.dumps(result, default=str))
    except BrokenPipeError:  # stdout closed early (`rankdown inspect DIR | head`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"rankdown {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}{_notes(e)}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    except _user_errors() as e:
        who = "" if main_process else f" (process {os.environ.get('RANK')})"
        print(f"rankdown {args.command}{who}: error: {e}{_notes(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a full, read-only or unwritable disk: the data is fine, the place is not
        from rankdown.io import as_disk_error

        disk = as_disk_error(e)
        if disk is None:
            raise
        print(f"rankdown {args.command}: error: {disk_advice(args, disk, _notes(e))}", file=sys.stderr)
        return 2
    finally:
        if handle:
            signal.signal(signal.SIGTERM, previous)
        if "torch" in sys.modules:
            from rankdown.distributed import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
