"""Steered generation (one vector, one layer, every position) against plain `model.generate` in
the same run, at batch 16 and batch 1, plus the time to fit a vector at every layer.

    python benchmarks/bench_steer.py [--n 32] [--new 32] [--repeats 3]
"""

from __future__ import annotations

import time

import torch
from common import alternate, rtp_prompts, setup

from steerlab.steer import SteeringVector


def main() -> None:
    args, m = setup(__doc__, n=32, repeats=3, new_tokens=32, layer=(int, 12))
    prompts = rtp_prompts(args.n + 64)
    fit_texts, prompts = prompts[:64], prompts[64:]
    t0 = time.perf_counter()
    sv = SteeringVector.fit(m, fit_texts[:32], fit_texts[32:], [f"blocks.{i}.resid_post" for i in range(m.n_layers)])
    fit_s = time.perf_counter() - t0
    one = sv.only(f"blocks.{args.layer}.resid_post") * 8.0
    bs = args.batch_size
    batches = [m.encode(prompts[i:i + bs]) for i in range(0, len(prompts), bs)]
    singles = [m.encode([p]) for p in prompts[:8]]

    @torch.no_grad()
    def run(encs):
        for enc in encs:
            m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=args.new,
                          do_sample=False, pad_token_id=m.pad_id, temperature=None, top_p=None, top_k=None)

    def steered(encs):
        with one.apply(m, alpha=1.0, where="all"):
            run(encs)

    res = alternate({"plain generate, batch 16": lambda: run(batches),
                     "steered generate, batch 16": lambda: steered(batches),
                     "plain generate, batch 1 (8 prompts)": lambda: run(singles),
                     "steered generate, batch 1 (8 prompts)": lambda: steered(singles)}, args.repeats)
    print(f"model {m.name}: {len(prompts)} prompts x {args.new} new tokens, greedy, vector at layer {args.layer}, "
          f"every position, {torch.get_num_threads()} threads, median of {args.repeats}")
    for k, v in res.items():
        print(f"  {k:40s} {v:7.2f} s")
    print(f"  ratio steered / plain, batch 16: {res['steered generate, batch 16'] / res['plain generate, batch 16']:.3f}")
    print(f"  ratio steered / plain, batch 1:  "
          f"{res['steered generate, batch 1 (8 prompts)'] / res['plain generate, batch 1 (8 prompts)']:.3f}")
    print(f"fit a mean-difference vector at all {m.n_layers} layers from 32 + 32 texts: {fit_s:.2f} s")


if __name__ == "__main__":
    main()
