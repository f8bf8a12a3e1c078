"""The intrinsic self-correction study (arXiv 2505.11924, "Explanation_ISC"; METHODS.md section 1).

:func:`run_selfcorrect` runs multi-round self-correction dialogues, measures toxicity and hidden
states per round, and relates the round-to-round shifts to the vocabulary (logit lens) and to
toxicity steering vectors. Everything lands in one run directory (see ``docs/selfcorrect.md``).

What is computed, and the choices made where the paper leaves room:

1. **Samples.** The prompt pool (default: the bundled RealToxicityPrompts prefixes, duplicates
   removed) is scored with the scorer. ``selection="threshold"``: *toxic* prompts score
   ``>= threshold`` (0.5), *non-toxic* ones below; a seeded random sample is drawn from each pool.
   ``selection="rank"``: the most toxic and the least toxic prompts of the ranking. Toxic prompts
   get the detox correction (group ``detox``), non-toxic prompts the toxify one (group ``toxify``);
   ``n`` is split evenly (detox gets the odd one).
2. **Dialogues** (:mod:`steerlab.protocols.selfcorrect`): round 1 asks for a completion, round ``r>1``
   is the whole history plus the correction instruction. The dialogues of a round are sorted by
   length and generated in batches by :meth:`steerlab.runs.RunDir.loop` (sampling ``t0.7``, each
   batch seeded from the run seed, the round and its samples; rows appended per batch, resumable). The toxicity of a round is
   the scorer's score of the parsed ``Completion:`` text (the whole reply when the marker is
   missing; ``marker_found`` in the rows and tables says how often it was there).
3. **States per round**, read with :func:`steerlab.record` *while generating* (no extra forward
   pass): ``final``
   (after the final norm, the input of the unembedding) at the last prompt token (*prompt*
   state); the mean ``final`` over the positions that predict the reply's tokens, i.e. the last
   prompt token and the reply's tokens except the last (*response* state; ``generate`` never runs
   the model on the last sampled token, so this is the one-position-shifted mean over the reply,
   end-of-turn token and padding excluded); and ``blocks.{l}.resid_post`` at the last prompt
   token for every layer ``l``. See :func:`generate_round`. Points 4-7 are computed by
   :mod:`.selfcorrect_analysis` with the maths of :mod:`steerlab.explain.shifts`.
4-7. Moved as instructed, the logit-lens relation, PCA/SVD and the steering-vector comparison:
   see :mod:`.selfcorrect_analysis`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..generation import GenConfig, derive_seed, generate_batch, plan_batches, text_id
from ..hooks import record
from ..models.model import Model
from ..protocols.selfcorrect import dialogue, instruction_texts, parse_completion
from ..runs import RunDir, read_json, write_atomic
from .selfcorrect_analysis import PAPER, SelfCorrectResult, analyse, json_safe
from .selfcorrect_config import (
    PRESETS,
    Sample,
    SelfCorrectConfig,
    SelfCorrectError,
    make_config,
    pool,
    select_samples,
)

__all__ = ["PRESETS", "SelfCorrectConfig", "SelfCorrectError", "SelfCorrectResult", "generate_round", "make_config",
           "run_selfcorrect", "select_samples"]

STATE_KEYS = ("prompt", "response", "resid", "resid_response", "response_tokens")


# =============================================================================================
# per-round generation with states recorded on the way


def _stop_ids(model: Model) -> torch.Tensor:
    ids: set[int] = set()
    for v in (getattr(model.hf.generation_config, "eos_token_id", None), model.tok.eos_token_id):
        if v is not None:
            ids.update(int(x) for x in (v if isinstance(v, list | tuple) else [v]))
    return torch.tensor(sorted(ids), dtype=torch.long)


def reply_lengths(fed: torch.Tensor, calls: int, max_new_tokens: int, stop: torch.Tensor) -> torch.Tensor:
    """Reply length ``n`` per row from the tokens fed back during decoding (``fed`` ``[B, calls-1]``,
    ``fed[:, k]`` is reply token ``k+1``): up to the first end token; a row with none that stopped
    early ended on its last (never fed) token; a row that ran to the limit has ``calls`` tokens."""
    hit = torch.isin(fed, stop.to(fed.device))
    first = hit.float().argmax(1)
    none = calls if calls >= max_new_tokens else calls - 1
    return torch.where(hit.any(1), first, torch.full_like(first, none)).clamp_min(1)


def generate_round(model: Model, dialogues: list[list[dict]], keys: Sequence[str], cfg: SelfCorrectConfig,
                   round_index: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """Generate one reply per dialogue (one batch) and read the round's states during generation
    with :func:`steerlab.record`. States, in input order:

    - ``prompt``: ``final`` at the last prompt token (the prefill's last position), ``[N, d]``;
    - ``resid``: ``blocks.{l}.resid_post`` at the last prompt token for every layer, ``[N, L, d]``;
    - ``response``: the mean ``final`` over the positions whose next-token predictions are the
      reply's ``n`` tokens (the last prompt token and reply tokens ``1 .. n-1``; the end-of-turn
      token and padding excluded), ``[N, d]``. ``generate`` never runs the model on the last
      sampled token, so this is the one-position-shifted "mean over the response" that needs no
      extra forward pass;
    - ``resid_response``: the same response mean of ``blocks.{l}.resid_post``, every layer, ``[N, L, d]``;
    - ``response_tokens``: ``n`` per reply.
    """
    gen_cfg = GenConfig(max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, seed=cfg.seed, chat=True,
                        batch_size=max(cfg.batch_size, len(dialogues)))
    sites = [f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
    with record(model, "final", "last") as fin, record(model, sites, "last") as res:
        out = generate_batch(model, dialogues, gen_cfg, [f"{k}|round{round_index}" for k in keys])
    F = fin["final"]  # [B, calls, d]: call 0 = prefill
    n = reply_lengths(fin.input_ids[:, 1:], fin.calls, cfg.max_new_tokens, _stop_ids(model))
    keep = (torch.arange(F.shape[1], device=F.device)[None, :] < n[:, None].to(F.device)).float()
    resp = (F * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    Rs = torch.stack([res[s] for s in sites], 2)  # [B, calls, L, d]
    states = {"prompt": F[:, 0], "resid": Rs[:, 0], "response": resp, "response_tokens": n,
              "resid_response": (Rs * keep[..., None, None]).sum(1) / keep.sum(1)[:, None, None]}
    return [o[0] for o in out], {k: v.cpu().numpy() for k, v in states.items()}


def _save_npz(path: Path, arrays: dict) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


def _load_npz(path: Path, n: int | None = None, extra: tuple[str, ...] = ()) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in (*STATE_KEYS, *extra)}
    except (OSError, ValueError, KeyError):
        return None
    return d if n is None or all(len(v) == n for v in d.values()) else None


def _run_round(model: Model, run: RunDir, cfg: SelfCorrectConfig, samples: list[Sample], responses: list[list[str]],
               r: int, sc, progress: bool) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Round ``r`` of every dialogue through :meth:`RunDir.loop`: batches of similar token length,
    each batch's states saved (``states/round_r/<seed>.npz``) before its rows are appended; the
    round's states are then gathered into ``states/round_r.npz``."""
    dials = [dialogue(s.prompt, responses[i], s.instruction, cfg.opening) for i, s in enumerate(samples)]
    keys = [s.prompt_id for s in samples]
    part_dir = run.path / "states" / f"round_{r}"

    def work(batch: Sequence[int], seed: int) -> list[dict]:
        resp, st = generate_round(model, [dials[i] for i in batch], [keys[i] for i in batch], cfg, r)
        parsed = [parse_completion(x) for x in resp]
        tox = np.asarray(sc.toxicity([c for c, _ in parsed]), dtype=np.float64)
        _save_npz(part_dir / f"{seed}.npz", {**st, "index": np.asarray(batch)})
        return [{"sample": samples[i].index, "round": r, "group": samples[i].group, "instruction": samples[i].instruction,
                 "prompt_id": samples[i].prompt_id, "prompt": samples[i].prompt,
                 "prompt_toxicity": samples[i].prompt_toxicity, "response": resp[j], "completion": parsed[j][0],
                 "marker_found": parsed[j][1], "toxicity": float(tox[j]), "response_tokens": int(st["response_tokens"][j])}
                for j, i in enumerate(batch)]

    lengths = [len(model.tok(model.chat_text(d), add_special_tokens=False)["input_ids"]) for d in dials]
    batches = plan_batches(lengths, keys, cfg.batch_size)
    rows = run.loop(batches, work, keys=lambda i: [(r, samples[i].index)], row_key=lambda x: (x["round"], x["sample"]),
                    seed=lambda b: derive_seed("selfcorrect", cfg.seed, r, *[keys[i] for i in b]),
                    desc=f"round {r}", progress=progress)
    by_sample = {x["sample"]: x for x in rows if x["round"] == r}
    whole = run.path / "states" / f"round_{r}.npz"
    states = _load_npz(whole, len(samples))
    if states is None:
        states = _gather_states([_load_npz(f, extra=("index",)) for f in sorted(part_dir.glob("*.npz"))],
                                len(samples))
        _save_npz(whole, states)
        for f in part_dir.glob("*.npz"):
            f.unlink()
    return [by_sample[s.index] for s in samples], states


