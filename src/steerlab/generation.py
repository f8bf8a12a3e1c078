"""Batched generation with whatever interventions are active, and resumable generation runs.

Sampling presets (``SAMPLING``): ``greedy``; ``t0.7`` (T=0.7, top_p=0.9: the self-correction
study); ``t1.0`` (T=1.0, top_p=0.95: RealToxicityPrompts / EigenShift evaluation). Sampling
presets disable top-k (transformers' default of 50 would otherwise apply on top of top-p).

Seeds (common random numbers): every sampled row has its own random numbers, a pure function of
``(run seed, prompt key, sample index)`` and the decoding step (:class:`RowSampler`), so the text
of a (prompt, sample) does not depend on its batch, its batch mates or the padding (up to
floating-point noise in the logits), a resumed run regenerates exactly what an uninterrupted one
would, and two arms of a comparison (steered and unsteered, every cell of a sweep) see the same
random numbers for the same prompt and sample: their difference is paired. Batches are formed by
token length only for speed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from .errors import EmptyInputError, SteerlabError
from .models.model import Model
from .models.site import UPPER
from .parallel import run_loop
from .profile import PROFILE, stage
from .progress import progress_iter
from .registry import choose
from .scoring.registry import scorer_identity
from .validate import NonFiniteError, allocation, integer

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
        choose("sampling preset", self.sampling, SAMPLING)
        for name in ("max_new_tokens", "k", "batch_size", "seed"):  # 2.5 tokens or k=True: not integers
            integer(getattr(self, name), name, strict=True)
        if not isinstance(self.chat, bool):
            raise SteerlabError(f"chat must be True or False, got {self.chat!r}")
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise SteerlabError(f"k, max_new_tokens and batch_size must be >= 1 (got {self.k}, "
                                f"{self.max_new_tokens}, {self.batch_size})")
        if self.k > 1 and self.sampling == "greedy":
            raise SteerlabError("k > 1 samples per prompt needs a sampling preset (t0.7 or t1.0), not greedy")


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prompt_ids_texts(prompts: Sequence) -> tuple[list[str], list[str]]:
    """Ids and texts of prompts given as strings, dialogues (lists of messages) or Prompt records;
    ids must be unique. A bare string is one prompt (as :meth:`Model.encode` takes it), not one per character."""
    if isinstance(prompts, str):
        prompts = [prompts]
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


def token_lengths(model: Model, texts: Sequence, chat: bool = False) -> list[int]:
    """Token count of each prompt as it will be fed (chat-rendered when ``chat`` or a dialogue)."""
    rendered = [model.chat_text(t) if chat or isinstance(t, list) else t for t in texts]
    special = not (chat or any(isinstance(t, list) for t in texts))
    return [len(ids) for ids in model.tok(rendered, add_special_tokens=special)["input_ids"]]


def plan_batches(lengths: Sequence[int], keys: Sequence[str], per: int) -> list[list[int]]:
    """Deterministic batches of indices, ``per`` at a time, sorted by length then key (so little
    compute goes to padding and a rerun forms the same batches)."""
    order = sorted(range(len(keys)), key=lambda i: (lengths[i], keys[i]))
    return [order[i:i + per] for i in range(0, len(order), per)]


def generation_batches(model: Model, ids: list[str], texts: list, cfg: GenConfig) -> list[list[int]]:
    """The batches (prompt indices) a generation run forms: sorted by token length, ``batch_size // k``
    prompts each."""
    return plan_batches(token_lengths(model, texts, cfg.chat), ids, max(1, cfg.batch_size // cfg.k))


def derive_seed(*parts) -> int:
    """A 32-bit seed derived from the run seed and whatever identifies a batch (ids, round, site)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def row_seeds(cfg: GenConfig, keys: Sequence[str]) -> torch.Tensor:
    """The seed of every row of a batch, ``[len(keys) * k]``: ``derive_seed(run seed, key, sample)``."""
    return torch.tensor([derive_seed(cfg.seed, key, s) for key in keys for s in range(cfg.k)], dtype=torch.int64)


