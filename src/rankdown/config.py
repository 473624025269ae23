"""Method configs: one dataclass per method, fields documented, JSON round trip.

Each field's ``metadata["help"]`` is its documentation; the CLI turns fields into flags from it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A setting is out of its range or unknown; the message names it and the fix."""


def exclude_pattern(text: str) -> "re.Pattern[str]":
    """An ``exclude`` entry compiled; a :class:`ConfigError` that says how to escape it when it is not a regex."""
    try:
        return re.compile(text)
    except (re.error, TypeError) as e:
        raise ConfigError(f"--exclude {text!r} is not a valid regular expression ({e}); escape special characters "
                          f"with a backslash (e.g. {re.escape(str(text))!r})") from None


@dataclass
class MethodConfig:
    """Settings every method shares."""

    method: ClassVar[str] = ""
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "fisher")

    ratio: float = _f(0.2, "fraction of ALL parameters to remove (embeddings and lm_head counted), in (0, 1)")
    rank_multiple: int | None = _f(
        None, "round ranks and kept sizes to a multiple of this (default: 8, or 1 when hidden_size < 1024)"
    )
    exclude: list[str] = _f([], "regular expressions of module names never to compress")
    batch_size: int = _f(8, "calibration sequences per forward pass")
    device: str = _f("cpu", "device that runs the layer loop: cpu, cuda, cuda:1, ...")
    seed: int = _f(0, "random seed (calibration sampling and any randomised step)")
    max_memory: str | None = _f(
        None, "calibration activations kept in RAM, e.g. 8GB; beyond it they go to temporary files "
        "(default: no limit; 0 puts them all on disk)"
    )
    stats_cache: str | None = _f(
        None, "folder keeping statistics of the dense model between runs (ROM's global allocation): another "
        "ratio or allocation of the same model and calibration skips that pass"
    )
    allocation: str = _f(
        "uniform",
        "rank allocation: uniform (one kept fraction of every linear's parameters, as the baselines' papers), "
        "or fisher (ranks where they cost the model's loss least: a second-order estimate from one backward "
        "pass of the dense model and its output spectra; the model must be in memory)",
    )
    fisher_tokens: int = _f(8192, "fisher allocation: calibration tokens its backward pass reads at most (0: all)")

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(
                f"ratio {self.ratio} is out of range: give the fraction of parameters to remove, "
                "strictly between 0 and 1 (e.g. --ratio 0.3 keeps 70%)"
            )
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        from rankdown.spill import parse_bytes

        try:
            parse_bytes(self.max_memory)
        except ValueError as e:
            raise ConfigError(f"max_memory: {e}") from None
        if self.allocation not in self.allocations:
            raise ConfigError(f"unknown allocation {self.allocation!r} for {self.method}; "
                              f"choose one of: {', '.join(self.allocations)}")
        if not isinstance(self.fisher_tokens, int) or self.fisher_tokens < 0:
            raise ConfigError(f"fisher_tokens must be an integer >= 0 (0: all tokens), got {self.fisher_tokens!r}")
        for pattern in self.exclude:
            exclude_pattern(pattern)
        from rankdown.distributed import check_device  # (distributed imports this module)

        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        d.pop("method", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.method} setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class SVDConfig(MethodConfig):
    """Plain truncated SVD of each weight (data-free baseline)."""

    method: ClassVar[str] = "svd"


@dataclass
class ASVDConfig(MethodConfig):
    """Activation-aware SVD (Yuan et al. 2023): columns scaled by mean |x|^alpha before the SVD."""

    method: ClassVar[str] = "asvd"
    alpha: float = _f(0.5, "exponent of the mean absolute activation used as column scale")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"alpha must be in [0, 2], got {self.alpha}")


@dataclass
class SVDLLMConfig(MethodConfig):
    """SVD-LLM (Wang et al. 2024): truncation-aware whitening by the Cholesky factor of C_in."""

    method: ClassVar[str] = "svd-llm"


ROM_ALLOCATIONS = ("auto", "fisher", "global", "uniform", "last-k")


