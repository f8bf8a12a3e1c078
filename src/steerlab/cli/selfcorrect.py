"""The intrinsic self-correction study: ``selfcorrect``."""

from __future__ import annotations

import typer

from .app import EXPLAIN, MODEL, app, command, console, load_model
from .tables import print_rows, print_selfcorrect


@command(app, panel=EXPLAIN)
def selfcorrect(
    out: str = typer.Option("runs/selfcorrect", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = MODEL,
    prompts: str = typer.Option("rtp", help="Prompt pool: rtp, rtp:<category>, a .txt/.jsonl/.csv file or hf:<id>."),
    preset: str = typer.Option("small", help="small (48 prompts, 3 rounds, 40 tokens: minutes on 2 CPU cores), "
                               "paper (200 prompts, 5 rounds, 150 tokens), tiny (smoke test), crossed or "
                               "robustness (24 prompts, every prompt gets every instruction of --arms)."),
    n: int | None = typer.Option(None, help="Samples (split between detox and toxify groups); default from --preset."),
    rounds: int | None = typer.Option(None, min=2, help="Dialogue rounds (1 completion + corrections); default from --preset."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="New tokens per reply; default from --preset."),
    directions: str = typer.Option("both", help="both | detox (toxic prompts only) | toxify (non-toxic prompts only)."),
    selection: str = typer.Option("threshold", help="threshold: random prompts on each side of toxicity 0.5; "
                                  "rank: the most and least toxic prompts."),
    detox: str = typer.Option("strong_detox", help="Correction instruction for toxic prompts."),
    toxify: str = typer.Option("strong_toxify", help="Correction instruction for non-toxic prompts."),
    opening: str = typer.Option("opening", help="Round-1 instruction (its text holds {prompt})."),
    instructions: str | None = typer.Option(None, help="JSON file of extra or replacement instructions "
                                            '({"kind": "text"} or {"kind": {"text": ..., "direction": ...}}).'),
    list_instructions: bool = typer.Option(False, "--list-instructions", help="Print the instruction kinds and exit."),
    sampling: str = typer.Option("t0.7", help="Sampling preset: t0.7 (T=0.7, top_p=0.9), t1.0 or greedy."),
    seed: int = typer.Option(0, help="Seed of prompt selection and sampling."),
    batch_size: int = typer.Option(16, min=1, help="Dialogues per generate call."),
    scorer: str = typer.Option("default", help="Toxicity scorer (see `steerlab scorers`)."),
    steer_pairs: int | None = typer.Option(None, min=1, help="Contrast pairs for the per-layer steering vectors "
                                           "(default from --preset: 64, tiny 16)."),
    steer_positions: str = typer.Option("mean_skip_first", help="Steering-vector positions: last | mean | "
                                        "mean_skip_first | aligned."),
    arms: str | None = typer.Option(None, help="Crossed design: every prompt gets every instruction of this set: "
                                    "crossed (strong detox, strong toxify, neutral rewrite), robustness (strong and "
                                    "weak of both, neutral) or comma-separated kinds; default from --preset."),
    n_null: int | None = typer.Option(None, min=1, help="Label-shuffled steering vectors for the null (default 100)."),
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
    cfg = make_config(preset, prompts=prompts, n=n, rounds=rounds, max_new_tokens=max_new_tokens,
                      directions=directions, selection=selection, detox=detox, toxify=toxify, opening=opening,
                      sampling=sampling, seed=seed, batch_size=batch_size, scorer=scorer,
                      steer_pairs=steer_pairs, steer_positions=steer_positions, arms=arms, n_null=n_null)
    cfg.validate()
    m = load_model(model)
    res = run_selfcorrect(m, out, cfg, overwrite=overwrite)
    h = res.headline
    print_selfcorrect(m.name, h, cfg.rounds)
    console.print(f"generation {h.get('generation_seconds', '?')} s over all rounds, this call "
                  f"{h.get('seconds_this_call', '?')} s; report: {res.path / 'report.html'}")