@torch.no_grad()
def generate_ids(model: Model, texts: list, cfg: GenConfig, keys: Sequence[str] | None = None) -> torch.Tensor:
    """One ``generate`` call: the new token ids ``[len(texts) * k, T]`` (rows: text 0's k samples,
    then text 1's...). Sampled rows draw their random numbers from ``(cfg.seed, keys[i], sample)``
    (``keys`` default to the texts' hashes), so the result does not depend on the batch. Any active
    :func:`steerlab.edit` or :func:`steerlab.record` sees the call."""
    keys = list(keys) if keys is not None else [text_id(t if isinstance(t, str) else json.dumps(t)) for t in texts]
    if len(keys) != len(texts):
        raise SteerlabError(f"{len(keys)} keys for {len(texts)} texts")
    enc = model.encode(texts, chat=cfg.chat)
    check_memory(model, len(texts) * cfg.k, enc["input_ids"].shape[1], cfg.max_new_tokens)
    ids, mask = enc["input_ids"].repeat_interleave(cfg.k, 0), enc["attention_mask"].repeat_interleave(cfg.k, 0)
    kw: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    preset = SAMPLING[cfg.sampling]
    procs: list = [FiniteLogits(ids.shape[1])]  # NaN logits stop the run here, never reach a sampler
    if preset.get("do_sample"):
        procs.append(RowSampler(row_seeds(cfg, keys).to(ids.device), ids.shape[1], preset["temperature"],
                                preset["top_p"]))
    kw["logits_processor"] = LogitsProcessorList(procs)
    t0 = time.perf_counter()
    out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                            pad_token_id=model.pad_id, **kw)
    PROFILE.count("generate seconds", time.perf_counter() - t0)
    PROFILE.count("generated tokens", out[:, ids.shape[1]:].numel())
    return out[:, ids.shape[1]:]


def generation_bytes(model: Model, rows: int, prompt_len: int, new_tokens: int) -> float:
    """A rough lower estimate of the memory one ``generate`` call of ``rows`` rows needs: the KV cache
    over the whole sequence, the prefill's activations and attention scores, and a few copies of the
    last position's logits (scores, log-probabilities, the sampler's sort)."""
    T, e = prompt_len + new_tokens, torch.finfo(model.dtype).bits // 8
    kv = 2 * model.n_layers * model.n_kv_heads * model.d_head * e * T
    prefill = prompt_len * (model.d_model + model.d_mlp) * e * 4 + model.n_heads * prompt_len ** 2 * 4
    return float(rows) * (kv + prefill + model.vocab_size * 4 * 4)


def check_memory(model: Model, rows: int, prompt_len: int, new_tokens: int) -> None:
    """Refuse a generate call whose estimate (:func:`generation_bytes`) exceeds the memory of the
    model's device (the GPU's, or this machine's physical memory) before allocating anything."""
    limit = None
    if model.device.type == "cuda":
        limit = torch.cuda.get_device_properties(model.device).total_memory
    allocation(generation_bytes(model, rows, prompt_len, new_tokens),
               f"generating {rows} rows (prompts x samples) of {prompt_len} + {new_tokens} tokens at once",
               "lower -k, --batch-size or --max-new-tokens", limit)


def generate_batch(model: Model, texts: list, cfg: GenConfig, keys: Sequence[str] | None = None) -> list[list[str]]:
    """One ``generate`` call (:func:`generate_ids`): ``k`` continuations of each text (list per text)."""
    new = model.tok.batch_decode(generate_ids(model, texts, cfg, keys), skip_special_tokens=True)
    return [new[i * cfg.k:(i + 1) * cfg.k] for i in range(len(texts))]


@dataclass
class Generation:
    """What :meth:`steerlab.models.model.Model.generate` returns: ``k`` continuations of each prompt.
    Rows are in prompt order, then sample order: ``texts[i]`` (the decoded continuation, special
    tokens dropped) and ``tokens[i]`` (its new token ids, cut before the first end-of-sequence
    token) belong to prompt ``i // k``, sample ``i % k``."""

    prompts: list
    k: int
    texts: list[str]
    tokens: list[list[int]]

    @property
    def text(self) -> str:
        """The one continuation of a single-prompt, single-sample call."""
        if len(self.texts) != 1:
            raise SteerlabError(f"{len(self.texts)} continuations ({len(self.prompts)} prompts x k={self.k}); "
                                f"use .texts or .per_prompt()")
        return self.texts[0]

    def per_prompt(self) -> list[list[str]]:
        """The ``k`` continuations of each prompt, one list per prompt."""
        return [self.texts[i * self.k:(i + 1) * self.k] for i in range(len(self.prompts))]

    def __str__(self) -> str:
        return "\n".join(self.texts)


