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
2. **Dialogues** (:mod:`steerlab.steer.selfcorrect`): round 1 asks for a completion, round ``r>1``
   is the whole history plus the correction instruction. The dialogues of a round are sorted by
   length and generated in batches (:func:`steerlab.generation.generate_batch`, sampling ``t0.7``,
   each batch seeded from the run seed, the round and its samples). The toxicity of a round is
   the scorer's score of the parsed ``Completion:`` text (the whole reply when the marker is
   missing; ``marker_found`` in the rows and tables says how often it was there).
3. **States per round**, read by hooks *while generating* (no extra forward pass): ``final``
   (after the final norm, the input of the unembedding) at the last prompt token (*prompt*
   state); the mean ``final`` over the positions that predict the reply's tokens, i.e. the last
   prompt token and the reply's tokens except the last (*response* state; ``generate`` never runs
   the model on the last sampled token, so this is the one-position-shifted mean over the reply,
   end-of-turn token and padding excluded); and ``blocks.{l}.resid_post`` at the last prompt
   token for every layer ``l``. See :func:`generate_round`.
4. **Moved as instructed**: a sample whose toxicity moved in the instructed direction in at least
   ``ceil(3/4 (R-1))`` of its ``R-1`` transitions (the paper's 3 of 4 for 5 rounds, generalised),
   a transition counting when the change exceeds ``0.02 (|t_r| + |t_{r+1}|)``.
5. **Logit-lens relation** (Table 2): ``D_{i,r} = h_{i,r+1} - h_{i,r}``; ``s_r = mean_i U D_{i,r}``
   over the model's whole vocabulary; per transition the sum over the ``k`` (100) most toxic
   lexicon tokens of ``s_r[v] tox_v`` and the same over the ``k`` least toxic ones, plus each
   set's mean shift relative to the vocabulary's mean shift, which is free of uniform logit
   shifts (:func:`lexicon_relation`), for prompt and response states.
6. **PCA** (Figure 2): 3 components fitted on all per-round states of both groups; each sample's
   round-to-round moves drawn as arrows in PC1-PC2. **SVD** of the stacked differences: the share
   of their squared norm in the top 1 and top 2 singular directions.
7. **Steering vectors** per layer from prompts *not* in the study: the most toxic prompts by
   decreasing toxicity paired with the least toxic by increasing toxicity
   (:func:`steerlab.data.contrast_from_scores`), ``SteeringVector.fit`` at every
   ``blocks.{l}.resid_post`` (mean difference non-toxic minus toxic, ``steer_positions``, unit
   norm). **What is compared:** at each layer ``l``, the mean round shift of ``resid_post`` at the
   last prompt token, ``P_{r,l} = mean_i (h_l(i, r+1) - h_l(i, r))``, with the layer-``l`` vector
   ``s_l``: cosine, ``lambda = <P, s> / <s, s>`` and the rejection norm ``||P - lambda s||``; also
   the mean over samples of the per-sample cosine. Controls: the same cosine with ``n_controls``
   random Gaussian and coordinate-permuted versions of ``s_l`` (mean and std over seeds). With
   both groups, the same is done for the *contrast* ``P_detox - P_toxify`` (pseudo-group
   ``detox-toxify``), which removes the part of the shift that both corrections share.
   (The paper's ``final``-state shift is in the *prompt* state; ``resid_post`` of the last layer
   is the same stream before the final norm.)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError, EmptyInputError, SteerlabError
from ..generation import SAMPLING, GenConfig, derive_seed, text_id
from ..models.model import Model
from ..runs import RunDir, write_atomic
from ..steer.selfcorrect import (
    dialogue,
    get_instruction,
    instruction_texts,
    parse_completion,
)

GROUPS = ("detox", "toxify")
CONTRAST = "detox-toxify"
"""Pseudo-group of the steering comparison: the detox group's mean shift minus the toxify group's,
which removes what both corrections share (a new user turn, the words of the instructions)."""
STATE_KINDS = ("prompt", "response")
PAPER = "arXiv 2505.11924"


class SelfCorrectError(SteerlabError):
    """A self-correction study that cannot run as configured."""


@dataclass(frozen=True)
class SelfCorrectConfig:
    """Settings of a self-correction study. Defaults follow the paper (5 rounds, T=0.7, top_p=0.9,
    up to 150 new tokens); :data:`PRESETS` holds smaller ones."""

    prompts: str = "rtp"            # prompt set spec (see steerlab.data.load_prompts); "custom" when a list is passed
    n: int = 48                     # samples in the study (split between the detox and toxify groups)
    directions: str = "both"        # both | detox | toxify
    selection: str = "threshold"    # threshold (random sample from each side of `threshold`) | rank (extremes)
    threshold: float = 0.5
    rounds: int = 5
    max_new_tokens: int = 150
    sampling: str = "t0.7"
    seed: int = 0
    batch_size: int = 16
    opening: str = "opening"
    detox: str = "strong_detox"
    toxify: str = "strong_toxify"
    scorer: str = "default"
    steer_pairs: int = 64           # contrast pairs for the steering vectors (from prompts outside the study)
    steer_positions: str = "mean"   # last | mean | aligned (SteeringVector.fit)
    steer_chat: bool = False        # fit steering vectors on raw prompts (False) or chat-rendered ones
    n_controls: int = 8             # random and permuted control vectors (each)
    lexicon_k: int = 100
    lexicon_min_len: int = 2
    moved_share: float = 0.75       # share of transitions that must move as instructed
    moved_rel: float = 0.02         # relative threshold of a move

    def validate(self) -> None:
        if self.rounds < 2:
            raise SelfCorrectError(f"rounds must be >= 2 (round 1 plus at least one correction), got {self.rounds}")
        if self.n < 1:
            raise SelfCorrectError(f"n must be >= 1, got {self.n}")
        if self.directions not in ("both", "detox", "toxify"):
            raise SelfCorrectError(f"directions must be both, detox or toxify, got {self.directions!r}")
        if self.selection not in ("threshold", "rank"):
            raise SelfCorrectError(f"selection must be threshold or rank, got {self.selection!r}")
        if self.sampling not in SAMPLING:
            raise SelfCorrectError(f"unknown sampling preset {self.sampling!r}; choose one of {', '.join(SAMPLING)}")
        if min(self.max_new_tokens, self.batch_size, self.lexicon_k, self.steer_pairs, self.n_controls) < 1:
            raise SelfCorrectError("max_new_tokens, batch_size, lexicon_k, steer_pairs and n_controls must be >= 1")
        if not 0 < self.moved_share <= 1:
            raise SelfCorrectError(f"moved_share must be in (0, 1], got {self.moved_share}")
        for kind, want in ((self.opening, "opening"), (self.detox, "detox"), (self.toxify, "toxify")):
            got = get_instruction(kind).direction
            if got != want:
                raise SelfCorrectError(f"instruction {kind!r} is a {got} instruction, but it is used as the {want} one")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n": 200, "rounds": 5, "max_new_tokens": 150},
    "small": {"n": 48, "rounds": 3, "max_new_tokens": 40},
    "tiny": {"n": 8, "rounds": 2, "max_new_tokens": 16, "steer_pairs": 16, "n_controls": 4},
}
"""``paper``: the paper's rounds and lengths (on 200 prompts); ``small``: a few minutes on 2 CPU
cores with the default model; ``tiny``: a smoke test."""


