"""rankdown eval --generate and --tasks humaneval: what a user sees, with the dense model beside.

The --baseline (dense) model's figures come from the cache (:mod:`rankdown.eval.cache`) when they
were measured before with the same content and settings; it is loaded only otherwise. Samples and
per-problem results are written into --out (default ``rankdown-eval/<model name>``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from rankdown.cli.checks import given
from rankdown.cli.output import table


def check_generation_flags(args: argparse.Namespace, humaneval: bool) -> None:
    """The settings of --generate / humaneval, before any model is loaded."""
    from rankdown.config import ConfigError

    if args.generate and args.new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1 (new tokens per prompt), got {args.new_tokens}; e.g. 64")
    if humaneval and args.humaneval_tokens < 1:
        raise ConfigError(f"--humaneval-tokens must be >= 1, got {args.humaneval_tokens}; e.g. 384")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}; e.g. --batch-size 16")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '' names no folder: give the folder for the samples (or leave --out out)")


def out_folder(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out).expanduser()
    name = Path(str(args.model).rstrip("/")).name or "model"
    return Path("rankdown-eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _dense_figures(args: argparse.Namespace, dense: Any, kind: str, settings: dict[str, Any], measure) -> tuple[dict, bool]:
    from rankdown.eval.cache import cached_figures

    settings = {**settings, "dtype": args.dtype, "device": args.device or "cpu"}
    return cached_figures(args.baseline, kind, settings, lambda: measure(*dense.get()))


def run_generation_check(args: argparse.Namespace, model: Any, tokenizer: Any, dense: Any) -> dict[str, Any]:
    from rankdown.eval.gencheck import GenerationCheck, generation_check, prompt_set_version, write_samples

    batch = given(args.batch_size, 16)
    run = lambda m, t: generation_check(m, t, new_tokens=args.new_tokens, batch_size=batch, progress=not args.quiet)
    checks = {"model": run(model, tokenizer)}
    cached = None
    if args.baseline is not None:
        figures, cached = _dense_figures(args, dense, "generation", {"new_tokens": args.new_tokens, "batch_size": batch,
                                         "prompts": prompt_set_version()}, lambda m, t: run(m, t).to_dict())
        checks["baseline"] = GenerationCheck.from_dict(figures)
    names = {"model": args.model, "baseline": args.baseline}
    files = write_samples(out_folder(args), checks, names)
    rows = [{"model": names[k], "repetition": c.repetition, "distinct_1": c.distinct_1, "distinct_2": c.distinct_2,
             "tokens": c.tokens, "tokens_per_s": c.tokens_per_s} for k, c in checks.items()]
    print(f"generation check: {checks['model'].prompts} prompts, greedy, {args.new_tokens} new tokens each"
          f"{', through the chat template' if checks['model'].chat else ''}"
          f"{'; baseline from the cache' if cached else ''}")
    print(table(rows, ["model", "repetition", "distinct_1", "distinct_2", "tokens", "tokens_per_s"]))
    print(f"samples: {files[1]}")
    if "baseline" in checks and checks["baseline"].chat != checks["model"].chat:
        has, lacks = ("model", "baseline") if checks["model"].chat else ("baseline", "model")
        print(f"warning: only the {has}'s tokenizer has a chat template, so the {lacks}'s prompts went in as plain "
              f"text and the figures do not compare; give the {lacks} the same tokenizer files", file=sys.stderr)
    out = checks["model"].to_dict(samples=False)
    if "baseline" in checks:
        out["baseline"] = {"model": args.baseline, "cached": cached, **checks["baseline"].to_dict(samples=False)}
    out["files"] = [str(f) for f in files]
    return out


def run_humaneval(args: argparse.Namespace, model: Any, tokenizer: Any, dense: Any, limit: int | None) -> dict[str, Any]:
    from rankdown.eval.humaneval import HumanEvalResult, humaneval, write_results

    batch = given(args.batch_size, 16)
    run = lambda m, t: humaneval(m, t, limit=limit, allow_code_execution=True, max_new_tokens=args.humaneval_tokens,
                                 batch_size=batch, progress=not args.quiet)
    results = {"model": run(model, tokenizer)}
    cached = None
    if args.baseline is not None:
        figures, cached = _dense_figures(args, dense, "humaneval", {"limit": limit, "batch_size": batch,
                                         "max_new_tokens": args.humaneval_tokens}, lambda m, t: run(m, t).to_dict())
        results["baseline"] = HumanEvalResult.from_dict(figures)
    path = write_results(out_folder(args), results)
    names = {"model": args.model, "baseline": args.baseline}
    rows = [{"model": names[k], "passed": r.passed, "problems": r.problems, "pass@1": r.pass_at_1,
             "generate_s": r.generate_s, "cpu_s": r.generate_cpu_s, "tokens_per_s": r.tokens_per_s} for k, r in results.items()]
    print(f"humaneval: greedy completions (at most {args.humaneval_tokens} new tokens, batches of {batch}), each "
          f"program run in a sandbox{'; baseline from the cache' if cached else ''}")
    print(table(rows, ["model", "passed", "problems", "pass@1", "generate_s", "cpu_s", "tokens_per_s"]))
    if "baseline" in results and results["baseline"].pass_at_1 > 0:
        print(f"kept {results['model'].pass_at_1 / results['baseline'].pass_at_1:.1%} of the baseline's pass@1")
    print(f"completions and results: {path}")
    out = results["model"].to_dict(results=False)
    if "baseline" in results:
        out["baseline"] = {"model": args.baseline, "cached": cached, **results["baseline"].to_dict(results=False)}
    out["file"] = str(path)
    return out
