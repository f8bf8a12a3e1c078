"""The benchmark's settings (:func:`steerlab.experiments.bench.run_bench`), declared once: ``steerlab
bench`` generates its options from these fields. This module imports no torch, so the command line
starts fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SteerlabError
from ..options import option
from ..registry import choose
from .presets import from_preset

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"n_val": 48, "k_val": 1, "n_test": 0, "k": 3, "max_new_tokens": 16, "n_neutral": 64, "timing_reps": 2,
              "timing_max_reps": 2},
    "standard": {"n_val": 48, "k_val": 2, "n_test": 124, "k": 5, "max_new_tokens": 20, "n_neutral": 0},
    "full": {"n_val": 125, "k_val": 3, "n_test": 0, "k": 25, "max_new_tokens": 20, "n_neutral": 0},
}
"""``quick``: every method on the default model on 2 CPU cores (the README demo): every one of the test
prompts (124 after de-duplication) x 3 samples, about what detecting a change of 0.03 in mean toxicity at 80% power
takes on the default model (x 2 measured 0.035; docs/bench.md), settings chosen on 48 validation prompts, 2 timing
pairs per arm
(its time column is about as noisy as its unsteered A/A row shows);
``standard``: more prompts and samples; ``full``: the papers' 25 samples per test prompt, every
test prompt (``n_test=0``: all), for a GPU."""


class BenchError(SteerlabError):
    """A benchmark that cannot run as configured."""


@dataclass(frozen=True)
class BenchConfig:
    """Settings of :func:`run_bench` (all in ``config.json``)."""

    preset: str = option("quick", "quick (every method on the default model, about 40 min on 2 CPU cores), standard, "
                         "or full (the papers' 25 samples per prompt; for a GPU).", choices=tuple(PRESETS))
    methods: tuple[str, ...] = option((), "Comma-separated intervention methods (default: every registered one; see "
                                      "`steerlab interventions`).")
    prompts: str = option("rtp", "Prompt set (split 60/20/20 into train / validation / test).")
    scorer: str = option("default", "Toxicity scorer.")
    seed: int = option(0, "Seed of the split and of the per-row random numbers.")
    n_val: int = option(16, "Validation prompts per setting.", low=1)
    k_val: int = option(1, "Samples per validation prompt.", low=1, cli=False)
    n_test: int = option(40, "Held-out test prompts (0: all).", low=0)
    k: int = option(2, "Samples per test prompt.", low=1)
    max_new_tokens: int = option(16, "New tokens per continuation.", low=1, unit="tokens")
    sampling: str = option("t1.0", "Sampling preset.", cli=False)
    batch_size: int = option(64, "Rows (prompt x sample) per generate call (64: the fastest of 8-64 on 2 "
                                          "CPU cores, benchmarks/bench_batch.py; also the timing batch).", low=1)
    n_pairs: int = option(64, "Contrast pairs the methods fit on.", low=1, cli=False)
    max_ppl_ratio: float = option(1.5, "A chosen setting's perplexity may be at most this times the unsteered one.",
                                  low=0, cli=False)
    min_distinct_ratio: float = option(0.8, "A chosen setting's distinct-2 must be at least this times the "
                                       "unsteered one.", low=0, cli=False)
    n_neutral: int = option(64, "Neutral sentences for side effects (0: all 260 bundled ones).", low=0, cli=False)
    n_neutral_val: int = option(16, "Neutral sentences for each validation candidate's KL (the KL dose-response "
                                "figure; one forward pass over them per candidate).", low=1, cli=False)
    test_all_settings: bool = option(False, "After the choice on validation, also test every candidate setting "
                                     "(tables/candidates.csv; reported, not used to choose).")
    timing_reps: int = option(3, "Paired timing per arm: one test batch generated with and without the method at "
                              "least this many times, alternating; the time column is the median ratio (the baseline's "
                              "row: an A/A run, the noise).", low=1)
    timing_max_reps: int = option(12, "Pairs are added up to this many until the ratio's bootstrap CI is within "
                                  "+-timing_tolerance.", low=1)
    timing_tolerance: float = option(0.03, "Half-width of the timing ratio's CI at which no pair is added, as a "
                                     "share of the ratio.", low=0, cli=False)
    matched_ppl: tuple[float, ...] = option((1.1, 1.25), "Perplexity ratios at which methods are compared.",
                                            item=float, cli=False)
    confirm_matched: bool = option(True, "Test each method's setting closest to perplexity x1.1 and x1.25 on "
                                   "validation (the fluency-matched comparison on test).")

    def validate(self) -> None:
        from ..generation import SAMPLING
        from ..interventions import get

        choose("preset", self.preset, PRESETS, BenchError)
        choose("sampling preset", self.sampling, SAMPLING, BenchError)
        if min(self.n_val, self.k_val, self.k, self.max_new_tokens, self.batch_size, self.n_pairs,
               self.timing_reps) < 1 or self.n_test < 0:
            raise BenchError("n_val, k_val, k, max_new_tokens, batch_size, n_pairs and timing_reps must be >= 1, "
                             "n_test >= 0")
        for m in self.methods:
            get(m)  # an unknown method is an error naming the registered ones


def make_config(preset: str = "quick", **overrides: Any) -> BenchConfig:
    """A config from a preset with fields overridden (``None`` values are ignored)."""
    if overrides.get("methods") is not None:
        overrides = {**overrides, "methods": tuple(overrides["methods"])}
    return from_preset(BenchConfig, PRESETS, preset, overrides, BenchError, preset=preset)
