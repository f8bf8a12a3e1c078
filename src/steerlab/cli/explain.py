"""Commands that explain a model: ``lens``, ``attribute``, ``heads``, ``ffn``, ``instruction-shift``."""

from __future__ import annotations

import typer
from rich.markup import escape

from .app import EXPLAIN, MODEL, MODEL_HELP, app, check_out_file, command, console, ints, load_model
from .tables import print_attribution, print_ffn, print_head_pairs, print_lens


@command(app, panel=EXPLAIN)
def lens(
    prompt: str = typer.Argument(..., help="Text whose next-token prediction is read at each layer."),
    model: str = MODEL,
    k: int = typer.Option(5, "--top", "-k", min=1, help="Tokens shown per layer."),
    layers: str = typer.Option("", help="Comma-separated layer indices (negative count from the end); default all."),
    chat: bool = typer.Option(False, help="Render the prompt as a user turn with the chat template."),
) -> None:
    """Logit lens: the top next tokens (with probabilities) the model would predict after each layer."""
    from ..explain.lens import layer_lens

    m = load_model(model)
    idx = ints(layers, "--layers") or None
    res = layer_lens(m, prompt, k=k, layers=idx, chat=chat)
    print_lens(res, f"logit lens of {m.name} on {prompt!r} (last token; rows: after block l)")


LABELLER_URL_HELP = ("OpenAI-compatible endpoint (base URL, e.g. http://localhost:8000/v1) that labels each "
                     "component's word list; key from $STEERLAB_LABELLER_KEY if set.")


def make_labeller(url: str, name: str, local: str):
    """The FFN labeller the options ask for (None without one)."""
    import os

    from ..explain.ffn import LocalLabeller, OpenAILabeller

    if url and local:
        raise typer.BadParameter("give either --labeller-url or --labeller-local, not both")
    if url:
        return OpenAILabeller(url, name or "default", os.environ.get("STEERLAB_LABELLER_KEY"))
    return LocalLabeller(load_model(local)) if local else None


@command(app, panel=EXPLAIN)
def attribute(
    prompt: str = typer.Argument(..., help="The prompt (a user turn when the model has a chat template)."),
    response: str = typer.Option(None, "--response", "-r", help="Response to explain; default: the greedy reply."),
    model: str = MODEL,
    span: str = typer.Option("", "--span", help="Instruction span (a substring of the prompt) to score."),
    html_out: str = typer.Option("", "--html", help="Write the shaded prompt and the heat map to this HTML file."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    b: int = typer.Option(7, "--b", min=0, max=10, help="Quantised scores <= b are zeroed."),
    chunk: int = typer.Option(16, "--chunk", min=1, help="Output tokens per batched backward (reverse mode) or "
                              "prompt tokens per batched forward-mode product (forward mode)."),
    mode: str = typer.Option("auto", "--mode", help="reverse (one VJP per response token) | forward (one JVP per "
                             "prompt token) | auto (forward when the prompt is under half the response's length)."),
    prompt_tokens: str = typer.Option("user", "--prompt-tokens", help="Prompt tokens that get a density: user (the "
                                      "prompt's own tokens; no BOS/EOS, chat markers or template text, as the paper) "
                                      "| text (all but special tokens) | all."),
    separator: str = typer.Option(" ", "--separator", help="Without a chat template, the response is tokenized after "
                                  "prompt + this separator (as the paper's code); '' joins them directly."),
) -> None:
    """Gradient x input attribution of the response on the prompt: importance density per prompt token
    (divided by the prompt's largest, as the paper's code does)."""
    from ..explain.attribution import attribute as run_attribution

    if html_out:
        check_out_file(html_out, "--html")
    m = load_model(model)
    att = run_attribution(m, prompt, response, max_new_tokens=max_new_tokens, chunk=chunk, mode=mode,
                          prompt_tokens=prompt_tokens, separator=separator)
    print_attribution(att, att.density(b))
    if att.dropped:
        console.print(escape(f"left out of the attribution (--prompt-tokens {prompt_tokens}): {len(att.dropped)} "
                             f"token(s) such as {', '.join(repr(t) for t in att.dropped[:5])}"))
    if span:
        console.print(f"instruction score S({span!r}) = {att.instruction_score(span, b):.4f}")
    if html_out:
        write_attribution_page(att, html_out, span or None, b)
        console.print(f"wrote {html_out}")


def write_attribution_page(att, path: str, span: str | None, b: int) -> None:
    from pathlib import Path

    from ..explain.attribution_study import heatmap, prompt_html
    from ..report.html import HtmlReport

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)  # the figure is written next to the page
    page = HtmlReport("Input-output attribution", f"response: {att.response}")
    page.heading("Prompt tokens shaded by importance density").raw(prompt_html(att, b, span))
    png = heatmap(att, out.with_suffix(".png"))
    page.figure(png, "Normalised attribution: response token (rows) x prompt token (columns)")
    page.write(out)


