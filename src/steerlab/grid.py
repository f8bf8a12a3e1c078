"""Candidate grids in batched generations: every setting of one intervention over the same prompts,
the settings that :meth:`~steerlab.interventions.Intervention.grid_groups` lets share a batch
generated together (:meth:`~steerlab.interventions.Intervention.apply_rows`: one setting per row),
and each setting's rows written to its own run directory exactly as :func:`generate_run` writes them.

Why it gives the same rows as one setting at a time: each generate call stacks the *same* prompt
batch (:func:`~steerlab.generation.generation_batches`, so the padding is the same) once per
setting; a row keeps its prompt key, so it draws the same random numbers (:class:`RowSampler`);
each method edits a row with its own setting exactly as :meth:`apply` edits a batch of that setting
alone; and on the CPU a row's forward does not depend on how many rows share the batch (tested:
``tests/test_grid.py`` checks tokens and scores against :func:`generate_run` for every built-in
method). On a GPU, kernels chosen by batch size can differ in the last bits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .errors import SteerlabError
from .generation import (
    GenConfig,
    check_memory,
    generate_batch,
    generate_run,
    generation_batches,
    probe,
    prompt_ids_texts,
    run_identity,
    score_rows,
    token_lengths,
)
from .models.model import Model
from .parallel import SHARDS, group
from .progress import Progress
from .runs import RunDir
from .validate import NonFiniteError, ValidationError

GRID_ROWS = 64
"""Rows per generate call a grid aims at (several settings x one prompt batch): on the default model
on 2 CPU cores, t1.0 generation gives 72 tokens/s at 16 rows, 94 at 32 and 101 at 64."""


def generate_grid(model: Model, prompts: Sequence, out_dirs: Sequence[str | Path], cfg: GenConfig | None,
                  intervention, settings: Sequence[dict], *, scorer=None, max_rows: int | None = None,
                  progress: bool | None = None, desc: str | None = None) -> list[list[dict]]:
    """Generate ``prompts`` under ``intervention`` with each of ``settings`` (apply options) into
    ``out_dirs[i]``; returns each setting's rows, as :func:`generate_run` returns them.

    Each directory gets the ``config.json``, rows and record that ``generate_run(model, prompts,
    out_dirs[i], cfg, scorer=scorer, intervention=intervention, apply_options=settings[i])`` writes
    (its ``generate_seconds`` is its share of the batched calls), so either resumes the other: a
    rerun after a kill reuses the rows written and generates the rest. For every prompt batch the
    settings of one group are generated together, at most ``max_rows`` rows per call (default: the
    larger of ``cfg.batch_size`` and :data:`GRID_ROWS`; fewer when :func:`check_memory` refuses).
    Every setting is validated and every group tried on two tokens before anything is written.
    One progress bar counts the rows of the whole grid (``desc``). In a data-parallel launch
    (``steerlab.parallel.group().size > 1``), or when a directory holds the shards of an interrupted
    launch, it runs one :func:`generate_run` per setting instead (the same rows)."""
    cfg = cfg or GenConfig()
    settings, dirs = [dict(s) for s in settings], [Path(d) for d in out_dirs]
    if not settings or len(dirs) != len(settings) or len(set(dirs)) != len(dirs):
        raise SteerlabError(f"a grid needs one distinct run directory per setting: {len(settings)} settings and "
                            f"{len(set(dirs))} distinct directories of {len(dirs)}")
    ids, texts = prompt_ids_texts(prompts)
    intervention.check(model)
    for s in settings:  # an option the method does not have: named here, before anything is written
        intervention.apply_options(s)
    if group().size > 1 or any((d / SHARDS).exists() for d in dirs):  # shards of an interrupted launch: merged there
        return [generate_run(model, prompts, d, cfg, scorer=scorer, intervention=intervention, apply_options=s,
                             progress=progress) for d, s in zip(dirs, settings)]
    groups = check_groups(intervention.grid_groups(settings), len(settings), intervention.method)
    batches = generation_batches(model, ids, texts, cfg)
    per_call = {tuple(g): settings_per_call(model, len(g), max(len(b) for b in batches) * cfg.k,
                                            max(token_lengths(model, texts, cfg.chat)), cfg, max_rows)
                for g in groups}
    for g in groups:
        try_group(model, intervention, texts[0], ids[0], cfg, [settings[i] for i in g])
    runs = []
    try:
        for d, s in zip(dirs, settings):
            config, record = run_identity(model, ids, cfg, scorer, intervention, s)
            runs.append(RunDir(d, config))
            runs[-1].write_record(**record)
        _fill(model, intervention, runs, settings, groups, per_call, batches, ids, texts, cfg, scorer,
              Progress(len(settings) * len(ids) * cfg.k, desc or f"generate grid: {intervention.method}, "
                       f"{len(settings)} settings", show=progress if progress is not None else True,
                       initial=sum(len(_done(r)) for r in runs)))
        pos = {pid: i for i, pid in enumerate(ids)}
        out = []
        for r in runs:
            rows = r.rows(_key)
            r.write_record(n_rows=len(rows))
            out.append(sorted(rows, key=lambda x: (pos.get(x["prompt_id"], len(pos)), x["sample"])))
        return out
    finally:
        for r in runs:
            r.close()


def _key(row: dict) -> tuple:
    return row["prompt_id"], row["sample"]


def _done(run: RunDir) -> set:
    return {_key(r) for r in run.rows(_key)}


def _fill(model, iv, runs: list[RunDir], settings, groups, per_call, batches, ids, texts, cfg: GenConfig, scorer,
          bar: Progress) -> None:
    """Generate every (setting, batch) whose rows are not all written yet, a group's settings together."""
    done = [_done(r) for r in runs]
    try:
        for g in groups:
            for b in batches:
                keys = [(ids[i], s) for i in b for s in range(cfg.k)]
                todo = [j for j in g if any(k not in done[j] for k in keys)]
                n = per_call[tuple(g)]
                for chunk in (todo[c:c + n] for c in range(0, len(todo), n)):
                    t0 = time.perf_counter()
                    conts = generate_settings(model, iv, [settings[j] for j in chunk], [texts[i] for i in b],
                                              [ids[i] for i in b], cfg)
                    for j, cs in zip(chunk, conts):
                        rows = [{"prompt_id": ids[i], "prompt": texts[i], "sample": s, "continuation": c}
                                for i, per in zip(b, cs) for s, c in enumerate(per)]
                        rows = [r for r in score_rows(rows, scorer) if _key(r) not in done[j]]
                        runs[j].append(rows)
                        done[j].update(_key(r) for r in rows)
                        bar.update(len(rows))
                    share = (time.perf_counter() - t0) / len(chunk)
                    for j in chunk:
                        runs[j].add_seconds("generate_seconds", share)
    finally:
        bar.close()


