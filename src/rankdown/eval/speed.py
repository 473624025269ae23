"""Inference speed and memory of a causal LM: prefill and decode throughput, per-token latency.

One measurement feeds a batch of ``batch_size`` synthetic prompts of ``prompt_len`` token ids
(seeded, drawn uniformly from the vocabulary) through the model once (the *prefill*, which fills
the model's own KV cache), then runs ``new_tokens`` greedy *decode* steps, each feeding the argmax
token of every row and the cache back in (no early stop: the count is fixed). Reported are

* ``prefill_tok_s``: ``batch_size * prompt_len / prefill seconds``;
* ``decode_tok_s``: ``batch_size * new_tokens / decode seconds``;
* ``latency_ms_per_token``: decode milliseconds per step (one new token for each row);
* ``peak_mem_bytes``: measured in one more run of each model after the timed ones (so that the
  sampling thread, which takes the interpreter lock every few milliseconds, slows no timed run).
  On CPU the largest resident set size (RSS) of the whole process, sampled every 2 ms during that
  run (so it includes everything else the process holds, e.g. other models); on CUDA
  ``torch.cuda.max_memory_allocated`` since a reset before it (again device-wide).
  ``peak_extra_bytes`` is that peak minus the level just before the run (activations and cache;
  on CPU the allocator often reuses memory freed by earlier runs, so it can be near 0);
  ``model_bytes`` the model's parameters and buffers.

Every run is repeated ``repeats`` times after one warm-up run. The figures use each model's
fastest run (``statistic="min"``, the default, as :mod:`timeit` advises: other work on the machine
only ever makes a run slower, so the fastest is the closest to the model's own cost) or the median
(``statistic="median"``); the other one is kept too, as ``prefill_ms_median`` / ``decode_ms_median``
or ``prefill_ms_min`` / ``decode_ms_min``. Figures depend on the machine and its load: compare
models measured in the same run (:func:`compare_speed` has them take turns at every prefill and
every decode step), not figures from different runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import threading
import time
from typing import Any

import torch
from torch import nn

from rankdown.arch import UnsupportedModelError
from rankdown.config import ConfigError
from rankdown.distributed import check_device

logger = logging.getLogger(__name__)

FIGURES = ("prefill_tok_s", "decode_tok_s", "latency_ms_per_token", "peak_mem_bytes")
STATISTICS = {"min": min, "median": statistics.median}  # how the repeats of one model's run become one figure


# ----------------------------------------------------------------------------- memory
def _current_rss() -> int:
    """Resident set size of this process in bytes (psutil, else /proc/self/statm, else ru_maxrss)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        pass
    try:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux: the lifetime peak is the best there is
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _PeakMemory:
    """Context manager: the peak memory during its body (``.peak``) and the level at entry (``.start``)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = int(torch.cuda.memory_allocated(self.device))
            return self
        self.start = self.peak = _current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _current_rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _current_rss())


# ----------------------------------------------------------------------------- one run
def _check(batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return int(model.config.vocab_size)


def _model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    seen: set[int] = set()
    total = 0
    for t in tensors:  # tied weights count once
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    for name in ("cache", "past_key_values"):
        found = getattr(out, name, None)
        if found is not None:
            return found
    return None


def _cache_argument(model: nn.Module) -> str:
    """The name ``model.forward`` takes the KV cache by (``cache`` from transformers 5.24)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Decoding:
    """One prompt batch through one model, a call at a time: :meth:`prefill`, then :meth:`step` for
    each greedy decode step with the model's own KV cache; each returns its seconds."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> None:
        self.model, self.input_ids, self.device = model, input_ids, input_ids.device
        b, self.length = input_ids.shape
        self.mask = torch.ones((b, self.length + new_tokens), dtype=torch.long, device=self.device)
        self.key = _cache_argument(model)
        self.cache: Any = None
        self.tokens: list[torch.Tensor] = []

    def _next(self, out: Any) -> None:
        self.cache = _cache_of(out)
        if self.cache is None or getattr(out, "logits", None) is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} returned no logits or no KV cache: speed is "
                                        "measured on causal LMs that decode with a cache")
        self.tokens.append(out.logits[:, -1, :].argmax(-1, keepdim=True))  # (b, 1)

    def prefill(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=self.input_ids, attention_mask=self.mask[:, : self.length], use_cache=True)
        self._next(out)
        _sync(self.device)
        return time.perf_counter() - t0

    def step(self) -> float:
        seen = self.length + len(self.tokens)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=self.tokens[-1], attention_mask=self.mask[:, :seen], use_cache=True,
                         **{self.key: self.cache})
        self._next(out)
        _sync(self.device)
        return time.perf_counter() - t0


def _run_once(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, tokens) of one prompt batch ``input_ids`` (b, L) and
    ``new_tokens`` greedy steps with the model's own KV cache; tokens: (b, new_tokens + 1), the
    prefill's argmax and every decode step's."""
    run = _Decoding(model, input_ids, new_tokens)
    prefill = run.prefill()
    decode = sum(run.step() for _ in range(new_tokens))
    return prefill, decode, torch.cat(run.tokens, dim=1)


