"""The C heap under a long, memory-bounded run (glibc; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import mmap

import torch

_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def map_big_blocks(threshold: int = 4 * 2**20) -> None:
    """Have glibc give every allocation above ``threshold`` its own memory map, returned to the
    system when freed. By default the threshold grows with the largest block freed (up to 32 MB),
    after which a layer's weights and statistics come from the heap and stay resident: measured on
    a 2-layer copy of bench/memory.py's model, ROM's peak fell from 1.21 to 1.08 GB with this."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def trim() -> None:
    """Hand the heap's free pages back to the system, in every arena. glibc keeps them otherwise:
    measured, +40 MB of resident memory per 176 MB layer read and dropped (1.3 GB over 32
    layers), and 36 MB the tokenizer's threads leave behind after tokenizing a 330 kB calibration
    text, never reused by the main thread (+51 MB after tokenizing, +15 MB after a trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_MADV_DONTNEED = 4


def release_tail(t: torch.Tensor, start: int) -> None:
    """Give the memory of rows ``start..`` of a contiguous CPU tensor back to the system now, while
    the rest of it stays in use: the whole pages of those rows are dropped (``madvise(DONTNEED)``),
    so what the rows hold afterwards is undefined (zeros where a page went, the old values in the
    page they share with the row before). For a matrix consumed from its last row up, whose rows
    are never read again (MoDeGPT's Cholesky factor while the kept channels' correlation is formed).
    A no-op off Linux or on another device."""
    if t.device.type != "cpu" or not t.is_contiguous() or start >= t.shape[0] or t.numel() == 0:
        return
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return
    page = mmap.PAGESIZE
    first = t.data_ptr() + max(start, 0) * t.stride(0) * t.element_size()
    end = t.data_ptr() + t.numel() * t.element_size()
    a, e = -(-first // page) * page, end // page * page
    if e > a:
        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(e - a), _MADV_DONTNEED)
