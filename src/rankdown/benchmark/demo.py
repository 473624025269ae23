"""The demo: the built-in reference model compressed with each method at one ratio, its held-out
perplexity before and after (``rankdown demo``)."""

from __future__ import annotations

import time
from typing import Any, Iterator

from rankdown.config import ConfigError
from rankdown.loading import REFERENCE, load_model


def compare_methods(methods: list[str], ratio: float = 0.3, *, nsamples: int = 128, seqlen: int = 256,
                    seed: int = 0, progress: bool = True) -> Iterator[tuple[dict[str, Any], Any]]:
    """Yields (row, perplexity result): the dense reference model's first, then each method's, a
    fresh reference model compressed to ``ratio``. Every setting is checked here, before the
    minutes of evaluation; a row's keys are model, params, removed, heldout_ppl, ppl_change,
    compress_s and eval_s."""
    import rankdown
    from rankdown.methods import METHODS

    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for m in methods:
        rankdown.make_config(m, ratio=ratio)
    if nsamples < 1:
        raise ConfigError(f"--nsamples must be >= 1 (calibration windows), got {nsamples}; e.g. --nsamples 128")
    if seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a token and its successor), got {seqlen}; e.g. --seqlen 256")
    return _rows(methods, ratio, nsamples, seqlen, seed, progress)


def _rows(methods: list[str], ratio: float, nsamples: int, seqlen: int, seed: int,
          progress: bool) -> Iterator[tuple[dict[str, Any], Any]]:
    import rankdown
    from rankdown.calib import check_seqlen
    from rankdown.eval.perplexity import perplexity

    model, tok = load_model(REFERENCE)
    check_seqlen(model, seqlen)
    t0 = time.perf_counter()
    dense = perplexity(model, tok, "reference-heldout", seqlen=seqlen, progress=progress)
    yield ({"model": "dense", "params": sum(p.numel() for p in model.parameters()), "removed": 0.0,
            "heldout_ppl": dense.ppl, "ppl_change": "", "compress_s": "", "eval_s": time.perf_counter() - t0}, dense)
    for m in methods:
        model, tok = load_model(REFERENCE)
        cfg = rankdown.make_config(m, ratio=ratio)
        report = rankdown.compress(model, tok, cfg, REFERENCE, run=rankdown.RunSettings(seed=seed), nsamples=nsamples,
                                   seqlen=seqlen, progress=progress)
        t1 = time.perf_counter()
        res = perplexity(model, tok, "reference-heldout", seqlen=seqlen, progress=progress)
        yield ({"model": m, "params": report.params_after, "removed": report.ratio_achieved,
                "heldout_ppl": res.ppl, "ppl_change": f"{100 * (res.ppl / dense.ppl - 1):+.1f}%",
                "compress_s": report.seconds, "eval_s": time.perf_counter() - t1}, res)
