"""Reading and writing activations at canonical sites: :func:`capture` (one batched forward
pass per batch, read and stop early), :func:`record` (read during any forward or ``generate``) and
:func:`edit` (write during any forward or ``generate``).

All three install plain PyTorch hooks on the modules a site maps to, and always remove them, also
when the body raises. :func:`capture` never computes the unembedding and stops the forward right
after the deepest site it needs, so reading layer 5 of 30 costs about a sixth of a forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import EmptyInputError, ShapeError, SteerlabError
from .models.model import Model
from .models.site import UPPER, BoundSite
from .positions import Position, as_position, first_real
from .progress import progress_iter
from .registry import Registry
from .validate import ValidationError, number


class _Stop(Exception):
    """Raised from the deepest capture hook to end the forward early."""


def _in_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_in(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _out_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_out(out, new: torch.Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _hook_site(site: BoundSite, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register one hook that hands ``fn`` the site's tensor (``[..., H, d_head]`` for
    ``attn.heads``) and writes back what ``fn`` returns (None: leave it). Returns the handle."""
    mod, where = site.module, site.where
    heads = site.shape if site.kind == "attn.heads" else None

    def run(t: torch.Tensor) -> torch.Tensor | None:
        y = fn(t.view(*t.shape[:-1], *heads) if heads else t)
        return None if y is None else (y.reshape(t.shape) if heads else y)

    if where == "in":
        def pre(mod, args, kwargs):
            y = run(_in_tensor(args, kwargs))
            return None if y is None else _with_in(args, kwargs, y)

        return mod.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        y = run(_out_tensor(out))
        return None if y is None else _with_out(out, y)

    return mod.register_forward_hook(post)


class Captured(dict):
    """Captured activations keyed by site name. ``mask`` ([N, T]) is set when the selector keeps
    the token axis (left-padded like the inputs)."""

    mask: torch.Tensor | None = None


def _encode_all(model: Model, inputs, chat: bool) -> dict:
    if isinstance(inputs, Mapping):
        enc = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        if "attention_mask" not in enc:
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        if enc["input_ids"].numel() == 0:
            raise EmptyInputError("empty input batch")
        if (enc["attention_mask"][:, -1] == 0).any():
            raise ShapeError("inputs must be left-padded (attention_mask[:, -1] must be 1 in every row)")
        return enc
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise EmptyInputError("capture() got no texts: need at least one")
    return model.encode(texts, chat=chat)