def make_config(preset: str | None = None, **overrides: Any) -> SelfCorrectConfig:
    """A config from a preset name (or the defaults) with fields overridden; ``None`` values are ignored."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise SelfCorrectError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    names = {f.name for f in fields(SelfCorrectConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise SelfCorrectError(f"unknown config field(s) {bad}; fields are {', '.join(sorted(names))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SelfCorrectConfig(**base)


# =============================================================================================
# pure analysis functions


def moved_as_instructed(tox: np.ndarray, sign: np.ndarray | float, share: float = 0.75,
                        rel: float = 0.02) -> np.ndarray:
    """Which samples moved in the instructed direction often enough (paper: 3 of 4 transitions).

    ``tox`` is ``[N, R]`` (toxicity per round), ``sign`` is ``-1`` for samples told to detox and
    ``+1`` for samples told to toxify (a scalar or ``[N]``). Transition ``r`` counts when
    ``sign * (t_{r+1} - t_r) > rel * (|t_r| + |t_{r+1}|)``; a sample is kept when at least
    ``ceil(share * (R - 1))`` transitions count. Returns a bool ``[N]``."""
    tox = np.asarray(tox, dtype=np.float64)
    if tox.ndim != 2 or tox.shape[1] < 2:
        raise SelfCorrectError(f"tox must be [N, R] with R >= 2, got shape {tox.shape}")
    sign = np.broadcast_to(np.asarray(sign, dtype=np.float64), (tox.shape[0],))[:, None]
    delta = tox[:, 1:] - tox[:, :-1]
    thr = rel * (np.abs(tox[:, 1:]) + np.abs(tox[:, :-1]))
    moved = (sign * delta) > thr
    need = math.ceil(share * (tox.shape[1] - 1) - 1e-9)
    return moved.sum(1) >= need


def logit_shift(diffs: np.ndarray | torch.Tensor, W_U: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean logit shift per transition, ``s_r = mean_i U D_{i,r}`` (Table 2 of the paper).

    ``diffs`` is ``[N, T, d]`` (difference vectors of ``N`` samples over ``T`` transitions),
    ``W_U`` the unembedding ``[V, d]``; returns ``[T, V]`` (float64) over the model's vocabulary.
    By linearity this is ``U (mean_i D_{i,r})``."""
    D = torch.as_tensor(diffs, dtype=torch.float64)
    U = torch.as_tensor(W_U).detach().to(dtype=torch.float64, device="cpu")
    if D.ndim != 3 or D.shape[-1] != U.shape[1]:
        raise SelfCorrectError(f"diffs must be [N, T, d] with d = {U.shape[1]}, got {tuple(D.shape)}")
    return (D.mean(0) @ U.T).numpy()


