"""Batched generation through steerlab (no intervention) against plain `model.generate` in the
same run, and the throughput of each offline toxicity scorer.

    python benchmarks/bench_generate.py [--n 32] [--new 32] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import torch
from common import alternate, rtp_prompts, setup

from steerlab.generation import GenConfig, generate, generation_batches, prompt_ids_texts


def main() -> None:
    args, m = setup(__doc__, n=32, repeats=3, new_tokens=32, skip_scorers=("flag", False))
    prompts = rtp_prompts(args.n)
    cfg = GenConfig(max_new_tokens=args.new, batch_size=args.batch_size)
    bs = args.batch_size
    ids, texts = prompt_ids_texts(prompts)
    same_batches = [[texts[i] for i in b] for b in generation_batches(m, ids, texts, cfg)]
    in_order = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]

    @torch.no_grad()
    def plain(batches):
        outs = []
        for texts in batches:
            enc = m.tok(texts, return_tensors="pt", padding=True, padding_side="left")
            out = m.hf.generate(**enc, max_new_tokens=args.new, do_sample=False, pad_token_id=m.pad_id,
                                temperature=None, top_p=None, top_k=None)
            outs += m.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return outs

    res = alternate({
        "plain generate, steerlab's batches (the limit)": lambda: plain(same_batches),
        "plain generate, batches in input order": lambda: plain(in_order),
        "steerlab.generation.generate": lambda: generate(m, prompts, cfg, progress=False),
    }, args.repeats)
    limit = res["plain generate, steerlab's batches (the limit)"]
    print(f"model {m.name}: {len(prompts)} prompts x {args.new} new tokens, greedy, batch {bs}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for k, v in res.items():
        print(f"  {k:50s} {v:7.2f} s   ratio {v / limit:5.3f}")
    if not args.skip_scorers:
        from steerlab.scoring import scorer_throughput

        texts = rtp_prompts(700)
        print(f"scorer throughput on {len(texts)} RealToxicityPrompts prefixes:")
        for name in ("profanity", "jigsaw-bilstm", "default"):
            print(f"  {name:20s} {scorer_throughput(name, texts):10.0f} texts/s")


if __name__ == "__main__":
    main()