@torch.no_grad()
def capture(
    model: Model,
    inputs: str | Sequence[str] | Mapping[str, torch.Tensor],
    sites: str | Sequence[str],
    positions: Position | str | int | Sequence[int] = "last",
    *,
    batch_size: int = 16,
    chat: bool = False,
    progress: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Captured:
    """Run the model on ``inputs`` and return each site's activations at ``positions``.

    ``inputs`` are texts (tokenized with left padding; ``chat=True`` renders them as user turns)
    or an already left-padded batch with ``input_ids`` and ``attention_mask``. Results keep the
    input order, live on the model's device in ``dtype``; ``attn.heads`` comes as ``[..., H, d_head]``.
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise EmptyInputError("capture() got no sites")
    parsed = sorted({model.site(s) for s in names})
    pos = as_position(positions)
    enc = _encode_all(model, inputs, chat)
    ids_all, mask_all = enc["input_ids"], enc["attention_mask"]
    N, T_all = ids_all.shape
    deepest = parsed[-1]
    results: dict[str, list[torch.Tensor]] = {s.name: [] for s in parsed}
    order: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    state: dict[str, torch.Tensor] = {}

    def reader(site: BoundSite):
        def read(t: torch.Tensor) -> None:
            results[site.name].append(pos.select(t, state["mask"]).to(dtype=dtype, copy=True))
            if site is deepest:
                raise _Stop

        return read

    handles = []
    try:
        for s in parsed:
            handles.append(_hook_site(s, reader(s)))
        batches = list(model.batches(mask_all, batch_size))
        show = progress if progress is not None else len(batches) >= 8
        for rows, cols in progress_iter(batches, "capture", show=show):
            mask, ids = mask_all[rows, cols], ids_all[rows, cols]
            state["mask"] = mask
            try:
                model.forward(ids, mask, logits_to_keep=0)
            except _Stop:
                pass
            order.append(rows)
            masks.append(mask)
    finally:
        for h in handles:
            h.remove()

    inv = torch.argsort(torch.cat(order))
    out = Captured()
    for name, parts in results.items():
        if pos.keeps_tokens:
            parts = [_left_pad(p, T_all) for p in parts]
        out[name] = torch.cat(parts)[inv]
    if pos.keeps_tokens:
        out.mask = torch.cat([_left_pad(m, T_all) for m in masks])[inv]
    # report results under the names the caller used (e.g. negative layer indices)
    for given in names:
        canon = model.site(given).name
        if given != canon:
            out[given] = out[canon]
    return out


def _left_pad(t: torch.Tensor, T: int) -> torch.Tensor:
    pad = T - t.shape[1]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], pad, *t.shape[2:]), t], 1)


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class Step:
    """What the current forward call is: ``T`` new tokens after ``past_len`` cached ones, the
    attention mask and input ids of the call, and the prompt length (set by the first call of a
    generation, the prefill)."""

    T: int = 0
    past_len: int = 0
    prompt_len: int = 0
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute positions ``[1, T]`` (counted over the padded sequence) of this call's tokens."""
        return self.past_len + torch.arange(self.T, device=device)[None, :]

    def call_mask(self) -> torch.Tensor | None:
        """``[B, T]`` attention mask of this call's positions (0 on left padding), if known."""
        m = self.attention_mask
        return None if m is None else m[:, -self.T:]

    def first_tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool ``[B or 1, T]``: the positions of this call that are a row's first real token (left
        padding skipped; a decoding call has none)."""
        m = self.attention_mask
        if m is None or m.dim() != 2:
            return self.positions(device) == 0
        return first_real(m.to(device))[:, -self.T:]

    def where(self, schedule: str, device: torch.device) -> torch.Tensor | None:
        """Bool mask ``[B or 1, T]`` of the positions a schedule edits in this call (None: all)."""
        return SCHEDULE_FNS[schedule](self, device)


SCHEDULE_FNS: Registry = Registry("schedule", ShapeError)
"""Schedules by name: ``fn(step, device) -> bool mask [B or 1, T]`` of the positions edited in a
call (None: every position). Add one with :func:`register_schedule`."""


def register_schedule(name: str):
    """Decorator registering ``fn(step, device) -> mask | None`` as schedule ``name``."""
    return SCHEDULE_FNS.register(name)


@register_schedule("all")
def _every_position(step: Step, device) -> None:
    """Every position of every call."""
    return None


@register_schedule("prompt")
def _prompt_positions(step: Step, device) -> torch.Tensor:
    """Real prompt tokens during the prefill only."""
    m = step.positions(device) < step.prompt_len
    cm = step.call_mask()
    return m if cm is None else m & cm.to(device=device, dtype=torch.bool)


@register_schedule("generated")
def _generated_positions(step: Step, device) -> torch.Tensor:
    """Generated tokens only (every decoding call)."""
    return step.positions(device) >= step.prompt_len


@register_schedule("last")
def _last_position(step: Step, device) -> torch.Tensor:
    """The last position of every call."""
    m = torch.zeros(1, step.T, dtype=torch.bool, device=device)
    m[:, -1] = True
    return m




class EditFn:
    """Base of steerlab's edit functions: ``fn(act, step) -> new act``, with a schedule;
    ``skip_first`` leaves each row's first real token as it is (its attention-sink activation is
    orders of magnitude larger than the others in many models, see :func:`steerlab.positions.after_first`)."""

    def __init__(self, where: str = "all", skip_first: bool = False):
        SCHEDULE_FNS.check(where)
        self.where, self.skip_first = where, skip_first

    def bind(self, site: str, feat_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Check sizes against the site and move tensors to the model once, before any forward."""

    def new(self, act: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, act: torch.Tensor, step: Step) -> torch.Tensor:
        new = self.new(act)
        m = step.where(self.where, act.device)
        if self.skip_first:
            keep = ~step.first_tokens(act.device)
            m = keep if m is None else m & keep
        if m is None:
            return new
        return torch.where(m.view(*m.shape, *([1] * (act.dim() - 2))), new, act)


