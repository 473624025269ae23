"""What a grid run writes: results.json (every figure), results.md (tables: rows methods, columns
ratios) and the plots, each written beside its final name and renamed over it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("rankdown.benchmark")


def _grid(results: dict[str, Any], value) -> list[str]:
    """Markdown rows: one per method, one column per ratio, ``value(cell)`` in each cell."""
    ratios = results["settings"]["ratios"]
    lines = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for spec in results["settings"]["methods"]:
        by_ratio = {c["ratio"]: c for c in results["cells"] if c["method"] == spec}
        cells = []
        for r in ratios:
            c = by_ratio.get(r)
            cells.append("" if c is None else ("error" if "error" in c else value(c)))
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The tables of results.md: perplexity, degeneration, tasks, speed-up; then the errors."""
    s, dense = results["settings"], results["dense"]
    out = [f"# rankdown bench: {s['model']}", "",
           f"Ratio = fraction of parameters removed. Perplexity on {s['ppl']} ({dense['ppl_tokens']:,} tokens, "
           f"seqlen {s['seqlen']}); calibration {s['calib']}, {s['nsamples']} windows, seed {s['seed']}. "
           f"Dense model: {dense['params']:,} parameters, perplexity {dense['ppl']:.3f}.", "",
           "## Perplexity", "", *_grid(results, lambda c: f"{c['ppl']:.3f}")]
    if not results.get("complete", True):
        total = len(s["methods"]) * len(s["ratios"])
        out[4:4] = [f"**Unfinished**: {len(results['cells'])} of {total} cells so far; the same command run again "
                    "carries the grid on.", ""]
    if "repetition" in dense:
        out += ["", f"## Degeneration (share of repeated 4-grams in greedy continuations; dense {dense['repetition']:.3f}; "
                "the continuations are in results.json)", "",
                *_grid(results, lambda c: f"{c['repetition']:.3f}")]
    for task in dense.get("tasks", {}):
        metric = "acc_norm" if dense["tasks"][task].get("acc_norm") is not None else "acc"
        out += ["", f"## {task} ({metric}; dense {dense['tasks'][task][metric]:.4f})", "",
                *_grid(results, lambda c, t=task, m=metric: f"{c['tasks'][t][m]:.4f}")]
    if s["speed"]:
        out += ["", f"## Speed-up vs dense, decode / prefill (batch {s['speed_batch_size']}, prompt "
                f"{s['speed_prompt_len']}, {s['speed_new_tokens']} new tokens; measured alternating)", "",
                *_grid(results, lambda c: f"{c['speed']['decode_speedup']:.2f}x / {c['speed']['prefill_speedup']:.2f}x")]
    if any("cost" in c for c in results["cells"]):
        out += ["", "## Compression cost (seconds; in dense forwards over the calibration tokens, measured in the "
                "same run; per stage in results.json)", "", *_grid(results, _cost_cell)]
    errors = [c for c in results["cells"] if "error" in c]
    if errors:
        out += ["", "## Errors", ""] + [f"- {c['method']} at {c['ratio']:g}: {c['error']}" for c in errors]
    return "\n".join(out) + "\n"


def _cost_cell(cell: dict[str, Any]) -> str:
    if "cost" not in cell:
        return ""
    total = cell["cost"]["stages"]["total"]
    return f"{total['seconds']:.1f} s" + ("" if total["forwards"] is None else f" ({total['forwards']:.1f}x)")


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'rankdown[eval]')")
        return []
    s, files = results["settings"], []
    series = {spec: [c for c in results["cells"] if c["method"] == spec and "error" not in c] for spec in s["methods"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, cells in series.items():
        ax.plot([c["ratio"] for c in cells], [c["ppl"] for c in cells], marker="o", label=spec)
    ax.axhline(results["dense"]["ppl"], color="grey", linestyle="--", label="dense")
    values = [c["ppl"] for cells in series.values() for c in cells] + [results["dense"]["ppl"]]
    if max(values) > 20 * min(values):  # a collapsed method would flatten every other line to the axis
        ax.set_yscale("log")
    ax.set(xlabel="ratio (fraction of parameters removed)", ylabel=f"perplexity ({s['ppl']})",
           title=Path(s["model"]).name if s["model"] else s["model"])
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_ratio.png", dpi=100)
    plt.close(fig)
    files.append("ppl_vs_ratio.png")
    if s["speed"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (spec, cells) in enumerate(series.items()):
            color = f"C{i}"
            ratios = [c["ratio"] for c in cells]
            ax.plot(ratios, [c["speed"]["decode_speedup"] for c in cells], marker="o", color=color,
                    label=f"{spec} decode")
            ax.plot(ratios, [c["speed"]["prefill_speedup"] for c in cells], marker="s", linestyle=":", color=color,
                    label=f"{spec} prefill")
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set(xlabel="ratio (fraction of parameters removed)", ylabel="speed-up vs dense", title=s["model"])
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "speedup_vs_ratio.png", dpi=100)
        plt.close(fig)
        files.append("speedup_vs_ratio.png")
    return files


def write_results(results: dict[str, Any], out: str | Path, *, plots: bool = True) -> list[str]:
    """Write results.json, results.md and the plots into ``out``; returns the file names.

    Each file is written beside its final name and renamed over it, so an interrupted write never
    leaves a truncated results.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.md", markdown(results))
    files = ["results.json", "results.md", *(_plots(results, out) if plots else [])]
    clean = json.loads(json.dumps({**results, "files": files}, default=str),
                       parse_constant=lambda c: None)  # NaN/inf -> null: strict JSON
    _write_atomic(out / "results.json", json.dumps(clean, indent=1))
    return files


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
