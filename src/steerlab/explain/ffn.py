"""FFN concepts (Wu et al. ffn_explain, METHODS.md 2): principal components of each layer's MLP value
vectors read in vocabulary space, optionally labelled by a language model.

``W = down_proj^T`` is ``[d_mlp, d_model]``: row ``k`` is what neuron ``k`` writes into the residual
stream. The rows are centred and decomposed (SVD); the explained variance ratio of component ``r``
is ``s_r^2 / sum s^2``. Component ``v_r`` is scored against each word-like vocabulary token by
``|v_r . e_w|`` with ``e_w`` the unit-normalised unembedding row; the top ``k`` words are kept.

Labellers (:class:`OpenAILabeller`, :class:`LocalLabeller`, or any object with
``label(words, seed=None) -> {"level": ..., "task": ...}``) name each word list's linguistic level and
task, or ``"cannot tell"``. :func:`label_layers` asks ``seeds`` times (the paper: 5; with a seed the
labellers sample instead of decoding greedily) and keeps the majority label of each kind, ``"cannot
tell"`` when no label has more than half of the runs, with the share of runs that agree with it.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..errors import SiteError, SteerlabError
from ..models.adapters import get_module
from ..models.model import Model
from ..validate import check_url, redact, redact_url

LEVELS = ("phonology", "morphology", "syntax", "semantics")
TASKS = ("writing", "math", "coding", "translation", "none")
CANNOT_TELL = "cannot tell"
SAMPLING_TEMPERATURE = 0.7
WORD_RE = re.compile(r"^[A-Za-z]{2,}$")


class LabellerError(SteerlabError):
    """A labeller that cannot be reached or answers in an unusable form."""


def value_vectors(model: Model, layer: int) -> torch.Tensor:
    """The MLP value vectors of block ``layer``: ``down_proj^T``, ``[d_mlp, d_model]``, float32."""
    try:
        down = get_module(model.layer(layer), model.arch.mlp_down)
    except (AttributeError, IndexError) as e:
        raise SiteError(f"{model.name} has no MLP down projection {model.arch.mlp_down!r} in block {layer}") from e
    w = down.weight.detach().float()
    return w if type(down).__name__ == "Conv1D" else w.T


_VOCAB_CACHE: dict[tuple[int, int], tuple[torch.Tensor, list[str]]] = {}


def word_vocab(model: Model) -> tuple[torch.Tensor, list[str]]:
    """Ids and words of the word-like tokens: tokens that start a word (BPE ``Ġ`` / SentencePiece ``▁``
    marker) followed by at least two letters; for a vocabulary without such markers, tokens that
    decode to at least two letters. The first token of each word wins."""
    key = (id(model.tok), model.vocab_size)
    if key not in _VOCAB_CACHE:
        n = min(model.vocab_size, len(model.tok))
        raw = model.tok.convert_ids_to_tokens(list(range(n)))
        marked = [(i, t[1:]) for i, t in enumerate(raw) if isinstance(t, str) and t[:1] in ("\u0120", "\u2581")]
        if not marked:
            marked = list(enumerate(t.strip() for t in model.tok.batch_decode([[i] for i in range(n)])))
        ids, words, seen = [], [], set()
        for i, w in marked:
            if WORD_RE.match(w) and w not in seen:
                seen.add(w)
                ids.append(i)
                words.append(w)
        _VOCAB_CACHE[key] = (torch.tensor(ids, dtype=torch.long), words)
    return _VOCAB_CACHE[key]


@dataclass
class FfnLayer:
    """PCA of one layer's value vectors: ``evr`` ``[r]``, ``components`` ``[r, d]`` (unit rows),
    ``words[r]`` the top words of component ``r`` with their ``|v_r . e_w|`` in ``scores[r]``."""

    layer: int
    evr: np.ndarray
    components: np.ndarray
    words: list[list[str]]
    scores: np.ndarray
    labels: list[dict] = field(default_factory=list)


def pca(W: torch.Tensor, n_components: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Components ``[r, d]`` and explained variance ratios ``[r]`` of the centred rows of ``W``."""
    X = W - W.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    var = S.double() ** 2
    r = Vh.shape[0] if n_components is None else min(n_components, Vh.shape[0])
    return Vh[:r], (var / var.sum())[:r].float()


def explain_ffn(model: Model, layers: Sequence[int] | None = None, k: int = 50,
                n_components: int | None = 20) -> list[FfnLayer]:
    """PCA of the value vectors of each layer (all by default) and the top ``k`` words per component
    (``n_components=None``: all ``d_model`` of them)."""
    if k < 1:
        raise SteerlabError(f"k must be >= 1, got {k}")
    idx = range(model.n_layers) if layers is None else [model.site(f"blocks.{i}.mlp.out").layer for i in layers]
    ids, words = word_vocab(model)
    if not words:
        raise SteerlabError(f"{model.name}'s vocabulary has no word-like tokens to read components with")
    W = model.unembed.weight
    U = W.detach().float()[ids.to(W.device)]
    U = U / U.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for layer in idx:
        comps, evr = pca(value_vectors(model, layer), n_components)
        sc = (comps @ U.T).abs()
        top = sc.topk(min(k, len(words)), dim=-1)
        ti = top.indices.cpu().numpy()
        out.append(FfnLayer(layer, evr.cpu().numpy(), comps.cpu().numpy(),
                            [[words[j] for j in row] for row in ti], top.values.cpu().numpy()))
    return out