def generate_settings(model: Model, iv, settings: list[dict], texts: list, keys: list[str],
                      cfg: GenConfig) -> list[list[list[str]]]:
    """``k`` continuations of each text under each setting, in one ``generate`` call (the texts
    stacked once per setting, each row under its own setting): per setting, per text, its ``k``
    continuations. One setting goes through ``iv.generate`` (what :func:`generate_run` calls)."""
    if len(settings) == 1:
        return [iv.generate(model, texts, cfg, keys, **settings[0])]
    rows = torch.arange(len(settings)).repeat_interleave(len(texts) * cfg.k)
    try:
        with iv.apply_rows(model, settings, rows):
            conts = generate_batch(model, list(texts) * len(settings), cfg, list(keys) * len(settings))
    except NonFiniteError as e:
        shown = "; ".join(", ".join(f"{k}={v!r}" for k, v in s.items()) or "defaults" for s in settings)
        raise NonFiniteError(f"{iv.method} intervention with one of the settings [{shown}]: {e}") from None
    n = len(texts)
    return [conts[j * n:(j + 1) * n] for j in range(len(settings))]


def check_groups(groups: list[list[int]], n: int, method: str) -> list[list[int]]:
    """``groups`` when they cover the ``n`` settings once each, else an error naming the method."""
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n)) or any(not g for g in groups):
        raise SteerlabError(f"{method}.grid_groups must list each of the {n} settings in exactly one group, got {groups}")
    return [list(g) for g in groups]


def settings_per_call(model: Model, size: int, rows: int, prompt_len: int, cfg: GenConfig,
                      max_rows: int | None) -> int:
    """How many settings of a group of ``size`` share one generate call of ``rows`` rows each: as many
    as fit in ``max_rows`` rows (at least one) and pass :func:`check_memory`; one setting that does
    not fit is :func:`check_memory`'s error, as in :func:`generate_run`."""
    limit = max_rows if max_rows is not None else max(cfg.batch_size, GRID_ROWS)
    n = max(1, min(size, limit // max(1, rows)))
    while True:
        try:
            check_memory(model, n * rows, prompt_len, cfg.max_new_tokens)
            return n
        except ValidationError:
            if n == 1:
                raise
            n //= 2


def try_group(model: Model, iv, text, key: str, cfg: GenConfig, settings: list[dict]) -> None:
    """Two tokens of one prompt under every setting of a group (one row each), before a grid writes
    anything: :func:`~steerlab.generation.probe` for a group of one."""
    if len(settings) == 1:
        probe(model, iv, text, key, cfg, settings[0])
        return
    small = replace(cfg, max_new_tokens=2, k=1, batch_size=len(settings))
    try:
        generate_settings(model, iv, settings, [text], [key], small)
    except SteerlabError:
        raise
    except (TypeError, ValueError) as e:
        raise SteerlabError(f"the {iv.method} intervention cannot be applied with one of the settings "
                            f"{settings}: {type(e).__name__}: {e}") from None