@dataclass
class ROMConfig(MethodConfig):
    """ROM (Chavan, Lele, Gupta 2023): each linear re-parameterised in the principal subspace of its outputs."""

    method: ClassVar[str] = "rom"
    allocations: ClassVar[tuple[str, ...]] = ROM_ALLOCATIONS
    center: bool = _f(
        True,
        "center the output statistics (covariance; the mean goes into the low-rank layer's bias, which adds "
        "one bias to layers without one); False: the paper's uncentered correlation (--no-center)",
    )
    allocation: str = _f(
        "auto",
        "rank allocation: auto (the default: fisher where it can run, else global), fisher (ranks where they cost "
        "the model's loss least, see the shared --allocation; the model must be in memory), global (water-filling on the dense model's output spectra; one extra statistics "
        "pass), uniform (one module budget everywhere), last-k (the paper's: only the last K layers)",
    )
    last_k: int | None = _f(
        None, "last-k allocation: number of final layers to compress (default: the smallest K at module budget >= 0.33)"
    )
    spectra_tokens: int = _f(
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


LILLAMA_STRATEGIES = ("bottom", "top", "uniform")
LILLAMA_INITS = ("svd", "rom")
LILLAMA_LOSSES = ("teacher+student", "teacher", "student")


@dataclass
class LillamaConfig(MethodConfig):
    """Lillama (Sy, Cerisara, Illina 2025): SVD-initialised low-rank factors trained so each decoder
    layer's output matches the original's, gradients kept local to the layer."""

    method: ClassVar[str] = "lillama"
    allocations: ClassVar[tuple[str, ...]] = ("auto", "fisher", "strategy")
    strategy: str | None = _f(
        None,
        "with --allocation strategy: bottom (the default there; the paper's: matrices set to --min-rank from the first layer until the budget "
        "is met, later layers dense), top (the same from the last layer), uniform (one kept fraction everywhere)",
    )
    allocation: str = _f("auto", "auto (the default: fisher where it can run, else strategy), fisher (ranks where "
                         "they cost the loss least, see the shared --allocation) or strategy (the ranks --strategy gives)")
    batch_size: int = _f(4, "calibration sequences per forward pass and per optimiser step")
    min_rank: int | None = _f(None, "bottom/top: the rank a compressed matrix gets (default hidden_size/4)")
    init: str = _f("rom", "initial factors: rom (the default: ROM's activation-aware, uncentered factors) or svd "
                   "(the paper's plain weight SVD, ~10^6 x dense perplexity as a start on a pretrained model)")
    loss: str = _f("teacher+student", "which inputs the layer is trained on: teacher (the dense model's), student "
                   "(the compressed layers' before it) or teacher+student (both losses summed)")
    lr: float = _f(1e-4, "AdamW learning rate of the factors (measured on SmolLM2-135M from the rom start; the "
                   "paper's 8.6e-5 is for bf16 billion-parameter models)")
    epochs: int = _f(2, "passes over the calibration tokens per layer; the best of the initial and every "
                     "epoch's factors is kept")
    calib_tokens: int | None = _f(None, "calibration token budget: ceil(N/seqlen) windows of a text, or chat/JSONL "
                                  "records until N real tokens (default: --nsamples windows)")

    def validate(self) -> None:
        super().validate()
        if self.allocation in ("auto", "fisher") and (self.strategy is not None or self.min_rank is not None):
            raise ConfigError("--strategy and --min-rank choose lillama's ranks only with --allocation strategy; "
                              "add --allocation strategy, or drop them to keep the fisher allocation")
        for name, value, allowed in (("strategy", self.strategy or "bottom", LILLAMA_STRATEGIES),
                                     ("init", self.init, LILLAMA_INITS), ("loss", self.loss, LILLAMA_LOSSES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
        if self.min_rank is not None:
            if self.strategy == "uniform":
                raise ConfigError("min_rank is used by --strategy bottom or top, not uniform")
            if self.min_rank < 1:
                raise ConfigError(f"min_rank must be >= 1, got {self.min_rank}")
        if not self.lr > 0.0:
            raise ConfigError(f"lr must be > 0, got {self.lr} (e.g. --lr 1e-3)")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0 (0 keeps the initial factors), got {self.epochs}")
        if self.calib_tokens is not None and self.calib_tokens < 1:
            raise ConfigError(f"calib_tokens must be >= 1, got {self.calib_tokens}")


MODEGPT_ALLOCATIONS = ("block-influence", "uniform", "fisher")


@dataclass
class ModeGPTConfig(MethodConfig):
    """MoDeGPT (Lin et al. 2025): matrix pairs share a smaller inner dimension (MLP width, q/k and v head sizes)."""

    method: ClassVar[str] = "modegpt"
    allocations: ClassVar[tuple[str, ...]] = MODEGPT_ALLOCATIONS
    allocation: str = _f(
        "block-influence",
        "layer sparsity: block-influence (layers that change their input less lose more; one extra statistics "
        "pass over the dense model) or uniform (every layer loses the same fraction)",
    )
    epsilon: float = _f(0.1, "block-influence temperature ε of softmax(-s/ε): smaller concentrates sparsity more")
    cap: float = _f(0.9, "largest fraction of a module's inner dimension one layer may lose, in (0, 1)")
    ridge: float = _f(1e-2, "Nyström ridge λ of the MLP, as a fraction of the mean diagonal of its correlation")
    qk_share: float = _f(
        0.25,
        "fraction of a layer's sparsity that its query/key head size loses (the rest is paid by value/output "
        "and MLP); 1 is the paper's rule, 0.25 measured best on the reference model",
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.qk_share <= 1.0:
            raise ConfigError(f"qk_share must be in [0, 1] (1 = the paper's rule), got {self.qk_share}")
        if self.allocation not in MODEGPT_ALLOCATIONS:
            raise ConfigError(
                f"unknown allocation {self.allocation!r}; choose one of: {', '.join(MODEGPT_ALLOCATIONS)}"
            )
        if not self.epsilon > 0.0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0.0 < self.cap < 1.0:
            raise ConfigError(f"cap must be in (0, 1), got {self.cap}")
        if not self.ridge > 0.0:
            raise ConfigError(f"ridge must be > 0 (it keeps the Nyström inverse finite), got {self.ridge}")
