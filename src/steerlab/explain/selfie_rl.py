"""SelfIE Reinforcement Control (Chen et al. 2024, METHODS.md s4): fine-tune one block's MLP so that
the *interpretation* of chosen hidden states no longer carries a concept, with no target state.

Each step reads the states after block ``l`` (``blocks.{l}.resid_post``) at every token of the
source prompts with the current edit, decodes each state through the SelfIE interpretation prompt
(on the unedited model, greedily), and scores each interpretation text with a reward: ``+1`` when it
does not carry the concept, ``-1`` when it does (a word list: any of the words; a scorer: its
toxicity at or above ``threshold``). The MLP's deltas are then updated by Adam on a surrogate loss:

- ``estimator="paper"`` (the default, as the SelfIE notebook): ``-mean_i r_i * <h_i, sg(h_i)> /
  ||sg(h_i)||^2``; its gradient moves each state along itself, shrinking the states whose
  interpretation carries the concept and growing the others (``sg``: stop-gradient);
- ``estimator="gaussian"``: REINFORCE with a Gaussian policy around each state: ``samples`` draws
  ``h_i + sigma * ||h_i|| * eps`` are interpreted and scored, and the loss is ``-mean (r - mean r) *
  log N(draw; h_i, (sigma ||h_i||)^2)``, an unbiased policy-gradient estimate of the expected reward.

An optional preservation term (``preserve_weight`` times the mean squared change of the same layer's
states over reference texts) keeps other inputs as they were. The result is the ``selfie-rl``
intervention, saved and applied like ``selfie-control`` (additive deltas on the MLP's parameters,
restored bit for bit after ``apply``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..hooks import capture
from ..interventions import provenance, register
from ..models.model import Model
from ..options import option
from ..registry import choose
from .selfie import as_interpretation_prompt, interpret_states, layer_site
from .selfie_control import PARAMS, ControlError, SelfieControl, block_output, control_block, mlp_parameters

ESTIMATORS = ("paper", "gaussian")


def word_reward(words: Sequence[str]) -> Callable[[Sequence[str]], list[float]]:
    """``-1`` for a text containing any of ``words`` (whole words, case-insensitive), else ``+1``."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ControlError("the reward's word list is empty: give at least one word of the concept to erase")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return lambda texts: [-1.0 if pattern.search(t) else 1.0 for t in texts]


def scorer_reward(scorer, threshold: float = 0.5, attribute: str = "toxicity") -> Callable[[Sequence[str]], list[float]]:
    """``-1`` for a text whose ``attribute`` score (a steerlab scorer) is at least ``threshold``, else ``+1``."""
    def reward(texts):
        scores = scorer.score(list(texts))
        if attribute not in scores:
            raise ControlError(f"the scorer gives {', '.join(scores)}, not {attribute!r}")
        return [-1.0 if float(s) >= threshold else 1.0 for s in scores[attribute]]
    return reward


def reward_from_spec(spec: str, threshold: float = 0.5) -> Callable[[Sequence[str]], list[float]]:
    """``words:a,b,c`` (a word list) or ``scorer:NAME`` (a steerlab scorer's toxicity, e.g. ``scorer:default``)."""
    kind, _, value = spec.partition(":")
    if kind == "words":
        return word_reward(value.split(","))
    if kind == "scorer":
        from ..scoring import scorer_from_spec

        return scorer_reward(scorer_from_spec(value or "default"), threshold)
    raise ControlError(f"unknown reward {spec!r}: give 'words:WORD,WORD,...' or 'scorer:NAME' (e.g. scorer:default)")


def _sources(model: Model, data, chat: bool, tokens: Sequence[int] | None):
    """The source prompts, their left-padded batch and the mask of the states used: every real token,
    or the tokens at ``tokens`` (indices into each prompt, negative from the end)."""
    prompts = [data] if isinstance(data, str) else list(data)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ControlError("selfie-rl is fitted on source prompts: a non-empty string or list of non-empty strings")
    enc = model.encode(prompts, chat=chat)
    mask = enc["attention_mask"].bool()
    if tokens is None:
        return prompts, enc, mask
    keep = torch.zeros_like(mask)
    T = mask.shape[1]
    for row, n in enumerate(mask.sum(1).tolist()):
        for t in tokens:
            if not -n <= int(t) < n:
                raise ControlError(f"token {t} is beyond source prompt {row} ({n} tokens)")
            keep[row, T - n + int(t) % n] = True  # left padding: the prompt's tokens are the last n
    return prompts, enc, keep


def _surrogate(h: torch.Tensor, reward: torch.Tensor, estimator: str, draws=None, sigma: float = 0.0):
    """The loss whose gradient is the estimator's step (``h`` [N, d] with grad)."""
    if estimator == "paper":
        ref = h.detach()
        return -(reward * (h * ref).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-12)).mean()
    scale = (sigma * h.detach().norm(dim=-1, keepdim=True)).clamp_min(1e-6)  # [N, 1]
    adv = reward - reward.mean(0, keepdim=True)  # [S, N]
    logp = -((draws - h[None]) ** 2).sum(-1) / (2 * scale[None, :, 0] ** 2)  # [S, N]
    return -(adv * logp).mean()


