"""How much of a mean-pooled steering vector is the first token's attention-sink state (issue 15,
"fitting positions"): per layer, the first token's norm against the others', and the cosine of the
`mean` and the `mean_skip_first` vector with the mean first-token state, on the default toxicity
contrast set (training split of the bundled RealToxicityPrompts).

    python benchmarks/first_token.py [--model default] [--layers 6,12,18,24] [--pairs 64]
"""

from __future__ import annotations

import torch
from common import setup

from steerlab.hooks import capture
from steerlab.positions import after_first
from steerlab.steer.vector import toxicity_contrast


def main() -> None:
    args, m = setup(__doc__, n=0, repeats=1, layers=(str, "6,12,18,24"), pairs=(int, 64))
    cs = toxicity_contrast(n_pairs=args.pairs)
    texts, n = list(cs.desirable) + list(cs.undesirable), len(cs.desirable)
    sites = [f"blocks.{int(x)}.resid_post" for x in args.layers.split(",")]
    caps = capture(m, texts, sites, "all")
    mask = caps.mask.bool()
    rest = after_first(caps.mask)
    first = mask & ~rest
    lengths = mask.sum(1).float()
    print(f"{n} + {n} texts; mean length {lengths[:n].mean():.2f} (desirable) / {lengths[n:].mean():.2f} (undesirable)")
    print("| layer | first-token norm | other tokens' norm | cos(mean, first) | cos(mean_skip_first, first) "
          "| cos(mean, mean_skip_first) |")
    print("|---|---|---|---|---|---|")

    def cos(x, y):
        return float(torch.nn.functional.cosine_similarity(x, y, dim=0))

    for s in sites:
        a = caps[s]
        pooled = {k: (a * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
                  for k, w in (("mean", mask.float()), ("mean_skip_first", rest.float()))}
        v = {k: p[:n].mean(0) - p[n:].mean(0) for k, p in pooled.items()}
        f = a[first].mean(0)
        print(f"| {s.split('.')[1]} | {a[first].norm(dim=1).mean():,.0f} | {a[rest].norm(dim=1).mean():,.0f} "
              f"| {cos(v['mean'], f):+.2f} | {cos(v['mean_skip_first'], f):+.2f} "
              f"| {cos(v['mean'], v['mean_skip_first']):.2f} |")


if __name__ == "__main__":
    main()
