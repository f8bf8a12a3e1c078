"""Where the time goes: named stages timed with exclusive wall time (a stage nested in another is
subtracted from its parent, so the shares of a table add up to the time measured), one process-wide
profiler. Low-level work marks itself (``scoring``, ``perplexity``, ``side effects``,
``similarity``); a driver such as the benchmark marks its phases (``fit: steering``) and reads the
table (:func:`table`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Profiler:
    """Exclusive seconds per stage name, accumulated over calls."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self._stack: list[list] = []

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
        self._stack.clear()

    def count(self, name: str, amount: float) -> None:
        """Add ``amount`` to the counter ``name`` (for example the tokens every generate call made)."""
        self.counts[name] = self.counts.get(name, 0.0) + amount

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, child = self._stack.pop()
            dt = self.clock() - t0
            self.totals[name] = self.totals.get(name, 0.0) + dt - child
            if self._stack:
                self._stack[-1][1] += dt

    def table(self, total: float | None = None) -> list[dict]:
        """Rows ``{stage, seconds, share}``, largest first; ``share`` of ``total`` (default: the sum)."""
        whole = total if total else sum(self.totals.values()) or 1.0
        rows = [{"stage": k, "seconds": round(v, 2), "share": round(v / whole, 4)} for k, v in self.totals.items()]
        return sorted(rows, key=lambda r: -r["seconds"])


PROFILE = Profiler()
stage = PROFILE.stage
"""``with stage("perplexity"): ...`` times a block into the process-wide profiler."""


def generation_summary(wall: float) -> dict:
    """What the process-wide counters say about generation since the last reset: the new tokens
    every ``generate`` call produced (rows x steps, what the forward passes paid for), the seconds
    spent inside those calls, the throughput, and their share of ``wall`` seconds: the floor of a
    run is its generated tokens at this machine's best throughput (``benchmarks/bench_batch.py``)."""
    tokens, seconds = PROFILE.counts.get("generated tokens", 0.0), PROFILE.counts.get("generate seconds", 0.0)
    return {"generated_tokens": int(tokens), "generate_seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else float("nan"),
            "share_of_wall": round(seconds / wall, 4) if wall else float("nan")}
