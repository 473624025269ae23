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
    from rankdown.config import ConfigError
    from rankdown.pipeline import compress_model

    calib_given = args.calib is not None
    _calib_defaults(args)
    config = _method_config(args)
    run = _run_settings(args)
    heal = _heal_config(args)
    check_compress(args, config, calib_given and heal is None)  # healing reads the calibration
    if args.dry_run:
        return _dry_run(args, config, run)
    if args.out is None:  # an hour of compression thrown away at the end helps nobody
        raise ConfigError("no --out: give --out DIR to save the compressed model, or --dry-run to print the plan "
                          "(ranks, parameters, size on disk) without compressing")

    def resuming(done: int, work: Path) -> None:
        print(f"resuming: {done} layers were finished by an earlier run ({work}; --restart starts over)", flush=True)

    done = compress_model(args.model, args.out, config, args.calib, run=run, nsamples=args.nsamples,
                          seqlen=args.seqlen, dtype=args.dtype, save=args.save_dtype, overwrite=args.overwrite,
                          stream=args.stream, progress=not args.quiet, resume=not args.restart, on_resume=resuming,
                          heal=heal, cost=args.cost)
    out = None if done.out is None else str(done.out)
    result = {**done.report.summary(), "out": out, "streamed": done.streamed, "cost": done.report.cost()}
    earlier = done.report.seconds_earlier
    if earlier:
        result["seconds_total"] = round(done.report.seconds + earlier, 3)
    if out:
        result["bytes_on_disk"] = weights_bytes(Path(out))
        result["save_dtype"] = _saved_dtype(Path(out))
    if not distributed.is_main():  # process 0 speaks for all
        return result
    columns = ["method", "ratio_requested", "params_before", "params_after", "ratio_achieved", "seconds"]
    print(table([result], columns + (["seconds_total"] if earlier else [])))
    if earlier:
        print(f"this run took {done.report.seconds:.1f} s; with the {earlier:.1f} s of the run(s) it resumed, "
              f"{done.report.seconds + earlier:.1f} s in total")
    alloc = done.report.allocation
    if alloc:  # what ran, said where it differs from what was asked
        asked = alloc.get("requested")
        why = alloc.get("fallback_because")
        print(f"allocation: {alloc['allocation']}" + (f" (asked: {asked})" if asked and asked != alloc['allocation'] else "")
              + (f", because {why}" if why else ""))
    if done.report.heal:
        h = done.report.heal
        print(f"healed: held-out KL to the dense model {h['kl_before']:.4f} -> {h['kl_after']:.4f} "
              f"({h['steps']} steps, best at {h['best_step']}, {h['seconds']:.0f}s)")
    if args.cost:
        print(cost_lines(result["cost"]))
    if out:
        print(f"saved to {out}: {_size(result['bytes_on_disk'])} on disk in {result['save_dtype']} "
              f"(--save-dtype {_other_dtype(result['save_dtype'])} changes it)")
    return result


def _dry_run(args: argparse.Namespace, config: MethodConfig, run: Any) -> dict[str, Any]:
    """``--dry-run``: the plan printed, nothing compressed, nothing written."""
    from rankdown.planning import plan_model

    plan = plan_model(args.model, config, args.calib, run=run, nsamples=args.nsamples, seqlen=args.seqlen,
                      dtype=args.dtype, save=args.save_dtype, stream=args.stream, progress=not args.quiet)
    what = "kept size" if plan.kept_sizes else "rank"
    rows = [{"module": k, what: v} for k, v in plan.ranks.items()]
    print(table(rows, ["module", what]) if rows else "no module would be replaced")
    print()
    print(f"dry run of {plan.method} at ratio {plan.ratio_requested}: {len(plan.ranks)} of {plan.targets} linears "
          f"replaced{' (kept inner sizes: q/k and v head sizes, MLP width)' if plan.kept_sizes else ''}")
    print(f"parameters: {plan.params_before:,} -> {plan.params_after:,} ({plan.ratio_achieved:.4f} removed)")
    print(f"size on disk: about {_size(plan.bytes_on_disk)} in {plan.save_dtype} (--save-dtype "
          f"{_other_dtype(plan.save_dtype)} changes it); nothing was written")
    return {**plan.to_dict(), "dry_run": True}


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files in a saved folder."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _saved_dtype(folder: Path) -> str:
    from rankdown.io import checkpoint_dtype

    found = checkpoint_dtype(folder)
    return "unknown" if found is None else str(found).split(".")[1]


def _other_dtype(dtype: str) -> str:
    return "float32" if dtype != "float32" else "bfloat16"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def cost_lines(cost: dict[str, Any]) -> str:
    """The stage table of ``--cost``: seconds and multiples of one dense forward."""
    rows = [{"stage": k, "seconds": v["seconds"], "x forward": v["forwards"]} for k, v in cost["stages"].items()]
    unit = cost["forward_seconds"]
    head = (f"cost in dense forwards (one {cost['forward']} over the calibration tokens: {unit:.2f} s)"
            if unit else "cost per stage (no dense forward measured: a data-free method)")
    return head + "\n" + table(rows, ["stage", "seconds", "x forward"])
