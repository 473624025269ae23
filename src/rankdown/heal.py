"""Healing: after compression, distil the compressed model towards the dense model, end to end.

What is trained: only what compression created, the parameters of the linears inside the modules
the report lists (``report.modules``: low-rank factors ``A``/``B``, reduced projections, MoDeGPT's
reduced attention and MLP projections); everything else (embeddings, head, norms, the linears
compression left alone) is frozen. The parameter count, the state dict's keys and the saved format
are therefore unchanged.

The loss: KL(dense || compressed) between next-token distributions (temperature ``temperature``,
scaled by its square as Hinton et al.), averaged over the real tokens of the calibration windows the
compression used, with AdamW and a warmup then cosine (or constant) learning rate.

The teacher. Compression works in place, so the dense model is read *before* it (see
:func:`teacher_targets`, called by :func:`rankdown.compress`): one forward pass over the calibration
windows keeps, per token, the dense model's top-``topk`` log-probabilities and their token ids. The
KL is taken over those tokens plus one bucket holding the rest of the vocabulary: exact for that
coarser distribution, a lower bound of the full KL. Why not the alternatives: all logits take
vocabulary x tokens x 4 bytes (SmolLM2: 49,152 x 8,192 calibration tokens = 1.6 GB; a 150k
vocabulary and 128 x 2048 tokens: 160 GB), and a copy of the dense model doubles the weights in
memory and adds a teacher forward to every step of every epoch. Top-128 takes 1 KB per token
(8 MB for 8,192 tokens), one dense forward in all, and holds most of the probability mass (94.5% for
SmolLM2-135M-Instruct on the reference code; the
mean kept mass is recorded as ``teacher_mass``).

The guard: the last ``heldout`` fraction of the calibration windows is never trained on; the KL on
it is measured before training and every ``eval_every`` steps; the best state is kept and restored
at the end, and training stops after ``patience`` measurements without improvement. Healing thus
never leaves that KL above what compression left. (Those windows were seen by the compression's
statistics; they are held out from healing only. Text windows are drawn at random offsets and may
overlap.)

Streaming (not implemented: healing needs the whole model in memory, and ``--heal`` loads it).
The teacher's top-k would come from the dense pass the engine already makes layer by layer (the last
layer's outputs through the final norm and the head, before any layer is replaced). End-to-end
training over a model read from disk one layer at a time would need, per step: a forward layer by
layer that keeps only each layer's input activations (on disk when they do not fit: the LayerStore's
spill), the head's gradient, then a backward layer by layer in reverse that reloads each layer,
recomputes its forward, back-propagates and updates its trainable parameters in place, with the
AdamW moments (twice the trainable parameters) stored beside the layer; every step reads and writes
the whole model twice. Layer-wise distillation (each layer towards the dense layer's outputs, as
Lillama) streams easily but is not end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from rankdown.config import ConfigError, setting

log = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """Settings of healing (``rankdown compress --heal``; each field is a ``--heal-...`` flag)."""

    epochs: int = setting(2, "passes over the calibration windows trained on (--heal-steps overrides)")
    steps: int | None = setting(None, "optimiser steps (default: epochs x training windows / batch size)")
    lr: float = setting(1e-4, "peak learning rate of AdamW")
    schedule: str = setting("cosine", "learning rate after the warmup: cosine (decays to 0) or constant")
    warmup: float = setting(0.05, "fraction of the steps over which the learning rate rises linearly from 0")
    batch_size: int = setting(4, "calibration windows per optimiser step")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    max_grad_norm: float = setting(1.0, "clip the gradients' global norm to this (0: no clipping)")
    temperature: float = setting(1.0, "softmax temperature of both models in the KL (loss scaled by its square)")
    topk: int = setting(128, "dense model's most likely tokens kept per position; the rest form one bucket")
    heldout: float = setting(0.125, "fraction of the calibration windows held out to measure the KL (at least 1)")
    eval_every: int | None = setting(None, "steps between held-out measurements (default: an eighth of the steps)")
    patience: int = setting(3, "held-out measurements without improvement before stopping (0: never stop early)")
    seed: int | None = setting(None, "seed of the window order (default: the run's --seed)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def whole(name: str, low: int, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"heal {name} must be a whole number >= {low}, got {value!r}")

        whole("epochs", 1, self.epochs)
        whole("batch_size", 1, self.batch_size)
        whole("topk", 1, self.topk)
        whole("patience", 0, self.patience)
        for name in ("steps", "eval_every"):
            if getattr(self, name) is not None:
                whole(name, 1, getattr(self, name))
        if self.seed is not None:
            whole("seed", -(2**63), self.seed)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"heal lr must be in (0, 1), got {self.lr!r}; e.g. --heal-lr 1e-4")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"heal schedule {self.schedule!r} is unknown; choose cosine or constant")
        for name, low, high in (("warmup", 0.0, 1.0), ("heldout", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low <= value < high):
                raise ConfigError(f"heal {name} must be a fraction in [{low}, {high}), got {value!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ConfigError(f"heal {name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"heal temperature must be > 0, got {self.temperature!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Teacher:
    """The dense model's top-k next-token log-probabilities on the calibration windows.

    ``input_ids``, ``attention_mask``: (n, seqlen); ``logp``: (n, seqlen, k) float32; ``index``:
    (n, seqlen, k) int32 token ids; ``train`` and ``heldout``: window indices.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logp: torch.Tensor
    index: torch.Tensor
    train: list[int]
    heldout: list[int]
    mass: float  # mean probability the top-k hold, over real tokens


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ConfigError("healing needs a causal language model (its forward returns next-token logits); "
                          "drop --heal for this model")
    return logits


