"""rankdown eval: which evaluations the flags ask for, checked before the model is loaded; each
one's table printed as it finishes (perplexity, fidelity, generation check, tasks with HumanEval,
speed)."""

from __future__ import annotations

import argparse
from typing import Any

from rankdown.cli.checks import given, int_list
from rankdown.cli.output import table
from rankdown.loading import defaults_for, load_model, no_tokenizer


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown.config import ConfigError

    if args.ppl is None and args.fidelity is None and args.tasks is None and not args.speed and not args.generate:
        raise ConfigError("nothing to evaluate: pass --ppl SOURCE (perplexity), --fidelity ORIGINAL --texts FILE "
                          "(agreement with the original model), --generate (greedy samples: repetition, "
                          "distinct-n), --tasks NAMES (humaneval; lm-evaluation-harness accuracy) and/or --speed "
                          "(throughput and memory)")
    if (args.fidelity is None) != (args.texts is None):
        raise ConfigError("--fidelity ORIGINAL and --texts FILE go together: pass both "
                          "(FILE holds passages separated by blank lines)")
    if (args.include_path is not None or args.limit is not None) and args.tasks is None:
        raise ConfigError("--include-path and --limit are settings of --tasks: add --tasks NAMES")
    humaneval, humaneval_limit, lm_tasks = _split_tasks(args)
    if args.baseline is not None and not (args.speed or args.generate or humaneval):
        raise ConfigError("--baseline MODEL is the dense model that --speed, --generate and --tasks humaneval "
                          "compare against: add one of them")
    if args.out is not None and not (args.generate or humaneval):
        raise ConfigError("--out DIR is where --generate and --tasks humaneval write their samples: add one of them "
                          "(or drop --out)")
    manager = None
    if lm_tasks:  # unknown task names fail before the model is loaded
        from rankdown.eval.tasks import task_manager

        manager = task_manager(lm_tasks, args.include_path)
    from rankdown.distributed import check_device

    check_device(args.device)
    if args.seqlen is not None and args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {args.seqlen}; e.g. --seqlen 2048")
    if args.ppl is not None:
        from rankdown.calib import check_source

        check_source(args.ppl)
    if args.generate or humaneval:
        from rankdown.cli.evaluate_gen import check_generation_flags

        check_generation_flags(args, humaneval)
    if args.speed:  # (malformed lists fail before the model is loaded)
        batch_sizes, lengths = int_list(args.batch_sizes, "--batch-sizes"), int_list(args.lengths, "--lengths")
    model, tokenizer = load_model(args.model, args.dtype)
    if args.device:  # every evaluation below runs where the model is
        model.to(args.device)
    needs = [n for n, on in (("perplexity", args.ppl), ("fidelity", args.fidelity), ("--tasks", args.tasks),
                             ("--generate", args.generate)) if on]
    if tokenizer is None and needs:
        raise FileNotFoundError(no_tokenizer(args.model, needs[0]))
    if args.seqlen is not None:
        from rankdown.calib import check_seqlen

        check_seqlen(model, args.seqlen)
    result: dict[str, Any] = {"model": args.model}
    if args.ppl is not None:
        from rankdown.eval.perplexity import perplexity

        seqlen = given(args.seqlen, defaults_for(args.model).seqlen)
        res = perplexity(model, tokenizer, args.ppl, seqlen=seqlen, batch_size=given(args.batch_size, 1),
                         device=args.device, max_windows=args.max_windows, progress=not args.quiet)
        result.update(res.to_dict())
        print(table([result], ["model", "source", "seqlen", "tokens", "ppl", "seconds"]))
    if args.fidelity is not None:
        fid = _fidelity(args, model, tokenizer)
        if args.ppl is not None:  # perplexity's keys stay at the top level; fidelity's nest
            result["fidelity"] = fid
        else:
            result.update(fid)
    dense = _Dense(args)
    if args.generate:
        from rankdown.cli.evaluate_gen import run_generation_check

        result["generate"] = run_generation_check(args, model, tokenizer, dense)
    if humaneval:
        from rankdown.cli.evaluate_gen import run_humaneval

        result["humaneval"] = run_humaneval(args, model, tokenizer, dense, humaneval_limit)
    if lm_tasks:
        result["tasks"] = _tasks(args, model, tokenizer, manager, lm_tasks)
    if args.speed:
        result["speed"] = _speed(args, model, batch_sizes, lengths)
    return result


