"""Instruction-tuning explanations on the default model: the attribution paths for a 64-token
response in one run (reverse mode, batched VJPs in chunks of output tokens; forward mode, batched
JVPs in chunks of prompt tokens; the per-token loop), then the full head and FFN explanations (all
layers, all heads; skip them with --no-explain).

    python benchmarks/bench_attribution.py [--model default] [--new 64] [--chunk 16] [--fchunk 48]
        [--threads 2] [--no-explain]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import setup

from steerlab.explain.attribution import attribute, attribute_loop, choose_mode
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
    args, m = setup(__doc__, n=1, repeats=1, new_tokens=64, chunk=(int, 16), fchunk=(int, 48), threads=(int, 2),
                    no_explain=("flag", False))
    torch.set_num_threads(args.threads)
    ids = m.tok(TEXT, add_special_tokens=False)["input_ids"][: args.new]
    response = m.tok.decode(ids)
    rev, t_rev = timed(lambda: attribute(m, PROMPT, response, chunk=args.chunk, mode="reverse"))
    fwd, t_fwd = timed(lambda: attribute(m, PROMPT, response, chunk=args.fchunk, mode="forward"))
    slow, t_slow = timed(lambda: attribute_loop(m, PROMPT, response))
    n_in, n_out = len(slow.prompt_tokens), len(slow.response_tokens)
    print(f"attribution of {n_out} response tokens on {n_in} prompt tokens ({m.name}, {args.threads} thread(s)); "
          f"auto picks {choose_mode(n_in, n_out)}")
    for name, t, att in [(f"reverse, batched VJPs (chunks of {args.chunk} output tokens)", t_rev, rev),
                         (f"forward, batched JVPs (chunks of {args.fchunk} prompt tokens)", t_fwd, fwd),
                         ("per-token loop (one forward, one backward per token)", t_slow, slow)]:
        diff = float(np.abs(att.scores - slow.scores).max())
        print(f"  {name}: {t:7.2f} s, {t_slow / t:.2f}x the loop's speed, max |diff| vs loop {diff:.1e}")
    print(f"  (max |a| {np.abs(slow.scores).max():.3f})")
    if args.no_explain:
        return
    heads, t_heads = timed(lambda: explain_heads(m, n_words=5000))
    print(f"heads: all {m.n_layers} layers x {m.n_heads} heads, 5000 words: {t_heads:.1f} s")
    ffn20, t_ffn20 = timed(lambda: explain_ffn(m, n_components=20))
    print(f"ffn: all {m.n_layers} layers, 20 components x top-50 words: {t_ffn20:.1f} s")
    ffn_all, t_ffn_all = timed(lambda: explain_ffn(m, n_components=None))
    print(f"ffn: all {m.n_layers} layers, all {m.d_model} components x top-50 words: {t_ffn_all:.1f} s")


if __name__ == "__main__":
    main()
