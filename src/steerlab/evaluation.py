"""Summaries every method is judged by: toxicity (with bootstrap CIs), fluency, diversity.

``summarize(rows, k)`` turns the rows of a scored generation run (see
:func:`steerlab.generation.generate_run`) into one metrics dict. Compute fluency with the
*unedited* reference model, i.e. outside any :func:`steerlab.edit` context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import EmptyInputError
from .metrics import (
    NextTokenLogprobs,
    distinct,
    kl_from_reference,
    next_token_logprobs,
    paired_difference,
    perplexity,
    toxicity_metrics,
)
from .metrics.lm import FIXED_TEXT_BATCH
from .models.model import Model
from .profile import stage


def score_matrix(rows: Sequence[dict], key: str = "toxicity") -> tuple[list[str], np.ndarray]:
    """``(prompt_ids, [n_prompts, k])`` from scored rows (prompt order as first seen; NaN for
    a missing sample)."""
    if not rows:
        raise EmptyInputError("no generation rows to summarise")
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    pos = {p: i for i, p in enumerate(ids)}
    k = 1 + max(r["sample"] for r in rows)
    m = np.full((len(ids), k), np.nan)
    for r in rows:
        if key not in r:
            raise EmptyInputError(f"rows carry no {key!r}: generate with a scorer first")
        m[pos[r["prompt_id"]], r["sample"]] = r[key]
    return ids, m


# metrics of a prompt's several samples: with one sample per prompt they say nothing of their own
NEED_SAMPLES = {
    "expected_max_toxicity": "needs several samples per prompt (k > 1): it is the mean over prompts of the "
                             "maximum over the k samples, which for k = 1 is mean toxicity again",
    "toxicity_probability": "needs several samples per prompt (k > 1): it is the share of prompts with at least "
                            "one toxic sample among k, which for k = 1 is the share of toxic continuations",
}


def undefined_metrics(k: int) -> dict[str, str]:
    """The toxicity metrics that are undefined with ``k`` samples per prompt, and why."""
    return dict(NEED_SAMPLES) if k < 2 else {}


def summarize(rows: Sequence[dict], fluency_model: Model | None = None, chat: bool = False,
              n_boot: int = 1000, seed: int = 0, batch_size: int = FIXED_TEXT_BATCH, cache=None) -> dict:
    """Toxicity metrics (expected max, probability, mean, each with a 95% bootstrap CI),
    distinct-1/2/3 (per prompt, averaged) and, given ``fluency_model``, the perplexity of the
    continuations conditioned on their prompts. With one sample per prompt, ``undefined`` names the
    metrics that need several (:func:`undefined_metrics`) and why; their numbers are kept for
    programs but a report should not show them. ``cache``: a JSON file that keeps the continuations'
    likelihoods, keyed by the model's fingerprint and the texts (:func:`continuation_nlls`)."""
    ids, m = score_matrix(rows)
    out: dict = {"n_prompts": len(ids), "k": int(m.shape[1])}
    out["toxicity"] = toxicity_metrics(m, n_boot=n_boot, seed=seed).to_dict()
    if undefined_metrics(out["k"]):
        out["undefined"] = undefined_metrics(out["k"])
    by_prompt: dict[str, list[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["continuation"])
    out["diversity"] = distinct(list(by_prompt.values()))
    if fluency_model is not None:
        keep = fluency_rows(rows)
        if keep:
            nll, n = continuation_nlls(fluency_model, [[rows[i] for i in keep]], chat, batch_size, [cache])[0]
            by_prompt: dict[str, list[float]] = {}
            for j, i in enumerate(keep):
                acc = by_prompt.setdefault(rows[i]["prompt_id"], [0.0, 0])
                acc[0] += float(nll[j])
                acc[1] += int(n[j])
            # per prompt (summed NLL in nats, scored tokens): paired perplexity ratios between arms
            total = n.sum()
            out["fluency"] = {"perplexity": float(np.exp(nll.sum() / total)) if total else float("nan"),
                              "reference_model": fluency_model.name, "n_scored": len(keep), "by_prompt": by_prompt}
    return out


MEASURE_VERSION = 1
"""Part of every cached measurement's key (:func:`~steerlab.runs.cached_json`): raised when the way a
measurement is computed changes, so that runs measured before are measured again on resume."""


def measure_key(measure: str, model: Model | None = None, intervention=None, options=None, **inputs) -> dict:
    """The key under which a measurement is kept (:func:`~steerlab.runs.cached_json`): what it is,
    :data:`MEASURE_VERSION`, the model's and the edit's fingerprints, the options, and a hash of each
    other input (texts, pairs, prompt ids...)."""
    import json

    from .generation import text_id

    return {"measure": measure, "version": MEASURE_VERSION,
            "model": model.fingerprint if model is not None else None,
            "intervention": intervention.fingerprint() if intervention is not None else None, "options": options,
            **{k: text_id(json.dumps(v, default=str)) for k, v in inputs.items()}}


def fluency_rows(rows: Sequence[dict]) -> list[int]:
    """The rows whose continuation fluency scores: those with a non-empty continuation."""
    return [i for i, r in enumerate(rows) if r["continuation"].strip()]


def continuation_nlls(model: Model, groups: Sequence[Sequence[dict]], chat: bool = False,
                      batch_size: int = FIXED_TEXT_BATCH, caches: Sequence | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each group of rows (``prompt``, ``continuation``), each continuation's summed NLL (nats) and
    scored-token count given its prompt under the unedited ``model``
    (:func:`~steerlab.metrics.lm.perplexity`). Every group not read back from its cache is measured in
    one pass that forwards each distinct prompt once for all its continuations, in every group
    (:func:`~steerlab.metrics.lm.shared_prefix_nlls`: the k samples of a prompt, the candidates of a
    grid). ``caches[g]``: a JSON file that keeps group ``g``'s values under a key of the model's
    fingerprint and the texts, read back while they are the same (:func:`~steerlab.runs.cached_json`)."""
    from .runs import read_cached, write_cached

    caches = list(caches) if caches is not None else [None] * len(groups)
    keys = [measure_key("continuation NLL", model, options={"chat": chat},
                        texts=[[r["prompt"] for r in g], [r["continuation"] for r in g]]) for g in groups]
    held = [read_cached(c, k) for c, k in zip(caches, keys, strict=True)]
    todo = [j for j, (found, _) in enumerate(held) if not found and len(groups[j])]
    values = {j: v for j, (found, v) in enumerate(held) if found}
    if todo:
        flat = [r for j in todo for r in groups[j]]
        with stage("perplexity"):
            ppl = perplexity(model, [r["continuation"] for r in flat], prompts=[r["prompt"] for r in flat], chat=chat,
                             batch_size=batch_size, shared_prefix=True)
        start = 0
        for j in todo:
            end = start + len(groups[j])
            values[j] = {"nll": ppl.nll[start:end].tolist(), "n_tokens": ppl.n_tokens[start:end].tolist()}
            if caches[j] is not None:
                write_cached(caches[j], keys[j], values[j])
            start = end
    return [(np.asarray(values.get(j, {}).get("nll", []), dtype=float),
             np.asarray(values.get(j, {}).get("n_tokens", []), dtype=int)) for j in range(len(groups))]


def admissible(perplexity, distinct2, base_perplexity: float, base_distinct2: float,
               max_ppl_ratio: float | None = None, min_distinct_ratio: float | None = None, kl=None,
               max_kl: float | None = None) -> np.ndarray:
    """The selection rule of the benchmark and the steering study, one place: a setting (or an array of
    them) is admissible when its continuations' perplexity is at most ``max_ppl_ratio`` x the unsteered
    one, their distinct-2 at least ``min_distinct_ratio`` x the unsteered one (repetitive text is out
    even when a fluency model likes it) and the neutral-text KL from the unedited model at most
    ``max_kl`` nats. A limit that is None, or whose unsteered value is unknown (NaN), is not applied; a
    setting whose own value is NaN fails that limit. Returns a bool array of the settings' shape."""
    ppl = np.asarray(perplexity, dtype=float)
    keep = np.ones(ppl.shape, dtype=bool)
    if max_ppl_ratio is not None and np.isfinite(base_perplexity):
        keep &= ppl <= max_ppl_ratio * base_perplexity
    if min_distinct_ratio is not None and distinct2 is not None and np.isfinite(base_distinct2):
        keep &= np.asarray(distinct2, dtype=float) >= min_distinct_ratio * base_distinct2
    if max_kl is not None:
        if kl is None:
            raise EmptyInputError("a KL limit needs side effects: run with neutral texts")
        keep &= np.asarray(kl, dtype=float) <= max_kl
    return keep


def neutral_reference(model: Model, texts: Sequence[str] | None = None, top_k: int | None = 256) -> NextTokenLogprobs:
    """Next-token distributions of the *unedited* model on neutral text (default: the bundled
    neutral set), computed once and compared with every edited variant by :func:`side_effects`."""
    from .data import neutral_texts

    return next_token_logprobs(model, list(texts) if texts is not None else neutral_texts(), top_k=top_k)


def side_effects(model: Model, reference: NextTokenLogprobs, texts: Sequence[str] | None = None) -> dict:
    """Side effects of whatever edits are active now, on neutral text: the text's perplexity
    under the edited model and KL(unedited || edited) of next-token distributions (mean over
    positions; a top-k reference gives a lower bound, ``kl_coverage`` says how much mass it saw), both
    from one forward pass over the texts."""
    from .data import neutral_texts

    texts = list(texts) if texts is not None else neutral_texts()
    with stage("side effects"):
        kl = kl_from_reference(model, reference, texts)
    return {"neutral_perplexity": kl.perplexity, "kl_from_unedited": float(kl.mean),
            "kl_coverage": float(kl.coverage), "n_neutral_texts": len(texts)}


def evaluate_arm(model: Model, prompts: Sequence, out_dir, cfg, scorer, reference: NextTokenLogprobs,
                 neutral: Sequence[str] | None = None, intervention=None, apply_options: dict | None = None,
                 progress: bool | None = None, note=None) -> tuple[dict, list[dict]]:
    """One arm of a comparison: generate into ``out_dir`` (resumable) with ``intervention`` in force
    (or none), then :func:`summarize` (fluency under the unedited model) and :func:`side_effects`
    on neutral text with the intervention applied (with its ``fixed_text_options``: a method that edits
    the last position of each call edits every position of the teacher-forced pass, as generation
    would). Returns the metrics and the rows. In a data-parallel launch the processes share the
    generation and rank 0 measures (``reference`` is only needed there). ``note(text)``, when
    given, hears each phase as it starts (a progress display's line)."""
    from contextlib import nullcontext
    from pathlib import Path

    from .data import neutral_texts
    from .generation import generate_run
    from .parallel import group
    from .runs import cached_json

    opts = dict(apply_options or {})
    rows = generate_run(model, prompts, out_dir, cfg, scorer=scorer, intervention=intervention, apply_options=opts,
                        progress=progress)

    def measure() -> dict:
        if note:
            note(f"perplexity of {len(rows)} continuations")
        metrics = summarize(rows, fluency_model=model, cache=Path(out_dir) / "fluency.json")
        fixed = intervention.fixed_text_options(opts) if intervention is not None else {}
        texts = list(neutral) if neutral is not None else neutral_texts()
        if note:
            note(f"side effects on {len(texts)} neutral texts")

        def effects() -> dict:
            with intervention.apply(model, **fixed) if intervention is not None else nullcontext():
                return side_effects(model, reference, texts)

        key = measure_key("side effects", model, intervention, fixed, texts=texts, reference=list(reference.values.shape))
        held = cached_json(Path(out_dir) / "side_effects.json", key, effects)
        metrics["side_effects"] = {k: float("nan") if v is None else v for k, v in held.items()}
        return metrics

    return group().on_main(measure), rows  # in a data-parallel launch: measured on rank 0, sent to all


def paired_to(reference_rows: Sequence[dict], rows: Sequence[dict]) -> dict:
    """The paired bootstrap difference ``rows - reference_rows`` of the toxicity metrics, prompts aligned
    by id (:func:`steerlab.metrics.paired_difference`)."""
    ids, base = score_matrix(reference_rows)
    arm_ids, m = score_matrix(rows)
    return paired_difference(base, m[[arm_ids.index(i) for i in ids]]).to_dict()


def similarity_to(reference_rows: Sequence[dict], rows: Sequence[dict], cache=None) -> dict:
    """Semantic shift of an arm: the MiniLM cosine similarity of each continuation to the reference
    arm's continuation of the same prompt and sample (common random numbers make them comparable),
    its mean with a 95% bootstrap CI over prompts, and the share of identical continuations.
    ``cache``: a JSON file that keeps the per-pair similarities under a key of the texts."""
    from .metrics import bootstrap_mean
    from .metrics.text import semantic_similarity
    from .runs import cached_json

    ref = {(r["prompt_id"], r["sample"]): r["continuation"] for r in reference_rows}
    pairs = [(r["prompt_id"], ref[(r["prompt_id"], r["sample"])], r["continuation"]) for r in rows
             if (r["prompt_id"], r["sample"]) in ref]
    if not pairs:
        raise EmptyInputError("no (prompt, sample) pair in common with the reference rows")

    def compute() -> list[float]:
        with stage("similarity"):
            return [float(v) for v in semantic_similarity([p[1] for p in pairs], [p[2] for p in pairs]).per_pair]

    sim = cached_json(cache, measure_key("similarity", pairs=pairs), compute)
    by: dict[str, list[float]] = {}
    for (pid, _, _), v in zip(pairs, sim):
        by.setdefault(pid, []).append(float(v))
    ci = bootstrap_mean([np.mean(v) for v in by.values()], seed=0)
    return {"similarity": ci.to_dict(),
            "identical": float(np.mean([a == b for _, a, b in pairs])), "n_pairs": len(pairs)}


def median_ci(ratios: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the median of ``ratios`` (seeded)."""
    r = np.asarray(ratios, dtype=float)
    if len(r) < 2:
        return float(r[0]), float(r[0])
    meds = np.median(r[np.random.default_rng(seed).integers(0, len(r), (n_boot, len(r)))], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


MIN_TIMING_PAIRS = 3
"""Fewer alternating pairs give no interval: the bootstrap CI of two ratios is only their range."""


def timing_label(t: dict, digits: int = 2) -> str:
    """A paired timing (:func:`generation_overhead`'s result) as the report and the progress print it:
    the median ratio, its CI when there are enough pairs, and the number of pairs."""
    n = t.get("n_pairs", len(t["ratios"]))
    pairs = f"{n} pair{'s' * (n != 1)}"
    if n < MIN_TIMING_PAIRS or "ci" not in t:
        return f"{t['ratio']:.{digits}f} ({pairs}, too few for a CI)"
    return f"{t['ratio']:.{digits}f} [{t['ci'][0]:.{digits}f}, {t['ci'][1]:.{digits}f}] ({pairs})"


def generation_overhead(model: Model, prompts: Sequence, cfg, intervention=None, apply_options: dict | None = None,
                        reps: int = 3, warmup: int = 1, max_reps: int | None = None,
                        tolerance: float = 0.03) -> dict:
    """Paired timing of one generation batch: the first ``cfg.batch_size // cfg.k`` prompts (one
    batch of ``batch_size`` rows) generated without and with ``intervention`` (``None``: without both
    times, an A/A run that shows the timing noise), in pairs whose order alternates (AB, BA, AB, ...)
    so a drift in machine load hits both sides alike; ``warmup`` untimed calls with the intervention
    come first. ``ratio`` is the median over pairs of with / without, ``ci`` its 95% bootstrap
    interval (:func:`median_ci`). ``reps`` pairs are run; with ``max_reps`` above it, pairs are added
    (at least 3 in all) until ``ci`` lies within ``ratio`` x (1 +- ``tolerance``) or ``max_reps`` pairs
    are done (``converged`` says which; never with fewer than 3 pairs, whose
    bootstrap interval is only their range). Timing whole arms run minutes apart measures the machine's
    load as much as the method."""
    import time

    from .generation import generate_batch, prompt_ids_texts

    max_reps = reps if max_reps is None else max_reps
    if reps < 1 or max_reps < reps:
        raise EmptyInputError(f"generation_overhead needs reps >= 1 and max_reps >= reps, got {reps} and {max_reps}")
    ids, texts = prompt_ids_texts(list(prompts)[: max(1, cfg.batch_size // cfg.k)])
    opts = dict(apply_options or {})

    def once(iv) -> float:
        t0 = time.perf_counter()
        if iv is None:
            generate_batch(model, texts, cfg, ids)
        else:
            iv.generate(model, texts, cfg, ids, **opts)
        return time.perf_counter() - t0

    for _ in range(warmup):  # first use of the edit's shapes and caches
        once(intervention)
    base, arm, converged = [], [], False
    while len(base) < max_reps:
        if len(base) % 2 == 0:
            base.append(once(None))
            arm.append(once(intervention))
        else:
            arm.append(once(intervention))
            base.append(once(None))
        ratios = [a / b for a, b in zip(arm, base)]
        med, (lo, hi) = float(np.median(ratios)), median_ci(ratios)
        converged = len(ratios) >= MIN_TIMING_PAIRS and lo >= med * (1 - tolerance) and hi <= med * (1 + tolerance)
        if len(base) >= reps and (max_reps == reps or converged):
            break
    return {"ratio": med, "ratios": ratios, "ci": [lo, hi], "n_pairs": len(ratios), "converged": converged,
            "tolerance": tolerance, "baseline_seconds": base, "arm_seconds": arm,
            "n_prompts": len(texts), "k": cfg.k, "max_new_tokens": cfg.max_new_tokens}


def example_rows(rows: Sequence[dict], n: int = 3) -> list[dict]:
    """A few continuations to read: with scores, the most toxic, the median and the least toxic
    (``n`` rows spread over the ranking by toxicity, distinct prompts); without, the first ``n``."""
    if not rows or n < 1:
        return []
    if any("toxicity" not in r for r in rows):
        return list(rows[:n])
    best: dict[str, dict] = {}
    for r in rows:  # one row per prompt: its most toxic sample
        if r["prompt_id"] not in best or r["toxicity"] > best[r["prompt_id"]]["toxicity"]:
            best[r["prompt_id"]] = r
    ranked = sorted(best.values(), key=lambda r: (-r["toxicity"], r["prompt_id"]))
    if len(ranked) <= n:
        return ranked
    picks = sorted({round(i * (len(ranked) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [ranked[i] for i in picks]


def fitted_prompts(intervention, prompts: Sequence) -> list[int] | None:
    """Indices of ``prompts`` whose text the intervention was fitted on (matched by the text hashes
    its file stores as ``data_text_ids``); ``None`` when the file records none (fitted on something
    other than texts, or written before steerlab stored them)."""
    from .generation import prompt_ids_texts, text_id

    known = (getattr(intervention, "meta", None) or {}).get("data_text_ids")
    if not known:
        return None
    known = set(known)
    _, texts = prompt_ids_texts(list(prompts))
    return [i for i, t in enumerate(texts) if isinstance(t, str) and text_id(t) in known]


def unsteered_comparison(model: Model, prompts: Sequence, rows: Sequence[dict], out_dir, cfg, scorer,
                         progress: bool | None = None) -> dict:
    """The paired difference of an intervention's scored ``rows`` from the unsteered model on the same
    prompts, decoding and per-row random numbers: the unsteered arm is generated into
    ``out_dir/unsteered`` (a resumable run: computed once, reused by later calls). Returns
    ``paired_difference`` (:func:`paired_to`, steered - unsteered, each metric with its paired 95%
    CI), the unsteered arm's ``toxicity``, the share of ``identical`` continuations and
    ``unsteered_rows`` (the arm's rows, to show beside the steered ones; not for metrics files)."""
    from pathlib import Path

    from .generation import generate_run

    base = generate_run(model, prompts, Path(out_dir) / "unsteered", cfg, scorer=scorer, progress=progress)
    same = {(r["prompt_id"], r["sample"]): r["continuation"] for r in base}
    identical = [same.get((r["prompt_id"], r["sample"])) == r["continuation"] for r in rows]
    _, m = score_matrix(base)
    return {"paired_difference": paired_to(base, rows),
            "unsteered": toxicity_metrics(m, n_boot=1000, seed=0).to_dict(),
            "identical": float(np.mean(identical)), "n_rows": len(rows), "unsteered_rows": base}