@command(app, panel=EXPLAIN)
def heads(
    model: str = MODEL,
    layers: str = typer.Option("", help="Comma-separated layers (default all)."),
    words: int = typer.Option(5000, "--words", min=2, help="Vocabulary: the N most frequent English words."),
    similarity: str = typer.Option("embeddings", help="'embeddings' (the model's input embeddings) or 'minilm'."),
    top: int = typer.Option(8, "--top", min=1, help="Pairs shown per head."),
    out: str = typer.Option("", "--out", help="Also write all pairs to this CSV file."),
) -> None:
    """Attention-head word pairs (key=query) from the query-key bilinear form on word embeddings."""
    from ..experiments.instruction_shift import head_rows
    from ..explain.heads import explain_heads
    from ..runs import write_csv

    m = load_model(model)
    res = explain_heads(m, ints(layers) or None, n_words=words, similarity=similarity)
    print_head_pairs(res, f"head word pairs of {m.name} (similarity: {similarity})", top)
    if out:
        write_csv(out, head_rows(res, m.name, top=10**6))


@command(app, panel=EXPLAIN)
def ffn(
    model: str = MODEL,
    layers: str = typer.Option("", help="Comma-separated layers (default all)."),
    pcs: int = typer.Option(5, "--pcs", min=1, help="Principal components per layer (the paper: 300)."),
    top: int = typer.Option(50, "--top", min=1, help="Words per component."),
    seeds: int = typer.Option(1, "--label-seeds", min=1, help="Labelling runs per component (the paper: 5): "
                              "sampled runs, majority label or 'cannot tell', with the agreement."),
    labeller_url: str = typer.Option("", "--labeller-url", help=LABELLER_URL_HELP),
    labeller_model: str = typer.Option("", "--labeller-model", help="Model name sent to the endpoint."),
    labeller_local: str = typer.Option("", "--labeller-local", help="A steerlab model that labels the lists."),
) -> None:
    """FFN concepts: principal components of each layer's MLP value vectors, read as vocabulary words."""
    from ..explain.ffn import explain_ffn, label_layers

    m = load_model(model)
    res = explain_ffn(m, ints(layers) or None, k=top, n_components=pcs)
    lab = make_labeller(labeller_url, labeller_model, labeller_local)
    if lab is not None:
        label_layers(res, lab, pcs, seeds=seeds)
    print_ffn(res, f"FFN components of {m.name}")


@command(app, "instruction-shift", panel=EXPLAIN)
def instruction_shift(
    base: str = typer.Option(..., "--base", help="Base (pre-trained) model. " + MODEL_HELP),
    tuned: str = typer.Option(..., "--tuned", help="Instruction-tuned model. " + MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (tables/, figures/, report.html)."),
    data: str = typer.Option("example", "--data", help="Annotated JSONL file, or 'example' (bundled, 20 items)."),
    layers: str = typer.Option("", help="Comma-separated layers (default all; same indices on both models)."),
    words: int = typer.Option(3000, "--words", min=2, help="English words for the head analysis."),
    pcs: int = typer.Option(10, "--pcs", min=1, help="FFN components per layer (the paper: 300)."),
    groups: int = typer.Option(4, "--groups", min=1, help="Layer groups by relative depth (the paper: 8)."),
    seeds: int = typer.Option(1, "--label-seeds", min=1, help="Labelling runs per FFN component (the paper: 5); "
                              "more than 1 samples each run and keeps the majority label, else 'cannot tell'."),
    paper: bool = typer.Option(False, "--paper-sizes", help="The paper's sizes: 300 components per layer, 8 layer "
                               "groups, 5 labelling seeds (overrides --pcs, --groups, --label-seeds)."),
    generate: bool = typer.Option(False, help="Score each model's own greedy replies instead of the given ones."),
    raw: bool = typer.Option(False, help="Feed the raw prompt to both models (no chat template), for a like-for-"
                             "like attribution; default: the chat template where a model has one."),
    labeller_url: str = typer.Option("", "--labeller-url", help=LABELLER_URL_HELP),
    labeller_model: str = typer.Option("", "--labeller-model", help="Model name sent to the endpoint."),
    labeller_local: str = typer.Option("", "--labeller-local", help="A steerlab model that labels the lists."),
) -> None:
    """Compare a base and an instruction-tuned model: attribution, head word pairs, FFN concepts."""
    from ..experiments.instruction_shift import ShiftConfig, run_instruction_shift

    kw = dict(data=data, layers=ints(layers) or None, n_words=words, generate=generate, raw=raw,
              labeller=labeller_url or labeller_local)
    cfg = ShiftConfig.paper(**kw) if paper else ShiftConfig(n_pcs=pcs, n_groups=groups, label_seeds=seeds, **kw)
    lab = make_labeller(labeller_url, labeller_model, labeller_local)
    summary = run_instruction_shift(load_model(base), load_model(tuned), out, cfg, lab)
    for name, test in summary["tests"].items():
        if "error" in test:
            console.print(f"{name}: {test['error']}")
        else:
            side, p = ("one", test["p_one_sided"]) if "p_one_sided" in test else ("two", test["p_two_sided"])
            console.print(f"{name}: mean {test['mean_a']:.3f} ({test['group_a']}) vs {test['mean_b']:.3f} "
                          f"({test['group_b']}), t = {test['t']:.2f}, {side}-sided p = {p:.3g}")
    console.print(f"report: {out}/report.html")
