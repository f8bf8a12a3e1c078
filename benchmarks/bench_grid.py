"""A method's validation grid as one batched generation against one generation per setting, on the
default model: the benchmark recipe's candidate settings (``steerlab bench --preset quick``) over the
first validation prompts, each setting written to its own run directory, with the benchmark's scorer,
first one ``generate_run`` per setting (what ``bench._select`` did), then ``steerlab.grid.generate_grid``
(what it does now). Asserts that both write the same rows (tokens and scores) and prints the wall
and CPU seconds of each (CPU seconds, both threads, vary less than wall seconds on a shared machine). Fits as the benchmark does (steering, ITI, SLIM, AurA: the recipe's fit on the
training split), except EigenShift, whose fit generates 1,024 continuations: here it is fitted on the
last-token ``final`` states of the contrast set's toxic and non-toxic prompts (the grid costs the same
whichever directions it dampens).

    OMP_NUM_THREADS=2 python benchmarks/bench_grid.py [--methods steering,iti,slim,aura,eigenshift] [--n 16]
        [--new 16] [--k 1] [--max-rows 64]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common import setup

from steerlab.data import contrast_from_scores, load_prompts, split
from steerlab.experiments.recipes import BenchData, recipe_for
from steerlab.generation import GenConfig, generate_run
from steerlab.grid import generate_grid
from steerlab.hooks import capture
from steerlab.interventions import get
from steerlab.scoring import get_scorer
from steerlab.steer.eigenshift import EigenShift


def bench_data(seed: int = 0) -> tuple[BenchData, list]:
    """The benchmark's training data (prompts scored, a 64-pair contrast set) and validation prompts."""
    scorer = get_scorer("default")
    parts = split(load_prompts("rtp"), seed=seed)
    train = [p.text for p in parts["train"]]
    scores = [float(x) for x in scorer.toxicity(train)]
    contrast = contrast_from_scores(train, scores, n=64, source="rtp:train")
    return BenchData(train, scores, contrast, [p.text for p in parts["validation"]], scorer, seed), parts["validation"]


def fitted(name: str, model, data: BenchData):
    if name != "eigenshift":
        return recipe_for(name).fit(get(name), model, data, "quick")
    c = data.contrast
    caps = capture(model, list(c.undesirable) + list(c.desirable), "final", "last")["final"]
    n = len(c.undesirable)
    return EigenShift.fit(model, (caps[:n], caps[n:]), k=64, alpha=0.0, rank="t", min_states=8)


def main() -> None:
    args, model = setup(__doc__, n=16, repeats=1, new_tokens=16, methods=(str, "steering,iti,slim,aura,eigenshift"),
                        k=(int, 1), max_rows=(int, 64))
    data, val = bench_data()
    prompts = val[:args.n]
    cfg = GenConfig(max_new_tokens=args.new, sampling="t1.0", k=args.k, seed=0, batch_size=args.batch_size)
    generate_run(model, prompts[:4], Path(tempfile.mkdtemp()) / "warm", cfg, progress=False)  # warm-up
    print(f"{args.n} validation prompts x {args.k}, {args.new} new tokens, t1.0, batch {args.batch_size}, grid "
          f"calls of up to {args.max_rows} rows", flush=True)
    for name in args.methods.split(","):
        iv = fitted(name, model, data)
        settings = recipe_for(name).settings(iv, model, data, "quick")
        groups = iv.grid_groups(settings)
        root = Path(tempfile.mkdtemp(prefix=f"grid-{name}-"))
        t0, c0 = time.perf_counter(), time.process_time()
        one = [generate_run(model, prompts, root / "one" / str(i), cfg, scorer=data.scorer, intervention=iv,
                            apply_options=s, progress=False) for i, s in enumerate(settings)]
        t1, c1 = time.perf_counter(), time.process_time()
        grid = generate_grid(model, prompts, [root / "grid" / str(i) for i in range(len(settings))], cfg, iv,
                             settings, scorer=data.scorer, max_rows=args.max_rows, progress=False)
        t2, c2 = time.perf_counter(), time.process_time()
        same = grid == one
        print(f"{name}: {len(settings)} settings in {len(groups)} group(s); one at a time {t1 - t0:.1f} s wall, "
              f"{c1 - c0:.1f} s CPU; batched {t2 - t1:.1f} s wall, {c2 - c1:.1f} s CPU (wall {(t1 - t0) / (t2 - t1):.2f}x, "
              f"CPU {(c1 - c0) / (c2 - c1):.2f}x); identical rows: {same}; load {os.getloadavg()[0]:.1f}", flush=True)
        assert same, f"{name}: the batched grid's rows differ from one setting at a time"


if __name__ == "__main__":
    main()
