"""Fisher sensitivity allocation, shared by every low-rank method (``allocation="fisher"``).

The question an allocation answers is how much the *model's loss* grows when a linear loses output
directions, so that ranks can be traded between linears in one currency. Spectral energy
normalised per linear (ROM's ``global``) and one fraction everywhere (``uniform``) both ignore it:
on a pretrained LLM a direction of one layer's output can matter a hundred times more to the loss
than a direction of equal energy elsewhere.

Second-order estimate (docs/METHODS.md §6.3). With ``g = ∂L/∂y`` the gradient of the
calibration loss with respect to a linear's output ``y``, an output error ``Δy`` raises the loss by
about ``½ E[(gᵀΔy)²]`` (the first-order term vanishes near a minimum). Truncating a linear in the
eigenbasis ``u_i`` of its outputs' (co)variance, with eigenvalues ``λ_i``, drops the components
``(u_iᵀ y) u_i``, ``i > r``; with the gradient and the outputs taken as independent and the
gradient's covariance replaced by its diagonal ``D = diag E[g gᵀ]``, the cost of rank ``r`` is

    c(r) = Σ_{i>r} λ_i · w_i,      w_i = u_iᵀ D u_i = Σ_j u_ij² D_j,

in loss units, comparable across linears and layers. One backward pass of the dense model gives
every ``D`` (a vector per linear: no (out, out) matrix is kept), one statistics pass gives every
spectrum; the ranks then minimise ``Σ c_u(r_u)`` under the parameter budget by the greedy
water-filling of :func:`rankdown.allocate.global_ranks` on these curves, unnormalised.

The eigenbasis is the one ROM truncates in (centered for centered ROM); SVD-LLM's truncation is the
same subspace as uncentered ROM's (both minimise the output error on the calibration data), and the
curves of the other baselines are taken from it too: the allocation then says where the budget
hurts the loss least, which does not depend much on how each linear is factorised.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rankdown.allocate import Target, check_reachable, global_ranks
from rankdown.config import ConfigError

if TYPE_CHECKING:
    from rankdown.engine import PlanContext

log = logging.getLogger(__name__)

# calibration tokens the backward pass reads at most (the first windows): the diagonal of a
# gradient covariance settles long before the statistics of a 4096-wide layer do
DEFAULT_FISHER_TOKENS = 8192
# calibration tokens the spectra walk reads at most: ROM's global allocation's default
DEFAULT_SPECTRA_TOKENS = 32768


def unavailable(context: "PlanContext | None") -> str | None:
    """Why the fisher allocation cannot run on this model (None when it can)."""
    if context is None:
        return "it needs a calibration pass (call rankdown.compress())"
    model = context.model
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no language-modelling head to take the loss of"
    return None


def resolution(allocation: str, context: "PlanContext | None", fallback: str) -> tuple[str, str | None]:
    """``auto`` -> (fisher, None) where it can run, else (``fallback``, why not); others unchanged."""
    if allocation != "auto":
        return allocation, None
    why = unavailable(context)
    return ("fisher", None) if why is None else (fallback, why)


def resolve(allocation: str, context: "PlanContext | None", fallback: str) -> str:
    """``auto`` -> fisher where it can run, else ``fallback`` (a warning says so); others unchanged."""
    ran, why = resolution(allocation, context, fallback)
    if why is not None:
        log.warning("allocation auto: %s instead of fisher, because %s", ran, why)
    return ran


def output_fisher(context: "PlanContext", targets: list[Target], max_tokens: int = DEFAULT_FISHER_TOKENS,
                  layerwise: bool | None = None) -> dict[str, torch.Tensor]:
    """path -> ``diag E[g gᵀ]`` (out,) float64: the mean over predicted calibration tokens of the
    squared gradient of the summed next-token loss with respect to the linear's output.

    Weights frozen, nothing of the model changed. A model in memory: one forward and backward of
    the whole dense model per batch. A streamed model (or ``layerwise=True``): the same gradients
    one layer at a time (:func:`rankdown.engine.backward.output_gradients`), within the run's
    memory budget.
    """
    why = unavailable(context)
    if why is not None:
        raise ConfigError(f"the fisher allocation cannot run: {why}; choose another --allocation")
    data = context.calibration()
    ids, mask = data.input_ids, data.attention_mask
    if max_tokens > 0:
        rows = int((mask.sum(1).cumsum(0) < max_tokens).sum()) + 1
        ids, mask = ids[:rows], mask[:rows]
    if context.streamed if layerwise is None else layerwise:
        return _layerwise_fisher(context, targets, ids, mask)
    return _whole_fisher(context, targets, ids, mask)


def _layerwise_fisher(context: "PlanContext", targets: list[Target], ids: torch.Tensor, mask: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
    from rankdown import distributed
    from rankdown.engine.backward import output_gradients

    device = torch.device(context.device)
    sums = {t.path: torch.zeros(t.out_features, dtype=torch.float64, device=device) for t in targets}

    def add(path: str):
        def grad(g: torch.Tensor) -> None:
            sums[path].add_(g.reshape(-1, g.shape[-1]).to(torch.float64).pow(2).sum(0))
        return grad

    tokens = output_gradients(context.model, context.spec, context.store, ids, mask, context.batch_size, device,
                              {t.path: add(t.path) for t in targets}, context.budget, context.progress)
    for v in sums.values():  # under torchrun the processes shared the batches
        distributed.all_sum_(v)
    return {k: (v / max(tokens, 1)).cpu() for k, v in sums.items()}


def _whole_fisher(context: "PlanContext", targets: list[Target], ids: torch.Tensor, mask: torch.Tensor,
                  ) -> dict[str, torch.Tensor]:
    model = context.model
    device = torch.device(context.device)
    home = next(p.device for p in model.parameters())
    sums = {t.path: torch.zeros(t.out_features, dtype=torch.float64, device=device) for t in targets}
    hooks, frozen = [], [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training

    def hook(path: str):
        def grad(g: torch.Tensor) -> None:
            sums[path].add_(g.detach().reshape(-1, g.shape[-1]).to(torch.float64).pow(2).sum(0))

        def fwd(mod, args, out):
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    def leaf(mod, args, out):  # the graph starts at the embeddings' output: no weight gradient is made
        return out.detach().requires_grad_(True)

    tokens = 0
    try:
        model.eval()
        model.to(device)
        for p, _ in frozen:
            p.requires_grad_(False)
        hooks.append(model.get_input_embeddings().register_forward_hook(leaf))
        hooks += [model.get_submodule(t.path).register_forward_hook(hook(t.path)) for t in targets]
        with torch.enable_grad():
            for b in range(0, ids.shape[0], context.batch_size):
                x, m = ids[b : b + context.batch_size].to(device), mask[b : b + context.batch_size].to(device)
                logits = model(input_ids=x, attention_mask=m, use_cache=False).logits[:, :-1]
                labels = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                loss.backward()
                tokens += int((labels != -100).sum())
                del logits, loss
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.to(home)
        model.train(was_training)
    # under torchrun every process runs this whole pass on the same batches: the same result everywhere
    return {k: (v / max(tokens, 1)).cpu() for k, v in sums.items()}


def weighted_spectra(context: "PlanContext", targets: list[Target], fisher: dict[str, torch.Tensor],
                     center: bool, spectra_tokens: int) -> dict[str, torch.Tensor]:
    """path -> ``λ_i · w_i`` (k,) in the order of the eigenvalues ``λ_i`` (descending) of the
    target's output (co)variance on the dense model, ``w_i = Σ_j u_ij² D_j``; its tail sums are the
    loss cost of each rank (see the module docstring)."""
    from rankdown.methods.rom import ROM, ROMConfig

    def weigh(path: str, evals: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        D = fisher[path].to(V.device, torch.float64)
        w = (V.to(torch.float64).pow(2) * D[:, None]).sum(0)  # (k,)
        k = min(len(evals), len(w))
        return (evals[:k].clamp_min(0) * w[:k]).cpu()

    rom = ROM(ROMConfig(center=center, allocation="uniform", spectra_tokens=spectra_tokens))
    return rom.walk_spectra(targets, context, weigh, vectors=True)


def fisher_curves(context: "PlanContext", targets: list[Target], center: bool, fisher_tokens: int,
                  spectra_tokens: int) -> dict[str, torch.Tensor]:
    """The weighted spectra of every target, from the statistics cache when a run of the same model
    and calibration stored them."""
    settings = {"center": center, "targets": [t.path for t in targets], "fisher_tokens": fisher_tokens,
                "spectra_tokens": spectra_tokens}

    def compute() -> dict[str, torch.Tensor]:
        return weighted_spectra(context, targets, output_fisher(context, targets, fisher_tokens), center, spectra_tokens)

    return context.cached("fisher-spectra", settings, compute)


def fisher_ranks(
    targets: list[Target], total_params: int, ratio: float, multiple: int, context: "PlanContext | None",
    *, center: bool = False, with_bias: bool = False, fisher_tokens: int = DEFAULT_FISHER_TOKENS,
    spectra_tokens: int = DEFAULT_SPECTRA_TOKENS,
) -> dict[str, int]:
    """Ranks minimising the summed second-order loss cost ``Σ c_u(r_u)`` under the budget."""
    if context is None:
        raise ConfigError("the fisher allocation needs a calibration pass: call rankdown.compress(), "
                          "or use allocation='uniform'")
    check_reachable(targets, total_params, ratio, multiple, with_bias)  # fail before the passes
    curves = fisher_curves(context, targets, center, fisher_tokens, spectra_tokens)
    ranks = global_ranks(targets, curves, total_params, ratio, multiple, with_bias, normalise=False)
    cost = sum(float(curves[t.path][ranks[t.path]:].sum()) for t in targets if t.path in ranks)
    log.info("fisher allocation: predicted loss increase %.4f nats/token (second order, summed over %d targets)",
             0.5 * cost, len(targets))
    return ranks