def _gather_states(parts: list[dict | None], n: int) -> dict[str, np.ndarray]:
    if any(p is None for p in parts):
        raise SelfCorrectError("a saved state file of this round is unreadable; rerun with overwrite")
    index = np.concatenate([p["index"] for p in parts])
    if sorted(index.tolist()) != list(range(n)):
        raise SelfCorrectError("the saved states of this round do not cover every sample; rerun with overwrite")
    inv = np.argsort(index)
    return {k: np.concatenate([p[k] for p in parts])[inv] for k in STATE_KEYS}


# =============================================================================================
# the study


def run_selfcorrect(model: Model, out_dir: str | Path, config: SelfCorrectConfig | None = None, *,
                    prompts: Sequence | None = None, scorer=None, lexicon: tuple[np.ndarray, np.ndarray] | None = None,
                    overwrite: bool = False, progress: bool = True, **overrides: Any) -> SelfCorrectResult:
    """Run the intrinsic self-correction study of arXiv 2505.11924 on ``model`` into ``out_dir``.

    ``config`` (or the defaults) with keyword ``overrides`` gives the settings; ``prompts`` (a list
    of texts or :class:`steerlab.data.Prompt`) replaces the ``config.prompts`` spec; ``scorer`` (a
    :class:`steerlab.scoring.Scorer`) replaces ``config.scorer``; ``lexicon`` (``(token_ids,
    scores)``) replaces the token lexicon computed with the scorer. Rows are appended to
    ``results.jsonl`` (and states to ``states/``) batch by batch, so rerunning the same call after a
    crash resumes where it stopped. Returns the main tables.
    """
    from ..scoring import get_scorer

    t_start = time.perf_counter()
    cfg = replace(config, **overrides) if config is not None else make_config(**overrides)
    if prompts is not None and cfg.prompts == "rtp":
        cfg = replace(cfg, prompts="custom")
    cfg.validate()
    if not model.chat_template:
        raise SelfCorrectError(f"{model.name} has no chat template: self-correction dialogues need one "
                               "(set model.tok.chat_template to a Jinja template)")
    sc = get_scorer(cfg.scorer) if scorer is None else scorer
    texts, ids = pool(prompts, cfg.prompts)
    pool_tox = np.asarray(sc.toxicity(texts), dtype=np.float64)
    samples = select_samples(texts, ids, pool_tox, cfg)
    outside = len(texts) - len({s.prompt for s in samples})
    if outside < 2:  # checked before anything is written
        raise SelfCorrectError(f"only {outside} prompt(s) of the pool are outside the study: the steering vectors "
                               "need at least 2 (one pair) disjoint from the study prompts; give a larger pool or "
                               "lower n")
    groups = list(dict.fromkeys(s.group for s in samples))
    run_config = {"kind": "selfcorrect", "paper": PAPER, **asdict(cfg), "scorer_key": getattr(sc, "key", str(sc)),
                  "model": model.name, "model_fingerprint": model.fingerprint,
                  "pool_fingerprint": text_id("\n".join(ids)), "n_pool": len(texts),
                  "sample_ids": [s.prompt_id for s in samples],
                  "instructions": instruction_texts([cfg.opening] + sorted({s.instruction for s in samples}))}
    with RunDir(out_dir, run_config, overwrite=overwrite) as run:
        if overwrite:
            for f in (run.path / "states").glob("**/*.npz"):
                f.unlink()
        run.write_record(model_source=model.source, model_fingerprint=model.fingerprint, seed=cfg.seed,
                         n_samples=len(samples), groups={g: sum(s.group == g for s in samples) for g in groups})
        return _study(model, run, cfg, samples, groups, texts, ids, pool_tox, sc, lexicon, progress, t_start)


