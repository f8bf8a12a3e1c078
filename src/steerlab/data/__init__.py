"""Prompt sets and contrast sets: bundled (RealToxicityPrompts, Do-Not-Answer, HarmBench, neutral
text), local files and Hugging Face datasets; seeded splits by prompt; contrast-set builders."""

from .contrast import ContrastSet, contrast_from_continuations, contrast_from_scores
from .prompts import (
    BUNDLED,
    DNA_CATEGORIES,
    RTP_CATEGORIES,
    Prompt,
    fingerprint,
    load_prompts,
    neutral_texts,
    prompt_id,
    split,
    take,
    texts,
    training_prompts,
)

__all__ = [
    "BUNDLED", "DNA_CATEGORIES", "RTP_CATEGORIES", "ContrastSet", "Prompt", "contrast_from_continuations",
    "contrast_from_scores", "fingerprint", "load_prompts", "neutral_texts", "prompt_id", "split", "take", "texts", "training_prompts",
]
