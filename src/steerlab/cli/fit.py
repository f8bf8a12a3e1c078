"""The fit commands of the methods fitted from toxicity data: ``fit steering`` (also ``steer fit``),
``fit selfcorrect``, ``fit eigenshift`` and ``fit aura``."""

from __future__ import annotations

import typer
from rich.markup import escape

from .app import (
    MODEL,
    OUT_FILE,
    SCORER_OPTION,
    check_out_file,
    command,
    console,
    fit_app,
    ints,
    load_model,
    steer_app,
)


def fit_steering(
    out: str = OUT_FILE,
    model: str = MODEL,
    desirable: str = typer.Option("", help="File of desirable texts (.txt/.jsonl/.csv)."),
    undesirable: str = typer.Option("", help="File of undesirable texts."),
    prompts: str = typer.Option("rtp", help="Without --desirable/--undesirable: rank the training split of this "
                                "prompt set by toxicity and pair the least toxic with the most toxic."),
    n_pairs: int = typer.Option(64, min=1, help="Contrast pairs taken from the ranked prompts."),
    layers: str = typer.Option("", help="Comma-separated layers (default: all); sites blocks.{l}.resid_post."),
    method: str = typer.Option("mean_diff", help="Direction fitter: mean_diff | pca | probe."),
    positions: str = typer.Option("mean_skip_first", help="last | mean | mean_skip_first (mean without each "
                                  "text's first token, whose attention-sink state dominates a mean) | aligned."),
    scale: str = typer.Option("unit", help="unit | raw."),
    scorer: str = typer.Option("default", help="Scorer that ranks prompts (when building the contrast set), or NAME:VALUE."),
    scorer_option: list[str] = SCORER_OPTION,
    seed: int = typer.Option(0, help="Seed of the train/validation/test split the contrast set comes from."),
) -> None:
    """Fit a steering vector (one direction per layer) from contrast texts and save it."""
    from ..data import ContrastSet, load_prompts
    from ..scoring import scorer_from_spec
    from ..steer import SteeringVector
    from ..steer.vector import FIT_METHODS, toxicity_contrast

    check_out_file(out)
    idx = ints(layers)
    if method not in FIT_METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(FIT_METHODS)}",
                                 param_hint="--method")
    if desirable or undesirable:
        data = ContrastSet([p.text for p in load_prompts(desirable)] if desirable else [],
                           [p.text for p in load_prompts(undesirable)] if undesirable else [])
    else:
        data = toxicity_contrast(prompts, scorer_from_spec(scorer, scorer_option), n_pairs, seed)
    m = load_model(model)
    sites = [f"blocks.{i}.resid_post" for i in (idx or range(m.n_layers))]
    sv = SteeringVector.fit(m, data, sites=sites, method=method, positions=positions, scale=scale)
    sv.save(out)
    console.print(f"saved {len(sv.directions)} directions ({method}, {positions}, {scale}) from "
                  f"{len(data.desirable)} desirable / {len(data.undesirable)} undesirable texts to {out}")


command(fit_app, "steering")(fit_steering)
command(steer_app, "fit")(fit_steering)


@command(fit_app, "selfcorrect")
def fit_selfcorrect(
    out: str = OUT_FILE,
    model: str = MODEL,
    instruction: str = typer.Option("strong_detox", help="Correction instruction (`steerlab selfcorrect "
                                    "--list-instructions`)."),
    opening: str = typer.Option("opening", help="Opening instruction of the dialogue."),
) -> None:
    """Self-correction prompting: one "please revise" round after each continuation (nothing is learned;
    the file records the instruction texts and the model)."""
    from ..interventions import fit

    check_out_file(out)
    iv = fit("selfcorrect", load_model(model), None, instruction=instruction, opening=opening)
    iv.save(out)
    console.print(f"saved {iv.describe()} to {out}")


def training_prompts(prompts: str, n_prompts: int, seed: int) -> list:
    """The first ``n_prompts`` of the training part of the seeded split (what detox fits learn from)."""
    from ..data import load_prompts, split

    train = split(load_prompts(prompts), seed=seed)["train"]
    return train[:n_prompts] if n_prompts else train