def _study(model, run: RunDir, cfg, samples, groups, texts, ids, pool_tox, sc, lexicon, progress,
           t_start: float) -> SelfCorrectResult:
    """The rounds, the steering vectors, the analysis and the report of one run directory."""
    from .selfcorrect_report import write_report

    R = cfg.rounds
    before = set(run.record().get("round_seconds") or {})
    responses: list[list[str]] = [[] for _ in samples]
    rows_by_round, st = [], {k: [] for k in STATE_KEYS}
    for r in range(1, R + 1):
        rows, states = _run_round(model, run, cfg, samples, responses, r, sc, progress)
        for i, row in enumerate(rows):
            responses[i].append(row["response"])
        rows_by_round.append(rows)
        for k in STATE_KEYS:
            st[k].append(states[k])
    rec = run.record()
    round_seconds = {str(r): rec[f"round {r}_seconds"] for r in range(1, R + 1) if f"round {r}_seconds" in rec}
    tox = np.array([[rows_by_round[r][i]["toxicity"] for r in range(R)] for i in range(len(samples))])  # [N, R]
    S = {k: np.stack(v) for k, v in st.items()}  # prompt/response [R, N, d], resid(_response) [R, N, L, d]
    sv, steer_info, null = _steering_vectors(model, texts, ids, pool_tox, samples, cfg)
    sv.save(run.path / "steering_vector.safetensors")
    lex_note = "given by the caller"
    if lexicon is None:
        lexicon, lex_note = _lexicon(model, sc, cfg)
    result = analyse(model, run.path, cfg, samples, groups, tox, S, sv, lexicon, rows_by_round, null)
    result.headline.update({"lexicon": lex_note, "steering": steer_info, "round_seconds": round_seconds,
                            "rounds_generated_this_call": sorted(int(r) for r in set(round_seconds) - before),
                            "generation_seconds": round(sum(round_seconds.values()), 1),
                            "seconds_this_call": round(time.perf_counter() - t_start, 1)})
    result.headline = json_safe(result.headline)
    run.write_metrics(result.headline)
    run.write_record(round_seconds=round_seconds, generation_seconds=result.headline["generation_seconds"],
                     seconds_this_call=result.headline["seconds_this_call"], steering=steer_info, lexicon=lex_note)
    write_report(run.path, cfg, model, result)
    return result


