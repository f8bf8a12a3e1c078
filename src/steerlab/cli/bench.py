"""The main job: ``demo`` and ``bench`` (the detoxification benchmark)."""

from __future__ import annotations

import typer

from ..experiments.bench_config import PRESETS, BenchConfig, make_config
from .app import DEVICE, DEVICE_MAP, MAIN, MODEL, app, command, console, load_model
from .settings import settings_options
from .tables import print_bench, print_profile


@command(app, panel=MAIN)
def demo(model: str = MODEL,
         out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory of the benchmark.")) -> None:
    """The main job: the quick detoxification benchmark on the embedded model (`steerlab bench --preset quick`)."""
    bench(out=out, model=model, settings={"preset": "quick"}, device="cpu", device_map="")


@command(app, panel=MAIN)
@settings_options(BenchConfig, PRESETS)
def bench(
    settings: dict,
    out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = MODEL,
    device: str = DEVICE,
    device_map: str = DEVICE_MAP,
) -> None:
    """The detoxification benchmark: every registered method fitted on the training split, its
    settings chosen on validation, evaluated on held-out prompts with the same decoding, random
    numbers and scorer; one table (toxicity with paired CIs, fluency, side effects, cost) and report.html.
    Under `accelerate launch --num_processes N` the processes share every generation (docs/bench.md)."""
    from ..experiments.bench import run_bench
    from ..parallel import group

    cfg = make_config(**settings)
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
