"""The one verb: ``compress(model, tokenizer, config, calibration) -> CompressionReport``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankdown import distributed, heap
from rankdown.allocate import Target, count_params, default_multiple
from rankdown.arch import ArchSpec, spec_for
from rankdown.config import ConfigError, MethodConfig, RunSettings, exclude_pattern
from rankdown.engine import PlanContext, run_sequential
from rankdown.methods import method_class
from rankdown.storage import LayerStore, MemoryBudget, MemoryStore, parse_bytes
from rankdown.stats_cache import StatsCache
from rankdown.timing import Stages, cost_record, dense_forward

log = logging.getLogger(__name__)


@dataclass
class CompressionReport:
    """What a compression did: counts, ratio, time, and every replaced module."""

    method: str
    config: dict[str, Any]
    ratio_requested: float
    params_before: int
    params_after: int
    seconds: float
    calibration: dict[str, Any] | None
    modules: dict[str, dict] = field(default_factory=dict)  # dotted path -> record (type, shape, rank)
    unfused_experts: list[str] = field(default_factory=list)
    guards: dict[str, dict] = field(default_factory=dict)
    layer_seconds: list[float] = field(default_factory=list)
    device: str = "cpu"
    run: dict[str, Any] = field(default_factory=dict)  # the RunSettings the compression ran with
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> JSON value, saved beside the model
    seconds_earlier: float = 0.0  # a resumed streaming run: seconds its earlier, interrupted runs spent
    # the rank allocation that ran (``auto`` resolved, and why it fell back) and its parameter budget;
    # each module's rank is in ``modules``
    allocation: dict[str, Any] | None = None
    heal: dict[str, Any] | None = None  # what healing did (rankdown/heal.py), None when it did not run
    stages: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (rankdown/timing.py)
    forward_seconds: float | None = None  # one dense forward over the calibration tokens (compress(cost=True))
    forward_kind: str | None = None  # how that forward was measured

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def structure(self) -> dict[str, Any]:
        """What io.py needs to rebuild the compressed model's shapes (see nn/portable.py)."""
        return {"unfused_experts": list(self.unfused_experts), "modules": dict(self.modules)}

    def record(self) -> dict[str, Any]:
        """Provenance stored in the saved model's config.json (without the structure)."""
        d = asdict(self)
        for k in ("modules", "unfused_experts", "layer_seconds", "artifacts", "stages", "forward_seconds",
                  "forward_kind"):
            d.pop(k)
        d["cost"] = self.cost()
        d["ratio_achieved"] = self.ratio_achieved
        d["seed"] = self.run.get("seed")
        return d

    def summary(self) -> dict[str, Any]:
        """The flat figures the CLI prints with --json."""
        return {
            "method": self.method, "ratio_requested": self.ratio_requested,
            "params_before": self.params_before, "params_after": self.params_after,
            "ratio_achieved": round(self.ratio_achieved, 6), "seconds": round(self.seconds, 3),
            "modules_replaced": len(self.modules),
            **({} if self.heal is None else {"heal_kl_before": round(self.heal["kl_before"], 6),
                                             "heal_kl_after": round(self.heal["kl_after"], 6),
                                             "heal_seconds": self.heal["seconds"]}),
        }

    def cost(self) -> dict[str, Any]:
        """Seconds per stage and as multiples of one dense forward (rankdown/timing.py)."""
        return cost_record(self.stages, self.forward_seconds, self.forward_kind)

    def to_json(self) -> str:
        return json.dumps({**self.record(), "structure": self.structure}, indent=1)


def find_targets(model: nn.Module, spec: ArchSpec, exclude: list[str] | tuple[str, ...] = ()) -> list[Target]:
    """Every linear of every layer that a method may replace, in layer and group order."""
    path, layers = spec.find_layers(model)
    patterns = [exclude_pattern(p) for p in exclude]
    matched: set[str] = set()
    names: list[str] = []
    targets = []
    for i, layer in enumerate(layers):
        for group in spec.groups(layer):
            for name in group:
                full = f"{path}.{i}.{name}"
                names.append(full)
                hits = [p.pattern for p in patterns if p.search(full)]
                matched.update(hits)
                if hits or name in spec.exclude:
                    continue
                mod = layer.get_submodule(name)
                if isinstance(mod, nn.Linear):
                    targets.append(Target(full, mod.out_features, mod.in_features, mod.bias is not None, i))
    unused = [p.pattern for p in patterns if p.pattern not in matched]
    if unused:
        first = [n for n in names if n.startswith(f"{path}.0.")][:8]
        raise ConfigError(f"--exclude {unused[0]!r} matches no module of this model; the modules it is searched in "
                          f"are named like {', '.join(first)} (regular expressions, e.g. --exclude 'mlp' or "
                          f"--exclude '{path}\\.0\\.')")
    if not targets:
        if (getattr(model.config, "rankdown", None) or {}).get("structure"):
            raise ConfigError("every linear of this model was already replaced by rankdown (see `rankdown "
                              "inspect`); compress the original model to a larger ratio instead")
        raise ConfigError("no linear layer is left to compress: check --exclude patterns")
    return targets


