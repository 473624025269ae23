"""What the command line checks before any work (a model loaded, a text tokenized, a minute of
evaluation), and the words of its errors: each says what is wrong and what to do."""

from __future__ import annotations

import argparse
import errno
import logging
from pathlib import Path
from typing import Any

from rankdown.config import MethodConfig
from rankdown.loading import check_folder_config, is_reference
from rankdown.methods import METHODS

log = logging.getLogger("rankdown")


def uses_calibration(config: MethodConfig) -> bool:
    """Whether compressing with ``config`` reads calibration text (svd does not, unless its ranks
    come from the fisher allocation)."""
    return METHODS[config.method].reads_calibration(config)


def check_compress(args: argparse.Namespace, config: MethodConfig, calib_given: bool) -> None:
    """What can be checked before a model is loaded: the calibration source, size and window length
    (against the model's config.json where there is one), and the statistics cache's folder."""
    from rankdown.calib import CalibrationError, check_seqlen, check_size, check_source
    from rankdown.calib.sources import is_record_source
    from rankdown.config import ConfigError

    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '' names no folder: give the folder to save to (or leave --out out to save nothing)")
    if not is_reference(args.model) and (Path(args.model).expanduser() / "config.json").is_file():
        check_folder_config(args.model)  # before any work: a config.json no model can be built from
    uses = uses_calibration(config)
    try:
        check_source(args.calib)
    except CalibrationError as e:
        if uses:
            raise
        raise CalibrationError(f"{e} ({config.method} uses no calibration: drop --calib)") from None
    if not uses and calib_given:
        log.warning("%s uses no calibration data: --calib %s is not read", config.method, args.calib)
    if args.nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1 (calibration windows), got {args.nsamples}; e.g. --nsamples 128")
    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {args.seqlen}; e.g. --seqlen 2048")
    if uses and not is_record_source(args.calib):
        check_size(args.nsamples, args.seqlen)
    if uses:
        cfg = config_json(args.model)
        if cfg is not None:
            check_seqlen(cfg, args.seqlen)
    if args.stats_cache:
        from rankdown.io import check_writable

        try:
            check_writable(args.stats_cache)
        except OSError as e:
            raise ConfigError(f"--stats-cache {args.stats_cache} cannot be written ({e.strerror}): give a folder "
                              "rankdown can write to, or drop --stats-cache") from None


def config_json(model: str | None) -> dict | None:
    """config.json of the reference or of a local model folder; None for a hub id or a GGUF file."""
    from rankdown.io.record import _read_config

    if is_reference(model):
        from rankdown.reference import reference_dir

        return _read_config(reference_dir())
    path = Path(model).expanduser()
    return _read_config(path) if (path / "config.json").is_file() else None


def names(text: str, flag: str, example: str) -> list[str]:
    """The comma-separated names of ``flag``; none at all is a mistake, not a request for the default."""
    from rankdown.config import ConfigError

    found = [n.strip() for n in text.split(",") if n.strip()]
    if not found:
        raise ConfigError(f"{flag} {text!r} names nothing: give names separated by commas, e.g. {flag} {example} "
                          f"(leave {flag} out for the default)")
    return found


def disk_advice(args: argparse.Namespace, e: OSError, notes: str = "") -> str:
    """What a failed write into --out means and what to do; ``notes``: what the run kept (a streamed
    run's finished layers, to resume from), said instead of 'nothing incomplete was left behind'."""
    path = e.filename or getattr(args, "out", None)
    flag = "--out"  # (the statistics cache reports its own: see stats_cache.py)
    where = f" {path}" if path else ""
    left = notes or " (nothing incomplete was left behind)"
    if e.errno == errno.ENOTDIR and path:
        p = Path(path).expanduser().absolute()
        file = next((a for a in (p, *p.parents) if a.exists() and not a.is_dir()), None)
        if file is not None:
            what = "it is" if file == p else f"{file} is"
            return f"cannot write{where}: {what} a file, not a folder; choose another {flag}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write{where}: {e.strerror or e}; free some space or choose another {flag}{left}"
    return f"cannot write{where}: {e.strerror or e}; choose a writable {flag}{left}"


def int_list(text: str, flag: str) -> list[int]:
    """The comma-separated whole numbers >= 1 of ``flag``."""
    from rankdown.config import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes whole numbers separated by commas, e.g. 1,8; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes whole numbers >= 1 separated by commas, e.g. 1,8; got {text!r}")
    return values


def float_list(text: str, flag: str) -> list[float]:
    """The comma-separated numbers of ``flag``."""
    from rankdown.config import ConfigError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, e.g. 0.1,0.2; got {text!r}") from None


def given(value: Any, default: Any) -> Any:
    """``value`` unless it was not given (None): a given 0 reaches the validation and its error."""
    return default if value is None else value