def _split_tasks(args: argparse.Namespace) -> tuple[bool, int | None, list[str]]:
    """--tasks split into (whether HumanEval is asked for, its problem limit) and lm-eval's names;
    HumanEval's preconditions (the opt-in, the package, a whole-number --limit) checked here."""
    if args.tasks is None:
        return False, None, []
    from rankdown.eval.tasks import parse_tasks

    names = parse_tasks(args.tasks)
    lm = [n for n in names if n.lower() != "humaneval"]
    if len(lm) == len(names):
        return False, None, lm
    from rankdown.eval.humaneval import NEEDS_OPT_IN, HumanEvalError, read_humaneval

    if not args.allow_code_execution:
        raise HumanEvalError(NEEDS_OPT_IN)
    limit = args.limit
    if limit is not None and (limit < 1 or limit != int(limit)):
        raise HumanEvalError(f"--limit {limit:g} with humaneval: give a whole number of problems >= 1, e.g. --limit 40")
    limit = None if limit is None else int(limit)
    read_humaneval(limit)  # (the package is there)
    return True, limit, lm


class _Dense:
    """The --baseline model, loaded only when a figure of it is not in the cache, and once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name, self.dtype, self.device, self._loaded = args.baseline, args.dtype, args.device, None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            model, tok = load_model(self.name, self.dtype)
            if tok is None:
                raise FileNotFoundError(no_tokenizer(self.name, "the baseline"))
            if self.device:
                model.to(self.device)
            self._loaded = (model, tok)
        return self._loaded


def _fidelity(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    from rankdown.eval.fidelity import fidelity_to

    res = fidelity_to(model, tokenizer, args.fidelity, args.texts, dtype=args.dtype, device=args.device,
                      seqlen=given(args.seqlen, 512), batch_size=given(args.batch_size, 8), progress=not args.quiet)
    row = {"model": args.model, "original": args.fidelity, **res.to_dict()}
    metrics = ["kl", "top1_agreement"] if res.kind == "causal" else ["cosine", "neighbour_agreement"]
    print(table([row], ["model", "original", "passages", "tokens", *metrics, "seconds"]))
    return {"original": args.fidelity, **res.to_dict()}


def _tasks(args: argparse.Namespace, model: Any, tokenizer: Any, manager: Any, names: list[str]) -> dict[str, Any]:
    from rankdown.eval.tasks import evaluate_tasks

    res = evaluate_tasks(model, tokenizer, names, include_path=args.include_path, limit=args.limit,
                         batch_size=given(args.batch_size, 8), num_fewshot=args.num_fewshot, manager=manager)
    rows = [{"task": t, **{k: v for k, v in m.items() if k in ("acc", "acc_norm", "samples")}} for t, m in res.items()]
    print(table(rows, ["task", "acc", "acc_norm", "samples"]))
    return res


def _speed(args: argparse.Namespace, model: Any, batch_sizes: list[int], lengths: list[int]) -> list[dict[str, Any]]:
    from rankdown.eval.speed import speed_grid

    runs = speed_grid(model, baseline=args.baseline, dtype=args.dtype, batch_sizes=batch_sizes, lengths=lengths,
                      new_tokens=args.new_tokens, repeats=args.repeats, device=args.device or "cpu")
    rows = []
    for res in runs:
        for name, f in res["models"].items():
            row = {"model": args.baseline if name == "baseline" else args.model, "batch": res["settings"]["batch_size"],
                   "prompt": res["settings"]["prompt_len"], "prefill_tok_s": f["prefill_tok_s"],
                   "decode_tok_s": f["decode_tok_s"], "ms_per_token": f["latency_ms_per_token"],
                   "peak_mem_MB": f["peak_mem_bytes"] / 2**20, "model_MB": f["model_bytes"] / 2**20}
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
