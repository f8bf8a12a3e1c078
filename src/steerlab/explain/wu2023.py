"""The authors' own saved attributions of Wu et al. (arXiv 2310.00492), scored with steerlab's maths.

The folder (``shared/data/wu2023_attributions``, see its README) holds, for 158 prompts, the quantised
attribution matrices ``q`` (``[n_input_tokens, n_output_tokens]``, BOS excluded) of Vicuna-7B (tuned,
``v``) and LLaMA-7B (base, ``l``), their SentencePiece tokens, the prompts with the annotated
instruction spans, and human ratings of Vicuna's responses. Everything is read with ``json``,
``numpy`` and plain text parsing (no pickle).

The instruction tokens follow the public analysis code: each annotated span is widened to the whole
prompt sentences that contain it (a sentence ends at ``.!?:`` followed by white space; a leading
``Input:`` is dropped, a bare ``Output:`` is not an instruction; as there, the empty part left by a
span ending in ``Input: `` matches the prompt's first sentence); a sentence's tokens are the prompt
tokens whose characters overlap its first occurrence in the text the pieces spell. Table 1 keeps
the responses rated 1 (not followed) or >= 2 (followed) with at least 5 output tokens; Table 2
compares every prompt's score under the two models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from .attribution import B_DEFAULT, importance_density, instruction_score
from .attribution_study import welch

MODELS = {"v": "vicuna_7B", "l": "llama_7B"}


def decode_field(text: str) -> str:
    """A TSV field of the dataset as text (``/n`` and ``/t`` stand for newline and tab)."""
    text = text.replace("/t", "\t").replace("/n", "\n")
    if len(text) > 1 and text.startswith('"') and text.endswith('"'):
        text = text[1:-1]
    return text.replace('""', '"')


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?:])\s+", text)


def instruction_sentences(prompt: str, annotation: str) -> list[str]:
    """The prompt sentences containing each annotated instruction span (``annotation``: spans
    separated by ``|||``, then ``&&&`` and the context)."""
    prompt_sents = [s for line in prompt.split("\n") for s in sentences(line)]
    out: list[str] = []
    for span in annotation.split("&&&")[0].replace("\n", "|||").split("|||"):
        for part in sentences(span):
            hit = next((p for p in prompt_sents if part in p), None)
            if hit is None:
                continue
            hit = hit[6:].strip() if hit.startswith("Input:") else hit
            if hit and hit != "Output:" and hit not in out:
                out.append(hit)
    return out


def piece_text(piece: str) -> str:
    """The characters a SentencePiece piece stands for (``▁`` is a space, ``<0x0A>`` a byte)."""
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    return chr(int(m.group(1), 16)) if m else piece.replace("\u2581", " ")


def instruction_mask(pieces: list[str], spans: list[str]) -> np.ndarray:
    """Indices of the tokens (``pieces``) that overlap the first occurrence of each span."""
    text, offsets = "", []
    for p in pieces:
        s = piece_text(p)
        offsets.append((len(text), len(text) + len(s)))
        text += s
    idx: set[int] = set()
    for span in (s.strip() for s in spans):
        at = text.find(span) if span else -1
        if at < 0:
            continue
        end = at + len(span)
        idx.update(i for i, (a, z) in enumerate(offsets) if a < end and z > at and text[a:z].strip())
    return np.array(sorted(idx), dtype=np.int64)


def _tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf8") as f:
        f.readline()
        return [row.rstrip("\n").split("\t") for row in f if len(row) > 1]


def load_reference(folder: str | Path) -> list[dict]:
    """One dict per prompt: ``id``, ``group`` (lima / mtbench / user), ``instruction`` (sentences),
    ``rating`` (Vicuna's response; 0 = not rated) and per model key (``v``, ``l``) the ``tokens``,
    the quantised matrix ``q`` and the instruction token indices ``mask``."""
    folder = Path(folder)
    need = ["items.json", "attributions.npz", "FinalDataset.tsv", "AnnotatedDataset.tsv"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)} (expected the wu2023_attributions folder)")
    items = json.loads((folder / "items.json").read_text(encoding="utf8"))["items"]
    prompts = {r[0]: (decode_field(r[1]), decode_field(r[3])) for r in _tsv(folder / "FinalDataset.tsv")
               if len(r) >= 4}
    ratings = {r[0].rsplit(".", 1)[0]: float(r[6]) for r in _tsv(folder / "AnnotatedDataset.tsv")
               if len(r) == 7 and r[1] == MODELS["v"] and r[6].lstrip("-").isdigit()}
    out = []
    with np.load(folder / "attributions.npz") as z:
        for key, per_model in items.items():
            if key not in prompts:
                raise DataError(f"item {key!r} has no row in FinalDataset.tsv")
            spans = instruction_sentences(*prompts[key])
            row = {"id": key, "group": key.split("_")[0], "instruction": spans, "rating": ratings.get(key, 0.0)}
            for m in MODELS:
                toks = per_model[m]["input_tokens"]
                row[m] = {"tokens": toks, "q": z[f"{m}/{key}"], "mask": instruction_mask(toks, spans)}
            out.append(row)
    return out


def item_score(entry: dict, b: int = B_DEFAULT, prompt_max: bool = True) -> float:
    """The instruction score of one model's matrix (0 when it has no instruction token or no output)."""
    if entry["mask"].size == 0 or entry["q"].shape[1] == 0:
        return 0.0
    return instruction_score(importance_density(entry["q"], b, prompt_max, quantised=True), entry["mask"])


def reference_tables(folder: str | Path, b: int = B_DEFAULT, prompt_max: bool = True) -> dict:
    """Table 1 (Vicuna's followed vs not followed responses) and Table 2 (Vicuna vs LLaMA on every
    prompt) of the paper, one-sided Welch t-tests of steerlab's instruction score."""
    rows = load_reference(folder)
    tuned = [item_score(r["v"], b, prompt_max) for r in rows]
    base = [item_score(r["l"], b, prompt_max) for r in rows]
    rated = [(s, r["rating"]) for s, r in zip(tuned, rows) if r["rating"] > 0 and r["v"]["q"].shape[1] >= 5]
    table1 = welch([s for s, g in rated if g >= 2], [s for s, g in rated if g < 2], "followed", "not followed")
    table2 = welch(tuned, base, "tuned (Vicuna-7B)", "base (LLaMA-7B)")
    return {"table1": table1, "table2": table2, "n_items": len(rows),
            "score": "paper (per-prompt max)" if prompt_max else "raw density (no per-prompt max)"}
