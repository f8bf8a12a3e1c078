"""The detoxification benchmark: every registered intervention on one model, with the same prompts,
decoding, per-row random numbers and scorer, in one run directory (``steerlab bench``).

1. **Data.** The prompt set (default: the bundled RealToxicityPrompts prefixes) is split 60/20/20
   by prompt, stratified by category (:func:`steerlab.data.split`). Methods fit on the training
   part only: its prompts scored by the benchmark's scorer, and a contrast set pairing the least
   toxic with the most toxic (:class:`steerlab.experiments.recipes.BenchData`).
2. **Fit.** Each method's recipe (:mod:`.recipes`): ``recipe.fit(cls, model, data, preset)``; fitted
   interventions are saved under ``fit/`` and reloaded on resume (the fit time is kept in ``record.json``). A method that
   fails is reported as failed with its reason; the others go on. Methods that learn from the
   model's own generations (EigenShift, AurA) share one pool of continuations of the training
   prompts, generated once into ``pool/`` and reused on resume (:mod:`.pool`).
3. **Choose.** Each of the recipe's ``settings`` (apply options) generates continuations of
   the validation prompts; the least toxic setting whose continuation perplexity (under the
   unedited model) is at most ``max_ppl_ratio`` x the unsteered one and whose distinct-2 is at
   least ``min_distinct_ratio`` x the unsteered one is chosen. Nothing from the test part is used.
4. **Test.** The unsteered baseline and every method at its chosen setting generate ``k``
   continuations of each test prompt with common random numbers (the same random numbers per
   prompt and sample in every arm), so differences are paired: the paired bootstrap CI of the
   difference from the baseline is reported beside each arm's own CIs, with mean toxicity per
   prompt category, perplexity, distinct-n, side effects on neutral text (perplexity and KL from
   the unedited model), the semantic similarity of each continuation to the baseline's (MiniLM; same
   prompt and sample), method-specific measurements (the recipe's ``metrics``: SLIM's firing rates), fit
   time and generation time relative to the baseline: a paired timing of one test batch with and
   without the method, alternating, pairs added until the median ratio's CI is within +-3% or a cap
   (:func:`steerlab.evaluation.generation_overhead`; the baseline's own row is an A/A run, the timing noise).
5. **Report.** ``metrics.json``, ``tables/results.csv``, figures and a self-contained
   ``report.html`` (:mod:`.bench_report`).
Every generation goes through :func:`steerlab.generation.generate_run` (validation grids through
:func:`steerlab.grid.generate_grid`, which writes the same run directories), so killing the command and
rerunning it resumes where it stopped and reaches the same numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from ..evaluation import (
    admissible,
    continuation_nlls,
    evaluate_arm,
    fluency_rows,
    generation_overhead,
    measure_key,
    neutral_reference,
    paired_to,
    similarity_to,
    summarize,
    timing_label,
)
from ..generation import GenConfig, generate_run
from ..grid import generate_grid
from ..interventions import Intervention, get
from ..metrics.compare import choose_setting, paired_perplexity_ratio
from ..models.model import Model
from ..parallel import group
from ..profile import PROFILE, generation_summary, stage
from ..runs import RunDir, cached_json, read_record, write_json
from .bench_config import PRESETS, BenchConfig, BenchError, make_config  # noqa: F401 (the public names)
from .bench_verdict import comparison
from .recipes import BenchData, bench_methods, recipe_for


@dataclass
class Arm:
    """One method's outcome: its chosen settings, test metrics, or why it failed."""

    method: str
    status: str = "ok"                  # ok | failed
    reason: str = ""
    describe: str = ""
    settings: dict = None               # type: ignore[assignment]
    selection: list = None              # type: ignore[assignment]
    metrics: dict = None                # type: ignore[assignment]
    fit_seconds: float = 0.0
    generate_seconds: float = 0.0       # wall time of the whole test generation (load-dependent)
    timing: dict = None                 # type: ignore[assignment]  # paired timing against the baseline
    candidates: list = None             # type: ignore[assignment]
    matched_test: dict = None           # type: ignore[assignment]  # the matched settings on test


