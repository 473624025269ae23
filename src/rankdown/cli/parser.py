"""The command line's flags. A method's settings become flags from its config dataclass (their
help from the fields' metadata), and so do the run settings: a new setting is a new flag."""

from __future__ import annotations

import argparse
import dataclasses

from rankdown.cli.commands import cmd_bench, cmd_demo, cmd_generate, cmd_inspect
from rankdown.cli.compress import cmd_compress
from rankdown.cli.evaluate import cmd_eval
from rankdown.config import MethodConfig
from rankdown.heal import HealConfig
from rankdown.methods import METHODS


# the method `rankdown compress` runs when --method is left out, and why (measured: README.md)
DEFAULT_METHOD = "modegpt"
DEFAULT_METHOD_WHY = ("the best or within 4%% of the best held-out perplexity measured on SmolLM2-135M at 30%% "
                      "and Qwen2.5-Coder-0.5B at 20%%, about 4.5x faster than lillama")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default at the end of its help, unless the help says it already (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "default" in help_
                or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._StoreFalseAction))):
            return help_
        return f"{help_} (default: %(default)s)"


def method_lines() -> str:
    """One line per method: what it does (the first paragraph of its config's docstring)."""
    lines = []
    for name, m in METHODS.items():
        doc = (m.config_class.__doc__ or "").strip().split("\n\n")[0]
        lines.append(f"  {name:<8} {' '.join(doc.split())}")
    return "methods (--method; default " + DEFAULT_METHOD + "):\n" + "\n".join(lines)


