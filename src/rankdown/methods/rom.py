"""ROM: reduced order modelling of layer features (Chavan, Lele, Gupta 2023). docs/METHODS.md §2.

Each linear ``y = W x + b`` is re-parameterised in the principal subspace of its outputs on the
calibration data: ``V_r`` = the ``r`` leading eigenvectors of the outputs' covariance (centered,
the default) or correlation (uncentered, the paper's); ``A = V_rᵀ W``, ``B = V_r``, and whatever
is constant goes into B's bias. No gradients and no inverse.

The output statistics are accumulated in the cheaper space: ``C_out`` of the outputs themselves
when ``out <= in``, else ``C_in`` of the inputs, from which the output spectrum is derived without
forming the ``(out, out)`` matrix (see :func:`output_eig`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from rankdown.allocate import (
    Target, check_reachable, discarded_energy, global_ranks, last_k_ranks, uniform_ranks,
)
from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import Guard, guarded_eigh, mm64, output_eig_in, psd_root, sub_outer_lower_, tmm64
from rankdown.methods.base import Method, install_factors, register
from rankdown.stats import InputStats

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext

log = logging.getLogger(__name__)


ROM_ALLOCATIONS = ("auto", "fisher", "global", "uniform", "last-k")


@dataclass
class ROMConfig(MethodConfig):
    """ROM (Chavan, Lele, Gupta 2023): each linear re-parameterised in the principal subspace of its outputs."""

    method: ClassVar[str] = "rom"
    allocations: ClassVar[tuple[str, ...]] = ROM_ALLOCATIONS
    center: bool = setting(
        True,
        "center the output statistics (covariance; the mean goes into the low-rank layer's bias, which adds "
        "one bias to layers without one); False: the paper's uncentered correlation (--no-center)",
    )
    allocation: str = setting(
        "auto",
        "rank allocation: auto (the default: fisher where it can run, else global), fisher (ranks where they cost "
        "the model's loss least, see the shared --allocation), global (water-filling on the dense model's output spectra; one extra statistics "
        "pass), uniform (one module budget everywhere), last-k (the paper's: only the last K layers)",
    )
    last_k: int | None = setting(
        None, "last-k allocation: number of final layers to compress (default: the smallest K at module budget >= 0.33)"
    )
    spectra_tokens: int = setting(
        32768,
        "global allocation: calibration tokens its statistics pass reads at most (the first windows; 0: all). "
        "The spectra only set the ranks; the compression itself reads every token",
    )

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.center, bool):
            raise ConfigError(f"center must be true or false, got {self.center!r}")
        if self.allocation not in ROM_ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of: {', '.join(ROM_ALLOCATIONS)}")
        if self.last_k is not None:
            if self.allocation != "last-k":
                raise ConfigError(f"last_k is only used by --allocation last-k, not {self.allocation!r}")
            if self.last_k < 1:
                raise ConfigError(f"last_k must be >= 1, got {self.last_k}")
        if not isinstance(self.spectra_tokens, int) or self.spectra_tokens < 0:
            raise ConfigError(f"spectra_tokens must be an integer >= 0 (0: all tokens), got {self.spectra_tokens!r}")


# ----------------------------------------------------------------------------- math
def output_moments(
    W: torch.Tensor, stats: InputStats, space: str, take: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """``E[z zᵀ]`` (d, d) and ``E[z]`` (d,) of ``z = W x`` (space "out", d = out) or ``z = x`` ("in", d = in).

    W: (out, in). A linear that saw no calibration token (an expert never routed to) gets the
    moments of isotropic unit inputs (``E[x xᵀ] = I``, mean 0: ROM then reduces to the weight's SVD)
    and a guard saying so. ``take``: the second moment is formed in the statistics' own storage and
    handed over (:meth:`InputStats.take_moment`): only its lower triangle is valid, for
    :func:`output_eig` and :func:`input_root` with ``inplace``.
    """
    if stats.n > 0:
        return (stats.take_moment() if take else stats.second_moment), stats.mean, None
    out_f, in_f = W.shape
    if space == "out":
        second = mm64(W, W.T.to(torch.float64))
    else:
        second = torch.eye(in_f, dtype=torch.float64, device=W.device)
    return second, second.new_zeros(second.shape[0]), Guard("no_calibration_tokens", 0.0)


def _centered(second: torch.Tensor, mean: torch.Tensor, center: bool, inplace: bool) -> torch.Tensor:
    """``second − mean meanᵀ`` (center) or ``second``; ``inplace``: in second's storage, on its lower
    block triangle only (the upper one may be unwritten memory)."""
    if not center:
        return second
    return sub_outer_lower_(second, mean) if inplace else second - torch.outer(mean, mean)


def output_eig(
    W: torch.Tensor, second: torch.Tensor, mean: torch.Tensor, space: str, center: bool, vectors: bool | int = True,
    root: tuple[torch.Tensor, Guard | None] | None = None, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, Guard | None]:
    """Leading eigen-pairs of the outputs' covariance ``Σ = E[zzᵀ] − E[z]E[z]ᵀ`` (center) or ``E[zzᵀ]``.

    W: (out, in) in any float dtype; second: (d, d), mean: (d,) float64 as :func:`output_moments`
    returns them. Space "out": eigendecomposition of the (out, out) matrix. Space "in"
    (``out > in``): ``Σ_out = W Σ_in Wᵀ``, whose leading eigen-pairs come from (in, in) problems
    (:func:`rankdown.linalg.output_eig_in`): nothing of size (out, in) is formed in
    float64 but the wanted vectors.
    ``vectors``: False, True (all), or the number of leading eigenvectors wanted.
    Returns eigenvalues (k,) descending and non-negative, eigenvectors (out, ≤k) or None, and any
    clamping guard; k = out in space "out", in otherwise. ``root``: in space "in", the square root
    of the inputs' covariance (:func:`input_root`) when already computed for another linear.
    Only the lower triangle of ``second`` is read. ``inplace``: second is consumed (centred and
    decomposed in its own storage, the eigenvectors of space "out" returned in it): no (d, d) copy.
    """
    if space == "in" and root is not None:
        return output_eig_in(W, None, vectors, root)
    S = _centered(second, mean, center, inplace)
    if space == "out":
        evals, V, guard = guarded_eigh(S, bool(vectors), inplace=inplace)
        if V is not None and vectors is not True:
            V = V[:, : int(vectors)]
        return evals, V, guard
    return output_eig_in(W, S, vectors, psd_root(S, inplace) if inplace else None)


def input_root(
    second: torch.Tensor, mean: torch.Tensor, center: bool, inplace: bool = False,
) -> tuple[torch.Tensor, Guard | None]:
    """``R`` with ``R Rᵀ`` = the inputs' covariance (center) or second moment: what the space "in"
    route of :func:`output_eig` needs first, shared by the linears fed the same inputs (a Cholesky
    factor when the covariance is definite, else its symmetric root). ``inplace``: second is
    consumed (see :func:`output_eig`)."""
    return psd_root(_centered(second, mean, center, inplace), inplace)


def rom_factors(
    W: torch.Tensor, b: torch.Tensor | None, V: torch.Tensor, mu: torch.Tensor, center: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ROM's low-rank layer ``ŷ = B (A x) + bias`` from the output subspace ``V``.

    W: (out, in) in any float dtype; b: (out,) or None; V: (out, r) orthonormal columns; mu: (out,)
    mean of ``W x`` (without b) -> A: (r, in), B: (out, r), bias: (out,) or None, in float64.

    - centered: ``ŷ = V Vᵀ (W x − μ) + μ + b``, so ``bias = b + (I − V Vᵀ) μ``. This is the best
      rank-r affine map of the outputs on the calibration data (PCA of the centered outputs), and
      with ``A`` fixed to ``Vᵀ W`` the constant that minimises the squared error.
    - uncentered: ``ŷ = V Vᵀ W x + b``: the best rank-r linear map of ``W x`` (Eckart–Young on the
      calibration outputs, the same error as SVD-LLM), with the bias kept exactly; the spec's split
      (A's bias ``Vᵀ b``, B's bias ``(I − V Vᵀ) b``) sums to the same ``b``, and A has no bias here.
      A linear without bias gets none, so the parameter count equals the baselines'.
    """
    A = tmm64(V, W)
    if not center:
        return A, V, b
    bias = mu - V @ (V.T @ mu)
    return A, V, bias if b is None else bias + b


def _forget(roots: dict, stats: InputStats, moments: dict) -> None:
    """Drop the input root of ``stats`` once no linear left in ``moments`` reads those inputs."""
    if all(s is not stats for s, _ in moments.values()):
        roots.pop(id(stats), None)


def _space(linear: nn.Module) -> str:
    """Where the statistics are cheaper: the outputs (out, out) when ``out <= in``, else the inputs."""
    return "out" if linear.out_features <= linear.in_features else "in"


# ----------------------------------------------------------------------------- method
@register
class ROM(Method):
    """ROM (docs/METHODS.md §2). ``allocation``: auto (default: fisher, or global where fisher cannot run), fisher, global, uniform, or last-k (the paper's)."""

    config_class = ROMConfig
    config: ROMConfig
    order = 40
    auto_fallback = "global"

    def _moments(
        self, ctx: "LayerContext", names: list[str], keep_outputs: bool = False, replay: bool = False,
    ) -> dict[str, tuple[InputStats, str]]:
        """Statistics of the named linears (name -> (stats, space)), in one pass (which also keeps
        the layer's outputs when ``keep_outputs``: the statistics pass then runs each layer once;
        ``replay``: see :meth:`rankdown.engine.LayerContext.collect`)."""
        spaces = {n: _space(ctx.module(n)) for n in names}
        found: dict[str, tuple[InputStats, str]] = {}
        ins = [n for n in names if spaces[n] == "in"]
        outs = [n for n in names if spaces[n] == "out"]
        in_stats, out_stats = ctx.collect(ins, outs, keep_outputs=keep_outputs, replay=replay)  # one pass over the batches for both kinds
        found.update({n: (s, "in") for n, s in in_stats.items()})
        found.update({n: (s, "out") for n, s in out_stats.items()})
        return found

    def _eig(
        self, ctx: "LayerContext", name: str, stats: InputStats, space: str, vectors: bool | int, roots: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, Guard | None]:
        """W (out, in, the module's own tensor), eigenvalues, eigenvectors, output mean μ = E[W x]
        (out,) in float64, guard. ``roots``: input roots by statistics object, shared by the calls
        for one pass's linears (gate and up read the same inputs: one eigendecomposition)."""
        W, center = ctx.module(name).weight.detach(), self.config.center
        # the statistics' correlation is consumed in place: ROM's peak is a layer's largest
        # eigenproblem, and a copy of a 2048² matrix is 32 MB of it
        if space == "in" and id(stats) in roots:  # the root of inputs another linear was fed too
            mean, root = stats.mean, roots[id(stats)]
            guard = None if stats.n > 0 else Guard("no_calibration_tokens", 0.0)
            evals, V, eig_guard = output_eig(W, None, mean, space, center, vectors, root)
        else:
            second, mean, guard = output_moments(W, stats, space, take=True)
            if space == "in":
                roots[id(stats)] = input_root(second, mean, center, inplace=True)
                del second  # freed unless the root is its storage
                evals, V, eig_guard = output_eig(W, None, mean, space, center, vectors, roots[id(stats)])
            else:
                evals, V, eig_guard = output_eig(W, second, mean, space, center, vectors, inplace=True)
                del second  # V, when asked for, is its storage
        mu = mean if space == "out" else mm64(W, mean[:, None])[:, 0]
        return W, evals, V, mu, guard or eig_guard

    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        for group in ctx.groups():
            names = [n for n in group if n in ranks]
            if not names:
                continue
            moments, roots = self._moments(ctx, names, replay=True), {}
            for name in names:
                linear = ctx.module(name)
                stats, space = moments.pop(name)
                W, _, V, mu, guard = self._eig(ctx, name, stats, space, vectors=ranks[name], roots=roots)
                _forget(roots, stats, moments)
                b = None if linear.bias is None else linear.bias.detach().to(ctx.device, torch.float64)
                A, B, bias = rom_factors(W, b, V[:, : ranks[name]], mu, self.config.center)
                install_factors(ctx, name, A, B, bias, guard)
                del V, A, B  # float64 working copies: not alive while the next linear's are made

    def plan(
        self, targets: list[Target], total_params: int, ratio: float, multiple: int,
        context: "PlanContext | None" = None,
    ) -> dict[str, int]:
        from rankdown.sensitivity import resolve

        cfg, with_bias = self.config, self.config.center
        allocation = resolve(cfg.allocation, context, self.auto_fallback)
        if allocation == "uniform":
            return uniform_ranks(targets, total_params, ratio, multiple, with_bias)
        if allocation == "last-k":
            return last_k_ranks(targets, total_params, ratio, multiple, cfg.last_k, with_bias)
        if allocation == "fisher":
            from rankdown.sensitivity import fisher_ranks

            return fisher_ranks(targets, total_params, ratio, multiple, context, center=cfg.center,
                                with_bias=with_bias, fisher_tokens=cfg.fisher_tokens, spectra_tokens=cfg.spectra_tokens)
        if context is None:
            raise ConfigError("the global allocation needs a statistics pass: call rankdown.compress(), "
                              "or use allocation='uniform'")
        check_reachable(targets, total_params, ratio, multiple, with_bias)  # fail before the pass
        spectra = self.spectra(targets, context)
        ranks = global_ranks(targets, spectra, total_params, ratio, multiple, with_bias)
        energy = sum(discarded_energy(spectra[t.path], ranks.get(t.path)) for t in targets)
        log.info("global allocation: mean normalised discarded energy %.4f over %d targets",
                 energy / len(targets), len(targets))
        return ranks

    def spectra(self, targets: list[Target], context: "PlanContext") -> dict[str, torch.Tensor]:
        """Path -> eigenvalues (descending, CPU) of every target's output statistics on the dense
        model, one layer at a time; only one layer's statistics matrices are alive at once.
        Kept in the statistics cache (``--stats-cache``) when there is one. **(choice)** Read from the
        first ``spectra_tokens`` calibration tokens (32768 by default, all the reference model's):
        the ranks need the spectra's shape, not their last digits, and on a default calibration set
        (128 x 2048 tokens) this pass would otherwise cost a third of the run."""
        settings = {"center": self.config.center, "targets": [t.path for t in targets]}
        if self.config.spectra_tokens:
            settings["spectra_tokens"] = self.config.spectra_tokens
        return context.cached("rom-spectra", settings, lambda: self._spectra(targets, context))

    def _spectra(self, targets: list[Target], context: "PlanContext") -> dict[str, torch.Tensor]:
        return self.walk_spectra(targets, context, lambda path, evals, V: evals.cpu(), vectors=False)

    def walk_spectra(
        self, targets: list[Target], context: "PlanContext",
        keep: "Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]", vectors: bool,
    ) -> dict[str, torch.Tensor]:
        """Path -> ``keep(path, eigenvalues, eigenvectors or None)`` for every target's output
        statistics on the dense model, one layer at a time (only one layer's statistics alive)."""
        spectra: dict[str, torch.Tensor] = {}

        def visit(ctx: "LayerContext") -> None:
            names = [t.path[len(ctx.prefix) + 1 :] for t in targets if t.path.startswith(ctx.prefix + ".")]
            if not names:
                return
            moments, roots = self._moments(ctx, names, keep_outputs=True), {}
            for name in names:
                stats, space = moments.pop(name)
                _, evals, V, _, _ = self._eig(ctx, name, stats, space, vectors=vectors, roots=roots)
                _forget(roots, stats, moments)
                spectra[f"{ctx.prefix}.{name}"] = keep(f"{ctx.prefix}.{name}", evals, V)
                del V

        context.walk_dense(visit, self.config.spectra_tokens)
        return spectra
