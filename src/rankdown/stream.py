"""Compressing a model folder into a folder, holding one decoder layer in RAM at a time (the
layers are read from and written to safetensors files by :class:`rankdown.storage.folder.StreamedModel`).

The folder written is the same as :func:`rankdown.io.save` writes for the model compressed in
memory (tested: same logits), and appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from rankdown import distributed
from rankdown.storage.folder import StreamedModel
from rankdown.storage.resume import ResumableStore, RunState, _after_failure, _fingerprint, _lock, _open_state
from rankdown.storage.weights import INDEX, SINGLE


def can_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder with safetensors weights (the condition for streaming)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / SINGLE).is_file() or (p / INDEX).is_file())


def streamable_family(path: str | os.PathLike) -> bool:
    """Whether the family in folder ``path`` can be streamed (not fused experts, not GPT-2's Conv1D)."""
    from rankdown import io
    from rankdown.arch import FAMILIES

    cfg = io._read_config(Path(path).expanduser())
    record = cfg.get("rankdown") or {}
    model_type = record.get("base_model_type") or cfg.get("model_type")
    spec = next((s for s in FAMILIES if model_type in s.model_types), None)
    return spec is not None and spec.streamable  # the generic path looks at the model in memory


def partial_folder(out: Path) -> Path:
    """Where a streaming run into ``out`` keeps its finished layers until the folder is written."""
    return out.parent / f".{out.name}.rankdown-partial"


def compress_folder(
    path: str | os.PathLike,
    out: str | os.PathLike,
    config: Any,
    calibration: Any,
    *,
    run: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    dtype: torch.dtype = torch.float32,
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = True,
    on_resume: Callable[[int, Path], None] | None = None,
    cost: bool = False,
) -> tuple[Any, Path]:
    """Compress the model in folder ``path`` into folder ``out`` holding one layer at a time.

    Same arguments and same result as loading the model, :func:`rankdown.compress` and
    :func:`rankdown.save`. Returns (report, out path). The layers compute in ``dtype``; the folder
    is written in ``save_dtype``, by default the dtype the input is stored in (a float16 model
    stays float16 on disk).

    Resumable: finished layers are kept beside ``out`` (``.OUT.rankdown-partial``) until the folder
    is written; after an interruption (Ctrl-C, SIGTERM, a kill, a full disk, no memory left) the same
    call continues after the last finished layer and gives the same model. After any other failure
    (bad input: the same call would fail the same way) nothing is kept. A partial run of other
    settings or inputs is refused (:class:`ResumeMismatchError` names what differs); ``resume=False``
    discards it. A run holds a lock on the partial folder: a second run into ``out`` meanwhile is
    refused (:class:`OutputBusyError`). ``on_resume(finished_layers, partial_folder)`` is called
    when a run resumes (the CLI says so; the library only logs it).

    An application may call :func:`rankdown.heap.map_big_blocks` first (the CLI does): glibc then
    returns each big block to the system when freed, which lowers the peak memory of a long run;
    the library never changes process-wide allocator settings itself.

    Under torchrun every process calls this with the same arguments and computes the same model
    (see :mod:`rankdown.distributed`); only process 0 writes: the folder, the shards, the state.
    """
    from rankdown import io
    from rankdown.api import _calibration, compress
    from rankdown.config import RunSettings
    from rankdown.methods import method_class

    config.validate()
    run = RunSettings() if run is None else run
    run.validate()
    distributed.setup(run.device)
    path = Path(path).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    io._check_out_dir(out, overwrite, [path])
    work = partial_folder(out)
    fresh = not work.exists()
    lock = distributed.on_main(lambda: _lock(out, work))
    state, resumable = None, True
    try:
        if distributed.is_main():
            io.clear_stale(out)
        tokenizer = io.load_tokenizer(path) if io.has_tokenizer(path) else None
        save_dtype = save_dtype or io.checkpoint_dtype(path) or dtype
        method = method_class(config.method)
        if method.reads_calibration(config):  # the run depends on the tokens, not on the name of their source
            calibration = _calibration(tokenizer, calibration, nsamples, seqlen, run.seed,
                                       getattr(config, "calib_tokens", None), model=path)  # path: for --calib self
        resumable = getattr(method, "resumable", True)
        # process 0 reads or starts the state; under torchrun the others get a copy they never write
        state = distributed.on_main(lambda: _open_state(
            work, _fingerprint(path, config, run.batch_size or method.default_batch_size, run, calibration, nsamples, seqlen, dtype,
                               save_dtype), resume and resumable,
            on_resume))
        streamed = StreamedModel(path, dtype, work, save_dtype)
        report = compress(streamed.model, tokenizer, config, calibration, run=run, nsamples=nsamples, seqlen=seqlen,
                          progress=progress, store=ResumableStore(streamed, state) if resumable else streamed, cost=cost)
        if isinstance(state, RunState):  # a resumed run: the seconds its earlier runs spent too
            report.seconds_earlier = state.earlier
        distributed.barrier()  # every process is done reading finished layers from the work folder
        if not distributed.is_main():
            return report, out
        streamed.model.config.dtype = str(save_dtype).split(".")[1]
        saved = io.save(streamed.model, tokenizer, out, record=report.record(), structure=report.structure,
                        overwrite=overwrite, extra_files=report.artifacts, weights=streamed.write_weights,
                        inputs=[path])
    except BaseException as e:
        if distributed.is_main():
            _after_failure(e, work, state, fresh, resumable)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if distributed.is_main():
            os.close(lock)  # after the work folder is gone: a run that waited finds none
    return report, saved

