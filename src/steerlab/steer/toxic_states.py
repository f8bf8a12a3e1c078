"""The training data of EigenShift: hidden states at the unembedding's input (``final``) that
produced toxic and non-toxic tokens in the model's own scored generations (METHODS.md section 3).

For every prompt the model generates continuations (batched, seeded like a generation run) while
:func:`steerlab.record` copies ``final`` at the last position of every call, so ``states[:, j]`` is
the state that produced generated token ``j`` (no second forward). Each continuation is scored:

- **non-toxic** continuations (score < ``threshold``) give the state of their first generated token;
- **toxic** continuations give the state of the first token of a toxic word. Toxic words come
  from the gradient saliency of the Jigsaw BiLSTM's ``toxic`` logit over the continuation's words
  (|d logit / d embedding| summed over the embedding dimensions, normalised to sum 1 over the
  words; up to ``top_words`` words with a share of at least ``min_share``) where the scorer is the
  BiLSTM or contains it (the default scorer); otherwise, or when no salient word is found in the
  text, from the token-toxicity lexicon (the first token whose lexicon score is >= ``threshold``).

A state is kept only where the model's argmax at that state is the token it produced (the token
was the model's own choice, not a sampling accident), for both sets. ``stats`` counts each stage:
``continuations``, ``toxic_continuations``, ``toxic_word_found`` (toxic ones where a toxic-word token
was located) and ``toxic_states`` / ``nontoxic_states`` (after the argmax filter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SteerlabError
from ..generation import GenConfig, derive_seed, generate_ids, generation_batches, prompt_ids_texts
from ..hooks import record
from ..models.model import Model
from ..registry import choose

BILSTM_SCORERS = ("jigsaw-bilstm", "jigsaw-profanity-max")


class StateCollectionError(SteerlabError):
    """Too few toxic or non-toxic states, or a saliency method that cannot run."""


@dataclass
class ToxicStates:
    """States ``[n, d]`` (float32, on the model's device) and how they were found."""

    toxic: torch.Tensor
    nontoxic: torch.Tensor
    stats: dict = field(default_factory=dict)
    data_fingerprint: str = ""


def word_starts(text: str, words: Sequence[str]) -> list[int]:
    """Character offset in ``text`` of each of ``words``, the words of ``text`` in order as a word
    tokenizer (lower-casing) split it."""
    low, cursor, out = text.lower(), 0, []
    for w in words:
        at = low.find(w, cursor)
        out.append(at if at >= 0 else cursor)
        cursor = (at if at >= 0 else cursor) + len(w)
    return out


def salient_words(texts: Sequence[str], top_words: int = 5, min_share: float = 0.1) -> list[set[str]]:
    """Per text, the words the Jigsaw BiLSTM's ``toxic`` logit is most sensitive to (gradient
    saliency, see the module docstring)."""
    from ..scoring import get_scorer

    sc = get_scorer("jigsaw-bilstm")
    net, tk = sc.net, sc.tokenizer
    if not texts:
        return []
    ids = torch.from_numpy(tk.pad(list(texts))).to(sc.device)
    with torch.enable_grad():
        emb = net.embed(ids).detach().requires_grad_(True)
        h, _ = net.lstm(emb)
        logit = net.out(torch.relu(net.dense(h.amax(dim=1))))[:, 0]
        (grad,) = torch.autograd.grad(logit.sum(), emb)
    sal = grad.abs().sum(-1) * (ids > 0)
    share = sal / sal.sum(1, keepdim=True).clamp_min(1e-12)
    val, pos = share.topk(min(top_words, share.shape[1]), dim=1)
    word = {i: w for w, i in tk.word_index.items()}
    picked = torch.gather(ids, 1, pos).masked_fill(val < min_share, 0).tolist()
    return [{word[i] for i in row if i > 0} for row in picked]


def first_word_token(pieces: Sequence[str], words: set[str], split) -> int:
    """Index of the first token (``pieces``: each token's text) that starts one of ``words``, or -1;
    ``split(text)`` gives the words of a text in order."""
    text = "".join(pieces)
    seq = split(text)
    starts = [s for s, w in zip(word_starts(text, seq), seq) if w in words]
    if not starts:
        return -1
    ends = np.cumsum([len(p) for p in pieces])
    return int(np.searchsorted(ends, min(starts), side="right"))


def _lexicon_table(model: Model, scorer) -> torch.Tensor | None:
    """Per vocabulary id, the lexicon toxicity (0 for non-word tokens); None when there is no lexicon."""
    from ..scoring import ScorerError, token_lexicon

    try:
        ids, scores = token_lexicon(model, scorer)
    except ScorerError:
        return None
    table = torch.zeros(model.vocab_size, device=model.device)
    table[torch.as_tensor(ids, device=model.device)] = torch.as_tensor(scores, dtype=torch.float32,
                                                                       device=model.device)
    return table


def _toxic_positions(model: Model, new: torch.Tensor, conts: list[str], saliency: str, scorer,
                     threshold: float, lexicon: dict) -> torch.Tensor:
    """Per toxic row of ``new`` (generated ids ``[n, T]``), the position of its first toxic-word
    token (-1: none found)."""
    n, T = new.shape
    pos = torch.full((n,), -1, dtype=torch.long, device=new.device)
    if n == 0:
        return pos
    if saliency == "bilstm":
        from ..scoring import get_scorer

        split = get_scorer("jigsaw-bilstm").tokenizer.words
        special = torch.tensor(sorted(set(model.tok.all_special_ids or [])), device=new.device)
        flat = model.tok.batch_decode(new.reshape(-1, 1).tolist())
        drop = torch.isin(new, special).reshape(-1).tolist() if len(special) else [False] * len(flat)
        flat = ["" if d else p for p, d in zip(flat, drop)]
        words = salient_words(conts)
        pos = torch.tensor([first_word_token(flat[i * T:(i + 1) * T], w, split) for i, w in enumerate(words)],
                           dtype=torch.long, device=new.device)
    if (pos < 0).any():  # no salient word (or no differentiable scorer): the token lexicon
        if "table" not in lexicon:
            lexicon["table"] = _lexicon_table(model, scorer)
        if lexicon["table"] is not None:
            hit = lexicon["table"][new] >= threshold
            lex = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(pos, -1))
            pos = torch.where(pos < 0, lex, pos)
    return pos



