"""Progress that reads in a terminal and in a log file.

In a terminal (stderr is a TTY) each phase gets one tqdm bar named by the phase. Anywhere else
(a file, a pipe, CI, ``nohup``) a phase writes plain lines to stderr, never a carriage return or a
cursor movement: one when it starts, one each time another tenth of its work is finished (a group
of batches), with the elapsed time and an estimate of the time left, and one when it ends.
``STEERLAB_PROGRESS=bar|plain|off`` overrides the choice.

:func:`quiet_transformers` silences the progress bars of transformers and huggingface_hub
("Loading weights", downloads), which steerlab's own phases replace.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
MODES = ("bar", "plain", "off")


def mode(stream: TextIO | None = None) -> str:
    """``bar`` in a terminal, ``plain`` otherwise; ``$STEERLAB_PROGRESS`` (bar, plain, off) wins."""
    env = os.environ.get("STEERLAB_PROGRESS", "").strip().lower()
    if env in MODES:
        return env
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "plain"


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """Progress of one phase over ``total`` units (rows, batches, arms). ``update(n)`` after each
    finished piece; ``note(text)`` names what the phase is doing now (a bar's postfix, a line in a
    log); ``close()`` (or the ``with`` block's end) finishes it. ``show=False`` prints nothing."""

    def __init__(self, total: int, desc: str, unit: str = "row", show: bool = True, initial: int = 0,
                 stream: TextIO | None = None, steps: int = 10):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode(self.stream) if show else "off"
        self.t0 = time.perf_counter()
        self._start = self.n
        self._every = max(1, -(-self.total // max(1, steps)))  # a line per tenth (ceil)
        self._next = (self.n // self._every + 1) * self._every
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False, file=self.stream)
        elif self.mode == "plain":
            done = f", {self.n} done before" if self.n else ""
            self._line(f"{self.total} {self.units}{done}")

    @property
    def units(self) -> str:
        return self.unit + ("es" if self.unit.endswith(("ch", "s", "x")) else "s")

    def _line(self, text: str) -> None:
        self.stream.write(f"[{self.desc}] {text}\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain" and self.n >= self._next and self.n < self.total:
            self._next = (self.n // self._every + 1) * self._every
            el = time.perf_counter() - self.t0
            rate = (self.n - self._start) / el if el > 0 else 0.0
            eta = f", about {_seconds((self.total - self.n) / rate)} left" if rate > 0 else ""
            self._line(f"{self.n}/{self.total} {self.units} ({100 * self.n / max(1, self.total):.0f}%), "
                       f"{_seconds(el)}{eta}")

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        elif self.mode == "plain":
            self._line(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            self._line(f"done: {self.n}/{self.total} {self.units} in {_seconds(time.perf_counter() - self.t0)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_iter(items: Iterable[T], desc: str, show: bool = True, unit: str = "batch",
                  total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` of ``desc`` (one unit per item)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(n, desc, unit=unit, show=show) as p:
        for x in items:
            yield x
            p.update(1)


def quiet_transformers() -> None:
    """Silence the progress bars of transformers and huggingface_hub (weight loading, downloads)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """Within the block, no transformers progress bar (restored after it, as the caller had it)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextmanager
def gguf_bars_off(off: bool = True) -> Iterator[None]:
    """Within the block (when ``off``), no bar from transformers' GGUF reader (it calls tqdm directly,
    ignoring :func:`transformers_quiet`) nor from its weight loading and saving."""
    if not off:
        yield
        return
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    orig = getattr(gguf_utils, "tqdm", None)
    if orig is not None:
        gguf_utils.tqdm = functools.partial(orig, disable=True)
    try:
        with transformers_quiet():
            yield
    finally:
        if orig is not None:
            gguf_utils.tqdm = orig