@command(fit_app, "eigenshift")
def fit_eigenshift(
    out: str = OUT_FILE,
    model: str = MODEL,
    prompts: str = typer.Option("rtp", help="Prompt set whose training split (seeded 60/20/20) is generated from."),
    n_prompts: int = typer.Option(200, min=0, help="Training prompts to generate from (0: all)."),
    samples: int = typer.Option(4, min=1, help="Continuations per prompt."),
    sampling: str = typer.Option("t1.0", help="Decoding of the collection: greedy | t0.7 | t1.0."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    percentile: float = typer.Option(0.999, help="k = ceil(d (1 - percentile)) directions are dampened."),
    k: int = typer.Option(0, min=0, help="Dampen exactly k directions (overrides --percentile; 0: use it)."),
    alpha: float = typer.Option(0.1, help="Dampened singular values become alpha x s_i (0: removed)."),
    rank: str = typer.Option("abs", help="abs: largest |delta| (sign-free) | signed: largest delta (the paper)."),
    scorer: str = typer.Option("default", help="Scorer labelling the continuations."),
    threshold: float = typer.Option(0.5, help="Toxic when the scorer gives >= threshold."),
    saliency: str = typer.Option("auto", help="auto | bilstm | lexicon: how toxic words are found."),
    min_states: int = typer.Option(8, min=1, help="Fewest toxic (and non-toxic) states accepted."),
    batch_size: int = typer.Option(16, min=1, help="Rows per generate call."),
    seed: int = typer.Option(0, help="Split and sampling seed."),
    figures: str = typer.Option("", help="Also write the delta figure and the dampened directions' tokens here."),
) -> None:
    """EigenShift: generate from training prompts, collect toxic / non-toxic final states, dampen the
    unembedding's singular directions that separate them, save the edit."""
    from ..generation import GenConfig
    from ..steer.eigenshift import EigenShift

    check_out_file(out)
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling=sampling, k=samples, seed=seed, batch_size=batch_size)
    m = load_model(model)
    iv = EigenShift.fit(m, training_prompts(prompts, n_prompts, seed), percentile=percentile, alpha=alpha,
                        k=k or None, rank=rank, min_states=min_states, cfg=cfg, scorer=scorer,
                        threshold=threshold, saliency=saliency)
    iv.save(out)
    st = iv.meta["stats"]
    console.print(f"{st['continuations']} continuations ({st['toxic_continuations']} toxic): {st['toxic_states']} "
                  f"toxic and {st['nontoxic_states']} non-toxic states ({st['saliency']} saliency)")
    console.print(escape(f"saved {iv.describe()}: directions {iv.indices.tolist()[:12]} to {out}"))
    if figures:
        from ...steer.eigenshift_report import report

        for p in report(m, iv, figures):
            console.print(f"wrote {p}")


@command(fit_app, "aura")
def fit_aura(
    out: str = OUT_FILE,
    model: str = MODEL,
    variant: str = typer.Option("aura", help="aura (factor 1 - 2 (AUROC - 0.5)) | damp (0.5) | det0 (0) for the top N."),
    top_n: int = typer.Option(0, min=0, help="Units dampened by damp / det0 (0: 1% of all MLP units)."),
    prompts: str = typer.Option("rtp", help="Prompt set whose training split (seeded 60/20/20) is generated from."),
    n_prompts: int = typer.Option(200, min=0, help="Training prompts to generate from (0: all)."),
    samples: int = typer.Option(2, min=1, help="Continuations per prompt."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    scorer: str = typer.Option("default", help="Scorer labelling prompt + continuation."),
    threshold: float = typer.Option(0.5, help="Toxic when the scorer gives >= threshold."),
    min_texts: int = typer.Option(8, min=1, help="Fewest toxic (and non-toxic) texts accepted."),
    seed: int = typer.Option(0, help="Split and sampling seed."),
) -> None:
    """AurA: generate from training prompts, score prompt + continuation, rank every MLP unit by its
    AUROC as a toxicity detector and save the per-unit factors."""
    from ..generation import GenConfig
    from ..steer.aura import VARIANTS, AurA, texts_from_generations

    check_out_file(out)
    if variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}",
                                 param_hint="--variant")
    m = load_model(model)
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling="t1.0", k=samples, seed=seed)
    data = texts_from_generations(m, training_prompts(prompts, n_prompts, seed), cfg, scorer, threshold)
    iv = AurA.fit(m, data, variant=variant, top_n=top_n or None, min_texts=min_texts)
    iv.save(out)
    console.print(f"{len(data[1])} toxic and {len(data[0])} non-toxic texts; {iv.meta['units_dampened']} units "
                  f"dampened over {len(iv.sites)} layers")
    console.print(escape(f"saved {iv.describe()} to {out}"))

