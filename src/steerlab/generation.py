"""Batched generation with whatever interventions are active, and resumable generation runs.

Sampling presets (``SAMPLING``): ``greedy``; ``t0.7`` (T=0.7, top_p=0.9: the self-correction
study); ``t1.0`` (T=1.0, top_p=0.95: RealToxicityPrompts / EigenShift evaluation). Sampling
presets disable top-k (transformers' default of 50 would otherwise apply on top of top-p).

Seeds: each batch is seeded from the run seed and the ids of its prompts, and batches are formed
deterministically (prompts sorted by token length, then id), so the same command gives the same
text, and a resumed run regenerates an interrupted batch exactly. Results depend on
``batch_size`` (the sampling noise of a row depends on its batch), so it is part of the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import EmptyInputError, SteerlabError
from .models.model import Model
from .runs import RunDir

SAMPLING: dict[str, dict] = {
    "greedy": {"do_sample": False},
    "t0.7": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
    "t1.0": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0},
}


@dataclass(frozen=True)
class GenConfig:
    """Decoding settings shared by every method of a comparison."""

    max_new_tokens: int = 20
    sampling: str = "greedy"
    k: int = 1  # samples per prompt
    seed: int = 0
    chat: bool = False  # render prompts as user turns with the chat template
    batch_size: int = 16  # rows (prompt x sample) per generate call

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise SteerlabError(f"unknown sampling preset {self.sampling!r}; choose one of {', '.join(SAMPLING)}")
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise SteerlabError(f"k, max_new_tokens and batch_size must be >= 1 (got {self.k}, "
                                f"{self.max_new_tokens}, {self.batch_size})")
        if self.k > 1 and self.sampling == "greedy":
            raise SteerlabError("k > 1 samples per prompt needs a sampling preset (t0.7 or t1.0), not greedy")


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prompt_ids_texts(prompts: Sequence) -> tuple[list[str], list[str]]:
    """Ids and texts of prompts given as strings, dialogues (lists of messages) or Prompt records;
    ids must be unique."""
    if not prompts:
        raise EmptyInputError("no prompts given: need at least one")
    texts = [p if isinstance(p, str | list) else p.text for p in prompts]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise EmptyInputError(f"prompt {empty[0]} is empty ({len(empty)} empty prompt(s)); every prompt needs text")
    ids = [text_id(p if isinstance(p, str) else json.dumps(p, sort_keys=True)) if isinstance(p, str | list)
           else str(p.id) for p in prompts]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            dup = i if i in seen else dup
            seen.add(i)
        raise SteerlabError(f"prompt ids must be unique; {dup!r} appears twice (duplicate prompts?)")
    return ids, texts


def plan_batches(lengths: Sequence[int], keys: Sequence[str], per: int) -> list[list[int]]:
    """Deterministic batches of indices, ``per`` at a time, sorted by length then key (so little
    compute goes to padding and a rerun forms the same batches)."""
    order = sorted(range(len(keys)), key=lambda i: (lengths[i], keys[i]))
    return [order[i:i + per] for i in range(0, len(order), per)]


def generation_batches(ids: list[str], texts: list, cfg: GenConfig) -> list[list[int]]:
    """The batches (prompt indices) a generation run forms: sorted by length, `batch_size // k` prompts each."""
    lengths = [len(t) if isinstance(t, str) else len(json.dumps(t)) for t in texts]
    return plan_batches(lengths, ids, max(1, cfg.batch_size // cfg.k))


def derive_seed(*parts) -> int:
    """A 32-bit seed derived from the run seed and whatever identifies a batch (ids, round, site)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@torch.no_grad()
def generate_batch(model: Model, texts: list[str], cfg: GenConfig, seed: int) -> list[list[str]]:
    """One ``generate`` call: ``k`` continuations of each text (list per text)."""
    enc = model.encode(texts, chat=cfg.chat)
    torch.manual_seed(seed)
    out = model.hf.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.k, pad_token_id=model.pad_id, **SAMPLING[cfg.sampling],
        **({} if cfg.sampling != "greedy" else {"temperature": None, "top_p": None, "top_k": None}),
    )
    new = model.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [new[i * cfg.k:(i + 1) * cfg.k] for i in range(len(texts))]