@dataclass
class _Setup:
    block: int
    weights: dict
    enc: dict
    keep: torch.Tensor
    ip: object
    reward: Callable
    ref: dict | None
    ref_before: torch.Tensor | None


def _states(model, s: _Setup, deltas) -> tuple[torch.Tensor, dict]:
    """The source states ``[N, d]`` with the current edit (differentiable through the deltas)."""
    current = {n: w.detach() + deltas[n].to(w.dtype) for n, w in s.weights.items()}
    return block_output(model, s.block, s.enc["input_ids"], s.enc["attention_mask"], current)[s.keep].float(), current


def _read(model, s: _Setup, h: torch.Tensor, opts: dict) -> list[str]:
    kw = dict(k=opts["k"], max_new_tokens=opts["max_new_tokens"], batch_size=opts["batch_size"], relevancy=False)
    return [t for t, _, _ in interpret_states(model, h.detach(), s.ip, **kw)]


def _step(model, s: _Setup, deltas, opt, opts: dict) -> dict:
    """One update: read the states with the current edit, interpret, score, step. Returns the stats."""
    h, current = _states(model, s, deltas)
    texts = _read(model, s, h, opts)
    r = torch.tensor(s.reward(texts), dtype=torch.float32, device=h.device)
    if opts["estimator"] == "gaussian":
        g = torch.Generator(device="cpu").manual_seed(opts["seed"] + opts["step"])
        eps = torch.randn((opts["samples"], *h.shape), generator=g).to(h.device)
        draws = h.detach()[None] + opts["sigma"] * h.detach().norm(dim=-1, keepdim=True)[None] * eps
        drawn = _read(model, s, draws.reshape(-1, h.shape[-1]), opts)
        rd = torch.tensor(s.reward(drawn), dtype=torch.float32, device=h.device).view(opts["samples"], -1)
        loss = _surrogate(h, rd, "gaussian", draws, opts["sigma"])
    else:
        loss = _surrogate(h, r, "paper")
    if s.ref is not None:
        hr = block_output(model, s.block, s.ref["input_ids"], s.ref["attention_mask"], current).float()
        loss = loss + opts["preserve_weight"] * ((hr - s.ref_before)[s.ref["attention_mask"].bool()] ** 2).mean()
    grads = torch.autograd.grad(loss, list(deltas.values()))
    for d, gr in zip(deltas.values(), grads):
        d.grad = gr
    opt.step()
    return {"mean_reward": float(r.mean()), "carrying": float((r < 0).float().mean()), "texts": texts}


@dataclass
class SelfieRLFitOptions:
    prompt: list = option([], "source prompt whose states' interpretations should lose the concept (repeatable; "
                          "required)", type=list, repeated=True)
    layer: int = option(None, "layer l: the states after block l are read and block l's MLP is fine-tuned "
                        "(negative from the end; required)", type=int)
    hf_layer: bool = option(False, "read layer in the SelfIE paper's numbering (L = output of block L-1)")
    tokens: list = option([], "token indices of each prompt whose states are used (negative from the end; "
                          "default: every token)", type=list, item=int)
    reward: str = option("scorer:default", "words:WORD,WORD (-1 when an interpretation names one, else +1) | "
                         "scorer:NAME (-1 when its toxicity >= threshold)")
    threshold: float = option(0.5, "toxicity at which a scorer reward is -1", low=0.0, high=1.0)
    estimator: str = option("paper", "paper: the notebook's surrogate (each state moved along itself by its "
                            "reward) | gaussian: REINFORCE with Gaussian draws", choices=ESTIMATORS)
    sigma: float = option(0.1, "gaussian: draw scale", unit="x state norm", low=0.0)
    samples: int = option(4, "gaussian: draws per state and step", low=1)
    steps: int = option(10, "Adam steps", low=1)
    lr: float = option(1e-3, "Adam learning rate", low=0.0)
    params: str = option("mlp", "mlp: every parameter of the block's MLP | down: its down projection only",
                         choices=PARAMS)
    template: str = option("", "interpretation prompt, each [X] one placeholder token (default: interpret's)")
    plain: bool = option(False, "do not wrap the interpretation prompt in the chat template")
    k: int = option(1, "inject before decoder block k", low=0)
    max_new_tokens: int = option(20, "greedy tokens per interpretation", low=1)
    preserve: list = option([], "reference text whose states at the layer should stay (repeatable)", type=list,
                            repeated=True)
    preserve_file: list = option([], "file of reference texts (.txt/.jsonl/.csv; repeatable)", type=list,
                                 repeated=True)
    preserve_weight: float = option(1.0, "weight of the preservation term", low=0.0)
    chat: bool = option(False, "render the prompts and references as user turns with the chat template")


