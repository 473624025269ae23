"""Budgets: a whole-model ratio -> a rank for every target linear.

The ratio is the fraction of ALL parameters removed (METHODS.md §0), so the budget is met on the
exact count after rounding: the search runs on rounded ranks, not on a continuous relaxation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from rankdown.config import ConfigError


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, a tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def default_multiple(hidden_size: int) -> int:
    """Ranks are multiples of 8 (fast GEMMs), or of 1 on small models (METHODS.md §0)."""
    return 8 if hidden_size >= 1024 else 1


def lowrank_params(out_f: int, in_f: int, rank: int, bias: bool = False) -> int:
    return rank * (out_f + in_f) + (out_f if bias else 0)


def max_useful_rank(out_f: int, in_f: int) -> int:
    """Largest rank that still saves parameters: ``r (in + out) < in · out``."""
    return (out_f * in_f - 1) // (out_f + in_f)


@dataclass(frozen=True)
class Target:
    """One linear that may be replaced: full dotted path, shape, bias."""

    path: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features


def _round(x: float, multiple: int, cap: int) -> int:
    r = max(multiple, int(round(x / multiple)) * multiple)
    return min(r, max(1, cap - cap % multiple) if cap >= multiple else cap)


def uniform_ranks(targets: list[Target], total_params: int, ratio: float, multiple: int) -> dict[str, int]:
    """Every target keeps the same fraction ``k`` of its parameters; ``k`` found by bisection.

    The rank of a target (out, in) is ``k · out·in / (out+in)`` rounded to ``multiple``. Raises a
    :class:`ConfigError` naming the reachable range when the ratio cannot be met to ±0.01.
    """
    goal = total_params * (1.0 - ratio)
    fixed = total_params - sum(t.dense for t in targets)
    caps = [max_useful_rank(t.out_features, t.in_features) for t in targets]

    def ranks_at(k: float) -> list[int]:
        return [_round(k * t.dense / (t.out_features + t.in_features), multiple, c) for t, c in zip(targets, caps)]

    def size(ranks: list[int]) -> int:
        return fixed + sum(lowrank_params(t.out_features, t.in_features, r) for t, r in zip(targets, ranks))

    lo, hi = 0.0, 1.0
    smallest = size(ranks_at(0.0))
    if goal < smallest:
        max_ratio = 1.0 - smallest / total_params
        raise ConfigError(
            f"ratio {ratio} cannot be reached: compressing every target linear to rank {multiple} removes "
            f"at most {max_ratio:.3f} of the parameters; use --ratio in (0, {math.floor(max_ratio * 100) / 100})"
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        if size(ranks_at(mid)) > goal:
            hi = mid
        else:
            lo = mid
    best = min((ranks_at(lo), ranks_at(hi)), key=lambda rs: abs(size(rs) - goal))
    achieved = 1.0 - size(best) / total_params
    if abs(achieved - ratio) > 0.01:
        raise ConfigError(
            f"ratio {ratio} can only be approximated to {achieved:.4f} with ranks rounded to multiples of "
            f"{multiple}; pass --rank-multiple 1, or a ratio closer to {achieved:.2f}"
        )
    return {t.path: r for t, r in zip(targets, best)}
