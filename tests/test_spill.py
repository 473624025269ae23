"""Activations beyond --max-memory go to disk and come back bit-identical."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch

import rankdown
from rankdown.config import RunSettings
from rankdown.storage import MemoryBudget, TensorStore, parse_bytes
from tests.tiny import outputs, tiny_ids, tiny_model


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("0", 0), ("1.5k", 1500),
                                        (None, None), (123, 123)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "8XB", "-1GB", ""])
def test_parse_bytes_refuses_what_is_not_a_size(bad):
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(bad)


def test_store_spills_beyond_the_budget_and_cleans_up():
    tensors = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    nbytes = tensors[0].numel() * 4
    with MemoryBudget(limit=2 * nbytes) as budget:
        store = TensorStore(budget, tensors)
        assert store.on_disk == 3 and budget.used == 2 * nbytes and budget.spilled == 3 * nbytes
        assert all(torch.equal(a, b) for a, b in zip(store, tensors))
        folder = budget.folder()
        assert len(os.listdir(folder)) == 3
        store.clear()
        assert budget.used == 0 and os.listdir(folder) == []
    assert not folder.exists()


def test_compress_with_everything_on_disk_gives_the_same_model():
    ids = tiny_ids(8, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "rankdown-spill-*")))
    for model, mem in ((a, None), (b, "0")):
        rankdown.compress(model, None, rankdown.make_config("rom", ratio=0.3), ids,
                          progress=False, run=RunSettings(max_memory=mem, batch_size=2))
    assert torch.equal(outputs(a, ids), outputs(b, ids))
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "rankdown-spill-*"))) == before


def test_bad_max_memory_is_a_config_error():
    with pytest.raises(rankdown.ConfigError, match="max_memory"):
        rankdown.RunSettings(max_memory="a lot")