def _run_lockstep(models: dict[str, nn.Module], input_ids: torch.Tensor, new_tokens: int) -> dict[str, tuple[float, float]]:
    """Name -> (prefill seconds, decode seconds) of every model on one prompt batch, the models taking
    turns at every call (each prefill, then each decode step): a change of the machine's speed,
    which on a shared machine comes and goes within seconds, hits every model alike."""
    runs = {name: _Decoding(m, input_ids, new_tokens) for name, m in models.items()}
    prefill = {name: run.prefill() for name, run in runs.items()}
    decode = dict.fromkeys(runs, 0.0)
    for _ in range(new_tokens):
        for name, run in runs.items():
            decode[name] += run.step()
    return {name: (prefill[name], decode[name]) for name in runs}


# ----------------------------------------------------------------------------- public
def compare_speed(
    models: dict[str, nn.Module],
    *,
    batch_size: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    statistic: str = "min",
) -> dict[str, Any]:
    """Measure several models in one run, taking turns at every prefill and decode step (so drifts
    of the machine's speed hit each alike). The first model is the baseline.

    Returns ``{"settings": {...}, "models": {name: figures}, "ratios": {name: ratios}}``: figures
    as in :func:`speed`; ratios of each model against the first: ``prefill_speedup`` and
    ``decode_speedup`` (tok/s ÷ baseline tok/s), ``latency_ratio`` (ms ÷ baseline ms),
    ``model_bytes_ratio`` and ``peak_mem_ratio`` (process/device-wide peaks: with every model
    loaded at once, compare ``model_bytes_ratio``). Each model is moved to ``device`` and left
    there, in eval mode during the measurement and restored afterwards. All models must accept the
    same token ids (same vocabulary size, or the smallest is used).
    """
    _check(batch_size, prompt_len, new_tokens, repeats)
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if not models:
        raise ConfigError("no model to measure: give at least one")
    device = torch.device(device)
    check_device(device)
    vocab = min(_vocab_size(m) for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).to(device)
    for name, model in models.items():
        can_generate = getattr(model, "can_generate", None)
        if not callable(can_generate) or not can_generate():
            raise UnsupportedModelError(f"{name} ({type(model).__name__}) has no language-model head: speed is "
                                        "measured on causal LMs that decode with a KV cache")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and prompt_len + new_tokens > limit:
            logger.warning("%s: prompt_len + new_tokens = %d exceeds max_position_embeddings %d",
                           name, prompt_len + new_tokens, limit)
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    peaks: dict[str, list[tuple[int, int]]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.to(device).eval()
        with torch.no_grad():
            _run_lockstep(models, input_ids, new_tokens)  # warm-up: kernels, allocator, caches
            for _ in range(repeats):
                for name, t in _run_lockstep(models, input_ids, new_tokens).items():
                    times[name].append(t)
            for name, m in models.items():  # memory in runs of its own: the sampling thread slows a timed run
                with _PeakMemory(device) as mem:
                    _run_once(m, input_ids, new_tokens)
                peaks[name].append((mem.peak, mem.peak - mem.start))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    figures: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        kept = {stat: (STATISTICS[stat](t[0] for t in times[name]), STATISTICS[stat](t[1] for t in times[name]))
                for stat in STATISTICS}
        prefill, decode = kept[statistic]
        other = next(stat for stat in STATISTICS if stat != statistic)
        figures[name] = {
            "prefill_tok_s": batch_size * prompt_len / prefill,
            "decode_tok_s": batch_size * new_tokens / decode,
            "latency_ms_per_token": 1000.0 * decode / new_tokens,
            "prefill_ms": 1000.0 * prefill,
            "decode_ms": 1000.0 * decode,
            f"prefill_ms_{other}": 1000.0 * kept[other][0],
            f"decode_ms_{other}": 1000.0 * kept[other][1],
            "peak_mem_bytes": max(p[0] for p in peaks[name]),
            "peak_extra_bytes": max(p[1] for p in peaks[name]),
            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss",
            "model_bytes": _model_bytes(m),
        }
    base = figures[next(iter(models))]
    ratios = {
        name: {
            "prefill_speedup": f["prefill_tok_s"] / base["prefill_tok_s"],
            "decode_speedup": f["decode_tok_s"] / base["decode_tok_s"],
            "latency_ratio": f["latency_ms_per_token"] / base["latency_ms_per_token"],
            "model_bytes_ratio": f["model_bytes"] / base["model_bytes"],
            "peak_mem_ratio": f["peak_mem_bytes"] / base["peak_mem_bytes"],
        }
        for name, f in figures.items()
    }
    settings = {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                "statistic": statistic, "device": str(device), "seed": seed, "threads": torch.get_num_threads()}
    for name, f in figures.items():
        logger.info("speed %s (b=%d, L=%d, +%d): prefill %.0f tok/s, decode %.0f tok/s, %.2f ms/token",
                    name, batch_size, prompt_len, new_tokens, f["prefill_tok_s"], f["decode_tok_s"],
                    f["latency_ms_per_token"])
    return {"settings": settings, "models": figures, "ratios": ratios}


def speed(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    statistic: str = "min",
) -> dict[str, Any]:
    """Speed and memory of one causal LM (see the module docstring for what each figure means).

    Returns a dict with ``prefill_tok_s``, ``decode_tok_s``, ``latency_ms_per_token``,
    ``peak_mem_bytes`` (plus ``prefill_ms``, ``decode_ms``, ``peak_extra_bytes``,
    ``peak_mem_kind``, ``model_bytes``) and the settings (``batch_size``, ``prompt_len``,
    ``new_tokens``, ``repeats``, ``statistic``, ``device``, ``seed``, ``threads``). The model is moved to
    ``device`` and left there.
    """
    res = compare_speed({"model": model}, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                        repeats=repeats, device=device, seed=seed, statistic=statistic)
    return {**res["models"]["model"], **res["settings"]}


def speed_grid(
    model: nn.Module,
    *,
    baseline: str | None = None,
    dtype: str = "float32",
    batch_sizes: list[int] = (1,),
    lengths: list[int] = (512,),
    new_tokens: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """:func:`compare_speed` at every batch size x prompt length (batch sizes outer), as ``rankdown
    eval --speed`` measures. ``baseline``: the name of a dense model (loaded here, in ``dtype``,
    with :func:`rankdown.loading.load_model`) measured in the same runs as ``"baseline"``, first,
    with ``model`` as ``"model"``. Returns one :func:`compare_speed` result per pair."""
    models = {"model": model}
    if baseline is not None:
        from rankdown.loading import load_model

        models = {"baseline": load_model(baseline, dtype)[0], "model": model}
    return [compare_speed(models, batch_size=b, prompt_len=length, new_tokens=new_tokens, repeats=repeats,
                          device=device)
            for b in batch_sizes for length in lengths]
