"""Train rankdown's embedded reference model.

A small Llama-architecture causal LM (grouped-query attention, tied embeddings) trained on the
Python standard library of the running interpreter: text every machine with Python has. The
held-out and calibration texts are whole files set aside by a stable hash of their path, so they
never enter training.

    python scripts/train_reference.py --steps 1400 --out src/rankdown/reference

Writes: config.json, model.safetensors (float16), tokenizer files, heldout.txt, calib.txt and
train_log.json (the held-out loss curve, to check that training ran long enough to flatten).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of every decodable .py file of the interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "lib2to3/tests/data", "test/encoded_modules")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def split_of(rel: str) -> str:
    h = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if h < 3 else "calib" if h < 6 else "train"


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="src/rankdown/reference")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-text-kb", type=int, default=320, help="size cap of heldout.txt / calib.txt")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    files = stdlib_files()
    parts: dict[str, list[str]] = {"train": [], "heldout": [], "calib": []}
    for rel, text in files:
        parts[split_of(rel)].append(text)
    cap = args.max_text_kb * 1024
    for name in ("heldout", "calib"):
        joined, size = [], 0
        for text in parts[name]:
            if size + len(text) > cap:
                continue
            joined.append(text)
            size += len(text)
        (out / f"{name}.txt").write_text("\n\n".join(joined), encoding="utf-8")
    print({k: (len(v), sum(map(len, v))) for k, v in parts.items()})

    tokenizer = train_tokenizer(parts["train"], args.vocab)
    tokenizer.save_pretrained(out)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in parts["train"]:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    train = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    held = torch.tensor(tokenizer((out / "heldout.txt").read_text())["input_ids"])
    L = args.seqlen
    held = held[: (held.numel() // L) * L].view(-1, L)[:64]
    print(f"train tokens {train.numel():,}; chars/token {sum(map(len, parts['train'])) / train.numel():.2f}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    @torch.no_grad()
    def heldout_loss() -> float:
        model.eval()
        losses = [model(input_ids=b, labels=b).loss.item() for b in held.split(16)]
        model.train()
        return float(np.mean(losses))

    log = {"config": vars(args), "parameters": n_params, "train_tokens": train.numel(), "curve": []}
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, train.numel() - L - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + L] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            hl = heldout_loss()
            el = time.time() - t0
            tokens = (step + 1) * args.batch * L
            log["curve"].append({"step": step + 1, "tokens": tokens, "train_loss": loss.item(),
                                 "heldout_loss": hl, "heldout_ppl": math.exp(hl), "seconds": el})
            print(f"step {step + 1} loss {loss.item():.3f} heldout {hl:.3f} ppl {math.exp(hl):.2f} "
                  f"{tokens / el:.0f} tok/s", flush=True)
            model.to(torch.float16).save_pretrained(out, safe_serialization=True)
            model.to(torch.float32)
            (out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
