"""EigenShift and AurA: fit costs and generation speed against plain generation, in one run.

- EigenShift fit after collection: SVD of the unembedding, delta, dampening and fingerprints from
  given final states (here: ``final`` at the last token of RTP prefixes, split in two halves), and
  the first apply on a loaded file (the SVD is recomputed there, then cached).
- AurA: AUROCs of every MLP unit (all layers) for ``--texts`` texts, on synthetic responses of the
  model's size (the cost does not depend on the values).
- Greedy generation of ``--n`` prompts x ``--new`` tokens: plain (the limit), with the EigenShift
  edit (same matrix shapes: should cost nothing) and with AurA's per-unit scaling at every layer.

    python benchmarks/bench_interventions.py [--n 16] [--new 32] [--texts 1000] [--repeats 2]
"""

from __future__ import annotations

import time

import torch
from common import alternate, rtp_prompts, setup

import steerlab as sl
from steerlab.generation import GenConfig, generate
from steerlab.steer.aura import AurA, aura_factors, auroc
from steerlab.steer.eigenshift import EigenShift


def fit_costs(m, texts: int) -> tuple[dict[str, float], EigenShift]:
    states = sl.capture(m, rtp_prompts(128), "final", "last")["final"]
    t0 = time.perf_counter()
    es = EigenShift.fit(m, (states[:64], states[64:]), percentile=0.99, alpha=0.1)
    t_fit = time.perf_counter() - t0
    es = EigenShift(es.indices, es.sigma, es.delta, es.alpha, dict(es.meta))  # as if loaded from a file
    t0 = time.perf_counter()
    with es.apply(m):
        pass
    t_apply = time.perf_counter() - t0
    units = m.n_layers * m.d_mlp
    g = torch.Generator().manual_seed(0)
    resp = torch.randn(texts, units, generator=g)
    labels = torch.rand(texts, generator=g) < 0.3
    t0 = time.perf_counter()
    auc = auroc(resp, labels)
    t_auc = time.perf_counter() - t0
    aura_factors(auc, "aura")
    return {"eigenshift fit from states (s)": t_fit, "eigenshift first apply, SVD recomputed (s)": t_apply,
            f"aura AUROC, {units} units x {texts} texts (s)": t_auc}, es


def main() -> None:
    args, m = setup(__doc__, n=16, repeats=2, new_tokens=32, texts=(int, 1000))
    costs, es = fit_costs(m, args.texts)
    g = torch.Generator().manual_seed(1)
    aura = AurA({f"blocks.{i}.mlp.act": 1.0 - 0.5 * torch.rand(m.d_mlp, generator=g) for i in range(m.n_layers)})
    prompts = rtp_prompts(args.n)
    cfg = GenConfig(max_new_tokens=args.new, batch_size=args.batch_size)

    def with_iv(iv):
        def run():
            with iv.apply(m):
                return generate(m, prompts, cfg, progress=False)
        return run

    res = alternate({"plain generate (the limit)": lambda: generate(m, prompts, cfg, progress=False),
                     "generate with EigenShift": with_iv(es), "generate with AurA (all layers)": with_iv(aura)},
                    args.repeats)
    print(f"model {m.name}, {torch.get_num_threads()} threads")
    for k, v in costs.items():
        print(f"  {k:55s} {v:7.2f}")
    limit = res["plain generate (the limit)"]
    print(f"{len(prompts)} prompts x {args.new} new tokens, greedy, batch {args.batch_size}, median of {args.repeats}")
    for k, v in res.items():
        print(f"  {k:55s} {v:7.2f} s   ratio {v / limit:5.3f}")


if __name__ == "__main__":
    main()
