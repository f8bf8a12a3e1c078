"""Capture of resid_post at every layer (last token, 64 prompts, batches of 16) on the default
model, against the plain-transformers limit: a forward with output_hidden_states=True.

    python benchmarks/bench_capture.py [--model default] [--repeats 5]
"""

from __future__ import annotations

import torch
from common import alternate, rtp_prompts, setup

import steerlab as sl


def main() -> None:
    args, m = setup(__doc__, n=64, repeats=5)
    prompts = rtp_prompts(args.n)
    bs = args.batch_size
    sites = [f"blocks.{i}.resid_post" for i in range(m.n_layers)]
    batches = [m.encode(prompts[i:i + bs]) for i in range(0, len(prompts), bs)]
    lengths = m.encode(prompts)["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True).tolist()
    sorted_batches = [m.encode([prompts[j] for j in order[i:i + bs]]) for i in range(0, len(prompts), bs)]

    @torch.no_grad()
    def plain(bs_list):
        out = []
        for enc in bs_list:
            hs = m.hf(**enc, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[:, -1] for h in hs[1:]], 1))
        return out

    res = alternate({
        "plain forward, output_hidden_states (input order)": lambda: plain(batches),
        "plain forward, output_hidden_states (length-sorted)": lambda: plain(sorted_batches),
        "steerlab.capture, all 30 layers": lambda: sl.capture(m, prompts, sites, "last", batch_size=bs),
        "steerlab.capture, layer 5 only": lambda: sl.capture(m, prompts, "blocks.5.resid_post", "last", batch_size=bs),
    }, args.repeats)
    # same numbers as the limit (all but the last layer, whose HF entry is after the final norm)
    got = sl.capture(m, prompts, sites, "last", batch_size=bs)
    ref = torch.cat(plain(batches))
    err = max(float(((got[s] - ref[:, i]).norm(dim=-1) / ref[:, i].norm(dim=-1)).max())
              for i, s in enumerate(sites[:-1]))
    limit = res["plain forward, output_hidden_states (input order)"]
    print(f"model {m.name}, {len(prompts)} prompts, batch {bs}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for k, v in res.items():
        print(f"  {k:55s} {v * 1000:8.1f} ms   ratio to limit {v / limit:5.2f}")
    print(f"  max relative difference |capture - hidden_states| / |hidden_states| over layers "
          f"0..{m.n_layers - 2}: {err:.1e} (batches differ: capture sorts prompts by length)")


if __name__ == "__main__":
    main()
