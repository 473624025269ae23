"""``--stats-cache DIR``: statistics of the dense model kept between runs.

A method that plans from a statistics pass over the still-dense model (ROM's global allocation
reads every linear's output spectrum) gets the same statistics for every ratio and allocation of
the same model, calibration and settings. The cache stores them as a safetensors file named by a
hash of everything they depend on (written atomically, with the key beside it as JSON), so a
second run skips that pass. The statistics of the compressing pass are not cached: each layer's
depend on the layers compressed before it, hence on the ratio.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def model_digest(model: nn.Module, sample: int = 4096) -> str:
    """A fingerprint of a model's weights: every tensor's name, shape, dtype and a strided sample
    of its values (hashing all of a 7B model's bytes would cost more than it saves)."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.device.type != "meta" and p.numel():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


class StatsCache:
    """A folder of cached statistics, each a dict of tensors under a key dict."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        text = json.dumps(key, sort_keys=True, default=str)
        name = f"{key.get('kind', 'stats')}-{hashlib.sha1(text.encode()).hexdigest()[:20]}"
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            try:
                value = load_file(path)
                self.hits += 1
                log.info("statistics from the cache: %s", path)
                return value
            except Exception as e:  # a damaged cache file is recomputed, not trusted
                log.warning("ignoring unreadable cache file %s (%s)", path, e)
        self.misses += 1
        value = compute()
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in value.items()}, tmp)
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(text + "\n", encoding="utf-8")
        except Exception as e:  # (safetensors reports a full or read-only disk as its own error)
            from rankdown.config import ConfigError
            from rankdown.io import as_disk_error

            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            disk = as_disk_error(e) or (e if isinstance(e, OSError) else None)
            if disk is None:
                raise
            full = disk.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ConfigError(f"--stats-cache {self.folder}: cannot write there ({disk.strerror or disk}); "
                              + ("free some space, " if full else "") + "give a folder rankdown can write to, "
                              "or drop --stats-cache") from None
        return value
