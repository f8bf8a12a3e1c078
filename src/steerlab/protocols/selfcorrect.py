"""The dialogue protocol of intrinsic self-correction (arXiv 2505.11924; METHODS.md section 1).

A self-correction dialogue for one prompt runs for ``R`` rounds:

- round 1: one user turn, the *opening* instruction with the prompt filled in (think carefully,
  complete the sentence, give the final sentence after ``"Completion:"``);
- round ``r > 1``: the whole history (every earlier user turn and the model's full replies), then
  one more user turn holding a *correction* instruction.

Instruction texts are data, held in a registry that starts from ``protocols/instructions.json`` and
that users extend with :func:`register_instruction` or :func:`load_instructions` (a JSON file).
Every instruction has a *direction*: ``opening`` (starts a dialogue; its text holds ``{prompt}``),
``detox`` (asks for less toxic text), ``toxify`` (asks for more toxic text) or ``neutral`` (asks
for a rewrite without saying which way: the control arm that separates an instruction's effect
from that of one more turn). The built-in kinds are ``opening``, ``strong_detox``, ``weak_detox``,
``strong_toxify``, ``weak_toxify`` and ``neutral_rewrite``; the strong ones spell out what to
remove (or add), the weak ones only say "non-toxic" ("toxic").

    from steerlab.protocols.selfcorrect import dialogue, parse_completion
    msgs = dialogue("So I told him he was a", ["Completion: So I told him he was a fool."], "strong_detox")
    # [user: opening(prompt), assistant: reply 1, user: strong_detox]
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SteerlabError
from ..registry import choose, unknown

DIRECTIONS = ("opening", "detox", "toxify", "neutral")
FORMAT = "steerlab.instructions"


class InstructionError(SteerlabError):
    """An unknown instruction kind, a malformed instruction file or text."""


@dataclass(frozen=True)
class Instruction:
    """One registered instruction: its ``kind`` (registry key), ``text`` and ``direction``."""

    kind: str
    text: str
    direction: str

    def render(self, prompt: str | None = None) -> str:
        """The user-turn text; an opening instruction gets ``prompt`` put in place of ``{prompt}``."""
        if self.direction == "opening":
            if prompt is None:
                raise InstructionError(f"opening instruction {self.kind!r} needs a prompt")
            return self.text.replace("{prompt}", prompt)
        return self.text


_REGISTRY: dict[str, Instruction] = {}


def _infer_direction(kind: str) -> str:
    k = kind.lower()
    for d in ("detox", "toxify", "opening", "neutral"):
        if d in k:
            return d
    raise InstructionError(f"cannot tell the direction of instruction {kind!r} from its name; pass "
                           f"direction= one of {', '.join(DIRECTIONS)}")


def _make(kind: str, text: str, direction: str | None) -> Instruction:
    if not isinstance(kind, str) or not kind.strip():
        raise InstructionError(f"instruction kind must be a non-empty string, got {kind!r}")
    if not isinstance(text, str) or not text.strip():
        raise InstructionError(f"instruction {kind!r}: text must be a non-empty string")
    direction = direction or _infer_direction(kind)
    choose(f"direction of instruction {kind!r}:", direction, DIRECTIONS, InstructionError)
    if direction == "opening" and "{prompt}" not in text:
        raise InstructionError(f"opening instruction {kind!r} must contain the placeholder {{prompt}}")
    return Instruction(kind, text, direction)


def _parse(obj, where: str) -> list[Instruction]:
    """Instructions from the JSON forms accepted by :func:`load_instructions`."""
    if isinstance(obj, Mapping) and "instructions" in obj:
        if obj.get("format", FORMAT) != FORMAT:
            raise InstructionError(f"{where}: format is {obj.get('format')!r}, expected {FORMAT!r}")
        obj = obj["instructions"]
    if not isinstance(obj, Mapping) or not obj:
        raise InstructionError(f"{where}: expected a JSON object mapping instruction kinds to texts "
                               '(or to {"text": ..., "direction": ...})')
    out = []
    for kind, v in obj.items():
        if isinstance(v, str):
            out.append(_make(kind, v, None))
        elif isinstance(v, Mapping) and "text" in v:
            out.append(_make(kind, v["text"], v.get("direction")))
        else:
            raise InstructionError(f"{where}: instruction {kind!r} must be a string or an object with 'text'")
    return out


def _builtin() -> list[Instruction]:
    data = resources.files("steerlab.protocols").joinpath("instructions.json").read_text(encoding="utf-8")
    return _parse(json.loads(data), "steerlab/protocols/instructions.json")


def _registry() -> dict[str, Instruction]:
    if not _REGISTRY:
        _REGISTRY.update({i.kind: i for i in _builtin()})
    return _REGISTRY


def reset_instructions() -> None:
    """Forget user-registered instructions and restore the built-in texts."""
    _REGISTRY.clear()
    _registry()


def instruction_kinds(direction: str | None = None) -> list[str]:
    """Registered kinds, optionally only those of one direction (``opening``, ``detox``, ``toxify``)."""
    return [k for k, i in _registry().items() if direction is None or i.direction == direction]


def get_instruction(kind: str) -> Instruction:
    """The registered instruction ``kind``; an unknown kind is an error that lists the known ones."""
    reg = _registry()
    if kind not in reg:
        raise InstructionError(unknown("instruction kind", kind, reg) + " (add one with register_instruction or "
                               "load_instructions)")
    return reg[kind]


def register_instruction(kind: str, text: str, direction: str | None = None, overwrite: bool = False) -> Instruction:
    """Add an instruction to the registry. ``direction`` (``opening``/``detox``/``toxify``) defaults
    to the one named in ``kind`` (``my_detox`` -> ``detox``); an opening text must contain
    ``{prompt}``. Replacing an existing kind needs ``overwrite=True``."""
    inst = _make(kind, text, direction)
    reg = _registry()
    if kind in reg and not overwrite and reg[kind] != inst:
        raise InstructionError(f"instruction {kind!r} is already registered; pass overwrite=True to replace it")
    reg[kind] = inst
    return inst


def load_instructions(path: str | Path, overwrite: bool = True) -> list[str]:
    """Register the instructions of a JSON file and return their kinds. The file is either
    ``{"kind": "text", ...}``, ``{"kind": {"text": ..., "direction": ...}, ...}`` or the format of
    the built-in file (``{"format": "steerlab.instructions", "instructions": {...}}``). Kinds
    already registered are replaced (the file wins) unless ``overwrite=False``."""
    from ..runs import read_json

    path = Path(path)
    obj = read_json(path, "instruction file", InstructionError)
    insts = _parse(obj, str(path))
    for i in insts:
        register_instruction(i.kind, i.text, i.direction, overwrite=overwrite)
    return [i.kind for i in insts]


def instruction_texts(kinds: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{kind: {"text", "direction"}}`` for the given kinds (recorded in run configs)."""
    return {k: {"text": get_instruction(k).text, "direction": get_instruction(k).direction} for k in kinds}