@contextlib.contextmanager
def _on(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """``model`` on ``device`` for the block, back where it was after (the engine keeps it on the CPU)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _batches(idx: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(idx), size):
        yield idx[i:i + size]


def teacher_targets(model: nn.Module, data: Any, config: HealConfig, device: torch.device | str = "cpu",
                    progress: bool = False) -> Teacher:
    """Read the dense ``model`` once on the calibration windows ``data`` (a CalibrationData):
    top-``config.topk`` log-probabilities per real token, and the split into training and held-out
    windows (the last ``heldout`` fraction, at least one). Call before compression."""
    from tqdm.auto import tqdm

    ids, mask = data.input_ids, data.attention_mask
    n = ids.shape[0]
    if n < 2:
        raise ConfigError(f"healing needs at least 2 calibration windows (one held out), got {n}; raise --nsamples")
    held = max(1, round(n * config.heldout))
    train, heldout = list(range(n - held)), list(range(n - held, n))
    vocab = None
    logps, indices = [], []
    kept, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with _on(model, device), torch.inference_mode():
            for b in tqdm(list(_batches(list(range(n)), config.batch_size)), desc="heal: dense targets",
                          unit="batch", disable=not progress, leave=False):
                m = mask[b].to(device)
                logits = _logits(model, ids[b].to(device), m).float()
                vocab = logits.shape[-1]
                lp = torch.log_softmax(logits / config.temperature, -1)
                v, i = lp.topk(min(config.topk, vocab), -1)
                kept += float(v.exp().sum(-1)[m.bool()].sum())
                count += int(m.sum())
                logps.append(v.cpu())
                indices.append(i.to(torch.int32).cpu())
    finally:
        model.train(was_training)
    mass = kept / max(count, 1)
    log.info("heal: dense top-%d of %d tokens hold %.4f of the probability on average", config.topk, vocab, mass)
    return Teacher(ids, mask, torch.cat(logps), torch.cat(indices), train, heldout, mass)


def topk_kl(logits: torch.Tensor, logp: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) over the real tokens, and their count.

    logits: (b, t, vocab) of the student; logp, index: (b, t, k) the teacher's top-k log-probabilities
    and token ids; mask: (b, t). The distributions are the k tokens plus one bucket for the rest.
    """
    lq = torch.log_softmax(logits.float() / temperature, -1)
    lq_k = lq.gather(-1, index.long())
    p_k = logp.exp()
    p_rest = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - lq_k.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_k * (logp - lq_k)).sum(-1) + p_rest * (torch.log(p_rest.clamp_min(1e-12)) - torch.log(q_rest))
    keep = mask.bool()
    return kl[keep].sum() * temperature**2, int(keep.sum())