def _warn_small_layer_share(targets: list[Target], params_before: int, ratio: float) -> None:
    """Say what the ratio asks of the layers when they hold little of the model (Gemma 3's 262k-token
    embedding is a quarter to a half of its small models): the rest is kept whole."""
    held = sum(t.dense + (t.out_features if t.bias else 0) for t in targets)
    if held < 0.75 * params_before:
        log.warning("the compressed linears hold %.0f%% of the model's %d parameters (embeddings, head and the "
                    "rest are kept whole): removing %.0f%% of the model removes %.0f%% of theirs",
                    100 * held / params_before, params_before, 100 * ratio, 100 * ratio * params_before / held)


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0) or 0)


def compress(
    model: nn.Module,
    tokenizer: Any,
    config: MethodConfig,
    calibration: Any = None,
    *,
    run: RunSettings | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    progress: bool = True,
    store: LayerStore | None = None,
    heal: Any = None,
    cost: bool = False,
) -> CompressionReport:
    """Compress ``model`` in place to ``config.ratio`` fewer parameters and report what changed.

    calibration: a :class:`rankdown.calib.CalibrationData`, or a source name/path
    (``wikitext2``, ``c4``, ``ptb``, ``reference``, ``prose``, ``self``: text ``model`` writes, a
    .txt or .jsonl file, or a mixture such as ``self,reference``) sampled into
    ``nsamples`` windows of ``seqlen`` tokens with ``run.seed``; unused by data-free methods.
    run: how it runs (device, batch size, seed, memory, statistics cache; default
    :class:`~rankdown.config.RunSettings` ()), apart from what it computes (``config``).
    ``store``: where the layers are kept between their visits (:class:`~rankdown.storage.LayerStore`);
    by default in memory, or a :class:`rankdown.storage.folder.StreamedModel` whose skeleton ``model``
    is, when the layers are read from disk one at a time (see :func:`rankdown.stream.compress_folder`).
    ``cost``: also time one dense forward over the calibration tokens before compressing (not
    counted in the report's seconds), the unit of the report's :meth:`~CompressionReport.cost`.

    Under torchrun every process calls this with the same arguments; the calibration batches are
    split between them and the statistics summed (see :mod:`rankdown.distributed`), and every
    process ends with the same compressed model. Only process 0 shows progress.

    ``heal``: a :class:`rankdown.heal.HealConfig` to distil the compressed model towards the dense
    one afterwards on the same calibration windows (the model in memory only; see rankdown/heal.py).

    The random number generators are seeded with ``run.seed`` inside and restored on the way out:
    the caller's random state is the same after the call as before.
    """
    config.validate()
    run = RunSettings() if run is None else run
    run.validate()
    device = distributed.setup(run.device)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(run.seed)
        return _compress(model, tokenizer, config, run, calibration, device, nsamples, seqlen, progress,
                         MemoryStore(model) if store is None else store, heal, cost)


def _compress(model: nn.Module, tokenizer: Any, config: MethodConfig, run: RunSettings, calibration: Any,
              device: torch.device, nsamples: int, seqlen: int, progress: bool, store: LayerStore,
              heal: Any = None, cost: bool = False) -> CompressionReport:
    timer = Stages()
    with timer.stage("other"):
        report = _compress_timed(model, tokenizer, config, run, calibration, device, nsamples, seqlen, progress,
                                 store, heal, cost, timer)
    report.stages = dict(timer.seconds)
    return report


