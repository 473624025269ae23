"""--stats-cache: the dense-model statistics of one run serve the next, with the same result."""

from __future__ import annotations

import pytest
import torch

import rankdown
from rankdown import api
from rankdown.stats_cache import StatsCache
from tests.tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)


@pytest.fixture
def counting(monkeypatch):
    """The caches compress() builds, so a test can read their hit and miss counts."""
    made: list[StatsCache] = []

    class Counting(StatsCache):
        def __init__(self, folder):
            super().__init__(folder)
            made.append(self)

    monkeypatch.setattr(api, "StatsCache", Counting)
    return made


def _run(ratio, cache, ids=IDS, seed=0, allocation="global"):
    model = tiny_model("llama", seed=seed)
    config = rankdown.make_config("rom", ratio=ratio, allocation=allocation)
    rankdown.compress(model, None, config, ids, run=rankdown.RunSettings(batch_size=2, stats_cache=cache), progress=False)
    return model


def test_a_second_ratio_reads_the_cache_and_gives_the_same_model(tmp_path, counting):
    _run(0.2, str(tmp_path))
    warm = _run(0.4, str(tmp_path))
    assert [(c.hits, c.misses) for c in counting] == [(0, 1), (1, 0)]
    assert len(list(tmp_path.glob("rom-spectra-*.safetensors"))) == 1
    assert torch.equal(outputs(warm, IDS), outputs(_run(0.4, None), IDS))


@pytest.mark.parametrize("change", ["calibration", "model"])
def test_other_calibration_or_weights_miss(tmp_path, counting, change):
    _run(0.3, str(tmp_path))
    if change == "calibration":
        _run(0.3, str(tmp_path), ids=tiny_ids(8, 32, seed=7))
    else:
        _run(0.3, str(tmp_path), seed=5)
    assert [(c.hits, c.misses) for c in counting] == [(0, 1), (0, 1)]
    assert len(list(tmp_path.glob("rom-spectra-*.safetensors"))) == 2


def test_a_damaged_cache_file_is_recomputed(tmp_path, counting):
    _run(0.3, str(tmp_path))
    (f,) = tmp_path.glob("rom-spectra-*.safetensors")
    f.write_bytes(b"garbage")
    again = _run(0.3, str(tmp_path))
    assert counting[-1].misses == 1 and counting[-1].hits == 0
    assert torch.equal(outputs(again, IDS), outputs(_run(0.3, None), IDS))
