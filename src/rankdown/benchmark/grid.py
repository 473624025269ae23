"""The grid of methods x ratios on one model: perplexity, degeneration, tasks and speed.

:func:`run_bench` loads the model once, evaluates the dense model once, samples the calibration
windows once (every cell compresses from the same :class:`~rankdown.calib.CalibrationData`; the
per-layer statistics cannot be shared, since each method's later layers see its own earlier
ones), then for each cell compresses a fresh copy of the dense model with :func:`rankdown.compress`
and evaluates it. A cell that raises is recorded with its error; the grid goes on. It writes
``results.json`` (every figure, the settings and the library versions), ``results.md`` (tables:
rows methods, columns ratios) and ``ppl_vs_ratio.png`` / ``speedup_vs_ratio.png`` into one folder.
results.json and results.md are rewritten after every cell, marked ``"complete": false`` until the
last: the same command run again after an interruption carries the grid on from the cells it has
(failed cells are tried again); other settings are refused, ``--overwrite`` starts over.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankdown.benchmark.report import write_results
from rankdown.config import ConfigError
from rankdown.distributed import check_device
from rankdown.loading import REFERENCE, defaults_for, is_reference

logger = logging.getLogger("rankdown.benchmark")


@dataclass
class BenchSettings:
    """Everything a grid run depends on; stored in results.json."""

    model: str = REFERENCE
    methods: list[str] = field(default_factory=list)  # NAME or NAME:key=value:key=value
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    ppl: str | None = None  # evaluation text (default: rankdown.loading.defaults_for the model)
    seqlen: int | None = None  # (default: ditto)
    max_windows: int | None = None  # perplexity on the first N windows only
    calib: str | None = None  # (default: ditto)
    nsamples: int = 128
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    degeneration_tokens: int = 64  # 0 skips the degeneration measure
    # of the degeneration measure (the generation check): None = rankdown's shipped prompts, through the
    # chat template where the model has one; the reference model's default is its code prompts
    prompts: list[str] | None = None
    tasks: list[str] | None = None
    include_path: str | None = None
    limit: float | None = None
    speed: bool = False
    speed_batch_size: int = 1
    speed_prompt_len: int = 256
    speed_new_tokens: int = 32
    speed_repeats: int = 3

    def resolve(self) -> "BenchSettings":
        """A copy with the model-dependent defaults (:func:`rankdown.loading.defaults_for`) filled in."""
        defaults = defaults_for(self.model)
        s = copy.deepcopy(self)
        s.model = _or(s.model, REFERENCE)  # a given '' or 0 reaches the checks and their errors
        s.ppl = _or(s.ppl, defaults.ppl)
        s.calib = _or(s.calib, defaults.calib)
        s.seqlen = _or(s.seqlen, defaults.seqlen)
        if s.prompts is None and is_reference(s.model):
            s.prompts = list(defaults.prompts)
        if not s.methods:
            from rankdown.methods import METHODS

            s.methods = list(METHODS)
        return s


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``rom:allocation=uniform:center=false`` -> ``("rom", {"allocation": "uniform", "center": False})``."""
    name, *pairs = spec.strip().split(":")
    settings: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"method spec {spec!r}: {pair!r} is not key=value; write e.g. rom:allocation=uniform")
        key, value = pair.split("=", 1)
        try:
            settings[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip().replace("-", "_")] = value
    return name, settings


def _check(settings: BenchSettings) -> dict[tuple[str, float], Any]:
    """Every cell's (method config, run settings), validated: unknown methods or settings fail
    before any work."""
    from rankdown.config import RunSettings, split_settings
    from rankdown.methods import METHODS, make_config

    from rankdown.calib import check_size, check_source

    if not settings.ratios:
        raise ConfigError("no ratio given: pass --ratios, e.g. 0.1,0.2,0.3")
    if settings.prompts is not None and not settings.prompts and settings.degeneration_tokens:
        raise ConfigError("no prompt for the degeneration measure: give prompts, or degeneration_tokens=0")
    if settings.nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1 (calibration windows), got {settings.nsamples}")
    if settings.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {settings.seqlen}")
    check_source(settings.calib)
    check_source(settings.ppl)
    check_size(settings.nsamples, settings.seqlen)
    check_device(settings.device)
    configs = {}
    for spec in settings.methods:
        name, extra = parse_method(spec)
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}")
        own, run = split_settings(extra)  # a spec may set a run setting too (lillama:batch_size=2)
        run = RunSettings(**{"seed": settings.seed, "device": settings.device, **run})
        for ratio in settings.ratios:
            configs[(spec, ratio)] = (make_config(name, ratio=ratio, **own), run)
    if settings.speed:
        from rankdown.eval.speed import _check as check_speed

        check_speed(settings.speed_batch_size, settings.speed_prompt_len, settings.speed_new_tokens,
                    settings.speed_repeats)
    return configs