def _compress_timed(model: nn.Module, tokenizer: Any, config: MethodConfig, run: RunSettings, calibration: Any,
                    device: torch.device, nsamples: int, seqlen: int, progress: bool, store: LayerStore,
                    heal: Any, cost: bool, timer: Stages) -> CompressionReport:
    distributed.barrier()  # every process has checked its arguments before any goes on (and writes)
    progress = progress and distributed.is_main()
    method = method_class(config.method)(config, run)
    batch_size = method.batch_size
    spec = spec_for(model)
    t0 = time.perf_counter()
    params_before = count_params(model)
    # a model rankdown compressed before keeps its earlier replacements in the structure it saves
    earlier = (getattr(model.config, "rankdown", None) or {}).get("structure") or {}
    unfused = list(earlier.get("unfused_experts", [])) + spec.prepare(model)
    targets = find_targets(model, spec, config.exclude)
    _warn_small_layer_share(targets, params_before, config.ratio)
    store.check_finite(progress)  # a NaN met at the last layer would waste the others
    multiple = config.rank_multiple or default_multiple(_hidden_size(model))
    loaded: list[Any] = []  # calibration tokens, loaded once on first use (by plan() or below)

    def load_calibration() -> Any:
        if not loaded:
            from rankdown.calib import check_seqlen

            with timer.stage("calibration"):
                data = _calibration(tokenizer, calibration, nsamples, seqlen, run.seed,
                                    getattr(config, "calib_tokens", None), model=model)  # Lillama's token budget
                check_seqlen(model, data.seqlen)
                loaded.append(data)
                heap.trim()  # what tokenizing left in the tokenizer threads' arenas
        return loaded[0]

    with MemoryBudget(parse_bytes(run.max_memory)) as budget:
        context = PlanContext(model, spec, load_calibration, batch_size, device, progress, budget,
                              store, StatsCache(run.stats_cache) if run.stats_cache else None)
        unit = None
        if cost and (method.needs_calibration or calibration is not None):
            data = load_calibration()
            with timer.paused():
                t_unit = time.perf_counter()
                unit = dense_forward(model, spec, data, batch_size, device, store, budget)
                t0 += time.perf_counter() - t_unit  # not part of the compression's seconds

        def plan() -> dict[str, Any]:
            with timer.stage("allocation"):
                return method.plan(targets, params_before, config.ratio, multiple, context)

        ranks = store.plan(plan)  # a resumed run keeps its plan
        allocation = method.allocation_record(context)  # also on a resumed run, which skips plan()
        if allocation is not None:
            allocation["params_budget"] = round(params_before * (1.0 - config.ratio))
            allocation["modules_compressed"] = len(ranks)

        teacher = None
        if heal is not None:  # the dense model's targets, read before the layers change
            from rankdown.heal import teacher_targets

            if not isinstance(store, MemoryStore) or distributed.world() > 1:
                raise ConfigError("healing needs the whole model in memory in one process: drop --heal, or "
                                  "compress with --no-stream and without torchrun")
            data = load_calibration()
            with timer.stage("healing"):
                teacher = teacher_targets(model, data, heal, device, progress)
        data = load_calibration() if method.needs_calibration else None
        if data is not None and method.ranks_from_statistics:
            _check_enough_tokens(data, ranks)
        modules, guards, layer_seconds = run_sequential(
            model, spec, method, ranks,
            None if data is None else data.input_ids, None if data is None else data.attention_mask,
            batch_size, device, progress, budget, store, timer,
        )
    if budget.spilled:
        log.info("%.1f MB of activations went to disk (max_memory=%s)", budget.spilled / 1e6, run.max_memory)
    report = CompressionReport(
        method=config.method, config=config.to_dict(), ratio_requested=config.ratio,
        params_before=params_before, params_after=count_params(model), seconds=time.perf_counter() - t0,
        calibration=None if not loaded else {**loaded[0].describe(), "seed": run.seed},  # read by plan() or the loop
        modules={**earlier.get("modules", {}), **modules}, unfused_experts=unfused, guards=guards, layer_seconds=layer_seconds,
        device=run.device, run=run.to_dict(), artifacts=method.artifacts(), allocation=allocation,
        forward_seconds=None if unit is None else unit[0], forward_kind=None if unit is None else unit[1],
    )
    log.info("%s: %d -> %d parameters (%.4f removed) in %.1fs", config.method, report.params_before,
             report.params_after, report.ratio_achieved, report.seconds)
    if teacher is not None:
        from rankdown.heal import heal as heal_model

        with timer.stage("healing"):
            report.heal = heal_model(model, teacher, heal, list(report.modules), seed=run.seed, device=device,
                                     progress=progress)
    return report


def _check_enough_tokens(data: Any, ranks: dict[str, Any]) -> None:
    """Refuse a calibration set with fewer tokens than the largest rank asked: its statistics
    cannot tell that many directions apart, and the factors would be arbitrary beyond its size."""
    tokens = int(data.attention_mask.sum())
    asked = [(r, p) for p, r in ranks.items() if isinstance(r, int)]
    if asked and tokens < max(asked)[0]:
        rank, path = max(asked)
        raise ConfigError(
            f"the calibration set has {tokens} tokens, fewer than the rank {rank} asked for {path}: its statistics "
            "cannot determine that many directions; give more calibration (--nsamples, --seqlen) or a higher --ratio")


def _calibration(tokenizer: Any, calibration: Any, nsamples: int, seqlen: int, seed: int, tokens: int | None = None,
                 model: Any = None):
    """The calibration batches of ``calibration``; ``model`` (the dense model, or its folder) writes
    the text of the ``self`` source (see rankdown/calib/selfgen.py)."""
    if calibration is None:
        raise ConfigError("this method needs calibration data: pass calibration='wikitext2' or a .txt/.jsonl path")
    from rankdown.calib import CalibrationData, calibration_data

    if isinstance(calibration, torch.Tensor):
        return CalibrationData(calibration, torch.ones_like(calibration), "tensor")
    if isinstance(calibration, CalibrationData):
        return calibration
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to turn the calibration text into tokens")
    return calibration_data(tokenizer, str(calibration), nsamples=nsamples, seqlen=seqlen, seed=seed, tokens=tokens,
                            model=model)
