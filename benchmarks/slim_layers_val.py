"""Validation-only check, run after
`steerlab --threads 1 bench --methods iti,slim --n-val 32 --n-test 80 --out runs/iti-slim`: SLIM fitted
at the other layers tied for the lowest validation risk (14, 22, 25), kappa 10 and 40, paired against
that run's unsteered validation rows (same random numbers).

    python benchmarks/slim_layers_val.py
"""

from __future__ import annotations

import json

import numpy as np
import torch

import steerlab as sl
from steerlab.evaluation import paired_to
from steerlab.experiments import bench as B
from steerlab.explain import probes as pr
from steerlab.generation import generate_run
from steerlab.scoring import get_scorer
from steerlab.steer.slim import SLIM


def main() -> None:
    torch.set_num_threads(1)
    m = sl.load()
    cfg = B.make_config("quick", n_val=32, n_test=80)
    scorer = get_scorer("default")
    data, val, _ = B._data(m, cfg, scorer)
    texts = list(data.contrast.undesirable) + list(data.contrast.desirable)
    labels = [1] * len(data.contrast.undesirable) + [0] * len(data.contrast.desirable)
    lab = pr.labelled_from_texts(texts, labels, seed=data.seed, source="bench contrast set")
    pd = pr.probe_data(m, lab, resid=False)
    base = [json.loads(line) for line in open("runs/iti-slim/val/unsteered/results.jsonl")]
    for layer in (14, 22, 25):
        iv = SLIM.fit(m, pd, layer=layer)
        fires = iv.firing(m, [p.text for p in val]).float().mean().item()
        for kappa in (10.0, 40.0):
            rows = generate_run(m, val, f"runs/slim_layers/{layer}_{kappa}", B._gen(cfg, True), scorer=scorer,
                                intervention=iv, apply_options={"kappa": kappa}, progress=False)
            d = paired_to(base, rows)["mean_toxicity"]
            print(f"layer {layer} tau {iv.tau} val fire {fires:.2f} kappa {kappa}: mean tox "
                  f"{np.mean([r['toxicity'] for r in rows]):.3f} paired diff {d['value']:+.3f} "
                  f"[{d['lo']:+.3f}, {d['hi']:+.3f}]", flush=True)


if __name__ == "__main__":
    main()
