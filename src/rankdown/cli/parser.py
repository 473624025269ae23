"""The command line's flags. A method's settings become flags from its config dataclass (their
help from the fields' metadata), and so do the run settings: a new setting is a new flag."""

from __future__ import annotations

import argparse
import dataclasses

from rankdown.cli.commands import cmd_bench, cmd_demo, cmd_generate, cmd_inspect
from rankdown.cli.compress import cmd_compress
from rankdown.cli.evaluate import cmd_eval
from rankdown.config import MethodConfig
from rankdown.methods import METHODS


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
    p.add_argument("--calib", default=None, help="wikitext2 | c4 | ptb | reference (code) | prose | self (text the "
                   "model writes) | FILE.txt | FILE.jsonl; A,B: equal shares of each")
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
    p.add_argument("--ppl", default=None, help="wikitext2 | c4 | ptb | reference-heldout | prose-heldout | FILE.txt")
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