def degeneration(model: torch.nn.Module, tokenizer: Any, prompts: list[str] | None, new_tokens: int,
                 progress: bool = False) -> dict[str, Any]:
    """The generation check (:func:`rankdown.eval.gencheck.generation_check`) of ``prompts`` (None:
    the shipped set): ``repetition`` (mean share of repeated 4-grams; 0: none repeat), ``distinct_2``
    and ``samples`` (prompt and greedy continuation, to be read)."""
    from rankdown.eval.gencheck import generation_check

    res = generation_check(model, tokenizer, prompts, new_tokens=new_tokens, progress=progress)
    return {"repetition": res.repetition, "distinct_2": res.distinct_2,
            "samples": [{"prompt": x["prompt"], "text": x["text"]} for x in res.samples]}


def _dense_degeneration(model, tok, s: BenchSettings, progress: bool) -> dict[str, Any]:
    """The dense model's generation check, from the cache when this model's content was checked before."""
    from rankdown.eval.cache import cached_figures
    from rankdown.eval.gencheck import prompt_set_version

    key = {"new_tokens": s.degeneration_tokens, "prompts": s.prompts or prompt_set_version(), "dtype": s.dtype,
           "device": s.device, "batch_size": 16}
    figures, _ = cached_figures(s.model, "bench-generation", key,
                                lambda: degeneration(model, tok, s.prompts, s.degeneration_tokens, progress))
    return figures


def _evaluate(model, tok, s: BenchSettings, manager: Any, progress: bool = False, dense: bool = False) -> dict[str, Any]:
    """Perplexity, degeneration and tasks of one model (dense or compressed), moved to ``s.device``."""
    from rankdown.eval.perplexity import perplexity

    model.to(s.device)
    res = perplexity(model, tok, s.ppl, seqlen=s.seqlen, max_windows=s.max_windows, device=s.device,
                     progress=progress)
    row: dict[str, Any] = {"ppl": res.ppl, "ppl_tokens": res.tokens, "eval_s": res.seconds}
    if s.degeneration_tokens:
        row.update(_dense_degeneration(model, tok, s, progress) if dense else
                   degeneration(model, tok, s.prompts, s.degeneration_tokens, progress))
    if s.tasks:
        from rankdown.eval.tasks import evaluate_tasks

        row["tasks"] = evaluate_tasks(model, tok, s.tasks, limit=s.limit, manager=manager)
    return row


def _speed(dense, model, s: BenchSettings) -> dict[str, Any]:
    from rankdown.eval.speed import compare_speed

    res = compare_speed({"dense": dense, "compressed": model}, batch_size=s.speed_batch_size,
                        prompt_len=s.speed_prompt_len, new_tokens=s.speed_new_tokens, repeats=s.speed_repeats,
                        device=s.device)
    return {**res["ratios"]["compressed"], "compressed": res["models"]["compressed"], "dense": res["models"]["dense"]}


