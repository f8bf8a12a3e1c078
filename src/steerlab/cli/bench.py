"""The main job: ``demo`` and ``bench`` (the detoxification benchmark)."""

from __future__ import annotations

import typer

from .app import DEVICE, DEVICE_MAP, MAIN, MODEL, app, command, console, load_model, names
from .tables import print_bench, print_profile


@command(app, panel=MAIN)
def demo(model: str = MODEL,
         out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory of the benchmark.")) -> None:
    """The main job: the quick detoxification benchmark on the embedded model (`steerlab bench --preset quick`)."""
    bench(out=out, model=model, preset="quick", methods="", prompts="rtp", scorer="default", n_test=None, k=None,
          n_val=None, max_new_tokens=None, seed=0, batch_size=None, device="cpu", device_map="", test_all_settings=False,
          timing_reps=None, timing_max_reps=None, confirm_matched=True)


@command(app, panel=MAIN)
def bench(
    out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = MODEL,
    preset: str = typer.Option("quick", help="quick (every method on the default model in minutes on 2 CPU cores), "
                               "standard, or full (the papers' 25 samples per prompt; for a GPU)."),
    methods: str = typer.Option("", help="Comma-separated intervention methods (default: every registered one; "
                                "see `steerlab interventions`)."),
    prompts: str = typer.Option("rtp", help="Prompt set (split 60/20/20 into train / validation / test)."),
    scorer: str = typer.Option("default", help="Toxicity scorer."),
    n_test: int | None = typer.Option(None, min=0, help="Held-out test prompts (0: all); default from --preset."),
    k: int | None = typer.Option(None, min=1, help="Samples per test prompt; default from --preset."),
    n_val: int | None = typer.Option(None, min=1, help="Validation prompts per setting; default from --preset."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="New tokens per continuation; default from --preset."),
    seed: int = typer.Option(0, help="Seed of the split and of the per-row random numbers."),
    test_all_settings: bool = typer.Option(False, help="After the choice on validation, also test every candidate "
                                           "setting (tables/candidates.csv; reported, not used to choose)."),
    batch_size: int | None = typer.Option(None, min=1, help="Rows (prompt x sample) per generate call; default "
                                          "from --preset."),
    timing_reps: int | None = typer.Option(None, min=1, help="Paired timing per arm: one test batch generated with "
                                           "and without the method at least this many times, alternating; the time "
                                           "column is the median ratio (the baseline's row: an A/A run, the noise); "
                                           "default from --preset (quick 2, others 3)."),
    timing_max_reps: int | None = typer.Option(None, min=1, help="Pairs are added up to this many until the ratio's "
                                               "bootstrap CI is within +-3%; default from --preset (quick 2, others "
                                               "12)."),
    confirm_matched: bool = typer.Option(True, help="Test each method's setting closest to perplexity x1.1 and "
                                         "x1.25 on validation (the fluency-matched comparison on test)."),
    device: str = DEVICE,
    device_map: str = DEVICE_MAP,
) -> None:
    """The detoxification benchmark: every registered method fitted on the training split, its
    settings chosen on validation, evaluated on held-out prompts with the same decoding, random
    numbers and scorer; one table (toxicity with paired CIs, fluency, side effects, cost) and report.html.
    Under `accelerate launch --num_processes N` the processes share every generation (docs/bench.md)."""
    from ..experiments.bench import make_config, run_bench
    from ..parallel import group

    cfg = make_config(preset, methods=names(methods) or None, prompts=prompts,
                      scorer=scorer, n_test=n_test, k=k, n_val=n_val, max_new_tokens=max_new_tokens, seed=seed,
                      batch_size=batch_size, test_all_settings=test_all_settings, timing_reps=timing_reps,
                      timing_max_reps=timing_max_reps, confirm_matched=confirm_matched)
    cfg.validate()
    m = load_model(model, device=device, device_map=device_map)
    metrics = run_bench(m, out, cfg, progress=group().main)
    if not group().main:  # a data-parallel launch: rank 0 reports
        return
    print_bench(m.name, metrics)
    print_profile(metrics.get("profile", []))
    gen = metrics.get("generation") or {}
    if gen.get("generated_tokens"):
        console.print(f"generation: {gen['generated_tokens']:,} new tokens (rows x steps) in {gen['generate_seconds']:.0f} s, "
                      f"{gen['tokens_per_second']:.0f} tokens/s, {100 * gen['share_of_wall']:.0f}% of this call "
                      "(the floor of a run: its tokens at this machine's best throughput, benchmarks/bench_batch.py)",
                      markup=False, highlight=False)
    for line in metrics.get("verdict", []):
        console.print(f"- {line}", markup=False, highlight=False)
    console.print(f"report: {out}/report.html (wall time of this call {metrics['wall_seconds_this_call']:.0f} s)")
