"""Data-parallel runs: the processes of one launch (``accelerate launch``, ``torchrun``) share the work.

The process group is read from the environment the launcher sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); without it, or with ``WORLD_SIZE=1``, everything runs in this one process as
before. With several processes:

- every generation run (:func:`steerlab.generation.generate_run`, hence ``steerlab generate`` and
  ``steerlab bench``) goes through :func:`run_loop`: rank 0 holds the run directory's lock,
  the batches still to do are dealt out in turn (batch ``j`` of the to-do list to rank
  ``j % size``), rank ``r`` appends its rows to its own run directory ``DIR/shards/rank{r}``, and
  rank 0 merges them into ``DIR/results.jsonl`` in the plan's batch order and removes ``shards/``.
  Batches are whole batches of the one-process plan and every row draws its own random numbers
  (:class:`steerlab.generation.RowSampler`), so the merged rows are the one-process run's rows;
- whatever is not generation (fitting, metrics, choices, reports) runs on rank 0 and its result is
  sent to the others (:meth:`Group.on_main`); an error on any rank is raised on every rank.

Resume: every call first merges whatever shards an interrupted call left, so a rerun continues with
any number of processes. Coordination uses a gloo process group (small pickled objects on the CPU),
whatever the model's device.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import SteerlabError
from .runs import RunDir, RunError, read_json

SHARDS = "shards"
TIMEOUT = timedelta(hours=24)  # rank 0 may fit a method for long while the others wait
_PG: list = []  # the gloo process group, created on first use


class ParallelError(SteerlabError):
    """The processes of a data-parallel launch disagree, or one of them failed."""


@dataclass(frozen=True)
class Group:
    """This process's place in the launch: ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=_group())
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=_group())
        return box[0]

    def on_main(self, fn: Callable[[], Any], share: bool = True) -> Any:
        """``fn()`` on rank 0 only; its result reaches every rank (``share=False``: rank 0 keeps it,
        the others get None), and so does its error: every rank raises it."""
        if self.size == 1:
            return fn()
        out, err = None, None
        if self.main:
            try:
                out = fn()
            except Exception as e:  # sent to the other ranks, then raised here too
                err = e
        status = self.share((_portable(err), out if share and err is None else None))
        if err is not None:
            raise err
        if status[0] is not None:
            raise _rebuild(*status[0])
        return out if self.main else status[1]

    def everywhere(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every rank, then a barrier: when any rank failed, every rank raises (its own
        error, or the first failed rank's)."""
        err = None
        try:
            out = fn()
        except Exception as e:
            if self.size == 1:
                raise
            err, out = e, None
        failed = [s for s in self.gather(_portable(err)) if s is not None]
        if err is not None:
            raise err
        if failed:
            raise _rebuild(*failed[0])
        return out

    def same(self, value: Any, what: str) -> None:
        """Raise on every rank unless every rank holds the same ``value`` (JSON-comparable)."""
        import hashlib

        seen = self.gather(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest())
        odd = [r for r, v in enumerate(seen) if v != seen[0]]
        if odd:
            raise ParallelError(f"the {self.size} processes disagree on {what} (rank(s) {odd} differ from rank 0); "
                                f"launch every process with the same command and data")

    def device(self, device: str | None) -> str | None:
        """``cuda`` (no index) means this process's own GPU, ``cuda:{local_rank}``, in a data-parallel launch."""
        if self.size > 1 and device == "cuda":
            import torch

            return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"
        return device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ParallelError(f"environment variable {name}={raw!r} is not an integer") from None


def group() -> Group:
    """The process group of this launch, from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``."""
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ParallelError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process group")
    return Group(rank, size, _env_int("LOCAL_RANK", rank))


def _group():
    """The gloo group (initialised from the launcher's environment on first use)."""
    if not _PG:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            raise ParallelError("this torch has no torch.distributed gloo backend: data-parallel runs need it")
        if dist.is_initialized():  # e.g. by accelerate in the caller's script: a gloo group of our own
            _PG.append(dist.new_group(backend="gloo", timeout=TIMEOUT))
            atexit.register(_destroy, _PG[0])
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
            _PG.append(dist.group.WORLD)
            atexit.register(_destroy, None)
    return _PG[0]


def _destroy(pg) -> None:
    """Tear down the group this module created before the interpreter exits: a gloo group left to
    the interpreter's own teardown can abort the process ("terminate called without an active
    exception") after its work is done, and the launcher then reports the run as failed."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group(pg)
    except Exception:  # best effort at exit
        pass


def _portable(err: BaseException | None) -> tuple[type, str] | None:
    return None if err is None else (type(err), str(err))


def _rebuild(cls: type, message: str) -> Exception:
    try:
        return cls(message)
    except Exception:
        return ParallelError(f"{cls.__name__}: {message}")


# --- one run directory written by every process ---------------------------------------------------
def run_loop(path: str | os.PathLike, config: dict, batches: Sequence[Sequence[Any]],
             work: Callable[[Sequence[Any], int], list[dict]], *, keys: Callable[[Any], Sequence[Hashable]],
             row_key: Callable[[dict], Hashable], seed: Callable[[Sequence[Any]], int], desc: str = "run",
             progress: bool | None = None, overwrite: bool = False, record: dict | None = None) -> list[dict]:
    """``RunDir(path, config).loop(batches, work, ...)`` (writing ``record`` first and ``n_rows``
    last), shared by the processes of the launch as the module docstring says. Every rank returns
    every row of the run."""
    g, path = group(), Path(path)
    g.same([config, [[list(k) if isinstance(k, tuple) else k for x in b for k in keys(x)] for b in batches]],
           f"the run in {path} (its config and batches)")
    run: RunDir | None = g.on_main(lambda: _open(path, config, overwrite, record or {}, batches, keys, row_key),
                                   share=False)
    try:
        if g.size == 1:
            rows = run.loop(batches, work, keys=keys, row_key=row_key, seed=seed, desc=desc, progress=progress)
            run.write_record(n_rows=len(rows))
            return rows
        todo = g.on_main(lambda: _todo(run, batches, keys, row_key))
        t0 = time.perf_counter()
        g.everywhere(lambda: _shard(path, config, g, [batches[i] for i in todo[g.rank::g.size]], work, keys,
                                    row_key, seed, desc, progress))
        return g.on_main(lambda: _finish(run, batches, keys, row_key, desc, time.perf_counter() - t0, bool(todo), g))
    finally:
        if run is not None:
            run.close()


def _open(path: Path, config: dict, overwrite: bool, record: dict, batches, keys, row_key) -> RunDir:
    """The run directory, locked, with any shards a previous call left merged in (or dropped with ``overwrite``)."""
    run = RunDir(path, config, overwrite=overwrite)
    try:
        if overwrite:
            shutil.rmtree(path / SHARDS, ignore_errors=True)
        _merge(run, batches, keys, row_key)
        run.write_record(**record)
    except BaseException:
        run.close()
        raise
    return run


def _todo(run: RunDir, batches, keys, row_key) -> list[int]:
    done = {row_key(r) for r in run.rows(row_key)}
    return [i for i, b in enumerate(batches) if any(k not in done for x in b for k in keys(x))]


def _shard(path: Path, config: dict, g: Group, mine: list, work, keys, row_key, seed, desc, progress) -> None:
    shard = {**config, "shard": {"rank": g.rank, "processes": g.size}}
    with RunDir(path / SHARDS / f"rank{g.rank}", shard) as run:
        run.loop(mine, work, keys=keys, row_key=row_key, seed=seed, desc=f"{desc} (rank {g.rank}/{g.size})",
                 progress=bool(progress if progress is not None else True) and g.main)


def _finish(run: RunDir, batches, keys, row_key, desc: str, seconds: float, worked: bool, g: Group) -> list[dict]:
    _merge(run, batches, keys, row_key)
    if worked:
        run.add_seconds(f"{desc}_seconds", seconds)  # wall time of the launch, as one process records its own
    rows = run.rows(row_key)
    run.write_record(n_rows=len(rows), processes=g.size)
    return rows


def _merge(run: RunDir, batches, keys, row_key) -> None:
    """Append the rows of every shard under ``run.path / shards`` that the run lacks, in the plan's
    order (batch, then item, then row), then remove the shards."""
    root = run.path / SHARDS
    if not root.is_dir():
        return
    base = json.loads(json.dumps(run.config, default=str))
    found: dict = {}
    for d in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        cfg = read_json(d / "config.json", "shard config", RunError)
        if {k: v for k, v in cfg.items() if k != "shard"} != base:
            raise RunError(f"{d} holds a shard of another run; remove {root} or pass --overwrite")
        with RunDir(d, cfg) as shard:
            for r in shard.rows(row_key):
                found.setdefault(row_key(r), r)
    done = {row_key(r) for r in run.rows(row_key)}
    order = [k for b in batches for x in b for k in keys(x)]
    run.append([found[k] for k in order if k in found and k not in done])
    shutil.rmtree(root)