def _versions(with_tasks: bool) -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("rankdown", "torch", "transformers") + (("lm_eval",) if with_tasks else ()):
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def run_bench(settings: BenchSettings, out: str | Path, *, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Run the grid of ``settings`` and write its results into the folder ``out``; returns results.json's dict."""
    from rankdown.allocate import count_params
    from rankdown.calib import calibration_data, check_seqlen
    from rankdown.loading import load_model, no_tokenizer
    from rankdown.methods import method_class

    s = settings.resolve()
    configs = _check(s)
    out = Path(out)
    done = _resumable(out, s, overwrite)
    manager = None
    if s.tasks:
        from rankdown.eval.tasks import task_manager

        manager = task_manager(s.tasks, s.include_path)
    dense, tok = load_model(s.model, s.dtype)
    if tok is None:
        raise FileNotFoundError(no_tokenizer(s.model, "the benchmark"))
    check_seqlen(dense, s.seqlen)
    t0 = time.perf_counter()
    needs_calib = any(method_class(c.method).reads_calibration(c) for c, _ in configs.values())
    calib = (calibration_data(tok, s.calib, nsamples=s.nsamples, seqlen=s.seqlen, seed=s.seed, model=dense)
             if needs_calib else None)
    results: dict[str, Any] = {
        "settings": asdict(s), "versions": _versions(bool(s.tasks)),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {s.device}",
        "calibration": None if calib is None else {**calib.describe(), "seed": s.seed},
        "complete": False, "seconds": 0.0,
    }
    if done is not None:  # a grid interrupted earlier: its dense row and finished cells are kept
        results.update(dense=done["dense"], cells=list(done["cells"]), seconds=done.get("seconds") or 0.0)
        logger.warning("bench: resuming the grid in %s, %d of %d cells already done", out, len(done["cells"]),
                       len(configs))
    else:
        results.update(dense={"params": count_params(dense), **_evaluate(dense, tok, s, manager, progress, dense=True)},
                       cells=[])
    dense.to("cpu")  # kept on the host between cells: one model at a time on the device
    _save_partial(results, out, t0)  # the dense row: an interruption now does not evaluate it again
    finished = {(c["method"], c["ratio"]) for c in results["cells"]}
    cells = [(key, cfg) for key, cfg in configs.items() if key not in finished]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), initial=len(configs) - len(cells), desc="bench", unit="cell")
    try:
        for (spec, ratio), cfg in cells:
            if bar is not None:
                bar.set_postfix_str(f"{spec} {ratio:g}")
            results["cells"].append(_cell(dense, tok, spec, ratio, cfg, calib, s, manager, results["dense"],
                                          progress))
            results["cells"].sort(key=lambda c: list(configs).index((c["method"], c["ratio"])))
            _save_partial(results, out, t0)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt as e:
        e.add_note(f"the {len(results['cells'])} finished cells are kept in {out / 'results.json'}: run the same "
                   "command again to carry the grid on, or add --overwrite to start over")
        raise
    finally:
        if bar is not None:
            bar.close()
    results["seconds"] += time.perf_counter() - t0
    results["complete"] = True
    results["files"] = write_results(results, out)
    return results


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed grid must share with the one it carries on (methods and ratios may grow)."""
    return {k: v for k, v in settings.items() if k not in ("methods", "ratios")}


def _resumable(out: Path, s: BenchSettings, overwrite: bool) -> dict[str, Any] | None:
    """The unfinished grid in ``out`` to carry on, or None to start afresh; refuses to mix settings."""
    path = out / "results.json"
    if not path.exists() or overwrite:
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileExistsError(f"{out} holds a results.json that cannot be read ({e}): choose another --out "
                              "or pass --overwrite to replace it") from None
    if old.get("complete", True):
        raise FileExistsError(f"{out} already holds results.json: choose another --out or pass --overwrite")
    before, now = _comparable(old.get("settings", {})), _comparable(json.loads(json.dumps(asdict(s))))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise FileExistsError(f"{out} holds an unfinished grid run with other settings ({', '.join(changed)} "
                              "differ): run the same command to carry it on, choose another --out, or pass "
                              "--overwrite to start over")
    wanted = {(m, r) for m in s.methods for r in s.ratios}
    old["cells"] = [c for c in old.get("cells", []) if (c["method"], c["ratio"]) in wanted and "error" not in c]
    return old


def _save_partial(results: dict[str, Any], out: Path, t0: float) -> None:
    """results.json and results.md after each cell, marked unfinished: an interrupted grid keeps its cells."""
    partial = {**results, "seconds": results["seconds"] + time.perf_counter() - t0}
    partial["files"] = write_results(partial, out, plots=False)


def _cell(dense, tok, spec, ratio, cfg_run, calib, s: BenchSettings, manager, dense_row,
          progress: bool = False) -> dict[str, Any]:
    import rankdown

    cfg, run = cfg_run
    cell: dict[str, Any] = {"method": spec, "ratio": ratio}
    try:
        model = copy.deepcopy(dense)
        rep = rankdown.compress(model, tok, cfg, calib, run=run, nsamples=s.nsamples, seqlen=s.seqlen, progress=False,
                                cost=True)
        cell.update(ratio_achieved=rep.ratio_achieved, params=rep.params_after, compress_s=rep.seconds,
                    cost=rep.cost())
        cell.update(_evaluate(model, tok, s, manager, progress))
        cell["ppl_change"] = cell["ppl"] / dense_row["ppl"] - 1
        if s.speed:
            cell["speed"] = _speed(dense, model, s)
    except Exception as e:  # one failing cell must not lose the rest of the grid
        logger.warning("bench cell %s at %g failed: %s: %s", spec, ratio, type(e).__name__, e)
        cell["error"] = f"{type(e).__name__}: {e}"
    finally:
        dense.to("cpu")  # the speed comparison leaves it on the device
    return cell