def strength(alpha, device, dtype) -> torch.Tensor | float:
    """A strength as a float or a ``[batch]`` tensor on ``device``; NaN or infinity is a
    :class:`~steerlab.validate.ValidationError` (it would turn every edited activation into NaN)."""
    if isinstance(alpha, torch.Tensor) or (isinstance(alpha, Sequence) and not isinstance(alpha, str)):
        a = torch.as_tensor(alpha, device=device, dtype=dtype)
        if a.dim() > 1:
            raise ShapeError(f"strength must be a scalar or a [batch] vector, got shape {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValidationError(f"strength must be finite in every row, got {a.tolist()[:8]}")
        return a
    return number(alpha, "strength (alpha)")


def finite_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` when every value is finite (checked once, when an edit is bound), else a ValidationError."""
    if not bool(torch.isfinite(t).all()):
        raise ValidationError(f"{what} holds NaN or infinite values")
    return t


def per_row(a, act: torch.Tensor):
    """Broadcast a per-row strength ``[B]`` over positions and features."""
    if isinstance(a, torch.Tensor) and a.dim() == 1:
        if a.shape[0] != act.shape[0]:
            raise ShapeError(f"per-row strength has {a.shape[0]} entries but the batch has {act.shape[0]} rows")
        return a.view(-1, *([1] * (act.dim() - 1)))
    return a


EditSpec = Callable[[torch.Tensor, Step], torch.Tensor | None]


@contextmanager
def _installed(model: Model, plan: Sequence[tuple[BoundSite, Callable[[torch.Tensor, Step], torch.Tensor | None]]],
               on_call: Callable[[Step], None] | None = None) -> Iterator[Step]:
    """Install one step tracker on the decoder stack and one hook per ``(site, fn)``; ``fn(act, step)``
    returns the new activation or None. ``on_call(step)`` runs at the start of every forward call.
    Every hook is removed on exit, also when the body raises. Shared by :func:`edit` and :func:`record`."""
    step = Step()

    def track(mod, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        step.T = x.shape[1]
        step.past_len = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        step.attention_mask = kwargs.get("attention_mask")
        step.input_ids = x if x.dim() == 2 else None
        if step.past_len == 0:
            step.prompt_len = step.T
        if on_call is not None:
            on_call(step)

    handles = [model.stack.register_forward_pre_hook(track, with_kwargs=True)]
    try:
        for site, fn in plan:
            handles.append(_hook_site(site, lambda t, fn=fn: fn(t, step)))
        yield step
    finally:
        for h in handles:
            h.remove()


@contextmanager
def expect_rows(model: Model, n: int, what: str = "the per-row settings") -> Iterator[None]:
    """While the body runs, every forward call must have ``n`` batch rows: another number is a
    :class:`~steerlab.errors.ShapeError` naming ``what`` (per-row settings given for another batch)."""
    def check(mod, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        x = args[0] if x is None and args else x
        if x is not None and x.shape[0] != n:
            raise ShapeError(f"{what} has {n} entries (one per batch row) but the forward call has {x.shape[0]} rows")

    handle = model.stack.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _check_edit_result(site: BoundSite, x: torch.Tensor, y) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ShapeError(f"edit on {site.name!r} returned {type(y).__name__}; an edit function must return a "
                         f"tensor of shape {tuple(x.shape)} or None")
    if y.shape != x.shape:
        raise ShapeError(f"edit on {site.name!r} returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    if y.dtype != x.dtype:
        raise ShapeError(f"edit on {site.name!r} returned dtype {y.dtype}, expected {x.dtype} (the model's dtype)")
    return y


_WATCH: list[dict[str, torch.Tensor]] = []
"""One dict per active :func:`edit`: site -> a bool tensor, True once the site's edited output held
NaN or inf. Accumulated on the device without a sync; read only when something went wrong."""


def nonfinite_sites() -> list[str]:
    """The sites of the active edits whose output held NaN or inf in some forward so far."""
    return [s for w in _WATCH for s, bad in w.items() if bool(bad)]


@contextmanager
def edit(model: Model, edits: Mapping[str, EditSpec | Sequence[EditSpec]]) -> Iterator[Step]:
    """Write activations while the body runs: ``{site: fn}`` where ``fn(act, step)`` returns the
    new activation (or None to keep it). Use the builders :func:`add`, :func:`scale`,
    :func:`replace`, or any function. Works around ``model.hf.generate`` with the KV cache;
    nested contexts compose (inner edits see outer ones' results). Hooks are removed on exit."""
    if not edits:
        raise EmptyInputError("edit() got no edits")
    plan = []
    for name, fns in edits.items():
        site = model.site(name)
        fns = [fns] if callable(fns) or not isinstance(fns, Sequence) else list(fns)
        shape = site.shape
        for f in fns:
            if not callable(f):
                raise ShapeError(f"edit for {site.name!r} is a {type(f).__name__}, not a function "
                                 f"fn(act, step) -> act (use sl.add, sl.scale, sl.replace or your own)")
            if isinstance(f, EditFn):
                f.bind(site.name, shape, model.device, model.dtype)

        def apply(x: torch.Tensor, step: Step, site=site, fns=fns) -> torch.Tensor:
            for f in fns:
                y = f(x, step)
                if y is not None:
                    x = _check_edit_result(site, x, y)
            bad = ~torch.isfinite(x).all()
            watch[site.name] = bad if site.name not in watch else watch[site.name] | bad
            return x

        plan.append((site, apply))
    watch: dict[str, torch.Tensor] = {}
    _WATCH.append(watch)
    try:
        with _installed(model, plan) as step:
            yield step
    finally:
        _WATCH.remove(watch)


class Recording(dict):
    """What :func:`record` read, keyed by site name: ``[B, P, *feat]`` over the recorded positions
    of the most recent pass (a pass starts at every call without a KV cache: a forward, or the
    prefill of a ``generate``), concatenated over its calls in order. ``mask`` ``[B, P]`` is 1 at
    real tokens (0 on left padding), ``input_ids`` ``[B, P]`` the token fed at each position
    (-1 when the call had embeddings as input), ``calls`` the number of forward calls of the pass,
    ``passes`` the number of passes seen."""

    mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    calls: int = 0
    passes: int = 0
    sites: tuple[str, ...] = ()

    def __missing__(self, site: str):
        if site in self.sites:
            raise RecordingError(f"nothing recorded at {site!r} yet: a recording fills in when its with block "
                                 f"exits, after at least one forward or generate inside it")
        raise RecordingError(f"{site!r} was not recorded; this recording holds {', '.join(self.sites) or 'no site'}")


class RecordingError(SteerlabError, KeyError):
    """A site read from a :class:`Recording` that does not hold it (yet): a ``KeyError`` too."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


@contextmanager
def record(model: Model, sites: str | Sequence[str], positions: str = "all", *,
           dtype: torch.dtype = torch.float32) -> Iterator[Recording]:
    """Record sites while the body runs any forward or ``generate``: the reading twin of :func:`edit`.

    ``positions``: ``"all"`` keeps every position of every call (for ``generate``: the prompt, then
    each fed token), ``"last"`` keeps the last position of each call (the last prompt token, then
    each fed token). Nothing is recomputed: states are copied (in ``dtype``, on the model's device)
    as the model produces them, with the KV cache. The result fills in when the block exits::

        with sl.record(m, ["final", "blocks.3.resid_post"], "last") as rec:
            m.hf.generate(**enc, max_new_tokens=20)
        rec["final"]   # [B, 1 + 19, d]: the last prompt token and each generated token fed back
    """
    if positions not in ("all", "last"):
        raise ShapeError(f"record positions must be 'all' or 'last', got {positions!r}")
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise EmptyInputError("record() got no sites")
    parsed = {n: model.site(n) for n in names}
    parts: dict[str, list[torch.Tensor]] = {}
    meta: dict[str, list[torch.Tensor]] = {"mask": [], "ids": []}
    out = Recording()
    out.sites = tuple(names)

    def on_call(step: Step) -> None:
        if step.past_len == 0:  # a new pass: forget the previous one
            parts.clear()
            meta["mask"].clear()
            meta["ids"].clear()
            out.calls = 0
            out.passes += 1
        out.calls += 1
        keep = slice(None) if positions == "all" else slice(-1, None)
        cm = step.call_mask()
        B = step.input_ids.shape[0] if step.input_ids is not None else (cm.shape[0] if cm is not None else 1)
        meta["mask"].append((cm if cm is not None else torch.ones(B, step.T, dtype=torch.long))[:, keep])
        ids = step.input_ids if step.input_ids is not None else torch.full((B, step.T), -1)
        meta["ids"].append(ids[:, keep])

    def reader(name: str):
        def read(act: torch.Tensor, step: Step) -> None:
            sel = act if positions == "all" else act[:, -1:]
            parts.setdefault(name, []).append(sel.detach().to(dtype=dtype, copy=True))
        return read

    try:
        with _installed(model, [(parsed[n], reader(n)) for n in names], on_call):
            yield out
    finally:
        for n in names:
            if parts.get(n):
                out[n] = torch.cat(parts[n], 1)
        if meta["mask"]:
            out.mask = torch.cat([m.to(model.device) for m in meta["mask"]], 1)
            out.input_ids = torch.cat([m.to(model.device) for m in meta["ids"]], 1)


# the entry points a bound site delegates to (models.site.BoundSite.capture / edit / record)
for _name, _fn in (("capture", capture), ("edit", edit), ("record", record)):
    UPPER["hooks"].register(_name, _fn)
