"""Benchmarks: a grid of methods x ratios on one model (``rankdown bench``), and the demo on the
reference model (``rankdown demo``).

    grid.py    BenchSettings, run_bench: compress and evaluate every cell, resumable
    report.py  results.json, results.md and the plots
    demo.py    compare_methods: each method at one ratio on the reference model
"""

from rankdown.benchmark.demo import compare_methods
from rankdown.benchmark.grid import BenchSettings, degeneration, parse_method, run_bench
from rankdown.benchmark.report import markdown, write_results

__all__ = ["BenchSettings", "compare_methods", "degeneration", "markdown", "parse_method", "run_bench",
           "write_results"]
