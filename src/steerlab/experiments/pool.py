"""The benchmark's pool of the model's own continuations of its training prompts, shared by every
method that learns from the model's generations (EigenShift, AurA).

The pool is generated once per (model fingerprint, prompt-set fingerprint, seed, decoding) into the
run directory's ``pool/`` (a run directory of its own: ``config.json`` holds those keys, so a pool of
another model, prompt set or decoding is an error naming what differs, never reused), resumable
batch by batch (:meth:`steerlab.runs.RunDir.loop`). While each batch is generated
:func:`steerlab.record` keeps ``final`` at the last position of every call, so ``states[:, j]`` is the
state that produced generated token ``j`` (:func:`steerlab.steer.toxic_states.generate_with_states`);
each batch's generated ids and states go to ``pool/states/NNNNN.safetensors`` (written before its
rows), its rows (prompt, sample, continuation, the benchmark scorer's toxicity of the continuation,
batch and row) to ``pool/results.jsonl``. A killed benchmark resumes with the batches not yet
written; a finished pool is read back, not generated again.

Size (what EigenShift's recipe used before the pool): quick, the 128 training prompts with the most
toxic training scores x 8 samples of 16 new tokens; other presets, every training prompt x 8 x 20;
t1.0 sampling, the benchmark's seed, 16 rows per generate call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import SteerlabError
from ..generation import GenConfig, derive_seed, generation_batches, prompt_ids_texts, text_id
from ..models.model import Model
from ..profile import stage
from ..scoring.registry import scorer_identity

POOL_K = 8
POOL_BATCH = 64  # rows per generate call: the fastest on 2 CPU cores (benchmarks/bench_batch.py)


class PoolError(SteerlabError):
    """A pool that cannot be used: missing state files, or a pool of other settings."""


def pool_spec(train: list[str], scores: list[float], preset: str, seed: int) -> tuple[list[str], GenConfig]:
    """The prompts (most toxic training score first) and decoding of the pool for ``preset``."""
    quick = preset == "quick"
    order = sorted(range(len(train)), key=lambda i: -scores[i])
    prompts = [train[i] for i in (order[:128] if quick else order)]
    return prompts, GenConfig(max_new_tokens=16 if quick else 20, sampling="t1.0", k=POOL_K, seed=seed,
                              batch_size=POOL_BATCH)


@dataclass
class Pool:
    """The pool's rows (prompt order, then sample) and where its states are. :meth:`batches` reads
    back, batch by batch in plan order, ``(new ids [n, T], states [n, T, d], continuations, scores)``."""

    rows: list[dict]
    path: Path
    cfg: GenConfig
    prompt_ids: list[str]
    n_batches: int

    def batches(self, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[float]]]:
        from safetensors.torch import load_file

        by: dict[int, list[dict]] = {}
        for r in self.rows:
            by.setdefault(r["batch"], []).append(r)
        for j in range(self.n_batches):
            f = self.path / "states" / f"{j:05d}.safetensors"
            if not f.exists():
                raise PoolError(f"the pool's states of batch {j} ({f}) are missing; remove {self.path} and rerun "
                                f"the benchmark to generate the pool again")
            t = load_file(str(f), device=str(device) if device is not None else "cpu")
            rows = sorted(by.get(j, []), key=lambda r: r["row"])
            if len(rows) != t["ids"].shape[0]:
                raise PoolError(f"the pool's batch {j} has {len(rows)} rows in results.jsonl and "
                                f"{t['ids'].shape[0]} in {f}; remove {self.path} and rerun")
            yield t["ids"], t["states"], [r["continuation"] for r in rows], [r["toxicity"] for r in rows]

    @property
    def fingerprint(self) -> str:
        """What the states are collected from: the prompts and the decoding (as ``collect_states``)."""
        from ..steer.toxic_states import states_fingerprint

        return states_fingerprint(self.prompt_ids, self.cfg)

    def texts(self, threshold: float = 0.5) -> tuple[list[str], list[str]]:
        """(non-toxic, toxic) continuations by their score (``>= threshold``: toxic); blank ones left out."""
        keep = [r for r in self.rows if r["continuation"].strip()]
        return ([r["continuation"] for r in keep if r["toxicity"] < threshold],
                [r["continuation"] for r in keep if r["toxicity"] >= threshold])


def build_pool(model: Model, path: str | Path, prompts: list[str], cfg: GenConfig, scorer,
               progress: bool | None = None) -> Pool:
    """Generate (or read back, or finish) the pool in ``path`` (see the module docstring)."""
    from ..parallel import run_loop
    from ..runs import write_atomic
    from ..steer.toxic_states import generate_with_states

    path = Path(path)
    ids, texts = prompt_ids_texts(prompts)
    batches = generation_batches(model, ids, texts, cfg)
    number = {tuple(b): j for j, b in enumerate(batches)}
    config = {"kind": "pool", "model": model.name, "model_fingerprint": model.fingerprint, **asdict(cfg),
              **scorer_identity(scorer), "prompts_fingerprint": text_id("\n".join(ids)), "n_prompts": len(ids),
              "states": "final"}

    def work(batch, seed: int) -> list[dict]:
        from safetensors.torch import save

        j = number[tuple(batch)]
        new, states = generate_with_states(model, [texts[i] for i in batch], cfg, [ids[i] for i in batch])
        conts = model.tok.batch_decode(new, skip_special_tokens=True)
        with stage("scoring"):
            scores = [float(x) for x in scorer.toxicity(conts)]
        write_atomic(path / "states" / f"{j:05d}.safetensors",
                     save({"ids": new.cpu().contiguous(), "states": states.float().cpu().contiguous()}))
        return [{"prompt_id": ids[i], "prompt": texts[i], "sample": s, "continuation": conts[r],
                 "toxicity": scores[r], "batch": j, "row": r}
                for r, (i, s) in enumerate((i, s) for i in batch for s in range(cfg.k))]

    rows = run_loop(path, config, batches, work, keys=lambda i: [(ids[i], s) for s in range(cfg.k)],
                    row_key=lambda r: (r["prompt_id"], r["sample"]),
                    seed=lambda b: derive_seed(cfg.seed, *[ids[i] for i in b]), desc="generate",
                    progress=progress, record={"model_source": model.source, "seed": cfg.seed,
                                               "n_rows_expected": len(ids) * cfg.k})
    pos = {pid: i for i, pid in enumerate(ids)}
    rows = sorted(rows, key=lambda r: (pos.get(r["prompt_id"], len(pos)), r["sample"]))
    return Pool(rows, path, cfg, ids, len(batches))


def pool_states(model: Model, pool: Pool, scorer, threshold: float = 0.5, saliency: str = "auto",
                positions: str = "first", min_states: int = 8):
    """EigenShift's toxic and non-toxic ``final`` states selected from the pool, without generating:
    the selection of :func:`steerlab.steer.toxic_states.collect_states` (which gives the same states
    when it generates the same prompts with the same decoding) run on the pooled batches."""
    from ..steer.toxic_states import StateSelector, check_counts

    sel = StateSelector(model, scorer, threshold, saliency, positions)
    for new, states, conts, scores in pool.batches(model.device):
        sel.add(new, states, conts, scores)
    out = sel.result(pool.cfg.seed, pool.fingerprint)
    check_counts(out, min_states, len(pool.prompt_ids), pool.cfg)
    return out
