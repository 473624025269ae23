"""Healing measured on a saved compressed folder: the dense model's top-k targets on the same
calibration windows the compression used, then heal (rankdown/heal.py) with each setting given,
held-out perplexity (``reference-heldout``, first 60 windows of 256 tokens) and one greedy sample
through the chat template before and after.

    python bench/heal.py MODEL COMPRESSED_DIR [--dense] '{"lr": 1e-4, "epochs": 2}' ...

COMPRESSED_DIR: made by ``rankdown compress MODEL ... --calib reference --nsamples 32 --seqlen 256
--seed 0 --out COMPRESSED_DIR`` (the calibration its record names is drawn again here). --dense also prints the dense model's figures; SKIP_UNHEALED=1 skips the
compressed model's. The same as ``rankdown compress ... --heal``, split so that several settings
share one compression.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys

import torch

from rankdown.calib import calibration_data
from rankdown.eval.perplexity import perplexity
from rankdown.heal import HealConfig, heal, teacher_targets
from rankdown.loading import load_model

PROMPT = "The capital of France is"


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, folder = argv[0], argv[1]
    settings = [json.loads(a) for a in argv[2:] if a != "--dense"]
    compressed, tok = load_model(folder, "float32")
    record = compressed.config.rankdown
    dense, _ = load_model(model, "float32")

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, "reference-heldout", seqlen=256, max_windows=60).ppl

    def sample(m: torch.nn.Module) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.inference_mode():
            out = m.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    cal = record["calibration"]
    data = calibration_data(tok, cal["source"], nsamples=cal["nsamples"], seqlen=cal["seqlen"], seed=cal["seed"])
    teacher = teacher_targets(dense, data, HealConfig())
    if "--dense" in argv:
        print("DENSE ppl", ppl(dense), "sample", repr(sample(dense)), flush=True)
    del dense
    if not os.environ.get("SKIP_UNHEALED"):
        print("UNHEALED ppl", ppl(compressed), "sample", repr(sample(compressed)), flush=True)
    modules = list(record["structure"]["modules"])
    for s in settings:
        m = copy.deepcopy(compressed)
        rec = heal(m, teacher, HealConfig(**s), modules, seed=0, progress=True)
        print("HEAL", s, "kl", rec["kl_before"], "->", rec["kl_after"], "steps", rec["steps"], "best",
              rec["best_step"], "s", rec["seconds"], "hist", [[a, round(b, 4)] for a, b in rec["history"]], flush=True)
        print("HEALED ppl", s, ppl(m), "sample", repr(sample(m)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
