"""Budgets: a whole-model ratio -> a rank for every target linear.

The ratio is the fraction of ALL parameters removed (docs/METHODS.md §0), so the budget is met on the
exact count after rounding: the search runs on rounded ranks, not on a continuous relaxation.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from rankdown.config import ConfigError

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, a tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def default_multiple(hidden_size: int) -> int:
    """Ranks are multiples of 8 (fast GEMMs), or of 1 on small models (docs/METHODS.md §0)."""
    return 8 if hidden_size >= 1024 else 1


def lowrank_params(out_f: int, in_f: int, rank: int, bias: bool = False) -> int:
    return rank * (out_f + in_f) + (out_f if bias else 0)


def max_useful_rank(out_f: int, in_f: int, extra: int = 0) -> int:
    """Largest rank that still saves parameters: ``r (in + out) + extra < in · out``.

    ``extra``: parameters the low-rank module adds besides its factors (a new bias).
    """
    return max(0, (out_f * in_f - extra - 1) // (out_f + in_f))


@dataclass(frozen=True)
class Target:
    """One linear that may be replaced: full dotted path, shape, bias, index of its decoder layer."""

    path: str
    out_features: int
    in_features: int
    bias: bool
    layer: int = -1

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    def added(self, with_bias: bool) -> int:
        """Parameters a compressed version adds besides its factors: a bias it did not have."""
        return self.out_features if with_bias and not self.bias else 0

    def cost(self, rank: int, with_bias: bool = False) -> int:
        """Parameters of the rank-``rank`` replacement, minus the bias it shares with the dense one."""
        return lowrank_params(self.out_features, self.in_features, rank) + self.added(with_bias)

    def cap(self, with_bias: bool = False) -> int:
        return max_useful_rank(self.out_features, self.in_features, self.added(with_bias))


def _round(x: float, multiple: int, cap: int) -> int:
    r = max(multiple, int(round(x / multiple)) * multiple)
    return min(r, max(1, cap - cap % multiple) if cap >= multiple else cap)


def _unreachable(ratio: float, smallest: int, total_params: int, multiple: int) -> ConfigError:
    max_ratio = 1.0 - smallest / total_params
    return ConfigError(
        f"ratio {ratio} cannot be reached: compressing every target linear to rank {multiple} removes "
        f"at most {max_ratio:.3f} of the parameters; use --ratio in (0, {math.floor(max_ratio * 100) / 100})"
    )


def _inexact(ratio: float, achieved: float, multiple: int) -> ConfigError:
    return ConfigError(
        f"ratio {ratio} can only be approximated to {achieved:.4f} with ranks rounded to multiples of "
        f"{multiple}; pass --rank-multiple 1, or a ratio closer to {achieved:.2f}"
    )


def check_reachable(
    targets: list[Target], total_params: int, ratio: float, multiple: int, with_bias: bool = False
) -> None:
    """Raise a :class:`ConfigError` naming the reachable range when even rank ``multiple`` everywhere
    keeps more than ``1 − ratio`` of the parameters."""
    smallest = total_params - sum(t.dense - t.cost(multiple, with_bias) for t in targets)
    if smallest > total_params * (1.0 - ratio):
        raise _unreachable(ratio, smallest, total_params, multiple)


@dataclass
class _Budget:
    """One module budget solved on exact counts: ranks of the compressed targets and the model size."""

    ranks: dict[str, int]
    size: int  # parameters of the whole model after compression
    kept: float  # fraction of the compressed targets' dense parameters kept (the module budget)


def _solve_budget(
    targets: list[Target], total_params: int, goal: float, multiple: int, with_bias: bool
) -> _Budget | None:
    """The one kept fraction ``k`` for ``targets`` (others stay dense) whose size is nearest ``goal``.

    The rank of a target (out, in) is ``k · out·in / (out+in)`` rounded to ``multiple``; ``k`` is
    found by bisection on the exact rounded count. None when even the smallest ranks exceed ``goal``.
    """
    fixed = total_params - sum(t.dense for t in targets)
    caps = [t.cap(with_bias) for t in targets]

    def ranks_at(k: float) -> list[int]:
        return [_round(k * t.dense / (t.out_features + t.in_features), multiple, c) for t, c in zip(targets, caps)]

    def size(ranks: list[int]) -> int:
        return fixed + sum(t.cost(r, with_bias) for t, r in zip(targets, ranks))

    if size(ranks_at(0.0)) > goal:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if size(ranks_at(mid)) > goal:
            hi = mid
        else:
            lo = mid
    best = min((ranks_at(lo), ranks_at(hi)), key=lambda rs: abs(size(rs) - goal))
    kept = (size(best) - fixed) / max(1, sum(t.dense for t in targets))
    return _Budget({t.path: r for t, r in zip(targets, best)}, size(best), kept)


def uniform_ranks(
    targets: list[Target], total_params: int, ratio: float, multiple: int, with_bias: bool = False
) -> dict[str, int]:
    """Every target keeps the same fraction ``k`` of its parameters, ``k`` solved on exact counts.

    with_bias: every compressed module carries a bias (ROM centered), so a target without one
    costs ``out`` parameters more. Raises a :class:`ConfigError` naming the reachable range when
    the ratio cannot be met to ±0.01.
    """
    goal = total_params * (1.0 - ratio)
    check_reachable(targets, total_params, ratio, multiple, with_bias)
    budget = _solve_budget(targets, total_params, goal, multiple, with_bias)
    assert budget is not None  # the smallest ranks fit, as checked
    achieved = 1.0 - budget.size / total_params
    if abs(achieved - ratio) > 0.01:
        raise _inexact(ratio, achieved, multiple)
    return budget.ranks


def last_k_ranks(
    targets: list[Target], total_params: int, ratio: float, multiple: int, last_k: int | None = None,
    with_bias: bool = False, min_budget: float = 0.33,
) -> dict[str, int]:
    """ROM's allocation: only the targets of the last ``K`` layers, all at one module budget.

    Without ``last_k``, ``K`` is the smallest number of final layers whose module budget (fraction
    of their parameters kept) is still ``>= min_budget`` while the ratio is met to ±0.01. When no
    ``K`` does, every layer is compressed with a lower budget (logged).
    """
    layers = sorted({t.layer for t in targets})
    goal = total_params * (1.0 - ratio)

    def attempt(k: int) -> _Budget | None:
        budget = _solve_budget([t for t in targets if t.layer in layers[-k:]], total_params, goal, multiple, with_bias)
        if budget is None or abs(1.0 - budget.size / total_params - ratio) > 0.01:
            return None
        return budget

    if last_k is not None:
        if not 1 <= last_k <= len(layers):
            raise ConfigError(f"last_k must be between 1 and the {len(layers)} layers with targets, got {last_k}")
        budget = attempt(last_k)
        if budget is None:
            feasible = [k for k in range(1, len(layers) + 1) if attempt(k) is not None]
            hint = f"use last_k >= {feasible[0]}" if feasible else "use a smaller --ratio"
            raise ConfigError(f"ratio {ratio} cannot be met by compressing only the last {last_k} layers: {hint}")
        if budget.kept < min_budget:
            log.info("last-k: the last %d layers keep only %.3f of their parameters", last_k, budget.kept)
        return budget.ranks
    for k in range(1, len(layers) + 1):
        budget = attempt(k)
        if budget is not None and budget.kept >= min_budget:
            log.info("last-k: compressing the last %d of %d layers at module budget %.3f", k, len(layers), budget.kept)
            return budget.ranks
    ranks = uniform_ranks(targets, total_params, ratio, multiple, with_bias)
    log.warning("last-k: no K keeps a module budget >= %.2f at ratio %s; compressing all %d layers",
                min_budget, ratio, len(layers))
    return ranks


def discarded_energy(spectrum: torch.Tensor, rank: int | None) -> float:
    """Fraction of a layer's output energy outside its ``rank`` leading eigenvalues (0 when dense).

    spectrum: (k,) eigenvalues in descending order, non-negative.
    """
    total = float(spectrum.sum())
    if rank is None or total <= 0.0:
        return 0.0
    return float(spectrum[rank:].sum()) / total


def _hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Upper concave hull of (cost, kept energy, rank) points sorted by cost, the first one kept."""
    hull: list[tuple[int, float, int | None]] = []
    for c in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) > 0:  # b below a->c
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def global_ranks(
    targets: list[Target], spectra: dict[str, torch.Tensor], total_params: int, ratio: float, multiple: int,
    with_bias: bool = False, normalise: bool = True,
) -> dict[str, int]:
    """Ranks for all targets at once that minimise the summed normalised discarded energy.

    spectra: path -> (k,) descending non-negative eigenvalues of the target's output covariance.
    Greedy water-filling: every target starts at rank ``multiple``; the step with the largest
    normalised energy gained per parameter is taken while it fits the budget. A target's steps
    are the segments of the upper concave hull of its (parameters, kept energy) points: ranks in
    steps of ``multiple`` up to the dense break-even, then the dense layer itself (all the energy
    for its full count), so a target that gains more by staying dense than by a last rank step
    stays dense. When a long segment no longer fits, the target continues in single rank steps.
    Dense targets are left out of the result. The ratio is met to ±0.01 on exact counts.
    ``normalise=False``: the spectra are costs in one currency across targets (the loss-weighted
    spectra of :mod:`rankdown.sensitivity`), summed as they are instead of as fractions of each
    target's total; they need not be descending.
    """
    goal = total_params * (1.0 - ratio)
    check_reachable(targets, total_params, ratio, multiple, with_bias)
    size = total_params - sum(t.dense - t.cost(multiple, with_bias) for t in targets)
    kept: list[list[float]] = []  # kept[i][r]: (normalised) energy of the r leading eigenvalues
    full: list[float] = []  # kept by the dense layer
    for t in targets:
        s = spectra[t.path].to(torch.float64).clamp_min(0)
        total = float(s.sum())
        scale = total if normalise else 1.0
        c = torch.cat([s.new_zeros(1), s.cumsum(0) / scale]) if total > 0 else s.new_zeros(len(s) + 1)
        kept.append(c.tolist())
        full.append(kept[-1][-1] if not normalise else 1.0)
    ranks: list[int | None] = [multiple] * len(targets)

    def energy(i: int, r: int) -> float:
        return kept[i][min(r, len(kept[i]) - 1)]

    def steps(i: int, dense: bool) -> deque[tuple[float, int, int | None]]:
        """Target ``i``'s next steps from its rank: (gain, cost, new rank or None for dense)."""
        t, r0 = targets[i], ranks[i]
        pts = [(t.cost(r, with_bias), energy(i, r), r) for r in range(r0, t.cap(with_bias) + 1, multiple)]
        if dense:
            pts = _hull(pts + [(t.dense, full[i], None)])
        return deque((b[1] - a[1], b[0] - a[0], b[2]) for a, b in zip(pts, pts[1:]))

    todo = [steps(i, dense=True) for i in range(len(targets))]
    hull_mode = [True] * len(targets)
    heap: list[tuple[float, int]] = []  # (-gain per parameter of the next step, target index)

    def push(i: int) -> None:
        if todo[i]:
            gain, cost, _ = todo[i][0]
            heapq.heappush(heap, (-gain / max(cost, 1), i))

    for i in range(len(targets)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        gain, cost, new = todo[i].popleft()
        if size + cost <= goal:
            size += cost
            ranks[i] = new
        elif hull_mode[i] and (new is None or new - (ranks[i] or 0) > multiple):
            hull_mode[i] = False  # a long segment does not fit: single rank steps may
            todo[i] = steps(i, dense=False)
        else:
            todo[i].clear()  # its later steps come after this one
        push(i)
    achieved = 1.0 - size / total_params
    if abs(achieved - ratio) > 0.01:
        raise _inexact(ratio, achieved, multiple)
    n_dense = sum(r is None for r in ranks)
    if n_dense:
        log.info("global allocation: %d of %d targets stay dense", n_dense, len(targets))
    return {t.path: r for t, r in zip(targets, ranks) if r is not None}
