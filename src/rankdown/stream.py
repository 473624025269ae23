"""Compressing a model bigger than memory: one decoder layer in RAM at a time.

The model is built as a skeleton on the meta device (no memory); only the tensors outside the
layers that the calibration pass needs (the input embeddings) are read. The engine then asks for
layer ``i`` (:meth:`StreamedModel.load`: its tensors are read one by one from the safetensors
files, opening the file for each so the memory map never grows to the whole file), compresses it,
and gives it back (:meth:`StreamedModel.release`): on the compressing pass its new tensors go to a
shard file of their own, then the layer returns to the meta device. The tensors outside the layers
are never compressed; they are copied from the input files into the last shard. With
``--max-memory`` the calibration activations go to disk too (see spill.py), so the peak is about
one layer, its statistics, and the activations allowed in RAM.

The folder written is the same as :func:`rankdown.io.save` writes for the model compressed in
memory (tested: same logits), and appears complete or not at all.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rankdown import distributed, heap
from rankdown.config import ConfigError
from rankdown.io import ModelFolderError

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class FolderWeights:
    """Where each tensor of a safetensors model folder lives; reads one tensor at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        from rankdown.io import check_weights

        self.path = Path(path)
        if not ((self.path / INDEX).is_file() or (self.path / SINGLE).is_file()):
            raise ModelFolderError(
                f"{self.path} holds no {SINGLE} or {INDEX}: streaming reads safetensors weights only "
                "(convert .bin checkpoints with save_pretrained, or compress without --stream)"
            )
        check_weights(self.path)  # every file listed is there and readable
        if (self.path / INDEX).is_file():
            index = json.loads((self.path / INDEX).read_text(encoding="utf-8"))
            self.files = {k: self.path / f for k, f in index["weight_map"].items()}
        else:
            with safe_open(self.path / SINGLE, "pt") as f:
                self.files = {k: self.path / SINGLE for k in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, dtype: torch.dtype | None = None, block_bytes: int = 16 * 2**20) -> torch.Tensor:
        """A copy of tensor ``name`` (in ``dtype``); NaN or Inf refused.

        Read in row blocks of about ``block_bytes``, the file opened afresh for each: the pages of a
        memory map stay resident until it is closed, so this keeps the peak at the result plus one
        block instead of the result plus the whole tensor in the file.
        """
        from safetensors import safe_open

        file = self.files[name]
        with safe_open(file, "pt") as f:
            sl = f.get_slice(name)
            shape, first = sl.get_shape(), (sl[0:1] if sl.get_shape() else f.get_tensor(name).clone())
        out = torch.empty(shape, dtype=dtype or first.dtype)
        if not shape:
            out.copy_(first)
            self._check(name, first)
            return out
        step = max(1, block_bytes // max(1, first.numel() * first.element_size()))
        for a in range(0, shape[0], step):
            with safe_open(file, "pt") as f:
                blk = f.get_slice(name)[a : a + step]
            self._check(name, blk)
            out[a : a + step].copy_(blk)
            del blk
        return out

    def check_finite(self, names: list[str] | None = None, progress: bool = False) -> None:
        """Read every tensor (or ``names``) block by block and refuse NaN or Inf before any work:
        reading is cheap next to compressing, and a bad tensor found at the last layer wastes the rest."""
        from safetensors import safe_open

        names = sorted(self.files) if names is None else names
        if progress:
            from tqdm.auto import tqdm

            names = tqdm(names, desc="checking weights", unit="tensor", leave=False)
        for name in names:
            with safe_open(self.files[name], "pt") as f:
                sl = f.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
            if dtype not in ("F64", "F32", "F16", "BF16"):
                continue
            if not shape:
                with safe_open(self.files[name], "pt") as f:
                    self._check(name, f.get_tensor(name))
                continue
            row = max(1, _nbytes(shape[1:], dtype))
            step = max(1, 64 * 2**20 // row)
            for a in range(0, shape[0], step):
                with safe_open(self.files[name], "pt") as f:
                    self._check(name, f.get_slice(name)[a : a + step])

    def _check(self, name: str, t: torch.Tensor) -> None:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFolderError(f"{name} in {self.files[name].name} holds NaN or Inf values: the weights are "
                                   "corrupt (or overflowed when converted); fix the model before compressing")


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter or buffer ``name`` (dotted, relative to ``module``)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[leaf] = value


class StreamedModel:
    """A model skeleton whose layers are read from (and written to) files one at a time.

    ``work``: the folder the compressed layers' shards go to (``layer-00003.safetensors``).
    """

    def __init__(
        self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, work: Path | None = None,
        state: "RunState | None" = None, save_dtype: torch.dtype | None = None,
    ) -> None:
        from rankdown.arch import spec_for
        from rankdown.loading import folder_model

        self.path = Path(path).expanduser().absolute()
        self.weights = FolderWeights(self.path)
        self.dtype = dtype  # what the layers compute in
        self.save_dtype = save_dtype or dtype  # what the floating tensors are written in
        self.work = work
        self.state = state  # what a killed run finished already (resume), and where to record progress
        self.model = folder_model(self.path, dtype=dtype, empty=True)  # the skeleton: no weights read
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        self.spec = spec_for(self.model)
        if self.spec.experts is not None:
            raise ModelFolderError(
                f"{self.spec.family} stores its experts fused in the model but per expert in checkpoints: "
                "streaming cannot map them yet; compress it in memory (--no-stream)"
            )
        self.layers_path, self.layers = self.spec.find_layers(self.model)
        names = dict(self.model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}  # a tied tensor is saved under the name met first (as save_pretrained does)
        self.tied = {n for n, p in names.items() if first.setdefault(id(p), n) != n}
        state = [n for n in self.model.state_dict(keep_vars=True) if n not in self.tied]
        persistent = {n for n in state if n in names or self._persistent_buffer(n)}
        missing = sorted(n for n in persistent if n not in self.weights)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            others = sorted(k for k in self.weights.files if k not in state and k not in self.tied)
            if not others:  # every tensor of the files is one the model has: the missing ones are simply not there
                raise ModelFolderError(
                    f"{self.path} is incomplete: {', '.join(missing[:3])}{more} is in none of its weight files "
                    f"({', '.join(sorted({f.name for f in self.weights.files.values()}))}); fetch the model again")
            raise ModelFolderError(
                f"{self.path} lacks tensors the model needs ({', '.join(missing[:3])}{more}) and holds others it "
                f"does not know ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}): an older checkpoint "
                "layout; streaming needs the names transformers uses: compress in memory (--no-stream), which "
                "converts them"
            )
        self.outside = [n for n in persistent if not n.startswith(self.layers_path + ".")]
        self._check_shapes(persistent)

    def _check_shapes(self, names: set[str]) -> None:
        """Refuse, before any work, a tensor whose stored shape is not the one config.json implies."""
        from safetensors import safe_open

        want = self.model.state_dict(keep_vars=True)
        by_file: dict[Path, list[str]] = {}
        for n in sorted(names):
            by_file.setdefault(self.weights.files[n], []).append(n)
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for n in keys:
                    stored = tuple(f.get_slice(n).get_shape())
                    if stored != tuple(want[n].shape):
                        raise ModelFolderError(
                            f"{n} in {file.name} has shape {stored}, but {self.path / 'config.json'} makes it "
                            f"{tuple(want[n].shape)}: the weights do not belong to this config; fix the folder "
                            "or fetch the model again")

    def _persistent_buffer(self, name: str) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        return leaf in owner._buffers and leaf not in owner._non_persistent_buffers_set

    def load_outside(self) -> None:
        """Read what the calibration pass runs before layer 0 (the engine calls this before it
        captures the layers' inputs, :meth:`drop_outside` after); the output head stays on meta."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        emb = self.model.get_input_embeddings()
        # A plain lookup table stored in fewer bits is kept so and its rows are widened as they
        # come out: the same hidden states, bit for bit, and half the memory of the calibration
        # pass's largest tensor (a 32000 x 2048 table: 131 MB instead of 262 MB).
        narrow = type(emb) is nn.Embedding
        for name in self.outside:
            p = params.get(name)
            if p is not None and id(p) in head_params and name not in self._input_side():
                continue
            dtype = self.dtype if p is not None and p.is_floating_point() else None
            if narrow and p is emb.weight and self._stored_narrower(name):
                dtype = None
            _set(self.model, name, self.weights.read(name, dtype))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        if emb.weight.dtype != self.dtype and emb.weight.is_floating_point():
            self._widen = emb.register_forward_hook(lambda mod, a, out: out.to(self.dtype))

    def _stored_narrower(self, name: str) -> bool:
        from safetensors import safe_open

        with safe_open(self.weights.files[name], "pt") as f:
            stored = f.get_slice(name).get_dtype()
        return stored in ("F16", "BF16", "F32", "F64") and _DTYPE_BYTES[stored] < torch.finfo(self.dtype).bits // 8

    def drop_outside(self) -> None:
        """Send the tensors outside the layers back to the meta device (they are copied from the
        input files when the folder is written)."""
        widen = self.__dict__.pop("_widen", None)
        if widen is not None:
            widen.remove()
        for name, mod in self.model.named_modules():
            if name == self.layers_path or name.startswith(self.layers_path + "."):
                continue
            for key, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[key] = nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)
            for key in [k for k, b in mod._buffers.items() if b is not None and k not in mod._non_persistent_buffers_set]:
                mod._buffers[key] = mod._buffers[key].to("meta")
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        heap.trim()

    def _input_side(self) -> set[str]:
        emb = self.model.get_input_embeddings()
        return {n for n, p in self.model.named_parameters(remove_duplicate=False)
                if any(p is q for q in emb.parameters())}

    def digest(self) -> str:
        """A fingerprint of the input folder's weights (the content of its files, as the resume
        fingerprint reads it: computed once a process) and the dtype: the statistics cache's key."""
        text = json.dumps([str(self.path), str(self.dtype), weights_digest(self.path, self.weights)])
        return hashlib.sha1(text.encode()).hexdigest()

    # -- the engine's layer source --------------------------------------------------------------
    def finished(self, i: int) -> dict | None:
        """The records of layer ``i`` when an earlier run compressed and wrote it already."""
        return None if self.state is None else self.state.layers.get(str(i))

    def saved_ranks(self) -> dict[str, int] | None:
        return None if self.state is None else self.state.ranks

    def keep_ranks(self, ranks: dict[str, int]) -> None:
        if self.state is not None:
            self.state.ranks = dict(ranks)
            self.state.save()

    def load(self, i: int, layer: nn.Module) -> None:
        prefix = f"{self.layers_path}.{i}."
        done = self.finished(i)
        if done is not None:  # the compressed layer, as the killed run wrote it
            from safetensors.torch import load_file

            from rankdown.nn.portable import build_module

            for full, spec in done["modules"].items():
                name = full[len(prefix):]
                layer.set_submodule(name, build_module(spec, layer.get_submodule(name)))
            tensors = load_file(self.work / f"layer-{i:05d}.safetensors")
            for name in layer.state_dict(keep_vars=True):
                if prefix + name in tensors:
                    _set(layer, name, tensors[prefix + name])
            return
        for name, t in layer.state_dict(keep_vars=True).items():
            full = prefix + name
            if full not in self.weights:
                if t.device.type == "meta":
                    raise ModelFolderError(f"{full} is missing from {self.path}")
                continue  # a non-persistent buffer built at init
            _set(layer, name, self.weights.read(full, self.dtype if t.is_floating_point() else None))

    def release(self, i: int, layer: nn.Module, write: bool, ctx: Any = None, seconds: float = 0.0) -> None:
        if write and self.finished(i) is None and distributed.is_main():  # under torchrun: process 0 writes
            sha = self._write_layer(i, layer)
            if self.state is not None and ctx is not None:  # after the shard: a kill in between redoes the layer
                self.state.layers[str(i)] = {
                    "modules": {f"{ctx.prefix}.{k}": v for k, v in ctx.replaced.items()},
                    "guards": {f"{ctx.prefix}.{k}": v for k, v in ctx.guards.items()}, "seconds": seconds,
                    "sha256": sha}
                self.state.save()
        layer.to("meta")
        heap.trim()

    def _write_layer(self, i: int, layer: nn.Module) -> str:
        """Write layer ``i``'s shard; return its sha256 (checked before a resumed run trusts it)."""
        from safetensors.torch import save_file

        assert self.work is not None
        prefix = f"{self.layers_path}.{i}."
        tensors = {prefix + n: t.detach().contiguous() for n, t in layer.state_dict().items()
                   if self._persistent_in_layer(layer, n)}
        tmp = self.work / f".layer-{i:05d}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        sha = _sha256(tmp)
        os.replace(tmp, self.work / f"layer-{i:05d}.safetensors")
        return sha

    @staticmethod
    def _persistent_in_layer(layer: nn.Module, name: str) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        return leaf not in owner._non_persistent_buffers_set

    # -- writing the folder ---------------------------------------------------------------------
    def write_weights(self, folder: Path) -> None:
        """Move the layer shards into ``folder``, add the tensors outside the layers, write the index.

        The layer shards are in the compute dtype (so a resumed run replays exactly what the
        killed one computed) and are converted here, one at a time, when the saved dtype differs.
        Each tensor outside the layers gets its own shard, read in the saved dtype: only one of
        them (the embeddings or the head, the largest) is ever in memory.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        n = len(self.layers)
        outside = sorted(self.outside)
        total = n + len(outside)
        weight_map: dict[str, str] = {}
        size = 0
        for i in range(n):
            src = self.work / f"layer-{i:05d}.safetensors"
            if not src.is_file():
                raise RuntimeError(f"layer {i} was never written to {self.work}")
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            if self.save_dtype == self.dtype:
                shutil.copyfile(src, folder / name)
            else:
                tensors = {k: t.to(self.save_dtype) if t.is_floating_point() else t for k, t in load_file(src).items()}
                save_file(tensors, folder / name, metadata={"format": "pt"})
                del tensors
                heap.trim()
            with safe_open(folder / name, "pt") as f:
                for k in f.keys():
                    weight_map[k] = name
                    sl = f.get_slice(k)
                    size += _nbytes(sl.get_shape(), sl.get_dtype())
        for j, k in enumerate(outside):
            t = self.weights.read(k, self.save_dtype if self._floating(k) else None)
            name = f"model-{n + j + 1:05d}-of-{total:05d}.safetensors"
            save_file({k: t}, folder / name, metadata={"format": "pt"})
            weight_map[k] = name
            size += t.numel() * t.element_size()
            del t
            heap.trim()
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _floating(self, name: str) -> bool:
        t = self.model.get_parameter(name) if name in dict(self.model.named_parameters()) else self.model.get_buffer(name)
        return t.is_floating_point()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_digest(path: Path, weights: FolderWeights) -> str:
    """sha256 over the content of config.json and every weight file of a model folder: any change
    to any byte changes it. It costs one read of the weights (about 0.5 to 2 GB/s on one core, e.g.
    10 to 30 s for a 7B model in float16), small beside the compression that reads them anyway; a
    process reads them once: the files' paths, inodes, sizes and change times (st_ctime, which every
    write and every date change moves) key the remembered digest."""
    files = [Path(path) / "config.json", *sorted(set(weights.files.values()))]
    return _content_digest(tuple((str(f), *_stat_key(f)) for f in files))


def _stat_key(file: Path) -> tuple[int, int, int]:
    st = file.stat()
    return st.st_ino, st.st_size, st.st_ctime_ns


@functools.lru_cache(maxsize=8)
def _content_digest(files: tuple[tuple[str, int, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, *_ in files:
        file = Path(name)
        h.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _DTYPE_BYTES.get(dtype, 4)


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


class ResumeMismatchError(ConfigError):
    """A partial run of other settings or inputs sits where this run would write."""


class RunState:
    """What a streaming run has finished, in ``WORK/state.json`` (rewritten atomically)."""

    def __init__(self, work: Path, fingerprint: dict, ranks: dict | None = None, layers: dict | None = None):
        self.work, self.fingerprint = work, fingerprint
        self.ranks, self.layers = ranks, dict(layers or {})

    @classmethod
    def read(cls, work: Path) -> "RunState | None":
        try:
            d = json.loads((work / "state.json").read_text(encoding="utf-8"))
            return cls(work, d["fingerprint"], d.get("ranks"), d.get("layers"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def check(self) -> None:
        """Forget each finished layer whose shard is missing, unreadable or changed since it was
        written (its sha256): the resumed run computes it again."""
        from safetensors import safe_open

        for key in sorted(self.layers, key=int):
            shard = self.work / f"layer-{int(key):05d}.safetensors"
            try:
                sha = self.layers[key].get("sha256")
                if sha is not None and _sha256(shard) != sha:
                    raise ValueError("its content changed since it was written")
                with safe_open(shard, "pt") as f:  # a state without checksums: read every tensor
                    for k in f.keys() if sha is None else ():
                        f.get_tensor(k)
            except Exception as e:
                log.warning("%s of the partial run is damaged (%s): layer %s is computed again", shard, e, key)
                del self.layers[key]
        self.save()

    def save(self) -> None:
        if not distributed.is_main():  # under torchrun process 0 keeps the state
            return
        tmp = self.work / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "ranks": self.ranks, "layers": self.layers}),
                       encoding="utf-8")
        os.replace(tmp, self.work / "state.json")


def _fingerprint(
    path: Path, config: Any, batch_size: int, run: Any, calibration: Any, nsamples: int, seqlen: int,
    dtype: torch.dtype, save_dtype: torch.dtype,
) -> dict:
    """Every setting and input that changes the result: the method's config, the run's device,
    seed and batch size (not --max-memory or --stats-cache, which only move data), the calibration
    as its tokens, the model as the content of its files."""
    import rankdown

    if isinstance(calibration, torch.Tensor):
        calib = "tensor:" + hashlib.sha1(calibration.cpu().numpy().tobytes()).hexdigest()
    elif hasattr(calibration, "input_ids"):
        calib = "tokens:" + hashlib.sha1(calibration.input_ids.cpu().numpy().tobytes()
                                         + calibration.attention_mask.cpu().numpy().tobytes()).hexdigest()
    else:  # a method that reads no calibration
        calib = str(calibration)
    return {"model": str(path), "weights": weights_digest(path, FolderWeights(path)),
            **{f"method.{k}": v for k, v in config.to_dict().items()},
            "run.device": run.device, "run.seed": run.seed, "run.batch_size": batch_size, "calibration": calib, "nsamples": nsamples,
            "seqlen": seqlen, "dtype": str(dtype).split(".")[1], "save_dtype": str(save_dtype).split(".")[1],
            "rankdown": rankdown.__version__}


_CHANGED = {"weights": "the model's weights changed (the content of its files)",
            "calibration": "the calibration changed (other tokens: its file or source was changed)"}


def _differences(then: dict, now: dict) -> str:
    keys = sorted(set(then) | set(now), key=str)
    diffs = [_CHANGED.get(k) or f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
             for k in keys if then.get(k) != now.get(k)]
    return "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")


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
    state = None
    try:
        if distributed.is_main():
            io.clear_stale(out)
        tokenizer = io.load_tokenizer(path) if io.has_tokenizer(path) else None
        save_dtype = save_dtype or io.checkpoint_dtype(path) or dtype
        method = method_class(config.method)
        if method.needs_calibration:  # the run depends on the tokens, not on the name of their source
            calibration = _calibration(tokenizer, calibration, nsamples, seqlen, run.seed,
                                       getattr(config, "calib_tokens", None))
        resumable = getattr(method, "resumable", True)
        # process 0 reads or starts the state; under torchrun the others get a copy they never write
        state = distributed.on_main(lambda: _open_state(
            work, _fingerprint(path, config, run.batch_size or method.default_batch_size, run, calibration, nsamples, seqlen, dtype,
                               save_dtype), resume and resumable,
            on_resume))
        streamed = StreamedModel(path, dtype, work, state if resumable else None, save_dtype)
        report = compress(streamed.model, tokenizer, config, calibration, run=run, nsamples=nsamples, seqlen=seqlen,
                          progress=progress, source=streamed)
        distributed.barrier()  # every process is done reading finished layers from the work folder
        if not distributed.is_main():
            return report, out
        streamed.model.config.dtype = str(save_dtype).split(".")[1]
        saved = io.save(streamed.model, tokenizer, out, record=report.record(), structure=report.structure,
                        overwrite=overwrite, extra_files=report.artifacts, weights=streamed.write_weights,
                        inputs=[path])
    except BaseException as e:
        if distributed.is_main():
            _after_failure(e, work, state, fresh)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if distributed.is_main():
            os.close(lock)  # after the work folder is gone: a run that waited finds none
    return report, saved


class OutputBusyError(FileExistsError):
    """Another process is writing to the same output folder."""


def _lock(out: Path, work: Path) -> int:
    """Take ``WORK/lock`` (``fcntl.flock``, let go by the system however the process ends) for as
    long as this run writes to ``out``; refuse at once if another process holds it."""
    import fcntl

    while True:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(f"another rankdown run is writing to {out} (pid {pid}): wait for it to end, or "
                                  "choose another --out") from None
        try:  # the run that held it may have removed the folder meanwhile: lock the new one
            same = os.stat(work / "lock").st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _interruption(e: BaseException) -> bool:
    """Whether the same command may succeed where this one stopped: Ctrl-C or SIGTERM (the CLI
    raises KeyboardInterrupt for both), a full disk, no memory left."""
    return (isinstance(e, (KeyboardInterrupt, MemoryError, torch.OutOfMemoryError))
            or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)))


def _after_failure(e: BaseException, work: Path, state: RunState | None, fresh: bool) -> None:
    """Keep the partial run after an interruption (and say so on the exception); else remove it:
    the same command would fail the same way. A partial run this one never took is left alone."""
    if state is None:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
    elif _interruption(e) and (state.layers or state.ranks):
        e.add_note(f"the partial run in {work} is kept (finished layers: {len(state.layers)}): run the same "
                   "command again to resume, or add --restart to start over")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _open_state(work: Path, fingerprint: dict, resume: bool,
                on_resume: Callable[[int, Path], None] | None = None) -> RunState:
    """The state of the partial run in ``work`` to resume (its damaged layers forgotten), or a new
    one (``work`` emptied but for the lock)."""
    state = RunState.read(work) if resume else None
    if state is not None and state.fingerprint != fingerprint:
        raise ResumeMismatchError(
            f"{work} holds a partial run of other settings or inputs ({_differences(state.fingerprint, fingerprint)}); "
            "resume it with the settings and inputs it began with, or pass --restart to discard it and start over")
    if state is not None and (state.layers or state.ranks):
        state.check()
        log.info("resuming the partial run in %s: %d layers done", work, len(state.layers))
        if on_resume is not None:
            on_resume(len(state.layers), work)
        return state
    for entry in work.iterdir():
        if entry.name != "lock":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    state = RunState(work, fingerprint)
    state.save()
    return state
