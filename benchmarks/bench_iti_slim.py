"""Costs of ITI and SLIM: capture of every head at every layer, probe training for all heads of all
layers (logistic, batched Newton; SLIM's risk probes, batched Adam), SLIM's conic program per head,
and the runtime overhead of ITI and SLIM against plain `model.generate` in the same run.

    python benchmarks/bench_iti_slim.py [--n 32] [--new 32] [--repeats 3] [--fit-texts 64] [--slim-heads 2]
"""

from __future__ import annotations

import time

import torch
from common import alternate, rtp_prompts, setup

from steerlab.explain import probes as pr
from steerlab.steer.iti import ITI
from steerlab.steer.slim import SLIM, fit_head_maps


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    args, m = setup(__doc__, n=32, repeats=3, new_tokens=32, fit_texts=(int, 64), slim_heads=(int, 2))
    texts = rtp_prompts(args.n + args.fit_texts)
    fit_texts, prompts = texts[:args.fit_texts], texts[args.fit_texts:]
    labels = [i % 2 for i in range(len(fit_texts))]  # timing only: arbitrary labels
    lab = pr.labelled_from_texts(fit_texts, labels, validation=0.3)
    data, t_cap = _timed(lambda: pr.probe_data(m, lab))
    res, t_probe = _timed(lambda: pr.probe_heads(data))
    rp, t_risk = _timed(lambda: pr.risk_probes(data))
    li = data.layers.index(rp.layer)
    acts = data.heads["train"][li, :, :args.slim_heads].double().numpy()
    flags = torch.ones(acts.shape[:2], dtype=torch.bool).numpy()  # all rows: time the program, not the data
    _, t_ot = _timed(lambda: fit_head_maps(acts, flags, rp.w[li, :args.slim_heads].double().numpy(),
                                           rp.b[li, :args.slim_heads].double().numpy(), rp.layer, 0.1, 0.1))
    iti = ITI.fit(m, data, k=16)
    H, d = m.n_heads, m.d_head
    slim = SLIM({"w": rp.w[li], "b0": rp.b[li], "A": torch.eye(d).repeat(H, 1, 1), "b": torch.zeros(H, d),
                 "active": torch.ones(H, dtype=torch.bool)}, {"model": m.name, "layer": rp.layer, "tau": 1})
    bs = args.batch_size
    batches = [m.encode(prompts[i:i + bs]) for i in range(0, len(prompts), bs)]

    @torch.no_grad()
    def run():
        for enc in batches:
            m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=args.new,
                          do_sample=False, pad_token_id=m.pad_id, temperature=None, top_p=None, top_k=None)

    def with_iv(iv, **opts):
        with iv.apply(m, strict=False, **opts):
            run()

    res_t = alternate({"plain": run, "iti": lambda: with_iv(iti, alpha=15.0),
                       "slim": lambda: with_iv(slim, kappa=1.0)}, args.repeats)
    L = len(data.layers)
    print(f"capture attn.heads + resid_post at {L} layers, {len(fit_texts)} texts: {t_cap:.2f} s")
    print(f"logistic probes, {L * H} heads (d={d}) + {L} residual streams, batched Newton: {t_probe:.2f} s")
    print(f"SLIM risk probes, {L * H} heads, 500 Adam epochs: {t_risk:.2f} s")
    print(f"SLIM transport program (cvxpy + Clarabel), d={d}: {t_ot / args.slim_heads:.2f} s per head")
    print(f"SLIM fired on {slim.fire_rate:.0%} of steps (tau=1, identity map: the cost of the gate and the map)")
    for k in ("iti", "slim"):
        print(f"generate {args.n} prompts x {args.new} tokens, batch {bs}: {k} {res_t[k]:.2f} s vs plain "
              f"{res_t['plain']:.2f} s = {res_t[k] / res_t['plain']:.3f}x")


if __name__ == "__main__":
    main()
