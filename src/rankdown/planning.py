"""What a compression would do, without doing it: ``rankdown compress --dry-run``.

:func:`plan_model` builds the model the way the real run would (streamed from its files when the
real run would stream, else in memory), asks the method for its plan (ranks, or MoDeGPT's kept
sizes), which may run a statistics pass over the dense model, and counts the parameters and the
bytes the compressed folder would hold. Nothing is compressed and nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from rankdown.config import MethodConfig, RunSettings

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The plan of one compression: what each target becomes, and the counts after."""

    method: str
    ratio_requested: float
    params_before: int
    params_after: int
    save_dtype: str
    bytes_on_disk: int  # the saved weights: parameters after x the size of one in ``save_dtype``
    streamed: bool
    # dotted module path -> rank (low-rank methods) or kept inner size (modegpt: q/k and v head sizes, MLP width)
    ranks: dict[str, int] = field(default_factory=dict)
    targets: int = 0  # linears that could be replaced
    kept_sizes: bool = False  # ranks are kept sizes (modegpt), not ranks

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ratio_requested": self.ratio_requested, "params_before": self.params_before,
                "params_after": self.params_after, "ratio_achieved": round(self.ratio_achieved, 6),
                "save_dtype": self.save_dtype, "bytes_on_disk": self.bytes_on_disk, "streamed": self.streamed,
                "targets": self.targets, "kept_sizes": self.kept_sizes, "ranks": dict(self.ranks)}


def plan_model(
    model: str | None,
    config: MethodConfig,
    calibration: Any,
    *,
    run: RunSettings | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    dtype: str = "float32",
    save: str = "auto",
    stream: bool | None = None,
    progress: bool = True,
) -> Plan:
    """The plan of compressing model ``model`` (a name as :func:`rankdown.loading.load_model` takes
    it) with ``config``; the arguments mean what they mean to :func:`rankdown.pipeline.compress_model`."""
    from rankdown.loading import load_model, save_dtype, should_stream

    config.validate()
    run = run or RunSettings()
    run.validate()
    # the real run streams when it is given --out: plan as it would run
    if should_stream(model, "dry-run", config.method, stream):
        from rankdown.io import has_tokenizer, load_tokenizer
        from rankdown.storage.folder import StreamedModel

        saved_as = save_dtype(model, save, dtype)
        streamed = StreamedModel(model, getattr(torch, dtype), None, saved_as)
        path = streamed.path
        tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
        return _plan(streamed.model, tokenizer, config, calibration, run, nsamples, seqlen, progress, saved_as,
                     streamed)
    loaded, tokenizer = load_model(model, dtype)  # (a name that is no model fails here, as in the real run)
    return _plan(loaded, tokenizer, config, calibration, run, nsamples, seqlen, progress,
                 save_dtype(model, save, dtype), None)


def _plan(model: torch.nn.Module, tokenizer: Any, config: MethodConfig, calibration: Any, run: RunSettings,
          nsamples: int, seqlen: int, progress: bool, saved_as: torch.dtype, store: Any) -> Plan:
    """What :func:`rankdown.api.compress` does up to the plan, and the counts of that plan."""
    from rankdown import distributed
    from rankdown.allocate import count_params, default_multiple
    from rankdown.api import _calibration, _hidden_size, find_targets
    from rankdown.arch import spec_for
    from rankdown.engine import PlanContext
    from rankdown.methods import method_class
    from rankdown.stats_cache import StatsCache
    from rankdown.storage import MemoryBudget, MemoryStore, parse_bytes

    device = distributed.setup(run.device)
    method = method_class(config.method)(config, run)
    spec = spec_for(model)
    params_before = count_params(model)
    spec.prepare(model)
    targets = find_targets(model, spec, config.exclude)
    store = MemoryStore(model) if store is None else store
    store.check_finite(progress)
    multiple = config.rank_multiple or default_multiple(_hidden_size(model))
    loaded: list[Any] = []

    def load_calibration() -> Any:
        if not loaded:
            from rankdown.calib import check_seqlen

            data = _calibration(tokenizer, calibration, nsamples, seqlen, run.seed, getattr(config, "calib_tokens", None))
            check_seqlen(model, data.seqlen)
            loaded.append(data)
        return loaded[0]

    cuda = list(range(torch.cuda.device_count())) if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), MemoryBudget(parse_bytes(run.max_memory)) as budget:
        torch.manual_seed(run.seed)
        context = PlanContext(model, spec, load_calibration, method.batch_size, device, progress, budget, store,
                              StatsCache(run.stats_cache) if run.stats_cache else None)
        ranks = method.plan(targets, params_before, config.ratio, multiple, context)
    if method.needs_calibration and method.ranks_from_statistics:  # what the real run refuses next
        from rankdown.api import _check_enough_tokens

        _check_enough_tokens(load_calibration(), ranks)
    allocation = method.artifacts().get("modegpt_allocation.json") or {}
    if "params_after" in allocation:  # kept sizes: the method counts its own narrower modules
        params_after = int(allocation["params_after"])
    else:
        with_bias = bool(getattr(config, "center", False)) and config.method == "rom"  # ROM's mean goes in a bias
        by_path = {t.path: t for t in targets}
        params_after = params_before - sum(by_path[p].dense - by_path[p].cost(r, with_bias)
                                           for p, r in ranks.items() if p in by_path)
    itemsize = torch.empty((), dtype=saved_as).element_size()
    return Plan(method=config.method, ratio_requested=config.ratio, params_before=params_before,
                params_after=params_after, save_dtype=str(saved_as).split(".")[1],
                bytes_on_disk=params_after * itemsize, streamed=store.streams,
                ranks={p: int(r) for p, r in ranks.items()}, targets=len(targets),
                kept_sizes="params_after" in allocation)