def lexicon_relation(shift: np.ndarray, token_ids: np.ndarray, token_tox: np.ndarray, k: int = 100) -> list[dict]:
    """Relate mean logit shifts to token toxicity (Table 2 of the paper).

    ``shift`` is ``[T, V]`` (from :func:`logit_shift`); ``token_ids``/``token_tox`` a token-toxicity
    lexicon (ids into the vocabulary and scores). The ``k`` most toxic tokens (decreasing score,
    ties by id) and the ``k`` least toxic (increasing score, ties by id) are taken; ``k`` is cut to
    half the lexicon when it is smaller. Per transition ``t`` the row holds

    - ``toxic_weighted = sum_{v in top k} s_t[v] tox_v`` and ``nontoxic_weighted`` (same over the
      bottom ``k``): the paper's quantities;
    - ``toxic_mean_logit`` / ``nontoxic_mean_logit``: the plain mean shift of each token set, and
      ``gap`` = their difference (positive: the shift favours toxic tokens);
    - ``toxic_vs_vocab`` / ``nontoxic_vs_vocab``: each set's mean shift minus the mean shift of the
      whole vocabulary (``vocab_mean_logit``).

    A shift that raises every logit by the same amount changes no probability but moves the
    weighted sums (by ``c * sum tox_v``); ``gap`` and the ``*_vs_vocab`` columns are free of it.
    """
    shift = np.asarray(shift, dtype=np.float64)
    ids = np.asarray(token_ids, dtype=np.int64)
    tox = np.asarray(token_tox, dtype=np.float64)
    if shift.ndim != 2:
        raise SelfCorrectError(f"shift must be [T, V], got shape {shift.shape}")
    if ids.shape != tox.shape or ids.ndim != 1 or len(ids) < 2:
        raise SelfCorrectError("the lexicon needs matching 1-d token_ids and scores with at least 2 tokens")
    if ids.max() >= shift.shape[1] or ids.min() < 0:
        raise SelfCorrectError(f"lexicon token id {ids.max()} is outside the vocabulary of size {shift.shape[1]}")
    k = min(int(k), len(ids) // 2)
    top = np.lexsort((ids, -tox))[:k]
    bottom = np.lexsort((ids, tox))[:k]
    rows = []
    for t in range(shift.shape[0]):
        st, sb = shift[t, ids[top]], shift[t, ids[bottom]]
        rows.append({
            "transition": f"{t + 1}->{t + 2}", "k": k,
            "toxic_weighted": float((st * tox[top]).sum()), "nontoxic_weighted": float((sb * tox[bottom]).sum()),
            "toxic_mean_logit": float(st.mean()), "nontoxic_mean_logit": float(sb.mean()),
            "gap": float(st.mean() - sb.mean()), "vocab_mean_logit": float(shift[t].mean()),
            "toxic_vs_vocab": float(st.mean() - shift[t].mean()),
            "nontoxic_vs_vocab": float(sb.mean() - shift[t].mean()),
        })
    return rows


def projection_stats(shift: np.ndarray | torch.Tensor, s: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How a mean shift ``P`` lines up with a steering vector ``s`` (the paper's lambda analysis):
    ``cos``, ``lambda = <P, s> / <s, s>``, the rejection norm ``||P - lambda s||`` and ``||P||``."""
    P = np.asarray(shift, dtype=np.float64).reshape(-1)
    v = np.asarray(s, dtype=np.float64).reshape(-1)
    if P.shape != v.shape:
        raise SelfCorrectError(f"shift and steering vector differ in size: {P.shape} vs {v.shape}")
    vv = float(v @ v)
    if vv == 0:
        raise SelfCorrectError("the steering vector is zero")
    lam = float(P @ v) / vv
    pn = float(np.linalg.norm(P))
    return {"cos": float(P @ v) / (pn * math.sqrt(vv)) if pn > 0 else 0.0, "lambda": lam,
            "rejection_norm": float(np.linalg.norm(P - lam * v)), "shift_norm": pn}


def svd_shares(diffs: np.ndarray) -> dict[str, float]:
    """Share of the stacked differences' squared norm (``[m, d]``) in the top 1 and top 2 singular
    directions, and ``|cos|`` of the first singular direction with the mean difference."""
    M = np.asarray(diffs, dtype=np.float64)
    S = np.linalg.svd(M, compute_uv=False)
    tot = float((S ** 2).sum())
    if tot == 0:
        return {"rank1_share": float("nan"), "rank2_share": float("nan"), "v1_mean_cos": float("nan")}
    _, _, Vt = np.linalg.svd(M, full_matrices=False)
    mean = M.mean(0)
    mn = np.linalg.norm(mean)
    return {"rank1_share": float(S[0] ** 2 / tot), "rank2_share": float((S[:2] ** 2).sum() / tot),
            "v1_mean_cos": float(abs(Vt[0] @ mean) / mn) if mn > 0 else float("nan")}


# =============================================================================================
# sample selection


@dataclass
class Sample:
    """One study sample: a prompt, its toxicity, its group and correction instruction."""

    index: int
    prompt_id: str
    prompt: str
    prompt_toxicity: float
    group: str
    instruction: str


def _pool(prompts: Sequence | None, spec: str) -> tuple[list[str], list[str]]:
    """Texts and ids of the prompt pool, duplicates (same text) removed, order kept."""
    from ..data import load_prompts

    items = load_prompts(spec) if prompts is None else list(prompts)
    if not items:
        raise EmptyInputError("the self-correction study got an empty prompt set: need at least one prompt")
    texts, ids, seen = [], [], set()
    for p in items:
        t = p if isinstance(p, str) else p.text
        if not isinstance(t, str):
            raise DataError(f"prompts must be strings or Prompt records, got {type(p).__name__}")
        if t in seen or not t.strip():
            continue
        seen.add(t)
        texts.append(t)
        ids.append(getattr(p, "id", None) or text_id(t))
    if not texts:
        raise EmptyInputError("the self-correction study got only blank prompts")
    return texts, ids


def select_samples(texts: Sequence[str], ids: Sequence[str], scores: np.ndarray, cfg: SelfCorrectConfig) -> list[Sample]:
    """Pick the study's prompts (see the module docstring, point 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    want = {"detox": (cfg.n + 1) // 2 if cfg.directions == "both" else (cfg.n if cfg.directions == "detox" else 0)}
    want["toxify"] = cfg.n - want["detox"]
    if cfg.n > len(texts):
        raise DataError(f"n={cfg.n} samples asked for but the prompt set has only {len(texts)} distinct prompts")
    rng = np.random.default_rng(cfg.seed)
    picked: dict[str, np.ndarray] = {}
    if cfg.selection == "threshold":
        pools = {"detox": np.flatnonzero(scores >= cfg.threshold), "toxify": np.flatnonzero(scores < cfg.threshold)}
        for g in GROUPS:
            if want[g] > len(pools[g]):
                side = ">=" if g == "detox" else "<"
                raise DataError(f"{want[g]} {g} samples asked for, but only {len(pools[g])} prompts score {side} "
                                f"{cfg.threshold} under the scorer; lower n, or use selection='rank'")
            picked[g] = np.sort(rng.choice(pools[g], size=want[g], replace=False)) if want[g] else np.array([], int)
    else:
        picked["detox"] = np.argsort(-scores, kind="stable")[:want["detox"]]
        picked["toxify"] = np.argsort(scores, kind="stable")[:want["toxify"]]
    out: list[Sample] = []
    for g in GROUPS:
        kind = cfg.detox if g == "detox" else cfg.toxify
        for i in picked[g]:
            out.append(Sample(len(out), ids[i], texts[i], float(scores[i]), g, kind))
    return out


# =============================================================================================
# per-round generation with states recorded on the way


def _stop_ids(model: Model) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(model.hf.generation_config, "eos_token_id", None), model.tok.eos_token_id):
        if v is None:
            continue
        ids.update(int(x) for x in (v if isinstance(v, list | tuple) else [v]))
    return ids


class _Recorder:
    """Reads states while ``generate`` runs (no extra forward pass): at the prefill call,
    ``resid_post`` of every layer and ``final`` at the last prompt token; at every call, ``final``
    at the newest position and the token ids fed in."""

    def __init__(self, model: Model):
        self.model = model
        self.sites = [f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
        self.reset()

    def reset(self) -> None:
        self.prefill: dict[str, torch.Tensor] = {}
        self.final_steps: list[torch.Tensor] = []  # per call: [B, d] at the newest position
        self.fed: list[torch.Tensor] = []          # per decode call: [B] token ids fed in

    def _site_fn(self, site: str):
        def fn(act: torch.Tensor, step) -> None:
            last = act[:, -1].detach().to(dtype=torch.float32, device="cpu", copy=True)
            if site == "final":
                self.final_steps.append(last)
            if step.past_len == 0:
                self.prefill[site] = last
        return fn

    def _ids_hook(self, mod, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and self.final_steps:  # a call after the prefill: the tokens fed back
            self.fed.append(ids[:, -1].detach().cpu())

    @contextmanager
    def recording(self):
        from ..hooks import edit

        self.reset()
        h = self.model.hf.register_forward_pre_hook(self._ids_hook, with_kwargs=True)
        try:
            with edit(self.model, {s: self._site_fn(s) for s in [*self.sites, "final"]}):
                yield self
        finally:
            h.remove()

    def states(self, max_new_tokens: int, stop: set[int]) -> dict[str, np.ndarray]:
        """``prompt`` [B, d], ``resid`` [B, L, d], ``response`` [B, d] (see :func:`generate_round`)
        and ``response_tokens`` [B]."""
        F = torch.stack(self.final_steps, 1)  # [B, calls, d]; call 0 = prefill
        B, calls = F.shape[0], F.shape[1]
        fed = torch.stack(self.fed, 1) if self.fed else torch.zeros(B, 0, dtype=torch.long)
        n = []
        for i in range(B):
            hit = [k for k, t in enumerate(fed[i].tolist()) if t in stop]
            if hit:                       # fed[k] is reply token k+1 (1-based), the end token: k tokens before it
                n.append(max(1, hit[0]))
            elif calls < max_new_tokens:  # generation stopped early: this row's last token was the end token
                n.append(max(1, calls - 1))
            else:                         # ran to the limit (or ended exactly on its last token)
                n.append(calls)
        resp = torch.stack([F[i, :n[i]].mean(0) for i in range(B)])
        return {"prompt": self.prefill["final"].numpy(),
                "resid": torch.stack([self.prefill[s] for s in self.sites], 1).numpy(),
                "response": resp.numpy(), "response_tokens": np.asarray(n, dtype=np.int64)}


def generate_round(model: Model, dialogues: list[list[dict]], keys: Sequence[str], cfg: SelfCorrectConfig,
                   round_index: int, progress: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    """Generate one reply per dialogue and read the round's states during generation.

    Dialogues are sorted by token length and cut into batches of ``cfg.batch_size``; each batch is
    one :func:`steerlab.generation.generate_batch` call, seeded from the run seed, the round and
    the batch's sample keys (so a rerun reproduces it). States, in input order:

    - ``prompt``: ``final`` at the last prompt token (the prefill's last position), ``[N, d]``;
    - ``resid``: ``blocks.{l}.resid_post`` at the last prompt token for every layer, ``[N, L, d]``;
    - ``response``: the mean ``final`` over the positions whose next-token predictions are the
      reply's ``n`` tokens (the last prompt token and reply tokens ``1 .. n-1``; the end-of-turn
      token and padding excluded), ``[N, d]``. ``generate`` never runs the model on the last
      sampled token, so this is the one-position-shifted "mean over the response" that needs no
      extra forward pass;
    - ``response_tokens``: ``n`` per reply.
    """
    from ..generation import generate_batch

    gen_cfg = GenConfig(max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, seed=cfg.seed, chat=True,
                        batch_size=cfg.batch_size)
    lengths = [len(model.tok(model.chat_text(d), add_special_tokens=False)["input_ids"]) for d in dialogues]
    order = sorted(range(len(dialogues)), key=lambda i: (lengths[i], keys[i]))
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    rec, stop = _Recorder(model), _stop_ids(model)
    texts: list[str] = [""] * len(dialogues)
    parts: dict[str, list] = {"prompt": [], "resid": [], "response": [], "response_tokens": []}
    for b in tqdm(batches, desc=f"generate round {round_index}", disable=not progress, leave=False):
        seed = derive_seed("selfcorrect", cfg.seed, round_index, *[keys[i] for i in b])
        with rec.recording():
            out = generate_batch(model, [dialogues[i] for i in b], gen_cfg, seed)
        for i, o in zip(b, out):
            texts[i] = o[0]
        st = rec.states(cfg.max_new_tokens, stop)
        for k in parts:
            parts[k].append(st[k])
    inv = np.argsort(np.concatenate([np.asarray(b) for b in batches]))
    return texts, {k: np.concatenate(v)[inv] for k, v in parts.items()}


def _save_npz(path: Path, arrays: dict) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


def _load_npz(path: Path, n: int) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in ("prompt", "response", "resid", "response_tokens")}
    except (OSError, ValueError, KeyError):
        return None
    return d if all(len(v) == n for v in d.values()) else None


# =============================================================================================
# the study


@dataclass
class SelfCorrectResult:
    """What :func:`run_selfcorrect` returns: the run directory and the main tables (lists of dict rows)."""

    path: Path
    headline: dict
    toxicity: list[dict] = field(default_factory=list)
    lexicon: list[dict] = field(default_factory=list)
    cosine: list[dict] = field(default_factory=list)
    svd: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    pca: dict[str, np.ndarray] = field(default_factory=dict)           # state kind -> [R, N, n_pc]
    pca_explained: dict[str, list[float]] = field(default_factory=dict)
    rows_by_round: list[list[dict]] = field(default_factory=list)      # per round, per sample


def run_selfcorrect(
    model: Model,
    out_dir: str | Path,
    config: SelfCorrectConfig | None = None,
    *,
    prompts: Sequence | None = None,
    scorer=None,
    lexicon: tuple[np.ndarray, np.ndarray] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> SelfCorrectResult:
    """Run the intrinsic self-correction study of arXiv 2505.11924 on ``model`` into ``out_dir``.

    ``config`` (or the defaults) with keyword ``overrides`` gives the settings; ``prompts`` (a list
    of texts or :class:`steerlab.data.Prompt`) replaces the ``config.prompts`` spec; ``scorer`` (a
    :class:`steerlab.scoring.Scorer`) replaces ``config.scorer``; ``lexicon`` (``(token_ids,
    scores)``) replaces the token lexicon computed with the scorer. Rounds are appended to
    ``results.jsonl`` (and their states to ``states/round_<r>.npz``) as they finish, so rerunning
    the same call after a crash resumes at the first unfinished round. Returns the main tables.
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
    texts, ids = _pool(prompts, cfg.prompts)
    pool_tox = np.asarray(sc.toxicity(texts), dtype=np.float64)
    samples = select_samples(texts, ids, pool_tox, cfg)
    N, R = len(samples), cfg.rounds
    groups = [g for g in GROUPS if any(s.group == g for s in samples)]

    run_config = {"kind": "selfcorrect", "paper": PAPER, **asdict(cfg), "scorer_key": getattr(sc, "key", str(sc)),
                  "model": model.name, "model_fingerprint": model.fingerprint,
                  "pool_fingerprint": text_id("\n".join(ids)), "n_pool": len(texts),
                  "sample_ids": [s.prompt_id for s in samples],
                  "instructions": instruction_texts([cfg.opening] + sorted({s.instruction for s in samples}))}
    run = RunDir(out_dir, run_config, overwrite=overwrite)
    run.write_record(model_source=model.source, model_fingerprint=model.fingerprint, seed=cfg.seed,
                     n_samples=N, groups={g: sum(s.group == g for s in samples) for g in groups})
    states_dir = run.path / "states"
    if overwrite:
        for f in states_dir.glob("round_*.npz"):
            f.unlink()

    bar = tqdm(total=R + 2, desc="self-correction", unit="step", disable=not progress)
    previous: dict[tuple[int, int], dict] = {}
    for row in run.rows():
        previous[(row["round"], row["sample"])] = row  # later rows win (a redone round)
    responses: list[list[str]] = [[] for _ in range(N)]
    rows_by_round: list[list[dict]] = []
    st: dict[str, list[np.ndarray]] = {"prompt": [], "response": [], "resid": [], "response_tokens": []}
    rec_file = run.path / "record.json"
    old_rec = json.loads(rec_file.read_text()) if rec_file.exists() else {}
    round_seconds: dict[str, float] = {} if overwrite else dict(old_rec.get("round_seconds") or {})
    computed: list[int] = []
    for r in range(1, R + 1):
        bar.set_description(f"round {r}/{R}")
        npz = states_dir / f"round_{r}.npz"
        old = [previous.get((r, i)) for i in range(N)]
        loaded = _load_npz(npz, N) if all(old) and npz.exists() else None
        if loaded is not None:
            rows = old  # type: ignore[assignment]
            states = loaded
        else:
            t0 = time.perf_counter()
            dials = [dialogue(s.prompt, responses[i], s.instruction, cfg.opening) for i, s in enumerate(samples)]
            resp, states = generate_round(model, dials, [s.prompt_id for s in samples], cfg, r, progress)
            parsed = [parse_completion(x) for x in resp]
            tox = np.asarray(sc.toxicity([c for c, _ in parsed]), dtype=np.float64)
            _save_npz(npz, states)
            rows = [{"sample": s.index, "round": r, "group": s.group, "instruction": s.instruction,
                     "prompt_id": s.prompt_id, "prompt": s.prompt, "prompt_toxicity": s.prompt_toxicity,
                     "response": resp[i], "completion": parsed[i][0], "marker_found": parsed[i][1],
                     "toxicity": float(tox[i]), "response_tokens": int(states["response_tokens"][i])}
                    for i, s in enumerate(samples)]
            run.append(rows)
            round_seconds[str(r)] = round(time.perf_counter() - t0, 2)
            computed.append(r)
        for i in range(N):
            responses[i].append(rows[i]["response"])  # type: ignore[index]
        rows_by_round.append(rows)  # type: ignore[arg-type]
        for k in st:
            st[k].append(states[k])
        bar.update(1)

    tox = np.array([[rows_by_round[r][i]["toxicity"] for r in range(R)] for i in range(N)])  # [N, R]
    S = {k: np.stack(v) for k, v in st.items()}  # prompt/response [R, N, d], resid [R, N, L, d]

    # --- steering vectors -------------------------------------------------------------------
    bar.set_description("steering vectors")
    sv, steer_info = _steering_vectors(model, texts, ids, pool_tox, samples, cfg)
    sv.save(run.path / "steering_vector.safetensors")
    bar.update(1)

    # --- analysis -----------------------------------------------------------------------------
    bar.set_description("analysis and report")
    if lexicon is None:
        lexicon, lex_note = _lexicon(model, sc, cfg)
    else:
        lex_note = "given by the caller"
    result = _analyse(model, run.path, cfg, samples, groups, tox, S, sv, lexicon, rows_by_round)
    headline = result.headline
    headline.update({"lexicon": lex_note, "steering": steer_info,
                     "seconds_this_call": round(time.perf_counter() - t_start, 1),
                     "rounds_generated_this_call": computed, "round_seconds": round_seconds,
                     "generation_seconds": round(sum(round_seconds.values()), 1)})
    headline = _json_safe(headline)
    result.headline = headline
    run.write_metrics(headline)
    run.write_record(seconds_this_call=headline["seconds_this_call"], round_seconds=round_seconds,
                     generation_seconds=headline["generation_seconds"], steering=steer_info,
                     lexicon=lex_note)
    from .selfcorrect_report import write_report

    write_report(run.path, cfg, model, result)
    bar.update(1)
    bar.close()
    return result


def _steering_vectors(model: Model, texts: list[str], ids: list[str], scores: np.ndarray, samples: list[Sample],
                      cfg: SelfCorrectConfig):
    """Per-layer toxicity steering vectors (non-toxic minus toxic) from prompts outside the study."""
    from ..data import contrast_from_scores
    from ..steer.vector import SteeringVector

    used = {s.prompt for s in samples}
    rest = [i for i, t in enumerate(texts) if t not in used]
    note = "prompts outside the study"
    if len(rest) < 2:
        rest = list(range(len(texts)))
        note = "all prompts (too few outside the study: overlaps the study prompts)"
    n = min(cfg.steer_pairs, len(rest) // 2)
    cs = contrast_from_scores([texts[i] for i in rest], scores[rest], n=n, source="selfcorrect pool")
    sites = [f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
    sv = SteeringVector.fit(model, cs.desirable, cs.undesirable, sites, method="mean_diff",
                            positions=cfg.steer_positions, scale="unit", chat=cfg.steer_chat,
                            batch_size=cfg.batch_size)
    info = {"pairs": n, "from": note, "positions": cfg.steer_positions, "chat": cfg.steer_chat,
            "toxic_mean_score": float(np.mean(cs.undesirable_scores)),
            "nontoxic_mean_score": float(np.mean(cs.desirable_scores)), "contrast_fingerprint": cs.fingerprint}
    sv.meta.update({"purpose": "selfcorrect toxicity direction (non-toxic minus toxic)", **info})
    return sv, info


def _lexicon(model: Model, scorer, cfg: SelfCorrectConfig):
    from ..scoring import ScorerError, token_lexicon

    try:
        lex = token_lexicon(model, scorer, min_len=cfg.lexicon_min_len)
    except ScorerError as e:
        return None, f"skipped: {e}"
    return lex, f"{len(lex[0])} word-like tokens scored with {getattr(scorer, 'name', scorer)}"


def _stats(x: np.ndarray) -> tuple[float, float]:
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(np.mean(x)), float(np.std(x))


def _analyse(model: Model, path: Path, cfg: SelfCorrectConfig, samples: list[Sample], groups: list[str],
             tox: np.ndarray, S: dict[str, np.ndarray], sv, lexicon, rows_by_round) -> SelfCorrectResult:
    from sklearn.decomposition import PCA

    from ..report.html import write_csv

    N, R = tox.shape
    T = R - 1
    tables = path / "tables"
    gidx = {g: np.array([s.index for s in samples if s.group == g], dtype=int) for g in groups}
    sign = np.array([-1.0 if s.group == "detox" else 1.0 for s in samples])
    moved = moved_as_instructed(tox, sign, cfg.moved_share, cfg.moved_rel)

    # per-sample table
    sample_rows = []
    for s in samples:
        row = {"sample": s.index, "group": s.group, "instruction": s.instruction, "prompt_id": s.prompt_id,
               "prompt_toxicity": s.prompt_toxicity, "moved_as_instructed": bool(moved[s.index])}
        row.update({f"tox_round{r + 1}": float(tox[s.index, r]) for r in range(R)})
        row["prompt"] = s.prompt
        sample_rows.append(row)
    write_csv(tables / "samples.csv", sample_rows)

    # toxicity per round (Table 1 / Figure 1)
    tox_rows = []
    for g in groups:
        for subset, idx in (("all", gidx[g]), ("moved", gidx[g][moved[gidx[g]]])):
            for r in range(R):
                m, sd = _stats(tox[idx, r])
                tox_rows.append({"group": g, "subset": subset, "round": r + 1, "n": len(idx), "mean": m, "std": sd,
                                 "marker_found": float(np.mean([rows_by_round[r][i]["marker_found"] for i in idx]))
                                 if len(idx) else float("nan")})
    write_csv(tables / "toxicity_per_round.csv", tox_rows)

    # difference vectors of the final-norm states
    D = {k: np.transpose(S[k][1:] - S[k][:-1], (1, 0, 2)) for k in STATE_KINDS}  # [N, T, d]

    # logit-lens relation (Table 2)
    lex_rows: list[dict] = []
    if lexicon is not None:
        ids, sc = lexicon
        for g in groups:
            for k in STATE_KINDS:
                shift = logit_shift(D[k][gidx[g]], model.W_U)
                for row in lexicon_relation(shift, ids, sc, cfg.lexicon_k):
                    lex_rows.append({"group": g, "state": k, **row})
        write_csv(tables / "lexicon_relation.csv", lex_rows)

    # PCA and SVD (Figure 2)
    pca_info, pca_rows, svd_rows = {}, [], []
    coords = {}
    for k in STATE_KINDS:
        X = S[k].reshape(R * N, -1)
        nc = min(3, X.shape[0], X.shape[1])
        pca = PCA(n_components=nc, random_state=cfg.seed)
        Z = pca.fit_transform(X).reshape(R, N, nc)
        coords[k] = Z
        pca_info[k] = [float(v) for v in pca.explained_variance_ratio_]
        for i in range(N):
            for r in range(R):
                pca_rows.append({"state": k, "sample": i, "group": samples[i].group, "round": r + 1,
                                 **{f"pc{c + 1}": float(Z[r, i, c]) for c in range(nc)}})
        for g in groups:
            Dg = D[k][gidx[g]]  # [n, T, d]
            svd_rows.append({"group": g, "state": k, "transitions": "all", **svd_shares(Dg.reshape(-1, Dg.shape[-1]))})
            for t in range(T):
                svd_rows.append({"group": g, "state": k, "transitions": f"{t + 1}->{t + 2}", **svd_shares(Dg[:, t])})
    write_csv(tables / "pca_coords.csv", pca_rows)
    write_csv(tables / "svd.csv", svd_rows)

    # steering vectors vs round shifts, per layer
    controls_r = [sv.random(cfg.seed + 1 + c) for c in range(cfg.n_controls)]
    controls_p = [sv.permuted(cfg.seed + 1 + c) for c in range(cfg.n_controls)]
    cos_rows = []
    resid = S["resid"]  # [R, N, L, d]
    shifts = {g: [resid[t + 1, gidx[g]] - resid[t, gidx[g]] for t in range(T)] for g in groups}  # [n, L, d] each
    compared: list[tuple[str, list[np.ndarray], list[np.ndarray | None]]] = [
        (g, [d.mean(0) for d in shifts[g]], list(shifts[g])) for g in groups]
    if len(groups) == 2:  # the instruction-specific part: what detox does that toxify does not
        compared.append((CONTRAST, [a.mean(0) - b.mean(0) for a, b in zip(shifts["detox"], shifts["toxify"])],
                         [None] * T))
    for name, means, per_sample in compared:
        for t in range(T):
            for layer in range(model.n_layers):
                site = f"blocks.{layer}.resid_post"
                v = sv.directions[site].numpy().astype(np.float64)
                P = means[t][layer].astype(np.float64)
                ps = projection_stats(P, v)
                mean_cos = float("nan")
                if per_sample[t] is not None:
                    per = per_sample[t][:, layer].astype(np.float64)
                    norms = np.linalg.norm(per, axis=1) * np.linalg.norm(v)
                    mean_cos = float(np.mean(np.where(norms > 0, per @ v / np.where(norms > 0, norms, 1), 0.0)))
                rc = [projection_stats(P, c.directions[site].numpy())["cos"] for c in controls_r]
                pc = [projection_stats(P, c.directions[site].numpy())["cos"] for c in controls_p]
                cos_rows.append({"group": name, "transition": f"{t + 1}->{t + 2}", "layer": layer, "cos": ps["cos"],
                                 "mean_sample_cos": mean_cos, "lambda": ps["lambda"],
                                 "rejection_norm": ps["rejection_norm"], "shift_norm": ps["shift_norm"],
                                 "random_cos_mean": float(np.mean(rc)), "random_cos_std": float(np.std(rc)),
                                 "permuted_cos_mean": float(np.mean(pc)), "permuted_cos_std": float(np.std(pc))})
    write_csv(tables / "steering_cosine.csv", cos_rows)

    headline = _headline(cfg, samples, groups, tox, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info)
    return SelfCorrectResult(path, headline, tox_rows, lex_rows, cos_rows, svd_rows, sample_rows, coords, pca_info,
                             rows_by_round)


def _headline(cfg, samples, groups, tox, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info) -> dict:
    h: dict[str, Any] = {"paper": PAPER, "rounds": cfg.rounds, "n": len(samples), "pca_explained_variance": pca_info}
    for g in groups:
        gi = [s.index for s in samples if s.group == g]
        gh: dict[str, Any] = {"n": len(gi), "instruction": cfg.detox if g == "detox" else cfg.toxify,
                              "moved_as_instructed": int(moved[gi].sum())}
        gh["toxicity_mean"] = [r["mean"] for r in tox_rows if r["group"] == g and r["subset"] == "all"]
        gh["toxicity_std"] = [r["std"] for r in tox_rows if r["group"] == g and r["subset"] == "all"]
        gh["toxicity_mean_moved"] = [r["mean"] for r in tox_rows if r["group"] == g and r["subset"] == "moved"]
        first = [r for r in cos_rows if r["group"] == g and r["transition"] == "1->2"]
        if first:
            best = max(first, key=lambda r: abs(r["cos"]))
            gh["first_shift_cos_by_layer"] = [round(r["cos"], 4) for r in first]
            gh["first_shift_random_cos"] = [round(r["random_cos_mean"], 4) for r in first]
            gh["first_shift_random_std"] = [round(r["random_cos_std"], 4) for r in first]
            gh["first_shift_permuted_cos"] = [round(r["permuted_cos_mean"], 4) for r in first]
            gh["first_shift_max_abs_cos"] = {"layer": best["layer"], "cos": best["cos"]}
            gh["first_shift_lambda_last_layer"] = first[-1]["lambda"]
        gh["shift_norm_by_transition"] = {
            tr: float(np.mean([r["shift_norm"] for r in cos_rows if r["group"] == g and r["transition"] == tr]))
            for tr in dict.fromkeys(r["transition"] for r in cos_rows if r["group"] == g)}
        lx = [r for r in lex_rows if r["group"] == g and r["state"] == "prompt"]
        if lx:
            gh["lexicon_first"] = {k: lx[0][k] for k in ("toxic_weighted", "nontoxic_weighted", "gap")}
        sv_all = [r for r in svd_rows if r["group"] == g and r["state"] == "prompt" and r["transitions"] == "all"]
        if sv_all:
            gh["svd_rank1_share"] = sv_all[0]["rank1_share"]
            gh["svd_rank2_share"] = sv_all[0]["rank2_share"]
        h[g] = gh
    first = [r for r in cos_rows if r["group"] == CONTRAST and r["transition"] == "1->2"]
    if first:
        h[CONTRAST] = {"first_shift_cos_by_layer": [round(r["cos"], 4) for r in first],
                       "first_shift_random_cos": [round(r["random_cos_mean"], 4) for r in first],
                       "first_shift_random_std": [round(r["random_cos_std"], 4) for r in first],
                       "first_shift_permuted_cos": [round(r["permuted_cos_mean"], 4) for r in first]}
    return h


def _json_safe(obj):
    """NaN and infinities become None (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_result_json(path: str | Path) -> dict:
    """The headline numbers (``metrics.json``) of a finished run directory."""
    return json.loads((Path(path) / "metrics.json").read_text())
