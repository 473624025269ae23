"""Zero-shot task accuracy through lm-evaluation-harness, on a model already in memory.

The loaded (compressed) model is wrapped by the harness's Hugging Face class
(``lm_eval.models.huggingface.HFLM``) and evaluated with ``lm_eval.simple_evaluate`` on task
names of the harness (``arc_easy``, ``piqa``, ...; their data comes from the Hugging Face hub,
so offline they need the ``HF_DATASETS`` cache) or on local YAML tasks found under
``include_path`` (e.g. a task whose ``dataset_path: json`` points at a local JSONL file). Local
tasks are looked up first; the harness's own task index (about 15,000 YAML files, slow to read)
is only read when a name is not local.
"""

from __future__ import annotations

import difflib
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rankdown.config import ConfigError

logger = logging.getLogger(__name__)

PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq", "openbookqa")
_FETCH_ERRORS = (ConnectionError, TimeoutError)


class TaskError(ConfigError):
    """A task cannot be run: unknown name, data that cannot be fetched, or lm-eval missing."""


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as e:
        raise TaskError(f"task evaluation needs lm-evaluation-harness, which is not installed ({e}); "
                        "install it with: pip install 'rankdown[eval]'") from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"arc_easy, piqa"`` or a list -> ``["arc_easy", "piqa"]`` (order kept, duplicates dropped)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for n in (n.strip() for n in names):
        if n and n not in out:
            out.append(n)
    if not out:
        raise TaskError("no task given: pass --tasks NAME[,NAME...], e.g. --tasks " + ",".join(PAPER_TASKS))
    return out


def task_manager(tasks: str | Sequence[str], include_path: str | Path | None = None) -> Any:
    """A ``TaskManager`` that knows every name of ``tasks``: the local tasks under ``include_path``
    alone when they cover every name (fast), else those plus the harness's own tasks. An unknown
    name raises :class:`TaskError` naming it (and close matches), before any model runs."""
    names = parse_tasks(tasks)
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise TaskError(f"--include-path {include_path}: no such folder; give the folder holding your "
                            "task YAML files")
        manager = TaskManager(include_path=str(path.resolve()), include_defaults=False)
        if not all(n in manager.all_tasks for n in names):
            manager = TaskManager(include_path=str(path.resolve()), include_defaults=True)
    else:
        manager = TaskManager()
    for name in names:
        if name not in manager.all_tasks and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            _unknown(manager, name)
    return manager


def _unknown(manager: Any, name: str) -> None:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise TaskError(f"unknown task {name!r}{hint}: give a task name of lm-evaluation-harness, or the name "
                    "of a local YAML task and the folder holding it with --include-path DIR")


def _load_one(manager: Any, name: str) -> list[Any]:
    """The built Task/Group objects of ``name`` (its data loaded), or a :class:`TaskError` naming it."""
    try:
        loaded = manager.load([name])
    except KeyError:
        _unknown(manager, name)
    except _FETCH_ERRORS as e:
        raise TaskError(
            f"task {name!r}: its data could not be fetched ({e}). Tasks of the hub need network access, or "
            "their dataset already in the Hugging Face datasets cache (HF_DATASETS_CACHE / HF_HOME); "
            "offline, write a local YAML task over a JSON file and pass --include-path DIR") from None
    except FileNotFoundError as e:
        raise TaskError(f"task {name!r}: a file it needs is missing ({e}); check its dataset_kwargs.data_files "
                        "(use an absolute path)") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: its tasks


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        out[name] = None if value == "N/A" else value
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
    manager: Any = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy of ``model`` on ``tasks`` through lm-evaluation-harness.

    Returns ``{task: {"acc": .., "acc_stderr": .., "acc_norm": .. (when the task defines it),
    "samples": n}}`` for each task (and each subtask of a group). ``limit`` caps the examples per
    task (an int, or a fraction < 1); ``seed`` seeds the harness's sampling. The global RNG states
    (Python, NumPy, torch) are restored afterwards. Unknown tasks and data that cannot be fetched
    raise :class:`TaskError` naming the task, before the model runs. ``manager``: a
    :func:`task_manager` already made for these tasks (made here when not given).
    """
    names = parse_tasks(tasks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if limit is not None and not limit > 0:
        raise TaskError(f"limit must be > 0 (examples per task, or a fraction < 1), got {limit!r}")
    if isinstance(limit, float) and limit >= 1:  # --limit 5 arrives as 5.0: a count, not a fraction
        limit = int(limit)
    if tokenizer is None:
        raise TaskError("task evaluation needs the model's Hugging Face tokenizer (PreTrainedTokenizer)")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager if manager is not None else task_manager(names, include_path)
    built = [obj for name in names for obj in _load_one(manager, name)]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    was_training = model.training
    model.eval()
    py_state = random.getstate()
    np_state = _numpy_state()
    try:
        dev = getattr(model, "device", None)  # simple_evaluate reseeds the GPU's generator too
        with torch.random.fork_rng(devices=[dev] if isinstance(dev, torch.device) and dev.type == "cuda" else []):
            out = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    finally:
        model.train(was_training)
        random.setstate(py_state)
        _set_numpy_state(np_state)
    samples = out.get("n-samples", {})
    results: dict[str, dict[str, Any]] = {}
    for task, entry in out["results"].items():
        row = _metrics(entry)
        if task in samples:
            row["samples"] = samples[task].get("effective")
        results[task] = row
        logger.info("%s: %s", task, row)
    return results


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)