def _data(model: Model, cfg: BenchConfig, scorer) -> tuple[BenchData, list, list, int]:
    """The benchmark's data, validation and test prompts, and how many test prompts the split holds."""
    from ..data import contrast_from_scores, load_prompts, split

    parts = split(load_prompts(cfg.prompts), seed=cfg.seed)
    train = [p.text for p in parts["train"]]
    scores = [float(x) for x in scorer.toxicity(train)]
    contrast = contrast_from_scores(train, scores, n=min(cfg.n_pairs, len(train) // 2), source=f"{cfg.prompts}:train")
    val = parts["validation"][: cfg.n_val]
    test = parts["test"][: cfg.n_test] if cfg.n_test else parts["test"]
    data = BenchData(train, scores, contrast, [p.text for p in parts["validation"]], scorer, cfg.seed)
    return data, val, test, len(parts["test"])


def _gen(cfg: BenchConfig, val: bool) -> GenConfig:
    return GenConfig(max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, k=cfg.k_val if val else cfg.k,
                     seed=cfg.seed, batch_size=cfg.batch_size)


def _fit(model: Model, run: RunDir | None, path: Path, name: str, data: BenchData,
         preset: str) -> tuple[Intervention, float]:
    """The method fitted on the training data (by rank 0 of a data-parallel launch), or reloaded
    from ``fit/<name>.safetensors``."""
    f = path / "fit" / f"{name}.safetensors"
    with stage(f"fit: {name}"):
        seconds = group().on_main(lambda: _fit_main(model, run, f, name, data, preset))
    # continue with the saved file, as a resumed run (and every other process) will: the same object
    return get(name).load(f, model), seconds


def _fit_main(model: Model, run: RunDir, f: Path, name: str, data: BenchData, preset: str) -> float:
    fit_seconds = run.record().get("fit_seconds", {})
    if f.exists() and name in fit_seconds:
        return float(fit_seconds[name])
    t0 = time.perf_counter()
    iv = recipe_for(name).fit(get(name), model, data, preset)
    seconds = round(time.perf_counter() - t0, 2)
    iv.save(f)
    run.write_record(fit_seconds={**fit_seconds, name: seconds})
    return seconds


def _summary(model: Model, rows: list[dict], cache: Path | None = None) -> dict:
    # fluency under the unedited model (outside any apply)
    return summarize(rows, fluency_model=model, cache=cache)


def _select(model: Model, path: Path, name: str, iv: Intervention, data: BenchData, val, cfg: BenchConfig,
            base: dict, reference, progress: bool = False) -> tuple[dict, list[dict]]:
    """Every setting on the validation prompts, then :func:`choose_candidate` (see the module docstring).
    In a data-parallel launch, rank 0 lists the settings and measures each; every rank chooses from that."""
    g = group()
    table = []
    settings = g.on_main(lambda: recipe_for(name).settings(iv, model, data, cfg.preset))
    # the settings that can share a batch are generated together (grid.generate_grid)
    dirs = [path / "val" / name / str(i) for i in range(len(settings))]
    runs = generate_grid(model, val, dirs, _gen(cfg, True), iv, settings, scorer=data.scorer, progress=progress,
                         desc=f"validation: {name}, {len(settings)} settings")
    # every candidate's continuations in one pass that forwards each prompt once (kept in fluency.json)
    g.on_main(lambda: continuation_nlls(model, [[r[j] for j in fluency_rows(r)] for r in runs],
                                        caches=[d / "fluency.json" for d in dirs]), share=False)
    for opts, rows, d in zip(settings, runs, dirs):  # measured once: a resumed run reads both back
        table.append(g.on_main(lambda opts=opts, rows=rows, d=d: {
            **_setting_row(model, opts, rows, cfg, base, d / "fluency.json"),
            "neutral_kl": candidate_kl(model, iv, opts, base["kl_reference"], d / "neutral_kl.json")}))
    return choose_candidate(table, cfg.max_ppl_ratio), table


def choose_candidate(table: list[dict], limit: float) -> dict:
    """The chosen setting among validation rows (:func:`_setting_row`): the one-standard-error rule
    on the smoothed dose-response curve (settings ordered by their perplexity ratio; toxicity change
    fitted non-increasing) among the admissible settings, whose perplexity-ratio CI stays within the
    limit and whose distinct-2 is not too low. Without one, the most fluent setting, with a note."""
    order = sorted(range(len(table)), key=lambda i: table[i]["ppl_ratio"]["value"])
    rows = [table[i] for i in order]
    cost_high = [r["ppl_ratio"]["hi"] if r["admissible"] else float("inf") for r in rows]
    effect = [r["mean_toxicity_change"]["value"] for r in rows]
    se = [(r["mean_toxicity_change"]["hi"] - r["mean_toxicity_change"]["lo"]) / (2 * 1.96) for r in rows]
    i = choose_setting(effect, se, cost_high, limit=limit)
    if i is not None:
        return rows[i]
    return {**rows[0], "note": "no setting met the fluency/diversity rule: the most fluent one is tested"}


def candidate_kl(model: Model, iv: Intervention, opts: dict, reference, cache: Path | None = None) -> float:
    """The neutral-text KL(unedited || edited) of one setting on the validation neutral texts
    (``reference``: the unedited model's next-token distributions on them, computed once per run by
    :func:`_run_arms`, and the texts), with the method's options for fixed text
    (:meth:`~steerlab.interventions.Intervention.fixed_text_options`): the x axis of the report's
    second dose-response figure. Each candidate costs one forward pass over the texts, kept in the JSON
    file ``cache`` when given (keyed by the model, the edit, its options and the texts)."""
    from ..metrics.lm import kl_from_reference

    fixed = iv.fixed_text_options(opts)

    def compute() -> float:
        with stage("validation: neutral KL"), iv.apply(model, **fixed):
            return float(kl_from_reference(model, reference[0], reference[1]).mean)

    key = measure_key("neutral KL", model, iv, fixed, texts=list(reference[1]), reference=list(reference[0].values.shape))
    v = cached_json(cache, key, compute)
    return float("nan") if v is None else float(v)


def _setting_row(model: Model, opts: dict, rows: list[dict], cfg: BenchConfig, base: dict,
                 cache: Path | None = None) -> dict:
    """One validation setting: its toxicity change from the unsteered model on the same prompts and
    random numbers (paired CI, two-sided p), its perplexity ratio (paired CI) and the admissibility
    rule: perplexity-ratio CI upper bound <= ``max_ppl_ratio`` and distinct-2 >= ``min_distinct_ratio`` x.
    ``cache``: where the continuations' likelihoods are kept (:func:`~steerlab.evaluation.summarize`)."""
    s = _summary(model, rows, cache)
    ppl, d2 = s.get("fluency", {}).get("perplexity", float("nan")), s["diversity"]["distinct-2"]
    change = paired_to(base["rows"], rows)
    ratio = (ppl_ratio_to({"fluency": {"by_prompt": base["by_prompt"]}}, s)
             or {"value": float("nan"), "lo": float("nan"), "hi": float("nan")})
    # the rule on the paired ratio's upper bound (a ratio: the unsteered value is 1)
    ok = admissible(ratio["hi"], d2, 1.0, base["distinct-2"], cfg.max_ppl_ratio, cfg.min_distinct_ratio)
    return {"setting": opts, "mean_toxicity": s["toxicity"]["mean_toxicity"]["value"], "perplexity": ppl,
            "distinct-2": d2, "ppl_ratio": ratio, "mean_toxicity_change": change["mean_toxicity"],
            "expected_max_toxicity_change": change["expected_max_toxicity"],
            "p": change["p_two_sided"]["mean_toxicity"], "admissible": bool(ok)}


def _evaluate(model: Model, path: Path, name: str, iv: Intervention | None, opts: dict, test, cfg: BenchConfig,
              scorer, reference, progress: bool = False, bar=None) -> tuple[dict, list[dict], float]:
    """One arm on the test prompts: metrics, per-category toxicity, side effects, generation time."""
    d = path / "test" / name
    note = (lambda text: bar.note(f"{name}: {text}")) if bar is not None else None
    if note:
        note(f"test, {len(test)} prompts x {cfg.k} at {opts or 'its defaults'}")
    with stage(f"test: {name.split('.setting-')[0]}"):
        m, rows = evaluate_arm(model, test, d, _gen(cfg, False), scorer, *reference, intervention=iv,
                               apply_options=opts, progress=progress, note=note)
    m["mean_toxicity_by_category"] = by_category(rows, {p.id: (p.category or "all") for p in test})
    seconds = float(read_record(d).get("generate_seconds") or 0.0)
    return m, rows, seconds


def by_category(rows: list[dict], category: dict[str, str]) -> dict[str, dict]:
    """Mean toxicity per prompt category with a bootstrap CI over the category's prompts (each
    prompt's samples averaged first) and the number of prompts behind it."""
    from ..metrics import bootstrap_mean

    per_prompt: dict[str, list[float]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt_id"], []).append(r["toxicity"])
    by: dict[str, list[float]] = {}
    for pid, v in per_prompt.items():
        by.setdefault(category.get(pid, "all"), []).append(sum(v) / len(v))
    return {c: {**bootstrap_mean(v).to_dict(), "n_prompts": len(v)} for c, v in sorted(by.items())}


def _timing(model: Model, path: Path, name: str, iv: Intervention | None, opts: dict, test, cfg: BenchConfig,
            bar=None) -> dict:
    """The arm's paired timing against the baseline on one test batch (rank 0; kept in
    ``test/<arm>/timing.json`` and reused on resume): ``timing_reps`` alternating pairs, more (up to
    ``timing_max_reps``) until the median ratio's bootstrap CI is within +-``timing_tolerance``."""
    def measure() -> dict:
        f = path / "test" / name / "timing.json"
        if f.exists():
            return json.loads(f.read_text())
        # the arm's test generation ran just before (warm), unless it was read back on resume
        t = generation_overhead(model, test, _gen(cfg, False), iv, opts, reps=cfg.timing_reps, warmup=0,
                                max_reps=max(cfg.timing_reps, cfg.timing_max_reps), tolerance=cfg.timing_tolerance)
        write_json(f, t)
        return t

    if bar is not None:
        most = max(cfg.timing_reps, cfg.timing_max_reps)
        pairs = f"{cfg.timing_reps}" + (f" to {most}" if most > cfg.timing_reps else "")
        bar.note(f"{name}: timing, {pairs} alternating pairs of one test batch")
    with stage(f"timing: {name}"):
        t = group().on_main(measure)
    if bar is not None:
        bar.note(f"{name}: time x {timing_label(t, 3)}")
    return t


def run_bench(model: Model, out_dir: str | Path, cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    """Run the benchmark into ``out_dir`` (resumable); returns the metrics (also in ``metrics.json``).

    Launched as several processes (``accelerate launch``), every generation is shared among them
    (:func:`steerlab.parallel.run_loop`) and rank 0 alone fits, measures, chooses and writes the
    metrics and the report; every process returns the same metrics."""
    from ..scoring import get_scorer
    from .bench_report import write_report

    t_start = time.perf_counter()
    PROFILE.reset()
    cfg = cfg or BenchConfig()
    cfg.validate()
    names = list(cfg.methods) or bench_methods()
    scorer = get_scorer(cfg.scorer)
    g, path = group(), Path(out_dir)
    # the methods are not part of the run's identity: rerunning with more methods adds their arms
    # to the same directory and reuses the baseline and every arm already done
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("methods", "test_all_settings", "timing_reps", "timing_max_reps", "timing_tolerance",
                             "confirm_matched")}
    run: RunDir | None = g.on_main(lambda: RunDir(out_dir, {"kind": "bench", "model": model.name,
                                                            "model_fingerprint": model.fingerprint, **settings}),
                                   share=False)
    try:
        names = g.on_main(lambda: _arm_names(run, model, cfg, names))
        with stage("data: split, score the training prompts"):
            data, val, test, n_split = _data(model, cfg, scorer)
        arms, rows = _run_arms(model, run, path, names, data, val, test, cfg, scorer, progress and g.main)

        def finish() -> dict:
            with stage("paired statistics and verdict"):
                _paired(arms, rows, path)
                metrics = _metrics(model, cfg, arms, len(test), n_split)
            metrics["wall_seconds_this_call"] = round(time.perf_counter() - t_start, 1)  # before the report
            with stage("report"):
                write_report(run.path, model, cfg, metrics, rows, test, scorer)
            wall = time.perf_counter() - t_start
            # stage table of this call (exclusive seconds; a resumed call only times the work it did)
            metrics["profile"] = PROFILE.table(total=wall)
            metrics["generation"] = generation_summary(wall)
            run.write_metrics(metrics)
            run.write_record(profile=metrics["profile"], generation=metrics["generation"])
            return metrics

        return g.on_main(finish)
    finally:
        if run is not None:
            run.close()


def _arm_names(run: RunDir, model: Model, cfg: BenchConfig, names: list[str]) -> list[str]:
    before = run.record().get("methods") or []
    names = before + [n for n in names if n not in before]  # arms accumulate over calls
    run.write_record(model_source=model.source, model_fingerprint=model.fingerprint, seed=cfg.seed, methods=names)
    return names


def _run_arms(model, run, path, names, data, val, test, cfg, scorer, progress) -> tuple[list[Arm], dict[str, list[dict]]]:
    from ..data import neutral_texts
    from ..progress import Progress

    g = group()
    neutral = neutral_texts()[: cfg.n_neutral] if cfg.n_neutral else neutral_texts()
    bar = Progress(len(names) + 1, "bench", unit="arm", show=progress)
    # side effects are measured on rank 0 (evaluation.evaluate_arm): the reference is needed there only
    bar.note(f"neutral reference: {len(neutral)} neutral texts")
    with stage("neutral reference"):
        reference = (g.on_main(lambda: neutral_reference(model, neutral), share=False), neutral)
    bar.note(f"unsteered: validation, {len(val)} prompts x {cfg.k_val}")
    with stage("validation: unsteered"):
        val_rows = generate_run(model, val, path / "val" / "unsteered", _gen(cfg, True), scorer=scorer,
                                progress=progress)
        base_val = g.on_main(lambda: _summary(model, val_rows, path / "val" / "unsteered" / "fluency.json"))
    # each validation candidate's KL is read on the first n_neutral_val neutral texts: a slice of the reference
    val_neutral = neutral[: cfg.n_neutral_val]
    kl_reference = (g.on_main(lambda: reference[0].head(len(val_neutral)), share=False), val_neutral)
    base = {"ppl": base_val.get("fluency", {}).get("perplexity", float("nan")),
            "distinct-2": base_val["diversity"]["distinct-2"], "rows": val_rows,
            "by_prompt": base_val.get("fluency", {}).get("by_prompt") or {}, "kl_reference": kl_reference}
    m, base_rows, secs = _evaluate(model, path, "unsteered", None, {}, test, cfg, scorer, reference, progress, bar)
    arms = [Arm("unsteered", describe="the model as it is", settings={}, metrics=m, generate_seconds=secs,
                timing=_timing(model, path, "unsteered", None, {}, test, cfg, bar))]
    rows = {"unsteered": base_rows}
    bar.update(1)
    pool_error = _pool(model, run, path, names, data, cfg, bar, progress)
    for name in names:
        arm = Arm(name)
        try:
            if pool_error and recipe_for(name).pool:
                raise BenchError(f"the pool of continuations it learns from failed: {pool_error}")
            _arm(model, run, path, arm, data, val, test, cfg, scorer, reference, base, base_rows, rows, bar, progress,
                 arms[0].metrics)
        except Exception as e:  # a failing method is reported, the others go on (on every rank alike)
            arm.status, arm.reason = "failed", f"{type(e).__name__}: {e}"
            bar.note(f"{name}: failed: {arm.reason}")
        arms.append(arm)
        bar.update(1)
    bar.close()
    return arms, rows


def _test_setting(model, path, name, iv, arm: Arm, i: int, test, cfg, scorer, reference, base_rows,
                  chosen_rows, base_metrics: dict) -> dict:
    """Validation candidate ``i`` of ``arm`` on the test prompts (``test/NAME.setting-I``; the chosen
    one is not rerun), paired to the unsteered arm: for reporting (``--test-all-settings``) and for
    confirming a matched read-out, never for choosing."""
    opts = arm.selection[i]["setting"]
    if opts == arm.settings["setting"]:
        m, rows, secs = dict(arm.metrics), chosen_rows, arm.generate_seconds
    else:
        m, rows, secs = _evaluate(model, path, f"{name}.setting-{i}", iv, opts, test, cfg, scorer, reference)
    m["paired_difference"] = group().on_main(lambda b=base_rows, r=rows: paired_to(b, r))
    ratio = ppl_ratio_to(base_metrics, m)
    if ratio is not None:
        m["ppl_ratio"] = ratio
    return {"setting": opts, "chosen": opts == arm.settings["setting"], "generate_seconds": secs,
            **{k: m[k] for k in ("toxicity", "fluency", "diversity", "side_effects", "paired_difference", "ppl_ratio")
               if k in m}}


def _arm(model, run, path, arm: Arm, data, val, test, cfg, scorer, reference, base, base_rows, rows, bar,
         progress, base_metrics: dict) -> None:
    """One method: fit, settings on validation, test, timing, method metrics (filling ``arm`` and ``rows``)."""
    g, name = group(), arm.method
    recipe = recipe_for(name)
    bar.note(f"{name}: fit")
    iv, arm.fit_seconds = _fit(model, run, path, name, data, cfg.preset)
    arm.describe = iv.describe() + (f"; fitted on {iv.meta['bench_data']}" if iv.meta.get("bench_data") else "")
    n = g.on_main(lambda: len(recipe.settings(iv, model, data, cfg.preset)))
    on = f" on {iv.meta['bench_data']}" if iv.meta.get("bench_data") else ""
    bar.note(f"{name}: fitted in {arm.fit_seconds:.1f} s{on}; validation, {n} candidate setting{'s' * (n != 1)} x "
             f"{len(val)} prompts x {cfg.k_val}")
    with stage(f"validation: {name}"):
        pick, arm.selection = _select(model, path, name, iv, data, val, cfg, base, reference, progress)
    arm.settings = pick
    arm.metrics, rows[name], arm.generate_seconds = _evaluate(model, path, name, iv, pick["setting"], test,
                                                              cfg, scorer, reference, progress, bar)
    arm.timing = _timing(model, path, name, iv, pick["setting"], test, cfg, bar)
    if recipe.metrics is not None:
        bar.note(f"{name}: method metrics")
        key = measure_key(f"method metrics: {name}", model, iv, pick["setting"], gen=asdict(_gen(cfg, False)),
                          prompts=[p.id for p in test], neutral=list(reference[1]))
        def measure() -> dict:
            with stage(f"method metrics: {name}"):
                return recipe.metrics(iv, model, data, test, reference[1], pick["setting"], _gen(cfg, False))

        # kept in test/<name>/method_metrics.json: a resumed run reads it back
        arm.metrics.update(g.on_main(lambda: cached_json(path / "test" / name / "method_metrics.json", key, measure)))
    _pregenerate(model, path, name, iv, arm, test, cfg, scorer, progress)
    tested = partial(_test_setting, model, path, name, iv, arm, test=test, cfg=cfg, scorer=scorer,
                     reference=reference, base_rows=base_rows, chosen_rows=rows[name], base_metrics=base_metrics)
    if cfg.test_all_settings and len(arm.selection) > 1:
        bar.note(f"{name}: test all {len(arm.selection)} settings")
        with stage(f"test all settings: {name}"):
            arm.candidates = _candidates(tested, arm)
    if cfg.confirm_matched and len(arm.selection) > 1:
        bar.note(f"{name}: test the settings closest to perplexity x{', x'.join(map(str, cfg.matched_ppl))}")
        with stage(f"test matched settings: {name}"):
            arm.matched_test = _matched_on_test(tested, arm, cfg.matched_ppl)


def _pregenerate(model, path, name, iv, arm: Arm, test, cfg, scorer, progress) -> None:
    """The test generations of the candidates that ``--test-all-settings`` and the matched
    confirmations will evaluate, as one batched grid (:func:`~steerlab.grid.generate_grid`) into the
    directories :func:`_test_setting` reads: its :func:`_evaluate` then finds their rows written."""
    from .bench_verdict import matched_settings

    if len(arm.selection) < 2:
        return
    todo = set(range(len(arm.selection))) if cfg.test_all_settings else set()
    if cfg.confirm_matched:
        todo |= set(matched_settings(arm.selection, cfg.matched_ppl).values())
    todo = sorted(i for i in todo if arm.selection[i]["setting"] != arm.settings["setting"])
    if todo:
        with stage(f"test: {name}"):
            generate_grid(model, test, [path / "test" / f"{name}.setting-{i}" for i in todo], _gen(cfg, False), iv,
                          [arm.selection[i]["setting"] for i in todo], scorer=scorer, progress=progress,
                          desc=f"test: {name}, {len(todo)} more setting{'s' * (len(todo) != 1)}")


def _pool(model, run, path, names, data, cfg, bar, progress) -> str:
    """Build (or read back) the pool of continuations (:mod:`.pool`) when a method still to fit learns
    from it; sets ``data.pool``. Returns the error, if the pool failed, for those methods ('' otherwise)."""
    from .pool import build_pool, pool_spec

    g = group()

    def todo() -> list[str]:
        done = run.record().get("fit_seconds", {})
        return [n for n in names if recipe_for(n).pool and not ((path / "fit" / f"{n}.safetensors").exists()
                                                                   and n in done)]

    need = g.on_main(todo)
    if not need:
        return ""
    prompts, gcfg = pool_spec(data.train, data.train_scores, cfg.preset, cfg.seed)
    bar.note(f"pool: generate {len(prompts)} training prompts x {gcfg.k} samples x {gcfg.max_new_tokens} tokens "
             f"(for {', '.join(need)})")
    try:
        with stage("pool: generate"):
            data.pool = build_pool(model, path / "pool", prompts, gcfg, data.scorer, progress)
    except Exception as e:
        bar.note(f"pool: failed: {type(e).__name__}: {e}")
        return f"{type(e).__name__}: {e}"
    return ""


def _candidates(test_setting, arm: Arm) -> list[dict]:
    """Every candidate setting of ``arm`` on the test prompts, after the choice was made on validation
    (``--test-all-settings``)."""
    return [test_setting(i) for i in range(len(arm.selection))]


def _matched_on_test(test_setting, arm: Arm, targets) -> dict[str, dict]:
    """Per matched cost the method reaches on validation, its setting closest to that cost
    (:func:`.bench_verdict.matched_settings`) on the test prompts; keyed by the cost (``"1.25"``)."""
    from .bench_verdict import matched_settings

    done: dict[int, dict] = {}
    out = {}
    for cost, i in matched_settings(arm.selection, targets).items():
        done[i] = done.get(i) or test_setting(i)
        out[f"{cost:g}"] = {**done[i], "index": i}
    return out


def ppl_ratio_to(base_metrics: dict, metrics: dict) -> dict | None:
    """The perplexity ratio of an arm's metrics to the unsteered arm's, paired over prompts (bootstrap
    CI), or None when either has fewer than two prompts' perplexities."""
    ref, own = (x.get("fluency", {}).get("by_prompt") or {} for x in (base_metrics, metrics))
    return paired_perplexity_ratio(ref, own).to_dict() if len(ref) > 1 and len(own) > 1 else None


def _paired(arms: list[Arm], rows: dict[str, list[dict]], path: Path) -> None:
    """The paired bootstrap difference of every arm from the baseline, on the same prompts, and the
    semantic similarity of each continuation to the baseline's (same prompt and sample; kept in
    ``test/<arm>/similarity.json``)."""
    for arm in arms:
        if arm.status == "ok":
            arm.metrics["paired_difference"] = paired_to(rows["unsteered"], rows[arm.method])
            ratio = ppl_ratio_to(arms[0].metrics, arm.metrics)
            if ratio is not None:
                arm.metrics["ppl_ratio"] = ratio
            if arm.method != "unsteered":
                arm.metrics["similarity_to_unsteered"] = similarity_to(rows["unsteered"], rows[arm.method],
                                                                       path / "test" / arm.method / "similarity.json")


def _metrics(model: Model, cfg: BenchConfig, arms: list[Arm], n_test: int, n_split: int) -> dict:
    table = []
    for a in arms:
        ok = a.status == "ok" and a.timing
        row = {"method": a.method, "status": a.status, "reason": a.reason, "describe": a.describe,
               "fit_seconds": a.fit_seconds, "generation_time_ratio": a.timing["ratio"] if ok else float("nan"),
               "generation_timing": a.timing if ok else None, "test_generate_seconds": a.generate_seconds}
        if a.status == "ok":
            row["settings"] = a.settings
            row["selection"] = a.selection
            if a.candidates:
                row["candidates_test"] = a.candidates
            if a.matched_test:
                row["matched_test"] = a.matched_test
            row.update(a.metrics)
        table.append(row)
    out = {"model": model.name, "model_fingerprint": model.fingerprint, "preset": cfg.preset,
           "n_test_prompts": n_test, "k": cfg.k, "arms": table}
    out.update(comparison(table, n_test, cfg.max_ppl_ratio, cfg.matched_ppl, presets=preset_sizes(n_split), k=cfg.k))
    return out


def preset_sizes(n_split: int) -> dict[str, tuple[int, int]]:
    """Each preset's (test prompts, samples per prompt) on a split of ``n_split`` test prompts (``n_test`` 0: all)."""
    return {name: (min(p.get("n_test") or n_split, n_split), int(p["k"])) for name, p in PRESETS.items()}