def _steering_vectors(model: Model, texts: list[str], ids: list[str], scores: np.ndarray, samples: list[Sample],
                      cfg: SelfCorrectConfig):
    """Per-layer toxicity steering vectors (non-toxic minus toxic) from prompts outside the study, and
    ``n_null`` label-shuffled ones from the same prompts (:func:`steerlab.explain.shifts.shuffled_directions`)."""
    from ..data import contrast_from_scores
    from ..explain.shifts import shuffled_directions
    from ..hooks import capture
    from ..steer.vector import SteeringVector

    used = {s.prompt for s in samples}
    rest = [i for i, t in enumerate(texts) if t not in used]
    note = "prompts outside the study"
    n = min(cfg.steer_pairs, len(rest) // 2)
    cs = contrast_from_scores([texts[i] for i in rest], scores[rest], n=n, source="selfcorrect pool")
    sites = [f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
    sv = SteeringVector.fit(model, cs.desirable, cs.undesirable, sites, method="mean_diff",
                            positions=cfg.steer_positions, scale="unit", chat=cfg.steer_chat,
                            batch_size=cfg.batch_size)
    pos = cfg.steer_positions if cfg.steer_positions in ("last", "mean") else "mean_skip_first"
    caps = capture(model, list(cs.desirable) + list(cs.undesirable), sites, pos, chat=cfg.steer_chat,
                   batch_size=cfg.batch_size)
    acts = torch.stack([caps[s] for s in sites], 1).numpy()  # [2n, L, d]
    null = shuffled_directions(acts, len(cs.desirable), cfg.n_null, seed=derive_seed("null", cfg.seed))
    info = {"pairs": n, "from": note, "positions": cfg.steer_positions, "chat": cfg.steer_chat,
            "null": f"{cfg.n_null} label-shuffled mean-difference vectors ({pos} positions)",
            "toxic_mean_score": float(np.mean(cs.undesirable_scores)),
            "nontoxic_mean_score": float(np.mean(cs.desirable_scores)), "contrast_fingerprint": cs.fingerprint}
    sv.meta.update({"purpose": "selfcorrect toxicity direction (non-toxic minus toxic)", **info})
    return sv, info, null


def _lexicon(model: Model, scorer, cfg: SelfCorrectConfig):
    from ..scoring import ScorerError, token_lexicon

    try:
        lex = token_lexicon(model, scorer, min_len=cfg.lexicon_min_len)
    except ScorerError as e:
        return None, f"skipped: {e}"
    return lex, f"{len(lex[0])} word-like tokens scored with {getattr(scorer, 'name', scorer)}"


def load_result_json(path: str | Path) -> dict:
    """The headline numbers (``metrics.json``) of a finished run directory."""
    return read_json(Path(path) / "metrics.json", "self-correction metrics", SelfCorrectError)
