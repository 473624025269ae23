"""Peak memory of streaming compression against the model's size on disk (issues 3 and 7).

Writes a random-weights Llama of about 3.1 GB (float16 safetensors, 32 layers, hidden 2048,
intermediate 5632, 16 query / 4 key-value heads, vocabulary 32000, untied head) one layer at a
time, then for each method runs ``rankdown compress FOLDER --out ... --max-memory M`` in a child
process and reads the child's peak resident set (``VmHWM``). In the same run, a child times one
no-grad forward pass of the dense model over the same calibration tokens, streamed the same way
(every layer read from disk, run, dropped), so compress time is also given as a multiple of it.

    .venv/bin/python bench/memory.py --methods rom,svd-llm,modegpt
    -> bench/results/memory.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def make_model(path: Path, layout: dict, seed: int = 0) -> int:
    """Write a random Llama to ``path`` shard by shard (never whole in memory); returns bytes on disk."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from rankdown.reference import reference_dir

    path.mkdir(parents=True, exist_ok=True)
    cfg = tf.LlamaConfig(**layout)
    cfg.dtype = "float16"
    cfg.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer will do: its ids < vocab_size
        shutil.copy(reference_dir() / f, path / f)
    g = torch.Generator().manual_seed(seed)
    h, inter, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * (1 / shape[-1]) ** 0.5).to(torch.float16)
    weight_map, total = {}, 0
    n_files = L + 1
    for i in range(L):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
             p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
             p + "mlp.down_proj.weight": rnd(h, inter),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(t, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(x.numel() * 2 for x in t.values())
    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
         "lm_head.weight": rnd(cfg.vocab_size, h)}
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(t, path / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    total += sum(x.numel() * 2 for x in t.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_compress(args: argparse.Namespace) -> dict:
    from rankdown.cli import main

    out = Path(args.work) / f"out-{args.child}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rc = main(["compress", str(args.model), "--method", args.child, "--ratio", str(args.ratio), "--calib", "reference",
               "--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples), "--max-memory", args.max_memory,
               "--batch-size", str(args.batch_size), "--stream", "--restart", "--out", str(out), "-q"])
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) if rc == 0 else None
    shutil.rmtree(out, ignore_errors=True)
    return {"rc": rc, "seconds": seconds, "peak_rss": _peak_rss(), "out_bytes": size}


def child_forward(args: argparse.Namespace) -> dict:
    """One no-grad forward of the dense model's decoder layers over the calibration tokens, layer by
    layer from disk (every layer: until session 7 the last one was left out, as the walk skips the
    outputs no next layer reads, which made the compress/forward ratios L/(L-1) too large)."""
    import torch

    from rankdown import io
    from rankdown.calib import calibration_data
    from rankdown.engine import PlanContext
    from rankdown.storage import MemoryBudget, parse_bytes
    from rankdown.storage.folder import StreamedModel

    torch.manual_seed(0)
    streamed = StreamedModel(args.model, torch.float32)
    tok = io.load_tokenizer(args.model)
    data = calibration_data(tok, "reference", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ran: list[int] = []

    def visit(ctx) -> None:
        # the walk computes a layer's outputs only when a next layer needs them: asked here, so the
        # last layer runs too (the embedding is run, the final norm and head are left out)
        ctx.outputs()
        ran.append(ctx.index)

    t0 = time.perf_counter()
    with MemoryBudget(parse_bytes(args.max_memory)) as budget:
        PlanContext(streamed.model, streamed.spec, lambda: data, args.batch_size, "cpu", False, budget, streamed).walk_dense(
            visit)
    seconds = time.perf_counter() - t0
    if ran != list(range(streamed.model.config.num_hidden_layers)):
        raise RuntimeError(f"the forward ran layers {ran}, not all of them")
    return {"seconds": seconds, "peak_rss": _peak_rss(), "layers_run": len(ran)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rom,svd-llm")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-memory", default="64MB", help="activations kept in RAM by the compressing child")
    ap.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    ap.add_argument("--work", default="/tmp/rankdown-membench", help="where the model and outputs are written")
    ap.add_argument("--layers", type=int, default=LAYOUT["num_hidden_layers"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child_forward(args) if args.child == "forward" else child_compress(args)
        print("RESULT " + json.dumps(res))
        return

    work = Path(args.work)
    model = work / f"llama-random-{args.layers}L"
    layout = {**LAYOUT, "num_hidden_layers": args.layers}
    if not (model / "model.safetensors.index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        t0 = time.perf_counter()
        make_model(model, layout)
        print(f"wrote {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"model on disk: {disk / 1e9:.2f} GB", flush=True)

    def run(child: str) -> dict:
        cmd = [sys.executable, __file__, "--child", child, "--model", str(model), "--work", str(work),
               "--ratio", str(args.ratio), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--max-memory", args.max_memory, "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"rc": proc.returncode, "error": proc.stderr[-2000:]}
        res = json.loads(lines[-1][7:])
        if res.get("rc"):  # the compress command failed: say why
            res["error"] = proc.stderr[-2000:]
        return res

    def write(rows: list) -> None:  # after every method: a cut-off run keeps what it measured
        result = {"layout": layout, "disk_bytes": disk, "ratio": args.ratio, "calibration": {
            "source": "reference", "nsamples": args.nsamples, "seqlen": args.seqlen}, "max_memory": args.max_memory,
            "batch_size": args.batch_size, "forward": forward, "methods": rows, "cpu_threads": os.cpu_count()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    forward = run("forward")
    print(f"dense streamed forward: {forward.get('seconds', float('nan')):.1f}s, "
          f"peak RSS {forward.get('peak_rss', 0) / 1e9:.2f} GB", flush=True)
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        res = run(method)
        row = {"method": method, **res, "disk_bytes": disk}
        if "peak_rss" in res:
            row["peak_over_disk"] = res["peak_rss"] / disk
            row["time_over_forward"] = res["seconds"] / forward["seconds"] if "seconds" in forward else None
        rows.append(row)
        write(rows)
        print(f"{method}: rc {res.get('rc')}, {res.get('seconds', float('nan')):.0f}s, peak RSS "
              f"{res.get('peak_rss', 0) / 1e9:.2f} GB = {row.get('peak_over_disk', float('nan')):.3f} of the "
              f"size on disk, {row.get('time_over_forward') or float('nan'):.1f}x the forward"
              + (f"\n{res['error']}" if "error" in res else ""), flush=True)
    print(f"\n| method | peak RSS | / size on disk ({disk / 1e9:.2f} GB) | compress s | / dense forward "
          f"({forward.get('seconds', float('nan')):.0f} s) |\n|---|---|---|---|---|")
    for r in rows:
        if "peak_rss" in r:
            print(f"| {r['method']} | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_over_disk']:.3f} | {r['seconds']:.0f} | "
                  f"{r['time_over_forward']:.1f}x |")


if __name__ == "__main__":
    main()