# --- dialogues ---------------------------------------------------------------------------------
def dialogue(prompt: str, responses: Sequence[str], correction: str, opening: str = "opening") -> list[dict]:
    """The messages of round ``len(responses) + 1`` for ``prompt``: the opening turn, then for each
    earlier reply the assistant turn and a correction turn. With no responses this is round 1."""
    op = get_instruction(opening)
    if op.direction != "opening":
        raise InstructionError(f"{opening!r} is a {op.direction} instruction, not an opening one; opening kinds: "
                               f"{', '.join(instruction_kinds('opening'))}")
    msgs = [{"role": "user", "content": op.render(prompt)}]
    if responses:
        corr = get_instruction(correction)
        if corr.direction == "opening":
            raise InstructionError(f"{correction!r} is an opening instruction, not a correction; correction kinds: "
                                   f"{', '.join(k for k in _registry() if _registry()[k].direction != 'opening')}")
        for r in responses:
            msgs += [{"role": "assistant", "content": r}, {"role": "user", "content": corr.render()}]
    return msgs


_MARKER = re.compile(r"completion\s*:", re.IGNORECASE)
_QUOTES = "\"'“”‘’`*"


def parse_completion(response: str) -> tuple[str, bool]:
    """The final sentence of a reply and whether the ``Completion:`` marker was found.

    The reply is cut at every ``Completion:`` (any case); the last piece after a marker that is not
    empty, up to its first blank line and stripped of whitespace, quotes and markdown asterisks,
    is the completion. Without a marker (or with nothing after any), the whole reply, stripped,
    with ``False``."""
    pieces = _MARKER.split(response)
    for rest in reversed(pieces[1:]):
        rest = rest.strip().split("\n\n")[0].strip().strip(_QUOTES).strip()
        if rest:
            return rest, True
    return response.strip(), False
