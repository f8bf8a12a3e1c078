"""How many alternating pairs the benchmark's cost column needs: A/A timings (the plain model on both
sides) of one quick-preset test batch (16 rows: 8 test prompts x 2 samples, 16 new tokens, t1.0),
pairs added until the median ratio's bootstrap CI is within +-3% or --max-pairs
(``evaluation.generation_overhead``, as ``steerlab bench`` times each arm); repeated --runs times.

    python benchmarks/timing_aa.py [--runs 2] [--max-pairs 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import steerlab as sl
from steerlab.data import load_prompts, split
from steerlab.evaluation import generation_overhead
from steerlab.generation import GenConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--max-pairs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = sl.load()
    test = split(load_prompts("rtp"), seed=0)["test"][:40]
    cfg = GenConfig(max_new_tokens=16, sampling="t1.0", k=2, seed=0, batch_size=16)
    for run in range(a.runs):
        t0 = time.perf_counter()
        t = generation_overhead(m, test, cfg, None, reps=2, max_reps=a.max_pairs, warmup=1 if run == 0 else 0)
        print(json.dumps({"run": run, "ratio": round(t["ratio"], 4), "ci": [round(x, 4) for x in t["ci"]],
                          "n_pairs": t["n_pairs"], "converged": t["converged"],
                          "batch_seconds": [round(x, 2) for x in t["baseline_seconds"]],
                          "wall_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