def trim_tokens(model: Model, new: torch.Tensor) -> list[list[int]]:
    """New token ids of each row of ``generate_ids``, cut before the first end-of-sequence token
    (after which ``generate`` pads)."""
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.tok.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    out = []
    for row in new.tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        out.append(row[:cut])
    return out


def generate_text(model: Model, prompts: str | Sequence, cfg: GenConfig | None = None,
                  progress: bool | None = None, **kw) -> Generation:
    """Continuations of ``prompts`` (one string or a sequence) as text and token ids
    (:class:`Generation`), with :class:`GenConfig`'s defaults, which are the command line's
    (``steerlab generate``: 20 new tokens, greedy, ``k=1``, seed 0, raw completion, batch 16).
    Keyword arguments override fields of ``cfg``; any active :func:`steerlab.edit` applies."""
    cfg = GenConfig(**{**(asdict(cfg) if cfg else {}), **kw})
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, texts = prompt_ids_texts(plist)
    toks: list[list[list[int]] | None] = [None] * len(texts)
    batches = generation_batches(model, ids, texts, cfg)
    for b in progress_iter(batches, "generate", show=progress if progress is not None else len(batches) >= 4):
        rows = trim_tokens(model, generate_ids(model, [texts[i] for i in b], cfg, [ids[i] for i in b]))
        for j, i in enumerate(b):
            toks[i] = rows[j * cfg.k:(j + 1) * cfg.k]
    flat = [t for per in toks for t in per]  # type: ignore[union-attr]
    return Generation(plist, cfg.k, model.tok.batch_decode(flat, skip_special_tokens=True), flat)


def generate(model: Model, prompts: Sequence, cfg: GenConfig | None = None, progress: bool | None = None,
             **kw) -> list[list[str]]:
    """Continuations of each prompt (``k`` per prompt), in prompt order. With ``chat=True`` a prompt
    may also be a whole dialogue (a list of ``{"role", "content"}`` messages). Any active
    :func:`steerlab.edit` applies. Keyword arguments override fields of ``cfg``."""
    cfg = GenConfig(**{**(asdict(cfg) if cfg else {}), **kw})
    ids, texts = prompt_ids_texts(prompts)
    out: list[list[str] | None] = [None] * len(texts)
    batches = generation_batches(model, ids, texts, cfg)
    for b in progress_iter(batches, "generate", show=progress if progress is not None else len(batches) >= 4):
        for i, conts in zip(b, generate_batch(model, [texts[i] for i in b], cfg, [ids[i] for i in b])):
            out[i] = conts
    return out  # type: ignore[return-value]