def generate(model: Model, prompts: Sequence, cfg: GenConfig | None = None, progress: bool | None = None,
             **kw) -> list[list[str]]:
    """Continuations of each prompt (``k`` per prompt), in prompt order. With ``chat=True`` a prompt
    may also be a whole dialogue (a list of ``{"role", "content"}`` messages). Any active
    :func:`steerlab.edit` applies. Keyword arguments override fields of ``cfg``."""
    cfg = GenConfig(**{**(asdict(cfg) if cfg else {}), **kw})
    ids, texts = prompt_ids_texts(prompts)
    out: list[list[str] | None] = [None] * len(texts)
    batches = generation_batches(ids, texts, cfg)
    show = progress if progress is not None else len(batches) >= 4
    for b in tqdm(batches, desc="generate", disable=not show, leave=False):
        for i, conts in zip(b, generate_batch(model, [texts[i] for i in b], cfg, derive_seed(cfg.seed, *[ids[i] for i in b]))):
            out[i] = conts
    return out  # type: ignore[return-value]


def generate_run(model: Model, prompts: Sequence, out_dir: str | Path, cfg: GenConfig | None = None, *,
                 scorer=None, intervention=None, apply_options: dict | None = None,
                 extra_config: dict | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> list[dict]:
    """Generate into a run directory, append-only and resumable (:meth:`RunDir.loop`).

    Each row: ``prompt_id, prompt, sample, continuation`` (+ ``toxicity`` and the scorer's
    attributes when a scorer is given, scored per batch as rows are produced). Killing the process
    and rerunning the same call continues where it stopped; the final rows equal an uninterrupted
    run's. Any active :func:`steerlab.edit` applies; ``intervention`` (a
    :class:`steerlab.interventions.Intervention`, checked against the model first) generates every
    batch through its :meth:`~steerlab.interventions.Intervention.generate` with ``apply_options``
    (e.g. ``{"alpha": 0.3}``), and is recorded in the config. Returns all rows in prompt order,
    then sample order.
    """
    cfg = cfg or GenConfig()
    ids, texts = prompt_ids_texts(prompts)
    opts = dict(apply_options or {})
    config = {"kind": "generate", "model": model.name, "model_fingerprint": model.fingerprint, **asdict(cfg),
              "scorer": getattr(scorer, "name", None), "prompts_fingerprint": text_id("\n".join(ids)),
              "n_prompts": len(ids), **(extra_config or {})}
    if intervention is not None:
        intervention.check(model)
        config["intervention"] = {"describe": intervention.describe(), "apply": opts,
                                  **{k: intervention.meta.get(k) for k in ("data_fingerprint", "model_fingerprint")}}
    with RunDir(out_dir, config, overwrite=overwrite) as run:
        run.write_record(model_source=model.source, model_fingerprint=model.fingerprint, seed=cfg.seed,
                         n_rows_expected=len(ids) * cfg.k)

        def work(batch: Sequence[int], seed: int) -> list[dict]:
            chunk = [texts[i] for i in batch]
            conts = (generate_batch(model, chunk, cfg, seed) if intervention is None
                     else intervention.generate(model, chunk, cfg, seed, **opts))
            rows = [{"prompt_id": ids[i], "prompt": texts[i], "sample": s, "continuation": c}
                    for i, cs in zip(batch, conts) for s, c in enumerate(cs)]
            return score_rows(rows, scorer)

        rows = run.loop(generation_batches(ids, texts, cfg), work, keys=lambda i: [(ids[i], s) for s in range(cfg.k)],
                        row_key=lambda r: (r["prompt_id"], r["sample"]),
                        seed=lambda b: derive_seed(cfg.seed, *[ids[i] for i in b]), desc="generate",
                        progress=progress)
        run.write_record(n_rows=len(rows))
    pos = {pid: i for i, pid in enumerate(ids)}
    return sorted(rows, key=lambda r: (pos.get(r["prompt_id"], len(pos)), r["sample"]))


def score_rows(rows: list[dict], scorer, field: str = "continuation") -> list[dict]:
    """Add ``toxicity`` (the scorer's main attribute) and ``scores`` (every attribute) to rows, in
    one scorer call; rows are returned unchanged without a scorer."""
    if scorer is None or not rows:
        return rows
    scores = scorer.score([r[field] for r in rows])
    for j, r in enumerate(rows):
        r["toxicity"] = float(scores[scorer.attributes[0]][j])
        r["scores"] = {a: float(v[j]) for a, v in scores.items()}
    return rows
