"""The base of every method config: the settings all methods share, documented, JSON round trip.

Each method's own config subclasses :class:`MethodConfig` in the method's file
(``rankdown/methods/<name>.py``). Each field's ``metadata["help"]`` is its documentation; the CLI
turns fields into flags from it. A config is checked when it is made: an invalid one cannot exist
(a field changed afterwards is checked again by :func:`rankdown.compress`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (the CLI's flag help); a list or dict default is copied per config."""
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

    ratio: float = setting(0.2, "fraction of ALL parameters to remove (embeddings and lm_head counted), in (0, 1)")
    rank_multiple: int | None = setting(
        None, "round ranks and kept sizes to a multiple of this (default: 8, or 1 when hidden_size < 1024)"
    )
    exclude: list[str] = setting([], "regular expressions of module names never to compress")
    allocation: str = setting(
        "uniform",
        "rank allocation: uniform (one kept fraction of every linear's parameters, as the baselines' papers), "
        "or fisher (ranks where they cost the model's loss least: a second-order estimate from one backward "
        "pass of the dense model, layer by layer when it is streamed, and its output spectra)",
    )
    fisher_tokens: int = setting(8192, "fisher allocation: calibration tokens its backward pass reads at most (0: all)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(
                f"ratio {self.ratio} is out of range: give the fraction of parameters to remove, "
                "strictly between 0 and 1 (e.g. --ratio 0.3 keeps 70%)"
            )
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.allocation not in self.allocations:
            raise ConfigError(f"unknown allocation {self.allocation!r} for {self.method}; "
                              f"choose one of: {', '.join(self.allocations)}")
        if not isinstance(self.fisher_tokens, int) or self.fisher_tokens < 0:
            raise ConfigError(f"fisher_tokens must be an integer >= 0 (0: all tokens), got {self.fisher_tokens!r}")
        for pattern in self.exclude:
            exclude_pattern(pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        d.pop("method", None)
        names = {f.name for f in dataclasses.fields(cls)}
        run = sorted(set(d) & RUN_FIELDS - names)
        if run:
            raise ConfigError(f"{', '.join(run)} {'is a run setting' if len(run) == 1 else 'are run settings'}, not "
                              f"a setting of {cls.method}: pass {'it' if len(run) == 1 else 'them'} in "
                              f"rankdown.RunSettings (compress(..., run=RunSettings({run[0]}=...)))")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.method} setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class RunSettings:
    """How a compression runs, apart from what it computes: where, in what batches, from which seed,
    within how much memory, with which statistics cache. One object for every method; a method's
    own config (:class:`MethodConfig`) holds only its mathematics."""

    device: str = setting("cpu", "device that runs the layer loop: cpu, cuda, cuda:1, ...")
    batch_size: int | None = setting(
        None, "calibration sequences per forward pass (default: the method's, 8; lillama's 4, which is "
        "also its optimiser step)")
    seed: int = setting(0, "random seed (calibration sampling and any randomised step)")
    max_memory: str | None = setting(
        None, "calibration activations kept in RAM, e.g. 8GB; beyond it they go to temporary files "
        "(default: no limit; 0 puts them all on disk)"
    )
    stats_cache: str | None = setting(
        None, "folder keeping statistics of the dense model between runs (ROM's global allocation): another "
        "ratio or allocation of the same model and calibration skips that pass"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        from rankdown.storage import parse_bytes

        try:
            parse_bytes(self.max_memory)
        except ValueError as e:
            raise ConfigError(f"max_memory: {e}") from None
        from rankdown.distributed import check_device  # (distributed imports this module)

        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSettings":
        unknown = sorted(set(d) - RUN_FIELDS)
        if unknown:
            raise ConfigError(f"unknown run setting(s) {unknown}; known: {sorted(RUN_FIELDS)}")
        return cls(**d)


RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunSettings))


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``settings`` as (method settings, run settings): for callers that take both in one place
    (a bench method spec such as ``lillama:batch_size=2``)."""
    run = {k: v for k, v in settings.items() if k in RUN_FIELDS}
    return {k: v for k, v in settings.items() if k not in RUN_FIELDS}, run