def generate_run(model: Model, prompts: Sequence, out_dir: str | Path, cfg: GenConfig | None = None, *,
                 scorer=None, intervention=None, apply_options: dict | None = None,
                 extra_config: dict | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> list[dict]:
    """Generate into a run directory, append-only and resumable (:meth:`RunDir.loop`).

    Launched as several processes (``accelerate launch``), each generates a share of the batches
    and the rows are merged into ``out_dir`` (:func:`steerlab.parallel.run_loop`); every process
    returns every row.

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
    if intervention is not None:
        intervention.check(model)
        probe(model, intervention, texts[0], ids[0], cfg, opts)
    config, record = run_identity(model, ids, cfg, scorer, intervention, opts, extra_config)

    def work(batch: Sequence[int], seed: int) -> list[dict]:
        chunk, keys = [texts[i] for i in batch], [ids[i] for i in batch]
        conts = (generate_batch(model, chunk, cfg, keys) if intervention is None
                 else intervention.generate(model, chunk, cfg, keys, **opts))
        rows = [{"prompt_id": ids[i], "prompt": texts[i], "sample": s, "continuation": c}
                for i, cs in zip(batch, conts) for s, c in enumerate(cs)]
        return score_rows(rows, scorer)

    batches, lengths = generation_batches(model, ids, texts, cfg), token_lengths(model, texts, cfg.chat)
    # the largest batch must fit in memory: checked before the run directory exists, not at that batch
    check_memory(model, max(len(b) for b in batches) * cfg.k, max(lengths), cfg.max_new_tokens)
    # one process: RunDir(out_dir).loop; several (accelerate launch): a share of the batches each
    rows = run_loop(out_dir, config, batches, work,
                    keys=lambda i: [(ids[i], s) for s in range(cfg.k)], row_key=lambda r: (r["prompt_id"], r["sample"]),
                    seed=lambda b: derive_seed(cfg.seed, *[ids[i] for i in b]), desc="generate", progress=progress,
                    overwrite=overwrite, record=record)
    pos = {pid: i for i, pid in enumerate(ids)}
    return sorted(rows, key=lambda r: (pos.get(r["prompt_id"], len(pos)), r["sample"]))


def run_identity(model: Model, ids: list[str], cfg: GenConfig, scorer=None, intervention=None,
                 apply_options: dict | None = None, extra_config: dict | None = None) -> tuple[dict, dict]:
    """The ``config.json`` (the run's identity) and the first ``record.json`` fields of a
    :func:`generate_run` over prompts ``ids``."""
    config = {"kind": "generate", "model": model.name, "model_fingerprint": model.fingerprint, **asdict(cfg),
              **scorer_identity(scorer), "prompts_fingerprint": text_id("\n".join(ids)),
              "n_prompts": len(ids), **(extra_config or {})}
    extra_record: dict = {}
    if intervention is not None:
        config["intervention"] = {"method": intervention.method, "fingerprint": intervention.fingerprint(),
                                  "apply": dict(apply_options or {})}
        extra_record = {"intervention": intervention.describe()}
    record = dict(model_source=model.source, model_fingerprint=model.fingerprint, seed=cfg.seed,
                  n_rows_expected=len(ids) * cfg.k, **extra_record)
    return config, record


def probe(model: Model, intervention, text, key: str, cfg: GenConfig, options: dict) -> None:
    """Two tokens of one prompt with ``intervention`` applied with ``options``, before a run writes
    anything: an apply option the method refuses, or a value that overflows a forward (NaN or inf
    logits), fails here, while the run directory is untouched, instead of after ``config.json``
    exists (which would then refuse the corrected command as a changed config). An option of the
    wrong type that the method does not check itself (a ``TypeError`` or ``ValueError`` from deep
    inside) is a :class:`~steerlab.errors.SteerlabError` naming the options."""
    problem = None
    try:
        intervention.generate(model, [text], replace(cfg, max_new_tokens=2, k=1, batch_size=1), [key], **options)
    except SteerlabError:
        raise
    except (TypeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise SteerlabError(f"the {intervention.method} intervention cannot be applied with {shown}: {problem}")


def score_rows(rows: list[dict], scorer, field: str = "continuation") -> list[dict]:
    """Add ``toxicity`` (the scorer's main attribute) and ``scores`` (every attribute) to rows, in
    one scorer call; rows are returned unchanged without a scorer."""
    if scorer is None or not rows:
        return rows
    with stage("scoring"):
        scores = scorer.score([r[field] for r in rows])
    for j, r in enumerate(rows):
        r["toxicity"] = float(scores[scorer.attributes[0]][j])
        r["scores"] = {a: float(v[j]) for a, v in scores.items()}
    return rows


class FiniteLogits:
    """A logits processor that stops generation with a :class:`~steerlab.validate.NonFiniteError`
    when the logits hold NaN or +inf, or a row has no finite logit: an edit or a weight change
    overflowed (a strength like ``alpha=1e30``, a NaN factor). Without it greedy decoding picks an
    arbitrary token and the sampler fails, and the run looks like it produced (empty) text. The
    message names the edited sites whose output went non-finite. One reduction per step."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ok = ~(torch.isnan(scores).any() | torch.isposinf(scores).any()) & torch.isfinite(scores).any(-1).all()
        if not bool(ok):
            from .hooks import nonfinite_sites

            sites = nonfinite_sites()
            where = (f"; non-finite values first appear in the output of the edit at {', '.join(sites)}" if sites
                     else "; no edited site's output was non-finite, so a weight change or the model itself is the cause")
            raise NonFiniteError(f"the model produced NaN or infinite logits at decoding step "
                                 f"{input_ids.shape[1] - self.prompt_len}{where}; lower the strength or check the "
                                 f"intervention's values")
        return scores


# --- per-row sampling with common random numbers -------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xor-shift / multiply, "lowbias32"), elementwise on int64 tensors."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1) shaped like ``token_ids`` ``[B, K]``: a pure function of (row seed,
    decoding step, token id), so the noise a row sees does not depend on its batch mates, its place
    in the batch, the padding, or which other tokens are candidates."""
    base = _hash32(_hash32(seeds.to(token_ids.device, torch.int64)) ^ _mul32(torch.tensor(step + 1), 0x9E3779B1))
    h = _hash32(_hash32(base[:, None] ^ _mul32(token_ids.to(torch.int64), 0x85EBCA6B)) + 0x27D4EB2F)
    return (h.double() + 0.5) / 2.0 ** 32


class RowSampler:
    """A logits processor that samples each row with its own random numbers, after temperature and
    nucleus (top-p) filtering, and returns logits on which greedy decoding picks that token. The
    draw is the Gumbel-max trick, ``argmax_v (log p_v - log(-log u_v))``, an exact sample from ``p``,
    with ``u`` from :func:`row_uniforms`. Used with ``generate(do_sample=False)``, the randomness
    is keyed by (row seed, step): common random numbers across arms of a comparison, and the same
    text whatever the batch (up to floating-point noise in the logits)."""

    def __init__(self, seeds: torch.Tensor, prompt_len: int, temperature: float = 1.0, top_p: float = 1.0):
        self.seeds, self.prompt_len, self.temperature, self.top_p = seeds, prompt_len, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = (scores.float() / self.temperature).log_softmax(-1)
        step, pick = input_ids.shape[1] - self.prompt_len, torch.empty(len(logp), 1, dtype=torch.long,
                                                                         device=logp.device)
        for rows, sorted_lp, idx in self._ranked(logp):
            pick[rows] = self._draw(sorted_lp, idx, self.seeds.to(logp.device)[rows], step)
        return torch.full_like(scores, float("-inf")).scatter(-1, pick, 0.0)

    def _draw(self, sorted_lp: torch.Tensor, idx: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
        """One token id per row ``[n, 1]``: the Gumbel-max draw over the row's nucleus (``sorted_lp``:
        log-probabilities in decreasing order, ``idx`` their token ids)."""
        keep = torch.isfinite(sorted_lp)
        if self.top_p < 1.0:  # the smallest set of top tokens whose mass reaches top_p
            p = sorted_lp.exp()
            keep &= (p.cumsum(-1) - p) < self.top_p
        K = int(keep.sum(-1).max())
        lp = sorted_lp[:, :K].masked_fill(~keep[:, :K], float("-inf"))
        u = row_uniforms(seeds, step, idx[:, :K])
        return idx[:, :K].gather(-1, (lp.double() - torch.log(-torch.log(u))).argmax(-1, keepdim=True))

    def _ranked(self, logp: torch.Tensor, first: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Groups of rows ``(row mask, log-probabilities in decreasing order, their token ids)``: the
        rows whose nucleus lies within their top ``first`` tokens get only those (a partial selection
        is much cheaper than sorting the whole vocabulary); the other rows are sorted in full. The
        draw depends on (row seed, step, token id) only, so the grouping does not change it."""
        every = torch.ones(len(logp), dtype=torch.bool, device=logp.device)
        if self.top_p < 1.0 and logp.shape[-1] > first:
            top = logp.topk(first, dim=-1)
            ok = top.values.exp().sum(-1) >= self.top_p
            groups = [(ok, top.values[ok], top.indices[ok])] if bool(ok.any()) else []
            if not bool(ok.all()):
                rest = logp[~ok].sort(-1, descending=True)
                groups.append((~ok, rest.values, rest.indices))
            return groups
        return [(every, *logp.sort(-1, descending=True))]


UPPER["generation"].register("generate_text", generate_text)  # Model.generate's decoding loop