@register
@dataclass
class SelfieRL(SelfieControl):
    """SelfIE reinforcement control: an MLP edit learned from rewards on the interpretations of hidden states."""

    method = "selfie-rl"
    FitOptions = SelfieRLFitOptions

    @classmethod
    def from_options(cls, model: Model, o: SelfieRLFitOptions) -> SelfieRL:
        from ..data import load_prompts
        from .selfie import interpretation_prompt, parse_parts

        refs = list(o.preserve) + [p.text for f in o.preserve_file for p in load_prompts(f)]
        if not o.prompt or any(not p for p in o.prompt):
            raise ControlError("give at least one non-empty --prompt: the source texts whose states are read")
        if o.layer is None:
            raise ControlError("--layer is required: the layer whose states' interpretations are rewarded")
        if any(not t for t in refs):
            raise ControlError("a --preserve text is empty")
        if not o.reward.startswith("scorer:"):
            reward_from_spec(o.reward)  # a bad word list or an unknown kind fails before any work
        ip = interpretation_prompt(model, parse_parts(o.template) if o.template else None,
                                   chat=False if o.plain else None)
        return cls.fit(model, list(o.prompt), layer=o.layer, reward=o.reward, threshold=o.threshold,
                       estimator=o.estimator, sigma=o.sigma, samples=o.samples, steps=o.steps, lr=o.lr,
                       params=o.params, interpretation=ip, k=o.k, max_new_tokens=o.max_new_tokens,
                       preserve=refs or None, preserve_weight=o.preserve_weight, chat=o.chat,
                       numbering="hf" if o.hf_layer else "blocks", tokens=list(o.tokens) or None)

    def fit_summary(self) -> list[str]:
        m = self.meta
        return [f"interpretations of the {m['n_states']} states after block {m['block']} carrying the concept "
                f"({m['reward']}): {100 * m['carrying_before']:.0f}% -> {100 * m['carrying_after']:.0f}% after "
                f"{m['steps']} steps ({m['estimator']} estimator); per step: "
                + " ".join(f"{100 * c:.0f}%" for c in m["carrying"])]

    @classmethod
    def fit(cls, model: Model, data, *, layer: int, reward: str | Callable = "words:", interpretation=None,
            steps: int = 10, lr: float = 1e-3, estimator: str = "paper", sigma: float = 0.1, samples: int = 4,
            k: int = 1, max_new_tokens: int = 20, batch_size: int = 64, preserve: Sequence[str] | None = None,
            preserve_weight: float = 1.0, chat: bool = False, numbering: str = "blocks", params: str = "mlp",
            threshold: float = 0.5, seed: int = 0, tokens: Sequence[int] | None = None) -> SelfieRL:
        """Learn deltas on block ``layer``'s MLP from rewards on the interpretations of the states after
        it at every token of ``data`` (one prompt or a list; ``tokens``: only these token indices of
        each). ``reward``: ``"words:a,b"``, ``"scorer:NAME"`` or a callable ``texts -> [float]``."""
        choose("estimator", estimator, ESTIMATORS, ControlError)
        if steps < 1 or lr <= 0 or samples < 1 or sigma <= 0:
            raise ControlError(f"steps and samples must be >= 1, lr and sigma > 0 (got {steps}, {samples}, {lr}, {sigma})")
        reward_fn = reward if callable(reward) else reward_from_spec(reward, threshold)
        b = control_block(model, layer, numbering)
        prompts, enc, keep = _sources(model, data, chat, tokens)
        ref = model.encode(list(preserve), chat=chat) if preserve else None
        site = layer_site(model, b, "blocks")
        s = _Setup(b, mlp_parameters(model, b, params), enc, keep, as_interpretation_prompt(model, interpretation),
                   reward_fn, ref, capture(model, ref, site, "all")[site] if ref else None)
        deltas = {n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for n, w in s.weights.items()}
        opt = torch.optim.Adam(list(deltas.values()), lr=lr)
        opts = dict(k=k, max_new_tokens=max_new_tokens, batch_size=batch_size, estimator=estimator, sigma=sigma,
                    samples=samples, seed=seed, preserve_weight=preserve_weight)
        history = []
        with torch.enable_grad():
            for i in range(steps):
                history.append(_step(model, s, deltas, opt, {**opts, "step": i}))
        with torch.no_grad():
            after = _read(model, s, _states(model, s, deltas)[0], opts)
        carrying_after = sum(x < 0 for x in reward_fn(after)) / len(after)
        meta = provenance(model, None, {"block": b, "steps": steps, "lr": lr, "estimator": estimator, "params": params},
                          block=b, layer=b + 1, params=params, modules=list(s.weights), steps=steps, lr=lr,
                          estimator=estimator, reward=reward if isinstance(reward, str) else "callable",
                          sources=prompts, n_states=int(keep.sum()), chat=chat, layer_numbering=numbering,
                          n_preserve=len(preserve or []), preserve_weight=preserve_weight,
                          mean_reward=[h["mean_reward"] for h in history], carrying=[h["carrying"] for h in history],
                          carrying_before=history[0]["carrying"], carrying_after=carrying_after,
                          interpretations_before=history[0]["texts"], interpretations_after=after)
        return cls({n: d.detach() for n, d in deltas.items()}, meta)