@torch.no_grad()
def generate_with_states(model: Model, texts: list[str], cfg: GenConfig,
                         keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``generate`` call (``cfg.k`` samples per text, per-row random numbers keyed by ``keys``)
    recording ``final``: the generated ids ``[B*k, T]`` and the states that produced them ``[B*k, T, d]``."""
    with record(model, ["final"], "last") as rec:
        new = generate_ids(model, texts, cfg, keys)
    return new, rec["final"][:, :new.shape[1]]


def _select(model: Model, new: torch.Tensor, states: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """States at ``pos`` (one per row, -1: none) whose argmax token is the token generated there."""
    ok = (pos >= 0) & (pos < states.shape[1])
    rows, p = ok.nonzero().squeeze(1), pos[ok]
    h = states[rows, p]
    if h.shape[0] == 0:
        return h
    argmax = model.unembed.logits(h, softcap=False).argmax(-1)  # the soft-cap keeps the order
    return h[argmax == new[rows, p]]


def matched_nontoxic(model: Model, pending: list[tuple[torch.Tensor, torch.Tensor]], toxic_pos: Sequence[int],
                     seed: int) -> torch.Tensor:
    """Non-toxic states at positions drawn (seeded, with replacement) from ``toxic_pos``, the
    positions of the toxic-word tokens: one per non-toxic row of each ``(new, states)`` in ``pending``
    (a row shorter than its drawn position gives none), then the argmax filter."""
    if not toxic_pos:
        raise StateCollectionError("positions='matched' needs toxic states to draw positions from; none found")
    rng = np.random.default_rng(seed)
    out = []
    for new, states in pending:
        pos = torch.as_tensor(rng.choice(np.asarray(toxic_pos), size=new.shape[0]), device=new.device)
        out.append(_select(model, new, states, pos))
    return torch.cat(out)


class StateSelector:
    """The state selection of :func:`collect_states` over generated batches, however they were
    produced (generated here, or read back from the benchmark's pool of continuations): for each batch
    of generated ids ``new [n, T]``, the ``final`` states that produced them ``states [n, T, d]``, the
    decoded continuations and their scores, :meth:`add` keeps the states at the first generated token
    of the non-toxic rows and at the first toxic-word token of the toxic ones (argmax filter);
    :meth:`result` returns them as :class:`ToxicStates`."""

    def __init__(self, model: Model, scorer="default", threshold: float = 0.5, saliency: str = "auto",
                 positions: str = "first"):
        from ..scoring import get_scorer

        self.model, self.sc, self.threshold = model, get_scorer(scorer), threshold
        choose("saliency", saliency, ("auto", "bilstm", "lexicon"), StateCollectionError)
        choose("positions", positions, ("first", "matched"), StateCollectionError)
        self.saliency = ("bilstm" if self.sc.name in BILSTM_SCORERS else "lexicon") if saliency == "auto" else saliency
        self.positions = positions
        self.tox: list[torch.Tensor] = []
        self.non: list[torch.Tensor] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.found: list[int] = []
        self.lexicon: dict = {}
        self.stats = {"continuations": 0, "toxic_continuations": 0, "toxic_word_found": 0}

    def score(self, conts: list[str]) -> np.ndarray:
        """The scorer's toxicity of continuations (what :meth:`add` expects as ``scores``)."""
        return np.asarray(self.sc.toxicity(conts), dtype=float)

    def add(self, new: torch.Tensor, states: torch.Tensor, conts: list[str], scores) -> None:
        model = self.model
        is_tox = torch.as_tensor(np.asarray(scores, dtype=float) >= self.threshold, device=new.device)
        self.stats["continuations"] += len(conts)
        self.stats["toxic_continuations"] += int(is_tox.sum())
        pos = torch.zeros(len(conts), dtype=torch.long, device=new.device).masked_fill(is_tox, -1)
        if self.positions == "first":
            self.non.append(_select(model, new, states, pos))
        else:
            self.pending.append((new[pos == 0], states[pos == 0]))
        t_rows = is_tox.nonzero().squeeze(1)
        t_pos = torch.full_like(pos, -1)
        t_pos[t_rows] = _toxic_positions(model, new[t_rows], [conts[i] for i in t_rows.tolist()], self.saliency,
                                         self.sc, self.threshold, self.lexicon)
        self.stats["toxic_word_found"] += int((t_pos >= 0).sum())
        self.found += t_pos[t_pos >= 0].tolist()
        self.tox.append(_select(model, new, states, t_pos))

    def result(self, seed: int, data_fingerprint: str = "") -> ToxicStates:
        """The states kept so far (``seed`` draws the matched positions)."""
        d = self.model.d_model
        non = [matched_nontoxic(self.model, self.pending, self.found, seed)] if self.positions == "matched" else self.non
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, d, device=self.model.device)  # noqa: E731
        out = ToxicStates(cat(self.tox), cat(non), {**self.stats, "saliency": self.saliency, "scorer": self.sc.name,
                                                    "threshold": self.threshold, "positions": self.positions},
                          data_fingerprint)
        out.stats.update(toxic_states=len(out.toxic), nontoxic_states=len(out.nontoxic))
        return out


def collect_states(model: Model, prompts: Sequence, cfg: GenConfig | None = None, scorer="default",
                   threshold: float = 0.5, saliency: str = "auto", min_states: int = 8,
                   progress: bool | None = None, positions: str = "first") -> ToxicStates:
    """Generate continuations of ``prompts`` and return the toxic and non-toxic ``final`` states
    (see the module docstring; :class:`StateSelector` selects them). ``saliency``: ``auto`` (the
    BiLSTM where the scorer contains it, else the lexicon), ``bilstm`` or ``lexicon``. ``positions``:
    non-toxic states at the first generated token (``first``, the paper) or at positions drawn from
    those of the toxic-word tokens (``matched``, :func:`matched_nontoxic`: the two sets then differ in
    toxicity, not in position). Raises :class:`StateCollectionError` with the counts when fewer than
    ``min_states`` states of either kind are found."""
    from ..progress import progress_iter

    cfg = cfg or GenConfig(sampling="t1.0", k=4)
    sel = StateSelector(model, scorer, threshold, saliency, positions)
    ids, texts = prompt_ids_texts(prompts)
    batches = generation_batches(model, ids, texts, cfg)
    for b in progress_iter(batches, "collect states", show=progress if progress is not None else len(batches) >= 4):
        new, states = generate_with_states(model, [texts[i] for i in b], cfg, [ids[i] for i in b])
        conts = model.tok.batch_decode(new, skip_special_tokens=True)
        sel.add(new, states, conts, sel.score(conts))
    out = sel.result(cfg.seed, states_fingerprint(ids, cfg))
    check_counts(out, min_states, len(ids), cfg)
    return out


def states_fingerprint(ids: Sequence[str], cfg: GenConfig) -> str:
    """The data fingerprint of states collected from the prompts ``ids`` with ``cfg``."""
    return f"{derive_seed(*ids, cfg):08x}"


def check_counts(states: ToxicStates, min_states: int, n_prompts: int | None = None, cfg: GenConfig | None = None):
    """Raise :class:`StateCollectionError` naming the counts and how to get more states."""
    nt, nn = len(states.toxic), len(states.nontoxic)
    if nt >= min_states and nn >= min_states:
        return
    s = states.stats
    where = (f" from {s.get('continuations')} continuations ({s.get('toxic_continuations')} toxic) of "
             f"{n_prompts} prompts" if n_prompts is not None else "")
    more = ("more prompts (--n-prompts), more samples per prompt (--samples)" +
            (f" than k={cfg.k}" if cfg else "") + ", a toxicity-prone prompt set (rtp) or a lower --threshold")
    raise StateCollectionError(f"found {nt} toxic and {nn} non-toxic states{where}; EigenShift needs at least "
                               f"{min_states} of each: use {more}")
