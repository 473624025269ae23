"""MoDeGPT's speed-up on a model whose decoder dominates, as in a 7B model (issue 4).

On the 5.6M-parameter reference model per-operation overhead hides what the smaller matrices
save. Here a random-weights Llama with the layer shape of TinyLlama (hidden 2048, intermediate
5632, 16 query / 4 key-value heads, head size 128; ``--shape tinyllama``, the default) or of
Llama-2-7B (hidden 4096, intermediate 11008, 32 heads without grouping; ``--shape llama2-7b``) and a
small vocabulary (4096, so the head is 2-4% of the parameters, as in 7B models) is compressed by
MoDeGPT (and svd-llm for comparison) at 30% on the reference calibration text, and timed against
the dense model, the models taking turns at every prefill and decode step: prefill tokens/s at
batch 1 x 512 and decode tokens/s over 64 new tokens (rankdown.eval.speed). Each round keeps every
model's fastest of --repeats runs (interference only slows a run down); the table gives the median
over the rounds of the per-round ratios. A second measurement (``--serve-batch``, 16 by default, 0
skips it) times decoding at a serving batch (16 prompts of 128 tokens, 32 new tokens each): the
throughput the paper's 1.46x is about, where the fixed cost of a step (norms, rotary, softmax, the
framework's dispatch) is shared by the batch's tokens, as it is not at batch 1.
Random weights give meaningless perplexity; only the shapes matter for speed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/modegpt_speed.py [--shape tinyllama|llama2-7b] [--layers 4] \
        [--rounds 3] [--repeats 5]
    -> bench/results/modegpt_speed.json and a table
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import transformers as tf

import rankdown
from rankdown.eval.speed import compare_speed
from rankdown.reference import load_reference

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # decoder layer shapes of real models; the vocabulary stays 4096 (the head 2-4% of the parameters)
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama",
                    help="layer shape: TinyLlama's (GQA, 176 MB a layer) or Llama-2-7B's (808 MB a layer)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--methods", default="modegpt,svd-llm")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds; the median of their ratios is reported")
    ap.add_argument("--repeats", type=int, default=5, help="runs per model in a round; the fastest is kept")
    ap.add_argument("--serve-batch", type=int, default=16,
                    help="also time decoding at this batch (prompts of --serve-prompt tokens); 0: skip")
    ap.add_argument("--serve-prompt", type=int, default=128)
    ap.add_argument("--serve-tokens", type=int, default=32, help="new tokens per prompt at the serving batch")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "modegpt_speed.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SHAPES[args.shape], num_hidden_layers=args.layers, vocab_size=4096,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    dense = tf.LlamaForCausalLM(cfg).eval()
    _, tok = load_reference(torch.float32)  # its ids are < 4096
    models = {"dense": dense}
    compress_s = {}
    for method in args.methods.split(","):
        model = copy.deepcopy(dense)
        config = rankdown.make_config(method, ratio=args.ratio)
        report = rankdown.compress(model, tok, config, "reference", nsamples=args.nsamples, seqlen=256, progress=False)
        models[method] = model
        compress_s[method] = {"seconds": report.seconds, "ratio_achieved": report.ratio_achieved,
                              "params": report.params_after}
        print(f"{method}: {report.params_before:,} -> {report.params_after:,} ({report.ratio_achieved:.3f}) "
              f"in {report.seconds:.0f}s", flush=True)
    runs = [compare_speed(models, batch_size=1, prompt_len=512, new_tokens=64, repeats=args.repeats)
            for _ in range(args.rounds)]
    serve = [compare_speed(models, batch_size=args.serve_batch, prompt_len=args.serve_prompt,
                           new_tokens=args.serve_tokens, repeats=args.repeats)
             for _ in range(args.rounds if args.serve_batch else 0)]
    table = {}
    for name in models:
        if name == "dense":
            continue
        pre = statistics.median(r["ratios"][name]["prefill_speedup"] for r in runs)
        dec = statistics.median(r["ratios"][name]["decode_speedup"] for r in runs)
        removed = compress_s[name]["ratio_achieved"]
        table[name] = {"prefill_speedup": pre, "decode_speedup": dec, "params_removed": removed,
                       "proportional_speedup": 1 / (1 - removed), **compress_s[name]}
        if serve:
            table[name]["serve_decode_speedup"] = statistics.median(r["ratios"][name]["decode_speedup"] for r in serve)
            table[name]["serve_decode_speedups"] = [r["ratios"][name]["decode_speedup"] for r in serve]
        table[name]["decode_speedups"] = [r["ratios"][name]["decode_speedup"] for r in runs]
        table[name]["prefill_speedups"] = [r["ratios"][name]["prefill_speedup"] for r in runs]
    result = {"shape": args.shape, "layout": cfg.to_dict() | {"torch_dtype": "float32"}, "threads": torch.get_num_threads(),
              "ratio": args.ratio, "rounds": args.rounds, "methods": table, "runs": runs, "serve_runs": serve}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\n{args.layers}-layer random Llama ({args.shape} layers), {torch.get_num_threads()} thread(s), median of "
          f"{args.rounds} rounds\n| model at {args.ratio:.0%} | prefill, 1 x 512 | decode, batch 1 | decode, batch "
          f"{args.serve_batch} | proportional |\n|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['prefill_speedup']:.2f}x | {row['decode_speedup']:.2f}x | "
              f"{row.get('serve_decode_speedup', float('nan')):.2f}x | {row['proportional_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
