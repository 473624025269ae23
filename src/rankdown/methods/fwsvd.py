"""Baseline: Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with weighted
low-rank factorization"). docs/METHODS.md §1.4.

Plain SVD treats every entry of ``W`` (out, in) alike; the loss does not. FWSVD weighs each row of
``W`` (an output unit) by its Fisher information ``I_i = Σ_j E[(∂L/∂W_ij)²]`` and truncates the
weighted matrix: ``diag(√I) W ≈ U_r Σ_r V_rᵀ``, then ``W ≈ (diag(√I)⁻¹ U_r Σ_r^½)(Σ_r^½ V_rᵀ)``,
the best rank-``r`` fit in the norm ``Σ_i I_i ‖W_i − Ŵ_i‖²``.

Per token ``∂L/∂W_ij = g_i x_j`` (``g = ∂L/∂y``), so ``I_i = E[g_i² ‖x‖²]``. **(choice)** Like the
fisher allocation (§6.3), the gradient is taken as independent of the input's norm, so
``I_i ∝ E[g_i²]``: the diagonal of the output-gradient covariance that one backward pass of the
dense model gives every linear at once (:func:`rankdown.sensitivity.output_fisher`); a constant
factor per linear does not change its truncation. The weights are those of the dense model: every
linear is factorised from them, not from the compressed model's upstream, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from rankdown.allocate import Target
from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import Guard, svd_factors
from rankdown.methods.base import Method, install_factors, register

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext

FLOOR = 1e-6  # row weights below this fraction of a linear's largest are raised to it (√I⁻¹ stays finite)


@dataclass
class FWSVDConfig(MethodConfig):
    """Fisher-weighted SVD (Hsu et al. 2022): each weight row scaled by the square root of its Fisher
    information before the SVD."""

    method: ClassVar[str] = "fwsvd"
    fisher_rows_tokens: int = setting(
        8192, "calibration tokens the backward pass that measures the row weights reads at most (0: all)")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.fisher_rows_tokens, int) or self.fisher_rows_tokens < 0:
            raise ConfigError(f"fisher_rows_tokens must be an integer >= 0 (0: all tokens), "
                              f"got {self.fisher_rows_tokens!r}")


def fisher_weighted_factors(W: torch.Tensor, row_fisher: torch.Tensor, r: int,
                            ) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """W: (out, in), row_fisher: (out,) >= 0 -> A: (r, in), B: (out, r) minimising
    ``Σ_i I_i ‖W_i − (B A)_i‖²``, and a guard when some row weight was floored."""
    W64 = W.to(torch.float64)
    top = float(row_fisher.max()) if row_fisher.numel() else 0.0
    if not top > 0.0:  # no gradient reached this linear: every row alike, the plain SVD
        A, B = svd_factors(W64, r)
        return A, B, Guard("no_fisher_information", 0.0)
    lo = FLOOR * top
    guard = Guard("row_fisher_floor", lo) if bool((row_fisher < lo).any()) else None
    s = row_fisher.to(W64).clamp_min(lo).sqrt()
    A, B = svd_factors(W64 * s[:, None], r)
    return A, B / s[:, None], guard


@register
class FWSVD(Method):
    config_class = FWSVDConfig
    config: FWSVDConfig
    needs_calibration = False  # the layer loop reads no statistics: the weights come from plan()
    needs_loss = True
    order = 25

    def __init__(self, config: FWSVDConfig, run=None) -> None:
        super().__init__(config, run)
        self._rows: dict[str, torch.Tensor] = {}

    def plan(self, targets: list[Target], total_params: int, ratio: float, multiple: int,
             context: "PlanContext | None" = None) -> dict[str, int]:
        from rankdown.sensitivity import output_fisher, unavailable

        why = unavailable(context)
        if why is not None:
            raise ConfigError(f"fwsvd weighs rows by a backward pass of the model, which cannot run: {why}")
        ranks = super().plan(targets, total_params, ratio, multiple, context)  # fails first if unreachable
        chosen = [t for t in targets if t.path in ranks]
        self._rows = output_fisher(context, chosen, self.config.fisher_rows_tokens)
        return ranks

    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        for name, rank in ranks.items():
            W = ctx.module(name).weight.detach()
            rows = self._rows[f"{ctx.prefix}.{name}"].to(W.device)
            A, B, guard = fisher_weighted_factors(W, rows, rank)
            install_factors(ctx, name, A, B, guard=guard)
