"""Every method on a real pretrained LLM: SmolLM2-135M-Instruct (Llama architecture, 30 layers).

The reference model trained here is far easier to compress than a pretrained LLM and ranked the
methods in the wrong order; the quality claims of the README rest on this model instead.

Protocol (fixed): 30% of all parameters removed; calibration = 16 windows x 256 tokens of the
"reference" text (Python standard library files), seed 0; perplexity on the first 20 windows of
256 tokens of "reference-heldout" (other files of the standard library, never calibrated on); each
method with its default settings, plus svd-llm with the shared fisher allocation. One compression
per method, shared by the tests below (about 15 minutes in all on 2 CPU cores).

Known-good values were measured once with this protocol (torch 2.13 CPU, transformers 5.x, x86_64,
2 threads). REL_TOL (3%) covers the reordering of float sums between thread counts, which a 30-layer
pretrained model amplifies; a change to a method or its defaults that moves its perplexity more
fails here (remeasure with this protocol and update KNOWN, saying why in the commit).
"""

from __future__ import annotations

import copy

import pytest

import rankdown
from rankdown.config import RunSettings
from rankdown.calib import calibration_data
from rankdown.loading import load_model
from rankdown.eval.perplexity import perplexity

pytestmark = pytest.mark.slow

RATIO, SEED, NSAMPLES, SEQLEN, WINDOWS = 0.3, 0, 16, 256, 20
REL_TOL = 0.03
CELLS = {  # name: (method, settings)
    "svd": ("svd", {}),
    "svd-llm": ("svd-llm", {}),
    "svd-llm fisher": ("svd-llm", {"allocation": "fisher"}),
    "rom": ("rom", {}),
    "modegpt": ("modegpt", {}),
    "lillama": ("lillama", {}),
}
DENSE_PPL = 13.757139206864302
# name: held-out perplexity with this protocol, measured 2026-12-06 (one thread); svd collapses
# (7.8 million) and is left out: a value that large moves by more than any tolerance with the threads
KNOWN: dict[str, float] = {
    "svd-llm": 87.33653965963885,
    "svd-llm fisher": 40.13409135709916,
    "rom": 39.5836441351371,
    "modegpt": 37.425336244407504,
    # 2026-12-07: after a trained layer its outputs, not replayed ones, feed the next (was 35.167)
    "lillama": 34.230942228352696,
}


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    import torch

    torch.set_num_threads(2)
    model, tok = load_model(str(smollm2_dir))
    calib = calibration_data(tok, "reference", nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED)
    return model, tok, calib


def _ppl(model, tok) -> float:
    res = perplexity(model, tok, "reference-heldout", seqlen=SEQLEN, batch_size=4, max_windows=WINDOWS)
    assert res.tokens == WINDOWS * (SEQLEN - 1)
    return res.ppl


_results: dict[str, dict] = {}


def result(smol, name: str) -> dict:
    """Compress a copy of the model with cell ``name`` once per test session: ratio and perplexity."""
    if name not in _results:
        model, tok, calib = smol
        if name == "dense":
            _results[name] = {"ppl": _ppl(model, tok)}
        else:
            method, settings = CELLS[name]
            small = copy.deepcopy(model)
            report = rankdown.compress(small, tok, rankdown.make_config(method, ratio=RATIO, **settings),
                                       calib, progress=False, run=RunSettings(seed=SEED))
            _results[name] = {"ratio": report.ratio_achieved, "ppl": _ppl(small, tok)}
            del small
    return _results[name]


def test_dense_perplexity(smol):
    ppl = result(smol, "dense")["ppl"]
    assert 5.0 < ppl < 30.0  # a working pretrained model on Python source (14-16 at other window counts)
    if DENSE_PPL is not None:
        assert ppl == pytest.approx(DENSE_PPL, rel=1e-3)


@pytest.mark.parametrize("name", list(CELLS))
def test_every_method_meets_its_ratio_and_known_value(smol, name):
    r = result(smol, name)
    assert abs(r["ratio"] - RATIO) <= 0.01
    if name in KNOWN:
        assert r["ppl"] == pytest.approx(KNOWN[name], rel=REL_TOL), (
            f"{name} at {RATIO:.0%}: held-out perplexity {r['ppl']:.3f}, known-good {KNOWN[name]:.3f}")


def test_svd_llm_beats_svd(smol):
    assert result(smol, "svd-llm")["ppl"] < result(smol, "svd")["ppl"]


@pytest.mark.parametrize("name", ["rom", "modegpt", "lillama"])
def test_each_method_beats_svd_llm(smol, name):
    """The point of each paper, on a real model: better than the one-shot whitened SVD baseline."""
    assert result(smol, name)["ppl"] < result(smol, "svd-llm")["ppl"]


def test_fisher_allocation_beats_uniform(smol):
    """The shared allocation reads what matters: the same svd-llm factors, better placed ranks."""
    assert result(smol, "svd-llm fisher")["ppl"] < 0.8 * result(smol, "svd-llm")["ppl"]


def test_best_method_within_three_times_dense(smol):
    """Measured 2.49x (lillama, 2.56x before its replay fix; modegpt 2.72x, rom 2.88x) with this
    protocol; svd-llm with its paper's allocation is 6.35x. The goal of 1.6x is not met yet."""
    best = min(result(smol, n)["ppl"] for n in ("rom", "modegpt", "lillama"))
    assert best < 3.0 * result(smol, "dense")["ppl"]
