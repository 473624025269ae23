"""Time saved by --stats-cache on the reference model (issue 7): ROM with the global allocation.

Runs, in one process: 0.2 with an empty cache (fills it), 0.3 with the cache, 0.3 without, and
checks the two 0.3 models are identical.

    .venv/bin/python bench/stats_cache.py  -> bench/results/stats_cache.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import rankdown
from rankdown.reference import load_reference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stats_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dense, tok = load_reference(torch.float32)
    cache = tempfile.mkdtemp(prefix="rankdown-stats-")
    runs, models = {}, {}
    for name, ratio, folder in (("fill 0.2", 0.2, cache), ("cached 0.3", 0.3, cache), ("uncached 0.3", 0.3, None)):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rankdown.compress(model, tok, rankdown.make_config("rom", ratio=ratio), "reference",
                          run=rankdown.RunSettings(stats_cache=folder),
                          nsamples=args.nsamples, seqlen=args.seqlen, progress=False)
        runs[name] = time.perf_counter() - t0
        models[name] = model
        print(f"{name}: {runs[name]:.1f}s", flush=True)
    ids = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(models["cached 0.3"](ids).logits, models["uncached 0.3"](ids).logits)
    saved = runs["uncached 0.3"] - runs["cached 0.3"]
    res = {"seconds": runs, "saved_seconds": saved, "saved_fraction": saved / runs["uncached 0.3"],
           "identical_models": same, "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen}}
    print(f"saved {saved:.1f}s of {runs['uncached 0.3']:.1f}s ({100 * res['saved_fraction']:.0f}%), identical: {same}")
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
