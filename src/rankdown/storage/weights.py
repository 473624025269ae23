"""A safetensors model folder read one tensor at a time, and the digest of its content."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from rankdown.io import ModelFolderError

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