def _field_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _allocation_help() -> str:
    """--allocation's choices for each method, its default first."""
    per = []
    for name, m in METHODS.items():
        cls = m.config_class
        default = next(_field_default(f) for f in dataclasses.fields(cls) if f.name == "allocation")
        choices = [f"{a} (default)" if a == default else a for a in cls.allocations]
        per.append(f"{name}: {', '.join(choices)}")
    return ("rank allocation; the choices depend on --method: " + "; ".join(per) + ". uniform: one kept fraction of "
            "every linear; fisher: ranks where they cost the model's loss least (a backward pass of the dense model); "
            "auto: fisher where it can run, else global (rom) or strategy (lillama); global (rom): water-filling on "
            "the output spectra; last-k (rom): only the last K layers; block-influence (modegpt): layers that change "
            "their input less lose more; strategy (lillama): the ranks --strategy gives")


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
            if f.name == "allocation":
                help_ = _allocation_help()
            elif _field_default(f) not in (None, [], False) and "default" not in help_:
                help_ += f" (default: {_field_default(f)})"
            if cls not in (MethodConfig, RunSettings):
                help_ += f" [{cls.method}]"
            help_ = help_.replace("%", "%%")
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

    p = sub.add_parser("compress", help="compress a model to a parameter budget", epilog=method_lines(),
                       formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder or .gguf file (default: the reference model)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"what compresses the model (each one is described below); default {DEFAULT_METHOD}: "
                        f"{DEFAULT_METHOD_WHY}")
    _add_method_flags(p)
    p.add_argument("--calib", default=None, help="calibration text: wikitext2 | c4 | ptb | reference (code) | prose | "
                   "self (text the model writes) | FILE.txt | FILE.jsonl; A,B: equal shares of each (default: "
                   "reference for the reference model, else wikitext2)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 256 for the reference)")
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default auto: the dtype the input model is stored in; "
                        "bfloat16 for a GGUF file, whose quantized blocks have no float dtype)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration windows per forward pass (default 8; lillama 4: its optimiser steps)")
    p.add_argument("--out", default=None, help="folder to save the compressed model to (required, unless --dry-run)")
    p.add_argument("--cost", action="store_true",
                   help="also time one dense forward over the calibration tokens before compressing and print the "
                        "seconds per stage as multiples of it (--json carries them as 'cost' without this flag, "
                        "with no multiples)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (ranks or kept sizes per module, parameters before and after, size on disk) "
                        "and write nothing; a method whose plan reads statistics still runs that pass")
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
    heal = p.add_argument_group("healing", "after compression, distil the compressed model towards the dense one "
                                "on the calibration windows, training only the modules compression made")
    heal.add_argument("--heal", action="store_true", help="heal (loads the whole model; rankdown/heal.py)")
    for f in dataclasses.fields(HealConfig):
        heal.add_argument("--heal-" + f.name.replace("_", "-"), dest="heal_" + f.name, default=None, metavar="X",
                          type={"float": float, "str": str}.get(str(f.type), int),
                          help=f.metadata["help"] + ("" if f.default is None else f" (default {f.default})"))
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
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows / passages / prompts per forward (default 1 for --ppl, 8 for --fidelity, 16 for "
                        "--generate and humaneval: prompts decoded together, left-padded)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma-separated: humaneval (OpenAI's HumanEval, pass@1 of greedy completions; runs the "
                        "model's programs, so it needs --allow-code-execution) and/or lm-evaluation-harness tasks "
                        "(e.g. arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq,openbookqa; hub tasks need "
                        "network or the HF datasets cache)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of local task YAML files (--tasks)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (--tasks): a count, or a fraction < 1; humaneval: the first N problems")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="let --tasks humaneval run the programs the model writes. They are written by the model "
                        "and run on your machine: each in its own process with time and memory limits, in a "
                        "temporary folder, without network (where unshare allows) and with destructive os/socket "
                        "calls disabled; still, only pass this for models you are willing to run code from")
    p.add_argument("--humaneval-tokens", type=int, default=384,
                   help="with --tasks humaneval: most new tokens per completion (default 384; a row stops "
                        "earlier at the end of its function)")
    p.add_argument("--generate", action="store_true",
                   help="the generation check: greedy continuations of rankdown's shipped prompts (questions, "
                        "instructions, code requests; through the chat template where the model has one); "
                        "reports the share of repeated 4-grams and distinct-1/2, and writes the samples to --out")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="with --generate / --tasks humaneval: folder for generation.jsonl, generation.md and "
                        "humaneval.jsonl (default: rankdown-eval/<model name>)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (--tasks; default 0)")
    p.add_argument("--speed", action="store_true",
                   help="prefill and decode tokens/s, latency per token and peak memory")
    p.add_argument("--baseline", default=None, metavar="MODEL",
                   help="the dense model, its figures printed beside: with --speed measured in the same run "
                        "(alternating), ratios printed; with --generate and --tasks humaneval measured once per "
                        "model content and settings and cached ($RANKDOWN_CACHE/eval, ~/.cache/rankdown/eval)")
    p.add_argument("--batch-sizes", default="1", help="with --speed: batch sizes, comma-separated (default 1)")
    p.add_argument("--lengths", default="512", help="with --speed: prompt lengths, comma-separated (default 512)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="with --speed: decode steps; with --generate: new tokens per prompt (default 64)")
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
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--degeneration-tokens", type=int, default=64,
                   help="greedy tokens generated per prompt for the repeated-n-gram measure (0: skip)")
    p.add_argument("--tasks", default=None, metavar="NAMES", help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of local task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task")
    p.add_argument("--speed", action="store_true", help="measure speed-up vs the dense model (same run, alternating)")
    p.add_argument("--speed-batch-size", type=int, default=1, help="with --speed: sequences per batch")
    p.add_argument("--speed-prompt-len", type=int, default=256, help="with --speed: prompt tokens")
    p.add_argument("--speed-new-tokens", type=int, default=32, help="with --speed: decode steps")
    p.add_argument("--repeats", type=int, default=3, help="speed runs per model, the fastest kept")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="continue a prompt (greedy, or sampled with --sample)")
    p.add_argument("model", help="hub id, local folder, .gguf file, or 'reference'")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample (nucleus) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show the ranks and provenance recorded in a compressed model folder")
    p.add_argument("dir", help="a model folder (or .gguf file)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="compress the built-in reference model and compare methods")
    p.add_argument("--methods", default=",".join(METHODS), help=f"default: all ({','.join(METHODS)})")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of all parameters to remove")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(func=cmd_demo)
    for each in sub.choices.values():  # every default shown, in every command's --help
        each.formatter_class = HelpFormatter
    return ap
