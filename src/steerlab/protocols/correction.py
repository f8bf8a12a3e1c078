"""One round of intrinsic self-correction as an intervention (METHODS.md section 1), so that
"ask the model to revise" is evaluated like any other method: same prompts, decoding and scorer.

For each prompt the model first continues it as usual (same settings and per-row random numbers
as the unsteered arm, so round 1 is the baseline's text); then a dialogue is built, with the opening
instruction holding the prompt, the model's reply ``Completion: <prompt><continuation>``, and the
correction instruction, and the model answers it (chat template, same decoding, its own random
numbers keyed by prompt, sample and "correction"). The row's continuation is the revised text after ``Completion:`` with the
prompt removed from its start when it was repeated. Nothing in the model changes: ``apply`` is a
no-op, and this class overrides :meth:`~steerlab.interventions.Intervention.generate` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from ..generation import generate_batch, text_id
from ..interventions import Intervention, InterventionError, provenance, register
from ..models.model import Model
from ..options import option
from .selfcorrect import dialogue, get_instruction, instruction_texts, parse_completion


@dataclass
class SelfCorrectionFitOptions:
    instruction: str = option("strong_detox", "correction instruction (`steerlab selfcorrect --list-instructions`)")
    opening: str = option("opening", "opening instruction of the dialogue")


@register
@dataclass
class SelfCorrection(Intervention):
    """Self-correction prompting: one "please revise to be non-toxic" round after the first reply."""

    meta: dict = field(default_factory=dict)
    method = "selfcorrect"
    FitOptions = SelfCorrectionFitOptions

    @classmethod
    def from_options(cls, model: Model, o: SelfCorrectionFitOptions) -> SelfCorrection:
        return cls.fit(model, None, instruction=o.instruction, opening=o.opening)

    @classmethod
    def fit(cls, model: Model, data=None, instruction: str = "strong_detox", opening: str = "opening") -> SelfCorrection:
        """Nothing is learned: the instruction texts are fixed (``data`` is ignored) and recorded."""
        if get_instruction(instruction).direction == "opening":
            raise InterventionError(f"{instruction!r} is an opening instruction, not a correction")
        if get_instruction(opening).direction != "opening":
            raise InterventionError(f"{opening!r} is not an opening instruction")
        if not model.chat_template:
            raise InterventionError(f"{model.name} has no chat template: a correction round needs one")
        return cls(provenance(model, None, {"instruction": instruction, "opening": opening}, sites=[],
                              instructions=instruction_texts([opening, instruction])))

    def apply(self, model: Model, **options):
        """Nothing to change in the model: the correction is in the prompt (see :meth:`generate`)."""
        return nullcontext()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"none": torch.zeros(1)}

    @classmethod
    def from_tensors(cls, tensors, meta) -> SelfCorrection:
        return cls(meta)

    def generate(self, model: Model, texts: Sequence, cfg, keys: Sequence[str] | None = None,
                 **options) -> list[list[str]]:
        self.apply_options(options)  # none: an option is an error naming the method's options
        keys = list(keys) if keys is not None else [text_id(t) for t in texts]
        first = generate_batch(model, list(texts), cfg, keys)
        opts = self.meta["options"]
        dials = [dialogue(t, [f"Completion: {t}{c}"], opts["instruction"], opts["opening"])
                 for t, cs in zip(texts, first) for c in cs]
        revised = generate_batch(model, dials, replace(cfg, k=1, chat=True),
                                 [f"{key}|correction|{s}" for key in keys for s in range(cfg.k)])
        outs = [_strip_prompt(parse_completion(r[0])[0], t) for t, r in zip([t for t in texts for _ in range(cfg.k)], revised)]
        return [outs[i * cfg.k:(i + 1) * cfg.k] for i in range(len(texts))]


def _strip_prompt(completion: str, prompt: str) -> str:
    """The revised continuation: the completion without the prompt when it starts with it."""
    return completion[len(prompt):] if completion.startswith(prompt) else completion
