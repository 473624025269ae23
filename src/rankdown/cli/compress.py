"""rankdown compress: flags -> a method config and run settings, checked; the work is
:func:`rankdown.pipeline.compress_model`'s."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from rankdown.cli.checks import check_compress, given
from rankdown.cli.output import table
from rankdown.config import MethodConfig
from rankdown.loading import defaults_for
from rankdown.methods import METHODS


def _method_config(args: argparse.Namespace) -> MethodConfig:
    from rankdown.config import ConfigError

    cls = METHODS[args.method].config_class
    own = {f.name for f in dataclasses.fields(cls)}
    for other in METHODS.values():  # a flag of another method is a mistake, not something to ignore
        for f in dataclasses.fields(other.config_class):
            if f.name not in own and getattr(args, f.name, None) is not None:
                raise ConfigError(f"--{f.name.replace('_', '-')} is a setting of {other.config_class.method}, "
                                  f"not of {args.method}; remove it or choose --method {other.config_class.method}")
    settings = {n: getattr(args, n) for n in own if getattr(args, n, None) is not None}
    return cls.from_dict(settings)


def _run_settings(args: argparse.Namespace):
    """--device, --batch-size, --seed, --max-memory and --stats-cache as one RunSettings."""
    from rankdown.config import RUN_FIELDS, RunSettings

    return RunSettings(**{n: getattr(args, n) for n in RUN_FIELDS if getattr(args, n, None) is not None})


def _heal_config(args: argparse.Namespace):
    """--heal and its --heal-* settings as a HealConfig (None without --heal)."""
    from rankdown.config import ConfigError
    from rankdown.heal import HealConfig

    given_ = {f.name: getattr(args, "heal_" + f.name) for f in dataclasses.fields(HealConfig)
              if getattr(args, "heal_" + f.name, None) is not None}
    if not getattr(args, "heal", False):
        if given_:
            raise ConfigError(f"--heal-{next(iter(given_)).replace('_', '-')} is a setting of healing: add --heal")
        return None
    return HealConfig(**given_)


def _calib_defaults(args: argparse.Namespace) -> None:
    defaults = defaults_for(args.model)
    args.calib = given(args.calib, defaults.calib)
    args.seqlen = given(args.seqlen, defaults.seqlen)


def cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from rankdown import distributed
    from rankdown.pipeline import compress_model

    calib_given = args.calib is not None
    _calib_defaults(args)
    config = _method_config(args)
    run = _run_settings(args)
    heal = _heal_config(args)
    check_compress(args, config, calib_given and heal is None)  # healing reads the calibration

    def resuming(done: int, work: Path) -> None:
        print(f"resuming: {done} layers were finished by an earlier run ({work}; --restart starts over)", flush=True)

    done = compress_model(args.model, args.out, config, args.calib, run=run, nsamples=args.nsamples,
                          seqlen=args.seqlen, dtype=args.dtype, save=args.save_dtype, overwrite=args.overwrite,
                          stream=args.stream, progress=not args.quiet, resume=not args.restart, on_resume=resuming,
                          heal=heal)
    out = None if done.out is None else str(done.out)
    result = {**done.report.summary(), "out": out, "streamed": done.streamed}
    if not distributed.is_main():  # process 0 speaks for all
        return result
    print(table([result], ["method", "ratio_requested", "params_before", "params_after", "ratio_achieved", "seconds"]))
    if done.report.heal:
        h = done.report.heal
        print(f"healed: held-out KL to the dense model {h['kl_before']:.4f} -> {h['kl_after']:.4f} "
              f"({h['steps']} steps, best at {h['best_step']}, {h['seconds']:.0f}s)")
    if out:
        print(f"saved to {out}")
    return result
