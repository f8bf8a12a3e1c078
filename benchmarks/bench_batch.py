"""Tokens per second of the benchmark's two model passes at several batch sizes, on this machine:
sampled generation (t1.0, the benchmark's decoding) and the teacher-forced perplexity pass over
prompt + continuation (``metrics.lm.token_nlls``, what every arm's fluency costs). Each size is
timed alternately with the others, median of the repeats.

    python benchmarks/bench_batch.py [--n 64] [--new 16] [--repeats 2] [--sizes 8,16,32,64]
"""

from __future__ import annotations

import time

import torch
from common import rtp_prompts, setup

from steerlab.generation import GenConfig, generate_ids, prompt_ids_texts
from steerlab.metrics.lm import token_nlls


def main() -> None:
    args, m = setup(__doc__, n=64, repeats=2, new_tokens=16, sizes=(str, "8,16,32,64"))
    sizes = [int(s) for s in args.sizes.split(",")]
    ids, texts = prompt_ids_texts(rtp_prompts(args.n))
    new = generate_ids(m, texts, GenConfig(max_new_tokens=args.new, sampling="t1.0", seed=0), ids)
    ctx = [m.tok(t)["input_ids"] for t in texts]
    tgt = [[t for t in row if t != m.pad_id] for row in new.tolist()]

    def gen(bs: int) -> float:
        cfg = GenConfig(max_new_tokens=args.new, sampling="t1.0", seed=0, batch_size=bs)
        t0 = time.perf_counter()
        n = sum(generate_ids(m, texts[i:i + bs], cfg, ids[i:i + bs]).numel() for i in range(0, len(texts), bs))
        return n / (time.perf_counter() - t0)

    def ppl(bs: int) -> float:
        t0 = time.perf_counter()
        token_nlls(m, ctx, tgt, batch_size=bs)
        return sum(len(c) + len(t) for c, t in zip(ctx, tgt)) / (time.perf_counter() - t0)

    res: dict = {(k, b): [] for k in ("generate", "perplexity") for b in sizes}
    for _ in range(args.repeats):
        for b in sizes:
            res[("generate", b)].append(gen(b))
            res[("perplexity", b)].append(ppl(b))
    print(f"model {m.name}: {len(texts)} prompts, {args.new} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (tokens per second)")
    print(f"  {'batch':>6} {'generate (new tokens/s)':>24} {'perplexity pass (tokens/s)':>28}")
    for b in sizes:
        g, p = (sorted(res[(k, b)])[len(res[(k, b)]) // 2] for k in ("generate", "perplexity"))
        print(f"  {b:>6} {g:>24.0f} {p:>28.0f}")


if __name__ == "__main__":
    main()
