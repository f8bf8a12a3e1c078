"""Run directories: one folder per run, append-only results, resumable.

A run directory holds ``config.json`` (everything needed to rerun), ``record.json`` (versions,
fingerprints, seeds, timings), ``results.jsonl`` (one JSON row per item, appended as produced and
fsynced, so a crash loses at most the batch in flight and a rerun resumes), ``metrics.json``,
``figures/`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import SteerlabError
from .validate import json_safe


class RunError(SteerlabError):
    """A run directory that cannot be used as asked (another run's config, a corrupt results file)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes) -> Path:
    """Write ``path`` through a temporary file in its folder (``write(file)``, or the given bytes),
    fsync it, then rename it over ``path``: readers see the old file or the new one, never half of
    one, and a failed write leaves neither a partial file nor a stray temporary. The file gets the
    usual mode for new files (``0o666`` less the umask), not the temporary file's ``0o600``."""
    path = Path(path)
    if path.is_dir():
        raise SteerlabError(f"cannot write {path}: it is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SteerlabError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes | bytearray):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, an I/O error: one line, nothing left behind
        Path(tmp).unlink(missing_ok=True)
        raise SteerlabError(f"cannot write {path}: {e.strerror or e}{_full_hint(e)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _full_hint(e: OSError) -> str:
    return "; free some space and rerun the same command (it resumes)" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else ""


def _dumps(obj: Any, **kw) -> str:
    """JSON text of ``obj`` with NaN and infinity written as ``null`` (standard JSON, never a bare ``NaN``)."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (see :func:`write_atomic`)."""
    return write_atomic(path, _dumps(obj, indent=1).encode())



def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically."""
    return write_atomic(path, "".join(_dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None,
              digits: int | None = 6) -> Path:
    """Write dict rows as CSV (header from ``columns`` or the union of the rows' keys in order of
    appearance), atomically; floats get ``digits`` significant digits (None: full precision)."""
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.{digits}g}" if digits is not None and isinstance(v, float) else v) for k, v in r.items()})
    return write_atomic(path, buf.getvalue().encode())


def read_json(path: Path, what: str, error: type[SteerlabError] = SteerlabError) -> Any:
    """Parse a JSON file; a missing or unreadable file is ``error`` naming ``what`` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} cannot be read as JSON: {e}") from e


def cached_json(path: str | os.PathLike | None, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in the JSON file ``path`` beside ``key``: while the file holds the same key
    (compared as JSON) its value is read back instead of computed again, so that a resumed run does not
    measure twice what it measured before; another key (a changed input) or an unreadable file computes
    and overwrites. ``path`` None: compute only. The value is returned as JSON reads it back (non-finite
    floats as None, tuples as lists), the first time too."""
    if path is None:
        return compute()
    found, value = read_cached(path, key)
    if not found:  # returned as it reads back, so that a first call and a resumed one see the same value
        value = write_cached(path, key, compute())
    return value


def write_cached(path: str | os.PathLike, key: Any, value: Any) -> Any:
    """Keep ``value`` in the JSON file ``path`` under ``key`` (as :func:`cached_json` reads it back);
    returns the value as JSON reads it back."""
    value = json.loads(_dumps(value))
    write_json(path, {"key": key, "value": value})
    return value


def read_cached(path: str | os.PathLike | None, key: Any) -> tuple[bool, Any]:
    """``(True, value)`` when the JSON file ``path`` holds ``key`` (:func:`cached_json`), else ``(False, None)``."""
    f = Path(path) if path is not None else None
    if f is None or not f.exists():
        return False, None
    try:
        held = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, None
    if isinstance(held, dict) and "value" in held and held.get("key") == json.loads(_dumps(key)):
        return True, held["value"]
    return False, None


def read_record(path: str | os.PathLike) -> dict:
    """The ``record.json`` of a run directory (empty when there is none), read without taking its lock."""
    f = Path(path) / "record.json"
    return read_json(f, "run record", RunError) if f.exists() else {}


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"steerlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class RunDir:
    """A run directory. ``RunDir(path, config)`` creates it, or reopens it when it holds a run of
    the same config (raising :class:`RunError` when the config differs, unless ``overwrite``).

    One writer at a time: the directory is locked (``.lock``, an exclusive ``flock``) from
    construction until :meth:`close` (or the end of a ``with`` block, or the process); a second
    writer fails at once with a :class:`RunError` naming the holder. Nothing is written before
    the lock is held."""

    def __init__(self, path: str | os.PathLike, config: dict, overwrite: bool = False):
        if not isinstance(path, str | os.PathLike) or not str(path).strip():
            raise RunError(f"a run directory must be a non-empty path (an empty one would write the run into the "
                           f"current directory), got {path!r}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} exists and is not a directory; choose a directory for the run")
        self.config = json.loads(json.dumps(config, default=str))
        cfg_file = self.path / "config.json"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {self.path}: {e.strerror or e}") from e
        self._lock()
        try:
            self._check_config(cfg_file, overwrite)
        except BaseException:
            self.close()
            raise
        try:
            if overwrite:
                for name in ("results.jsonl", "metrics.json", "record.json"):
                    (self.path / name).unlink(missing_ok=True)
            (self.path / "figures").mkdir(exist_ok=True)
            write_json(cfg_file, self.config)
        except OSError as e:
            self.close()
            raise RunError(f"cannot write into run directory {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise
        self.results = self.path / "results.jsonl"

    def _check_config(self, cfg_file: Path, overwrite: bool) -> None:
        if not cfg_file.exists() or overwrite:
            return
        try:
            old = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{cfg_file} is not valid JSON ({e}); move the directory away or pass overwrite") from e
        if old != self.config:
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            raise RunError(f"{self.path} holds a run with a different config (differs in: {', '.join(diff)}); "
                           f"choose another output directory or pass --overwrite")

    # --- the lock ------------------------------------------------------------------------------
    def _lock(self) -> None:
        lock = self.path / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise RunError(f"cannot use run directory {self.path}: {e.strerror or e} (is it read-only?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(lock).read_text(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{self.path} is in use by another run ({holder}); wait for it to finish or choose "
                           f"another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode())
        self._fd: int | None = fd

    def close(self) -> None:
        """Release the directory's lock (idempotent)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- results -------------------------------------------------------------------------------
    def rows(self, key: Callable[[dict], Hashable] | None = None) -> list[dict]:
        """All complete rows written so far. A torn last line (a crash mid-write) is dropped from
        the file; a corrupt line elsewhere is an error naming it (nothing is rewritten). With
        ``key``, a row whose key was seen before is dropped (the first one counts)."""
        if not self.results.exists():
            return []
        data = self.results.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.results, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        rows, seen = [], set()
        # split on "\n" only: str.splitlines() also splits inside a string at U+2028, U+0085 and other
        # separators, which JSON writes raw (a model's continuation can hold them)
        for i, line in enumerate(data.decode().split("\n")[:-1] if data else [], 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunError(f"{self.results} line {i} is not valid JSON ({e}); the file was left untouched") from e
            if key is not None:
                try:
                    k = key(row)
                except (KeyError, TypeError) as e:
                    raise RunError(f"{self.results} line {i} lacks the field {e} that identifies a row") from None
                if k in seen:
                    continue
                seen.add(k)
            rows.append(row)
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows in one write, fsynced. When the write fails (a full disk, an I/O error) the
        file is cut back to its previous end and the error is a :class:`RunError` in one line: the
        batch is lost, and rerunning the same command runs it again (resumable)."""
        data = "".join(_dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        if not data:
            return
        fd, end = -1, None
        try:
            fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_umask())
            end = os.fstat(fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            if fd >= 0 and end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            raise RunError(f"cannot write results to {self.results}: {e.strerror or e}{_full_hint(e)}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def loop(self, batches: Sequence[Sequence[Any]], work: Callable[[Sequence[Any], int], list[dict]], *,
             keys: Callable[[Any], Iterable[Hashable]], row_key: Callable[[dict], Hashable],
             seed: Callable[[Sequence[Any]], int], desc: str = "run", progress: bool | None = None) -> list[dict]:
        """The resumable batch loop every run uses. ``batches`` are planned by the caller
        (deterministically); item ``x`` of a batch produces the rows whose keys are ``keys(x)``. A
        batch whose rows are all in ``results.jsonl`` is skipped; any other batch is run whole as
        ``work(batch, seed(batch))`` (so a resumed batch sees the same seed and batch mates as an
        uninterrupted one), its rows not yet written are appended in one write, and a progress bar
        counts rows. The seconds spent add up in ``record.json`` under ``{desc}_seconds`` across
        resumed calls. Returns every row of the run, duplicates dropped."""
        done = {row_key(r) for r in self.rows(row_key)}
        total = sum(1 for b in batches for x in b for _ in keys(x))
        todo = [b for b in batches if any(k not in done for x in b for k in keys(x))]
        from .progress import Progress

        where = self.path.parts[-3 if self.path.name.isdigit() else -2:]  # val/steering/0, test/steering
        bar = Progress(total, f"{desc} {'/'.join(where)}", unit="row",
                       initial=total - sum(1 for b in todo for x in b for _ in keys(x)),
                       show=(progress if progress is not None else True) and bool(todo))
        t0 = time.perf_counter()
        failed = True
        try:
            for b in todo:
                rows = [r for r in work(b, seed(b)) if row_key(r) not in done]
                self.append(rows)
                done.update(row_key(r) for r in rows)
                bar.update(sum(1 for x in b for _ in keys(x)))
            failed = False
        finally:
            bar.close()
            if todo:
                try:
                    self.add_seconds(f"{desc}_seconds", time.perf_counter() - t0)
                except SteerlabError:
                    if not failed:  # after a failure (a full disk) its own error is the one to show
                        raise
        return self.rows(row_key)

    # --- records -------------------------------------------------------------------------------
    def record(self) -> dict:
        """The contents of ``record.json`` (empty before the first write)."""
        return read_record(self.path)

    def write_record(self, **fields: Any) -> None:
        rec = self.record()
        rec.setdefault("versions", versions())
        rec.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        rec.update(fields)
        write_json(self.path / "record.json", rec)

    def add_seconds(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the timing ``name`` of ``record.json`` (timings add up over resumes)."""
        rec = self.record()
        self.write_record(**{name: round(float(rec.get(name) or 0.0) + seconds, 3)})

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path / "metrics.json", metrics)
