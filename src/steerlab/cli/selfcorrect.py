"""The intrinsic self-correction study: ``selfcorrect``."""

from __future__ import annotations

import typer

from ..experiments.selfcorrect_config import PRESETS, SelfCorrectConfig
from .app import EXPLAIN, MODEL, app, command, console, load_model
from .settings import settings_options
from .tables import print_rows, print_selfcorrect


@command(app, panel=EXPLAIN)
@settings_options(SelfCorrectConfig, PRESETS)
def selfcorrect(
    settings: dict,
    out: str = typer.Option("runs/selfcorrect", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = MODEL,
    preset: str = typer.Option("small", help="small (48 prompts, 3 rounds, 40 tokens: minutes on 2 CPU cores), "
                               "paper (200 prompts, 5 rounds, 150 tokens), tiny (smoke test), crossed or "
                               "robustness (24 prompts, every prompt gets every instruction of --arms)."),
    instructions: str | None = typer.Option(None, help="JSON file of extra or replacement instructions "
                                            '({"kind": "text"} or {"kind": {"text": ..., "direction": ...}}).'),
    list_instructions: bool = typer.Option(False, "--list-instructions", help="Print the instruction kinds and exit."),
    overwrite: bool = typer.Option(False, help="Start the run directory afresh instead of resuming."),
) -> None:
    """Intrinsic self-correction study (arXiv 2505.11924): multi-round detox/toxify dialogues,
    toxicity and hidden states per round, logit-lens relation, PCA of the moves, and the cosine
    of each round's shift with per-layer toxicity steering vectors. Writes tables, figures and
    report.html into --out."""
    from ..experiments.selfcorrect import make_config, run_selfcorrect
    from ..protocols.selfcorrect import get_instruction, instruction_kinds, load_instructions

    if instructions:
        load_instructions(instructions)
    if list_instructions:
        rows = [(kind, get_instruction(kind).direction, get_instruction(kind).text) for kind in instruction_kinds()]
        print_rows("self-correction instructions", ["kind", "direction", "text"], rows)
        return
    cfg = make_config(preset, **settings)
    cfg.validate()
    m = load_model(model)
    res = run_selfcorrect(m, out, cfg, overwrite=overwrite)
    h = res.headline
    print_selfcorrect(m.name, h, cfg.rounds)
    console.print(f"generation {h.get('generation_seconds', '?')} s over all rounds, this call "
                  f"{h.get('seconds_this_call', '?')} s; report: {res.path / 'report.html'}")