def trainable_parameters(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Parameter]:
    """The parameters of every ``nn.Linear`` inside the modules at ``paths`` (what compression made:
    a low-rank linear's A and B, a reduced linear, a reduced attention's projections), by name."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for path in paths:
        module = model.get_submodule(path)
        for name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    found[".".join(x for x in (path, name, pname) if x)] = p
    return found


def _heldout_kl(model: nn.Module, t: Teacher, config: HealConfig, device: torch.device | str) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in _batches(t.heldout, config.batch_size):
            m = t.attention_mask[b].to(device)
            kl, c = topk_kl(_logits(model, t.input_ids[b].to(device), m), t.logp[b].to(device),
                            t.index[b].to(device), m, config.temperature)
            total, count = total + float(kl), count + c
    return total / max(count, 1)


def _lr_factor(config: HealConfig, total: int) -> Any:
    warm = int(round(config.warmup * total))

    def factor(step: int) -> float:  # step: 0-based index of the step about to run
        if step < warm:
            return (step + 1) / (warm + 1)
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def heal(model: nn.Module, teacher: Teacher, config: HealConfig, modules: Iterable[str], *, seed: int = 0,
         device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Train the linears inside ``modules`` (dotted paths) of the compressed ``model`` towards the
    ``teacher``; everything else frozen. Returns the record of the pass (settings, steps, tokens,
    seconds, the held-out KL before and after). The model ends in its best held-out state."""
    t0 = time.perf_counter()
    params = trainable_parameters(model, modules)
    if not params:
        raise ConfigError("healing found nothing that compression created to train (no replaced linear)")
    seed = config.seed if config.seed is not None else seed
    total = config.steps or config.epochs * math.ceil(len(teacher.train) / config.batch_size)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()  # no dropout: deterministic, and the distributions compared are the ones used
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        with _on(model, device):
            done = _train(model, teacher, config, params, total, seed, device, progress)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("heal: held-out KL %.4f -> %.4f in %d steps (%.0fs)", done["kl_before"], done["kl_after"],
             done["steps"], seconds)
    return {
        "what": "KL(dense || compressed) distillation of the compressed modules' linears, the rest frozen",
        "config": {**config.to_dict(), "seed": seed}, "lr": config.lr, "steps_planned": total, **done,
        "stopped_early": done["steps"] < total, "train_windows": len(teacher.train),
        "heldout_windows": len(teacher.heldout), "trainable_params": sum(p.numel() for p in params.values()),
        "teacher_mass": round(teacher.mass, 6), "seconds": round(seconds, 3),
    }


def _train(model: nn.Module, teacher: Teacher, config: HealConfig, params: dict[str, nn.Parameter], total: int,
           seed: int, device: torch.device | str, progress: bool) -> dict[str, Any]:
    """The loop: AdamW steps on shuffled training windows, the held-out KL every ``eval_every`` steps,
    the best state restored at the end."""
    from tqdm.auto import tqdm

    every = config.eval_every or max(1, total // 8)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config, total))
    before = best = _heldout_kl(model, teacher, config, device)
    history: list[list[float]] = [[0, before]]
    best_step, stale, step, tokens = 0, 0, 0, 0
    best_state = {k: p.detach().clone() for k, p in params.items()}  # as compression left it
    order: list[int] = []
    with tqdm(total=total, desc="heal", unit="step", disable=not progress) as bar:
        while step < total:
            if not order:
                order = [teacher.train[i] for i in torch.randperm(len(teacher.train), generator=gen).tolist()]
            b, order = order[:config.batch_size], order[config.batch_size:]
            m = teacher.attention_mask[b].to(device)
            with torch.enable_grad():
                kl, count = topk_kl(_logits(model, teacher.input_ids[b].to(device), m), teacher.logp[b].to(device),
                                    teacher.index[b].to(device), m, config.temperature)
                (kl / max(count, 1)).backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, tokens = step + 1, tokens + count
            bar.update(1)
            if step % every and step != total:
                continue
            now = _heldout_kl(model, teacher, config, device)
            history.append([step, now])
            bar.set_postfix(heldout_kl=f"{now:.4f}", best=f"{min(best, now):.4f}")
            if now < best:
                best, best_step, stale = now, step, 0
                best_state = {k: p.detach().clone() for k, p in params.items()}
                continue
            stale += 1
            if config.patience and stale >= config.patience:
                log.info("heal: the held-out KL did not improve for %d measurements: stopped at step %d", stale, step)
                break
    with torch.no_grad():  # the best state measured
        for k, p in params.items():
            p.copy_(best_state[k])
    return {"steps": step, "best_step": best_step, "tokens": tokens, "kl_before": before, "kl_after": best,
            "history": history}
