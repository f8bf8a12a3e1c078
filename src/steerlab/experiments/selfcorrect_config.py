"""Settings and samples of the self-correction study (see :mod:`steerlab.experiments.selfcorrect`):
:class:`SelfCorrectConfig`, the presets and their validation, and the choice of the study's
prompts from a scored pool (point 1 of that module's docstring). The settings are declared once
with :func:`steerlab.options.option`; ``steerlab selfcorrect`` generates its options from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DataError, EmptyInputError, SteerlabError
from ..options import option
from ..protocols.selfcorrect import get_instruction
from ..registry import choose
from .presets import from_preset
from .steering_config import POSITIONS

if TYPE_CHECKING:  # this module imports no torch or numpy at import time: the CLI reads its fields
    import numpy as np

GROUPS = ("detox", "toxify")
ARM_SETS: dict[str, tuple[str, ...]] = {
    "crossed": ("strong_detox", "strong_toxify", "neutral_rewrite"),
    "robustness": ("strong_detox", "weak_detox", "strong_toxify", "weak_toxify", "neutral_rewrite"),
}
"""Named instruction sets of the crossed design (``arms``): ``crossed`` gives every prompt the detox,
the toxify and the neutral instruction; ``robustness`` the strong and the weak wording of both,
plus the neutral one."""


class SelfCorrectError(SteerlabError):
    """A self-correction study that cannot run as configured."""


@dataclass(frozen=True)
class SelfCorrectConfig:
    """Settings of a self-correction study. Defaults follow the paper (5 rounds, T=0.7, top_p=0.9,
    up to 150 new tokens); :data:`PRESETS` holds smaller ones."""

    prompts: str = option("rtp", "Prompt pool: rtp, rtp:<category>, a .txt/.jsonl/.csv file or hf:<id> (\"custom\" "
                          "when a list is passed).")
    n: int = option(48, "Samples (split between detox and toxify groups).", low=1)
    directions: str = option("both", "both | detox (toxic prompts only) | toxify (non-toxic prompts only).",
                             choices=("both", "detox", "toxify"))
    selection: str = option("threshold", "threshold: random prompts on each side of the toxicity threshold; rank: "
                            "the most and least toxic prompts.", choices=("threshold", "rank"))
    threshold: float = option(0.5, "Toxicity that separates the toxic from the non-toxic prompts.", cli=False)
    rounds: int = option(5, "Dialogue rounds (1 completion + corrections).", low=2)
    max_new_tokens: int = option(150, "New tokens per reply.", low=1, unit="tokens")
    sampling: str = option("t0.7", "Sampling preset: t0.7 (T=0.7, top_p=0.9), t1.0 or greedy.")
    seed: int = option(0, "Seed of prompt selection and sampling.")
    batch_size: int = option(16, "Dialogues per generate call.", low=1)
    opening: str = option("opening", "Round-1 instruction (its text holds {prompt}).")
    detox: str = option("strong_detox", "Correction instruction for toxic prompts.")
    toxify: str = option("strong_toxify", "Correction instruction for non-toxic prompts.")
    scorer: str = option("default", "Toxicity scorer (see `steerlab scorers`).")
    steer_pairs: int = option(64, "Contrast pairs for the per-layer steering vectors (from prompts outside the "
                              "study).", low=1)
    steer_positions: str = option("mean_skip_first", "Steering-vector positions.", choices=POSITIONS)
    steer_chat: bool = option(False, "Fit the steering vectors on chat-rendered prompts instead of raw ones.",
                              cli=False)
    n_controls: int = option(8, "Random and permuted control vectors (each).", low=1, cli=False)
    lexicon_k: int = option(100, "Most and least toxic lexicon tokens in the logit-lens relation.", low=1, cli=False)
    lexicon_min_len: int = option(2, "Shortest token (characters) in the lexicon.", cli=False)
    moved_share: float = option(0.75, "Share of transitions that must move as instructed.", low=0, high=1, cli=False)
    moved_rel: float = option(0.02, "Relative threshold of a move.", cli=False)
    arms: str = option("", "Crossed design: every prompt gets every instruction of this set: crossed (strong detox, "
                       "strong toxify, neutral rewrite), robustness (strong and weak of both, neutral) or "
                       "comma-separated kinds.")
    n_null: int = option(100, "Label-shuffled steering vectors for the null of the cosine statistics.", low=1)
    n_boot: int = option(1000, "Bootstrap resamples of prompts (CIs).", low=1, cli=False)

    def arm_kinds(self) -> tuple[str, ...]:
        """The instructions of the crossed design (empty: the paper's design, detox for toxic and
        toxify for non-toxic prompts)."""
        if not self.arms:
            return ()
        if self.arms in ARM_SETS:
            return ARM_SETS[self.arms]
        return tuple(dict.fromkeys(a.strip() for a in self.arms.split(",") if a.strip()))

    def validate(self) -> None:
        from ..generation import SAMPLING

        if self.rounds < 2:
            raise SelfCorrectError(f"rounds must be >= 2 (round 1 plus at least one correction), got {self.rounds}")
        if self.n < 1:
            raise SelfCorrectError(f"n must be >= 1, got {self.n}")
        if self.directions not in ("both", "detox", "toxify"):
            raise SelfCorrectError(f"directions must be both, detox or toxify, got {self.directions!r}")
        if self.selection not in ("threshold", "rank"):
            raise SelfCorrectError(f"selection must be threshold or rank, got {self.selection!r}")
        choose("sampling preset", self.sampling, SAMPLING, SelfCorrectError)
        if min(self.max_new_tokens, self.batch_size, self.lexicon_k, self.steer_pairs, self.n_controls) < 1:
            raise SelfCorrectError("max_new_tokens, batch_size, lexicon_k, steer_pairs and n_controls must be >= 1")
        if self.steer_positions not in POSITIONS:
            raise SelfCorrectError(f"steer_positions must be one of {', '.join(POSITIONS)}, got {self.steer_positions!r}")
        if not 0 < self.moved_share <= 1:
            raise SelfCorrectError(f"moved_share must be in (0, 1], got {self.moved_share}")
        if min(self.n_null, self.n_boot) < 1:
            raise SelfCorrectError("n_null and n_boot must be >= 1")
        for kind, want in ((self.opening, "opening"), (self.detox, "detox"), (self.toxify, "toxify")):
            got = get_instruction(kind).direction
            if got != want:
                raise SelfCorrectError(f"instruction {kind!r} is a {got} instruction, but it is used as the {want} one")
        arms = self.arm_kinds()
        if self.arms and len(arms) < 2:
            raise SelfCorrectError(f"arms needs at least two instruction kinds (or one of {', '.join(ARM_SETS)}), "
                                   f"got {self.arms!r}")
        for kind in arms:
            if get_instruction(kind).direction == "opening":
                raise SelfCorrectError(f"arm {kind!r} is an opening instruction, not a correction")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n": 200, "rounds": 5, "max_new_tokens": 150},
    "small": {"n": 48, "rounds": 3, "max_new_tokens": 40},
    "tiny": {"n": 8, "rounds": 2, "max_new_tokens": 16, "steer_pairs": 16, "n_controls": 4},
    "crossed": {"n": 24, "rounds": 3, "max_new_tokens": 40, "arms": "crossed"},
    "robustness": {"n": 24, "rounds": 3, "max_new_tokens": 40, "arms": "robustness"},
}
"""``paper``: the paper's rounds and lengths (on 200 prompts); ``small``: a few minutes on 2 CPU
cores with the default model; ``tiny``: a smoke test; ``crossed``: every prompt (toxic and
non-toxic) gets the detox, the toxify and the neutral instruction; ``robustness``: the same with
the strong and the weak wording of both directions."""


def make_config(preset: str | None = None, **overrides: Any) -> SelfCorrectConfig:
    """A config from a preset name (or the defaults) with fields overridden; ``None`` values are ignored."""
    return from_preset(SelfCorrectConfig, PRESETS, preset, overrides, SelfCorrectError)


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
    prompt_kind: str = ""           # toxic | nontoxic (the side of the threshold or ranking it was drawn from)


def pool(prompts: Sequence | None, spec: str) -> tuple[list[str], list[str]]:
    """Texts and ids of the prompt pool, duplicates (same text) removed, order kept."""
    from ..data import load_prompts
    from ..generation import text_id

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
    import numpy as np

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
    kinds = {"detox": "toxic", "toxify": "nontoxic"}
    if cfg.arm_kinds():  # crossed design: every prompt gets every arm, prompts in the same order in each arm
        for arm in cfg.arm_kinds():
            for g in GROUPS:
                for i in picked[g]:
                    out.append(Sample(len(out), ids[i], texts[i], float(scores[i]), arm, arm, kinds[g]))
        return out
    for g in GROUPS:
        kind = cfg.detox if g == "detox" else cfg.toxify
        for i in picked[g]:
            out.append(Sample(len(out), ids[i], texts[i], float(scores[i]), g, kind, kinds[g]))
    return out
