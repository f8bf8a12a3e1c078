"""Instruction-tuning explanations on the default model: batched attribution against the per-token
loop for a 64-token response (one run each), then the full head and FFN explanations (all layers,
all heads).

    python benchmarks/bench_attribution.py [--model default] [--new 64] [--chunk 16] [--threads 2]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import setup

from steerlab.explain.attribution import attribute, attribute_loop
from steerlab.explain.ffn import explain_ffn
from steerlab.explain.heads import explain_heads

PROMPT = "Write a short poem about the sea, in four lines, and give it a title."
TEXT = ("The Sea at Dawn\n\nThe grey waves fold beneath a paling sky,\nthe gulls complain above the harbour wall,\n"
        "a fishing boat goes slowly drifting by,\nand far away the tide begins to call.\n\nIt is the oldest song the "
        "water knows, a patient voice that rises and then goes, and every morning it returns again.")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    args, m = setup(__doc__, n=1, repeats=1, new_tokens=64, chunk=(int, 16), threads=(int, 2))
    torch.set_num_threads(args.threads)
    ids = m.tok(TEXT, add_special_tokens=False)["input_ids"][: args.new]
    response = m.tok.decode(ids)
    fast, t_fast = timed(lambda: attribute(m, PROMPT, response, chunk=args.chunk))
    slow, t_slow = timed(lambda: attribute_loop(m, PROMPT, response))
    diff = float(np.abs(fast.scores - slow.scores).max())
    print(f"attribution of {len(fast.response_tokens)} response tokens on {len(fast.prompt_tokens)} prompt tokens "
          f"({m.name}, {args.threads} thread(s))")
    print(f"  batched (chunks of {args.chunk}): {t_fast:7.2f} s")
    print(f"  per-token loop (one forward, one backward per token): {t_slow:7.2f} s")
    print(f"  speed-up {t_slow / t_fast:.2f}x; max |difference| {diff:.2e} (max |a| {np.abs(slow.scores).max():.3f})")
    heads, t_heads = timed(lambda: explain_heads(m, n_words=5000))
    print(f"heads: all {m.n_layers} layers x {m.n_heads} heads, 5000 words: {t_heads:.1f} s")
    ffn20, t_ffn20 = timed(lambda: explain_ffn(m, n_components=20))
    print(f"ffn: all {m.n_layers} layers, 20 components x top-50 words: {t_ffn20:.1f} s")
    ffn_all, t_ffn_all = timed(lambda: explain_ffn(m, n_components=None))
    print(f"ffn: all {m.n_layers} layers, all {m.d_model} components x top-50 words: {t_ffn_all:.1f} s")


if __name__ == "__main__":
    main()
