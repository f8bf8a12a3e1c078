"""Costs of ITI and SLIM on the default model, each printed as soon as it is measured: capture of every
head at every layer, probe training for all heads of all layers (logistic, batched Newton; SLIM's risk
probes, batched Adam), SLIM's transport program per head (the closed form for every head of the chosen
layer; cvxpy + Clarabel, the reference, for ``--cvxpy-heads`` of them), and the runtime overhead of the
fitted ITI and SLIM against plain `model.generate` in the same run (alternated, median of repeats).

    python benchmarks/bench_iti_slim.py [--n 32] [--new 32] [--repeats 3] [--n-train 64] [--n-val 32] [--cvxpy-heads 1]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import alternate, rtp_prompts, setup

from steerlab.explain import probes as pr
from steerlab.steer.iti import ITI
from steerlab.steer.slim import SLIM, fit_head_maps, gaussian_ot_map, head_gaussian


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _say(text: str) -> None:
    print(text, flush=True)


def _programs(data, rp, cvxpy_heads: int) -> None:
    """Time SLIM's program per head of the chosen layer: closed form for all, cvxpy for a few."""
    li = data.layers.index(rp.layer)
    acts = data.heads["train"][li].double().numpy()
    w, b0 = rp.w[li].double().numpy(), rp.b[li].double().numpy()
    flags = np.einsum("nhd,hd->nh", acts, w) + b0 > 0
    H, d = w.shape
    _, t = _timed(lambda: fit_head_maps(acts, flags, w, b0, rp.layer, 0.1, 0.1))
    _say(f"SLIM transport program, closed form, d={d}: {1000 * t / H:.1f} ms per head ({H} heads of layer "
         f"{rp.layer}, including the covariance and the map's matrix square roots)")
    for h in range(min(cvxpy_heads, H)):
        if flags[:, h].sum() < 2:
            continue
        mu, sig = head_gaussian(acts[flags[:, h], h], 0.1)
        t0 = time.perf_counter()
        ref = gaussian_ot_map(mu, sig, b0[h], w[h], 0.1, solver="cvxpy")
        t = time.perf_counter() - t0
        closed = gaussian_ot_map(mu, sig, b0[h], w[h], 0.1)
        gap = np.abs(ref["sigma"] - closed["sigma"]).max() / np.abs(closed["sigma"]).max()
        _say(f"  same program with cvxpy + Clarabel, head {h}: {t:.2f} s; max |Sigma* difference| / max |Sigma*| "
             f"= {gap:.1e}, |mu* difference| = {np.abs(ref['mu'] - closed['mu']).max():.1e}")


def main() -> None:
    args, m = setup(__doc__, n=32, repeats=3, new_tokens=32, n_train=(int, 64), n_val=(int, 32),
                    cvxpy_heads=(int, 1))
    lab = pr.toxicity_labels(n_train=args.n_train, n_val=args.n_val)
    L, H, d = m.n_layers, m.n_heads, m.d_head
    _say(f"model {m.name}: {L} layers x {H} heads x d_head {d}; {sum(map(len, lab.counts().values()))} labelled "
         f"parts {lab.counts()}; {torch.get_num_threads()} threads")
    data, t = _timed(lambda: pr.probe_data(m, lab))
    _say(f"capture attn.heads + resid_post at {L} layers, {len(lab.train[0]) + len(lab.validation[0])} texts: {t:.2f} s")
    _, t = _timed(lambda: pr.probe_heads(data))
    _say(f"logistic probes, {L * H} heads (d={d}) + {L} residual streams, batched Newton: {t:.2f} s")
    rp, t = _timed(lambda: pr.risk_probes(data))
    _say(f"SLIM risk probes, {L * H} heads, 500 Adam epochs: {t:.2f} s (layer {rp.layer}, tau "
         f"{int(rp.tau[data.layers.index(rp.layer)])})")
    _programs(data, rp, args.cvxpy_heads)
    iti, t = _timed(lambda: ITI.fit(m, data, k=max(1, round(0.05 * L * H))))
    _say(f"ITI fit from the captured activations (probes + top {len(iti.heads)} heads): {t:.2f} s")
    slim, t = _timed(lambda: SLIM.fit(m, data))
    _say(f"SLIM fit from the captured activations (risk probes + {H} programs): {t:.2f} s")
    prompts = rtp_prompts(args.n)
    bs = args.batch_size
    batches = [m.encode(prompts[i:i + bs]) for i in range(0, len(prompts), bs)]

    @torch.no_grad()
    def run():
        for enc in batches:
            m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=args.new,
                          do_sample=False, pad_token_id=m.pad_id, temperature=None, top_p=None, top_k=None)

    def with_iv(iv, **opts):
        with iv.apply(m, **opts):
            run()

    slim.reset_counts()
    res = alternate({"plain": run, "iti": lambda: with_iv(iti, alpha=15.0),
                     "slim": lambda: with_iv(slim, kappa=20.0)}, args.repeats)
    _say(f"SLIM fired on {slim.fire_rate:.0%} of (row, step) pairs while timed (its gate and map run at every step "
         "either way)")
    for k in ("iti", "slim"):
        _say(f"generate {args.n} prompts x {args.new} tokens, greedy, batch {bs}, median of {args.repeats}: {k} "
             f"{res[k]:.2f} s vs plain {res['plain']:.2f} s = {res[k] / res['plain']:.3f}x")


if __name__ == "__main__":
    main()
