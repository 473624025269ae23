"""Baseline: activation-aware SVD (Yuan et al. 2023). docs/METHODS.md §1.2."""

from __future__ import annotations

import torch

from dataclasses import dataclass
from typing import ClassVar

from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import asvd_factors
from rankdown.methods.base import Method, register
from rankdown.stats import InputStats


@dataclass
class ASVDConfig(MethodConfig):
    """Activation-aware SVD (Yuan et al. 2023): columns scaled by mean |x|^alpha before the SVD."""

    method: ClassVar[str] = "asvd"
    alpha: float = setting(0.5, "exponent of the mean absolute activation used as column scale")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"alpha must be in [0, 2], got {self.alpha}")


@register
class ASVD(Method):
    config_class = ASVDConfig
    needs_gram = False
    order = 20

    def factorize(self, W: torch.Tensor, stats: InputStats, rank: int):
        A, B = asvd_factors(W.to(torch.float64), stats.abs_mean, rank, self.config.alpha)
        return A, B, None
