"""From a model's name to a compressed model folder: ``rankdown compress`` as one function.

:func:`compress_model` refuses an output folder that is taken or unwritable before any work, then
either streams (reads the model one layer at a time from its files and writes the result shard by
shard, rankdown/stream.py) or loads the whole model, compresses it with :func:`rankdown.compress`
and saves it. :func:`rankdown.loading.should_stream` decides which.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rankdown.api import CompressionReport
from rankdown.config import MethodConfig, RunSettings
from rankdown.loading import is_reference, load_model, save_dtype, should_stream, source_record


class Compressed(NamedTuple):
    report: CompressionReport
    out: Path | None  # the saved folder (None: nothing saved, or not this process's to save)
    streamed: bool


def compress_model(
    model: str | None,
    out: str | os.PathLike | None,
    config: MethodConfig,
    calibration: Any,
    *,
    run: RunSettings | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    dtype: str = "float32",
    save: str = "auto",
    overwrite: bool = False,
    stream: bool | None = None,
    progress: bool = True,
    resume: bool = True,
    on_resume: Callable[[int, Path], None] | None = None,
    heal: Any = None,
    cost: bool = False,
) -> Compressed:
    """Compress model ``model`` (a name as :func:`rankdown.loading.load_model` takes it) and save it
    to ``out`` (None: compress only, in memory).

    ``dtype``: the dtype it is loaded (a GGUF file: dequantized) in; ``save``: the dtype it is saved
    in (``auto``: :func:`rankdown.loading.save_dtype`). ``stream``: None decides, True insists,
    False loads the whole model. A streamed run killed midway resumes from its finished layers
    (``resume=False`` starts over; ``on_resume(done, folder)`` is told). Under torchrun every
    process takes part and process 0 saves (see rankdown/distributed.py). ``heal`` (a
    :class:`rankdown.heal.HealConfig`) distils the compressed model towards the dense one afterwards
    (rankdown/heal.py); it needs the whole model in memory, so it is loaded whole. ``cost``: also time one
    dense forward, the unit of the report's cost (see :func:`rankdown.compress`); the save's seconds
    are added to the report's stages (not to the record already saved).
    """
    import torch

    import rankdown
    from rankdown import distributed

    run = run or RunSettings()
    distributed.setup(run.device)  # under torchrun: join the other processes
    if out:  # before any work: an out that is taken, or is (or holds, or is inside) the input
        from rankdown.io import _check_out_dir, check_writable

        local = [] if is_reference(model) else [Path(model).expanduser()]
        _check_out_dir(Path(out).expanduser().absolute(), overwrite, [p for p in local if p.exists()])
        check_writable(out)
    if heal is not None:
        from rankdown.config import ConfigError

        if stream:
            raise ConfigError("--heal trains the whole compressed model and needs it in memory: drop --stream "
                              "(or --heal)")
        stream = False
    if should_stream(model, out, config.method, stream):
        from rankdown import heap
        from rankdown.stream import compress_folder

        heap.map_big_blocks()  # big blocks back to the system when freed: a lower peak over a long run
        report, saved = compress_folder(model, out, config, calibration, run=run, nsamples=nsamples, seqlen=seqlen,
                                        dtype=getattr(torch, dtype), save_dtype=save_dtype(model, save, dtype),
                                        overwrite=overwrite, progress=progress, resume=resume,
                                        on_resume=on_resume, cost=cost)
        return Compressed(report, Path(saved), True)
    loaded, tokenizer = load_model(model, dtype)
    try:
        report = rankdown.compress(loaded, tokenizer, config, calibration, run=run, nsamples=nsamples, seqlen=seqlen,
                                   progress=progress, heal=heal, cost=cost)
    except KeyboardInterrupt as e:  # say what an interrupted in-memory run leaves: nothing
        e.add_note(f"the model was compressed in memory: nothing was kept{f' and nothing written to {out}' if out else ''}"
                   "; the same command starts over")
        raise
    saved = None
    if out and distributed.is_main():
        t0 = time.perf_counter()
        loaded.to(save_dtype(model, save, dtype))
        saved = rankdown.save(loaded, tokenizer, out, report, overwrite=overwrite, source=source_record(model))
        report.stages["save"] = report.stages.get("save", 0.0) + time.perf_counter() - t0
    return Compressed(report, saved, False)
