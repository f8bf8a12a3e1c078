"""The settings of the steering study (:func:`steerlab.experiments.steering.run_steering_study`),
declared once: ``steerlab steer study`` generates its options from these fields. This module imports
no torch, so the command line starts fast."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option

FIT_METHODS = ("mean_diff", "pca", "probe")                # steer.vector.FIT_METHODS (tested equal)
POSITIONS = ("last", "mean", "mean_skip_first", "aligned")  # steer.vector.POSITIONS (tested equal)
SCHEDULES = ("all", "prompt", "generated", "last")          # hooks.SCHEDULE_FNS (tested equal)


@dataclass
class SteeringStudy:
    """Settings of :func:`run_steering_study` (everything in config.json). Each field is declared once
    with :func:`steerlab.options.option`; ``steerlab steer study`` generates its options from them."""

    prompts: str = option("rtp", "Prompt set, split 60/20/20 into train / validation / test by prompt.")
    layers: list[int] = option([3, 6, 9, 12, 15, 18, 21, 24], "Layers to sweep.", item=int)
    alphas: list[float] = option([-0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5], "Strengths, in units of the layer's "
                                 "typical residual norm.", item=float, unit="x typical residual norm")
    n_pairs: int = option(64, "Contrast pairs from the training split.", low=1)
    n_sweep: int = option(24, "Validation prompts per sweep cell.", low=1)
    n_test: int = option(100, "Held-out test prompts.", low=1)
    method: str = option("mean_diff", "How the direction is fitted.", choices=FIT_METHODS)
    positions: str = option("mean_skip_first", "Fitting positions.", choices=POSITIONS)
    where: str = option("all", "Schedule: which positions are edited.", choices=SCHEDULES)
    max_new_tokens: int = option(20, "New tokens per continuation.", low=1, unit="tokens")
    sampling: str = option("t1.0", "Sampling preset.", cli=False)
    k_sweep: int = option(1, "Samples per validation prompt in the sweep (more: a less noisy choice).", low=1)
    k_test: int = option(3, "Samples per test prompt.", low=1)
    batch_size: int = option(32, "Rows (prompt x sample) per generate call.", low=1, cli=False)
    seed: int = option(0, "Seed of the split and of sampling.")
    scorer: str = option("default", "Toxicity scorer.")
    max_ppl_ratio: float = option(2.0, "The chosen cell's perplexity may be at most this times the unsteered one "
                                  "(on validation).", low=0)
    min_distinct_ratio: float = option(0.8, "The chosen cell's distinct-2 must be at least this times the unsteered "
                                       "one (on validation; rejects repetitive text).", low=0)
    refine_top: int = option(3, "Stage 2 of the sweep: re-run this many best admissible cells ...", low=1)
    k_refine: int = option(3, "... with this many samples per validation prompt.", low=1)
    variants: list[str] = option(["add"], "Comma-separated steering variants, each MODE[:WHERE][:multi]: mode add | "
                                 "gated | ablate | clamp, schedule (default --where), multi = every layer at once at "
                                 "alpha / n_layers each. E.g. add,add:generated,gated,ablate,clamp,add:multi.")
    fractions: list[float] = option([0.5, 1.0, 2.0], "Strengths of ablate (share of the component removed) and clamp "
                                    "(level between the toxic and non-toxic mean projections).", item=float)
    max_kl: float | None = option(None, "Rule: neutral-text KL from the unedited model at most this (nats, on neutral "
                                  "validation texts); e.g. 0.05 with --max-ppl-ratio 1.1 for issue 15's target.",
                                  type=float, low=0, unit="nats")
    n_neutral: int = option(52, "Neutral texts per part (validation: the rule; test: the report).", low=1)
    pareto: bool = option(True, "Also evaluate every variant x positive strength on the test prompts for the "
                          "trade-off figure (figures/pareto.png; never used for choosing).")