# --- labellers ---------------------------------------------------------------------------------
class Labeller(Protocol):
    def label(self, words: Sequence[str], seed: int | None = None) -> dict: ...


def label_prompt(words: Sequence[str]) -> str:
    return ("Here is a list of words that one direction of a language model's feed-forward layer promotes:\n"
            + ", ".join(words) + "\n\nWhich linguistic level do they share most (" + " / ".join(LEVELS)
            + "), and which task are they most useful for (" + " / ".join(TASKS) + ")? "
            f"If the words share no level or no task, say '{CANNOT_TELL}' for it. "
            "Answer in exactly this form: level: <level>; task: <task>")


def parse_label(text: str) -> dict:
    """``{"level", "task"}`` from a labeller's answer: the first known level and task named in it, or
    ``"cannot tell"`` when the answer says so first or names none."""
    low = text.lower()
    head, _, tail = low.partition("task")
    return {"level": _first_in(head if tail else low, LEVELS), "task": _first_in(tail if tail else low, TASKS)}


def _first_in(text: str, options: Sequence[str]) -> str:
    hits = [(text.find(o), o) for o in (*options, CANNOT_TELL) if o in text]
    return min(hits)[1] if hits else CANNOT_TELL


def consensus(labels: Sequence[dict]) -> dict:
    """The majority level and task of several labelling runs (``"cannot tell"`` when no label has
    more than half of them), the share of runs that agree with each, and every run's labels."""
    out: dict = {"runs": len(labels)}
    for kind in ("level", "task"):
        votes = [lab.get(kind, CANNOT_TELL) for lab in labels]
        top, n = max(((v, votes.count(v)) for v in dict.fromkeys(votes)), key=lambda x: x[1])
        out[kind] = top if n * 2 > len(votes) else CANNOT_TELL
        out[f"{kind}_agreement"] = n / len(votes)
        out[f"{kind}_votes"] = votes
    out["answer"] = " | ".join(str(lab.get("answer", "")) for lab in labels)
    return out


class OpenAILabeller:
    """Labels word lists through an OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        # http(s) only, no user:password@, https off loopback when a key is sent (the Perspective rule)
        check_url(base_url, "labeller URL", key_sent=bool(api_key), error=LabellerError)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def label(self, words: Sequence[str], seed: int | None = None) -> dict:
        """Temperature 0 without a seed; with one, sampled at :data:`SAMPLING_TEMPERATURE` with that seed."""
        body = {"model": self.model, "temperature": 0 if seed is None else SAMPLING_TEMPERATURE,
                "messages": [{"role": "user", "content": label_prompt(words)}]}
        if seed is not None:
            body["seed"] = int(seed)
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                answer = json.loads(r.read().decode())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            problem = f"labeller endpoint {redact_url(self.url)} failed: {redact(str(e), [self.api_key or ''])}"
        else:
            return {**parse_label(answer), "answer": answer}
        raise LabellerError(problem)  # outside the handler: no chained copy of the error keeps the key


class LocalLabeller:
    """Labels word lists with a local steerlab model, prompted greedily (chat template if it has one)."""

    def __init__(self, model: Model, max_new_tokens: int = 24):
        self.model, self.max_new_tokens = model, max_new_tokens

    def label(self, words: Sequence[str], seed: int | None = None) -> dict:
        """Greedy without a seed; with one, sampled at :data:`SAMPLING_TEMPERATURE` after seeding torch."""
        from .attribution import greedy_response

        m = self.model
        text = m.chat_text(label_prompt(words)) if m.chat_template else label_prompt(words) + "\nlevel:"
        ids = m.tok(text, add_special_tokens=not m.chat_template)["input_ids"]
        if seed is None:
            new = greedy_response(m, ids, self.max_new_tokens)
        else:
            torch.manual_seed(int(seed))
            x = torch.tensor([ids], device=m.device)
            with torch.no_grad():
                out = m.hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                                    temperature=SAMPLING_TEMPERATURE, top_p=1.0, top_k=0,
                                    max_new_tokens=self.max_new_tokens, pad_token_id=m.pad_id)
            new = out[0, x.shape[1]:].tolist()
        answer = m.tok.decode(new, skip_special_tokens=True)
        if not m.chat_template:
            answer = "level:" + answer
        return {**parse_label(answer), "answer": answer}


def label_layers(layers: Sequence[FfnLayer], labeller: Labeller, n_pcs: int = 10,
                 seeds: int = 1) -> list[FfnLayer]:
    """Label the first ``n_pcs`` components of each layer (in place; also returned). ``seeds = 1``:
    one deterministic run per component; ``seeds > 1``: that many sampled runs (seeds 0..), combined
    by :func:`consensus` (majority label or "cannot tell", with the agreement)."""
    if seeds < 1:
        raise SteerlabError(f"seeds must be >= 1, got {seeds}")
    for fl in layers:
        if seeds == 1:
            fl.labels = [labeller.label(ws) for ws in fl.words[:n_pcs]]
        else:
            fl.labels = [consensus([labeller.label(ws, seed=s) for s in range(seeds)]) for ws in fl.words[:n_pcs]]
    return list(layers)
