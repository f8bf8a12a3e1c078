"""SelfIE: a (layer x token) grid of interpretations decoded in batches against one at a time, in
the same run (both read the states with one capture and compute the relevancy).

    python benchmarks/bench_selfie.py [--layers 30] [--tokens 10] [--new 10] [--batch-size 100] [--repeats 1]
                                      [--threads 1]

``--layers 30 --tokens 10`` is the full grid of the default model (hidden-state layers 1..30, the
last 10 tokens of the prompt): 300 interpretations. 10 new tokens (not the default 30) keep the
one-at-a-time arm under ten minutes on 2 CPU cores. Each arm is warmed up on two states, then
the arms run alternately ``--repeats`` times. One thread by default: on a machine shared with
other jobs, two threads per process are much slower than one.
"""

from __future__ import annotations

import statistics

import torch
from common import setup, timeit

from steerlab.explain.selfie import interpret, interpretation_prompt

PROMPT = "The old lighthouse keeper climbed the stairs every night to light the lamp for the ships."


def main() -> None:
    args, m = setup(__doc__, n=0, repeats=1, new_tokens=10, layers=(int, 30), tokens=(int, 10), threads=(int, 1))
    torch.set_num_threads(args.threads)
    args.batch_size = 100 if args.batch_size == 16 else args.batch_size  # the shared default is 16
    ip = interpretation_prompt(m)
    pairs = [(L, -t) for L in range(args.layers) for t in range(1, args.tokens + 1)]  # the states after blocks 0..
    results = {}

    def run(bs: int, some: list | None = None):
        def go():
            results[bs] = interpret(m, PROMPT, some or pairs, ip, max_new_tokens=args.new, batch_size=bs)
        return go

    arms = {f"batched ({args.batch_size} per generate)": args.batch_size, "one at a time": 1}
    for bs in arms.values():
        run(bs, pairs[:2])()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for name, bs in arms.items():
            times[name] += timeit(run(bs), 1)
    res = {k: statistics.median(v) for k, v in times.items()}
    same = sum(a.text == b.text for a, b in zip(results[args.batch_size].rows, results[1].rows))
    batched, single = res.values()
    print(f"model {m.name}: {len(pairs)} interpretations ({args.layers} layers x {args.tokens} tokens), "
          f"{args.new} new tokens, greedy, relevancy included, interpretation prompt {len(ip)} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for k, v in res.items():
        print(f"  {k:32s} {v:8.2f} s   {len(pairs) / v:6.1f} interpretations/s")
    print(f"  speed-up of batching: {single / batched:.1f}x; identical texts: {same}/{len(pairs)}")


if __name__ == "__main__":
    main()
