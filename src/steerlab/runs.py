"""Run directories: one folder per run, append-only results, resumable.

A run directory holds ``config.json`` (everything needed to rerun), ``record.json`` (versions,
fingerprints, seeds, timings), ``results.jsonl`` (one JSON row per item, appended as produced and
fsynced, so a crash loses at most the batch in flight and a rerun resumes), ``metrics.json``,
``figures/`` and ``report.html``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import SteerlabError


class RunError(SteerlabError):
    """A run directory that cannot be used as asked (another run's config, a corrupt results file)."""


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def read_json(path: Path, what: str, error: type[SteerlabError] = SteerlabError) -> Any:
    """Parse a JSON file; a missing or unreadable file is ``error`` naming ``what`` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} cannot be read as JSON: {e}") from e


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"steerlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class RunDir:
    """A run directory. ``RunDir(path, config)`` creates it, or reopens it when it holds a run of
    the same config (raising :class:`RunError` when the config differs, unless ``overwrite``)."""

    def __init__(self, path: str | os.PathLike, config: dict, overwrite: bool = False):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        cfg_file = self.path / "config.json"
        if cfg_file.exists() and not overwrite:
            try:
                old = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise RunError(f"{cfg_file} is not valid JSON ({e}); move the directory away or pass overwrite") from e
            if old != self.config:
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise RunError(f"{self.path} holds a run with a different config (differs in: {', '.join(diff)}); "
                               f"choose another output directory or pass --overwrite")
        elif overwrite and self.path.exists():
            for name in ("results.jsonl", "metrics.json", "record.json"):
                (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)
        write_json_atomic(cfg_file, self.config)
        self.results = self.path / "results.jsonl"

    # --- results -------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """All complete rows written so far. A torn last line (a crash mid-write) is dropped from
        the file; a corrupt line elsewhere is an error naming it (nothing is rewritten)."""
        if not self.results.exists():
            return []
        data = self.results.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.results, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        rows = []
        for i, line in enumerate(data.decode().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RunError(f"{self.results} line {i} is not valid JSON ({e}); the file was left untouched") from e
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows in one write, flushed and fsynced."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not text:
            return
        with open(self.results, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    # --- records -------------------------------------------------------------------------------
    def write_record(self, **fields: Any) -> None:
        rec_file = self.path / "record.json"
        rec = json.loads(rec_file.read_text()) if rec_file.exists() else {}
        rec.setdefault("versions", versions())
        rec.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        rec.update(fields)
        write_json_atomic(rec_file, rec)

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.path / "metrics.json", metrics)
