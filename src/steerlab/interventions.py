"""The Intervention protocol and registry: one shape for every method that changes how a model
behaves, so that generation, evaluation, the benchmark and the CLI handle them all the same way.

An intervention is

- **fitted**: ``Cls.fit(model, data, **options)`` returns one (``data`` is what the method learns
  from: a contrast set, scored generations, labelled activations...); :func:`fit` does the same by
  registered name;
- **applied**: ``with iv.apply(model, **options): ...`` changes the model while the block runs
  (runtime hooks through :func:`steerlab.edit`, or a weight edit restored bit for bit on exit,
  also on errors); prompt-side methods (a self-correction round) override :meth:`generate`
  instead, since what they change is the dialogue, not the model;
- **saved** and **loaded**: safetensors plus a JSON header (``__metadata__["steerlab"]``: method,
  sites, options, model and data fingerprints, library version; nothing is pickled). :func:`load`
  reads any registered method's file and checks it against the model's fingerprint;
- **described** in one line by :meth:`describe`.

Register a method with the :func:`register` class decorator; ``steerlab interventions`` lists them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import SteerlabError
from .models.model import Model
from .options import NoOptions, as_dict, listing, validate
from .registry import Registry
from .validate import NonFiniteError, keywords


class InterventionError(SteerlabError):
    """An intervention that does not fit the model, an unknown method, or a file that is not one."""


HEADER_KEY = "steerlab"
FILE_KIND = "intervention"


class Intervention(ABC):
    """Base of every registered method. Subclasses set ``method`` and implement :meth:`fit`,
    :meth:`apply`, :meth:`tensors` and :meth:`from_tensors`; ``meta`` holds provenance (model
    name and fingerprint, data fingerprint, options) and is written into the file header."""

    method: ClassVar[str] = ""
    FitOptions: ClassVar[type] = NoOptions    # what `steerlab fit METHOD` takes (see steerlab.options)
    ApplyOptions: ClassVar[type] = NoOptions  # what apply(model, **options) takes
    strength_option: ClassVar[str | None] = None  # the apply option `--alpha` sets (None: the method has none)
    meta: dict

    def __init_subclass__(cls, **kw):
        """Every subclass's ``apply`` receives its options validated against ``ApplyOptions`` (an option
        the method does not have is an error listing the ones it has) with the declared defaults filled in."""
        super().__init_subclass__(**kw)
        raw = cls.__dict__.get("apply")
        if raw is None or getattr(raw, "validates_options", False):
            return

        @functools.wraps(raw)
        def apply(self, model: Model, strict: bool = True, **options: Any):
            return raw(self, model, strict=strict, **type(self).apply_options(options))

        apply.validates_options = True  # type: ignore[attr-defined]
        cls.apply = apply
        rows = cls.__dict__.get("apply_rows")
        if rows is not None and not getattr(rows, "validates_options", False):
            cls.apply_rows = rows_validated(rows)

    @classmethod
    def apply_options(cls, given: dict) -> dict:
        """``given`` checked against ``ApplyOptions``, with every default filled in."""
        return as_dict(validate(cls.ApplyOptions, given, f"{cls.method or cls.__name__}'s apply", InterventionError))

    @classmethod
    def cli_options(cls, options: dict, strength: Any = None) -> dict:
        """Apply options from the command line: ``options`` plus ``--alpha`` as the method's
        ``strength_option``, validated (an option the method does not have is an error listing the ones
        it has) and returned as given."""
        if strength is not None:
            if cls.strength_option is None:
                raise InterventionError(f"{cls.method} has no strength option for --alpha; its apply options are: "
                                        f"{listing(cls.ApplyOptions)}")
            options = {**options, cls.strength_option: strength}
        cls.apply_options(options)
        return options

    @classmethod
    def fit_options(cls, given: dict) -> Any:
        """``given`` checked against ``FitOptions`` (an instance of it)."""
        return validate(cls.FitOptions, given, f"{cls.method or cls.__name__}'s fit", InterventionError)

    @classmethod
    def from_options(cls, model: Model, options: Any) -> Intervention:
        """Fit from a ``FitOptions`` instance, gathering the data it names (what ``steerlab fit METHOD``
        runs); methods without a command-line recipe say so."""
        raise InterventionError(f"{cls.method} cannot be fitted from options; call {cls.__name__}.fit(model, data)")

    def fit_summary(self) -> list[str]:
        """Lines ``steerlab fit`` prints after fitting (besides the saved file's description)."""
        return []

    @classmethod
    @abstractmethod
    def fit(cls, model: Model, data: Any, **options: Any) -> Intervention:
        """Learn the intervention from ``data`` on ``model``."""

    @abstractmethod
    def apply(self, model: Model, **options: Any) -> AbstractContextManager:
        """Context manager: the model is changed while the block runs, and restored after."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved: named tensors (CPU)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Intervention:
        """Rebuild from saved tensors and header."""

    @property
    def sites(self) -> list[str]:
        """The sites (or modules) the intervention touches."""
        return list(self.meta.get("sites", []))

    def describe(self) -> str:
        """One line: method, sites, options and the model it was fitted on."""
        opts = ", ".join(f"{k}={v}" for k, v in (self.meta.get("options") or {}).items())
        sites = self.sites
        where = ", ".join(sites[:4]) + (f" (+{len(sites) - 4} more)" if len(sites) > 4 else "")
        return (f"{self.method} at {where or '-'}" + (f" [{opts}]" if opts else "")
                + f", fitted on {self.meta.get('model', '?')}")

    def check(self, model: Model, strict: bool = True) -> None:
        """Raise :class:`InterventionError` when fitted on another model (fingerprint, when ``strict``)."""
        fp = self.meta.get("model_fingerprint")
        if strict and fp and fp != model.fingerprint:
            raise InterventionError(
                f"this {self.method} intervention was fitted on model {self.meta.get('model')!r} (fingerprint "
                f"{fp}), not on {model.name!r} ({model.fingerprint}); pass strict=False to apply it anyway")

    def fingerprint(self) -> str:
        """A hash of what :meth:`save` writes (header and tensors): the same for a fitted
        intervention and its saved-and-loaded copy, so a run resumed with the file continues."""
        header = {k: v for k, v in self.header().items() if k != "steerlab_version"}
        h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def check_sizes(self, model: Model, per_site: dict[str, torch.Tensor], what: str,
                    error: type[InterventionError] | None = None) -> None:
        """Raise when a per-site tensor does not have the site's feature shape on ``model``."""
        for site, t in per_site.items():
            shape = model.site(site).shape
            if tuple(t.shape) != tuple(shape):
                raise (error or InterventionError)(
                    f"{what} for {site!r} has size {tuple(t.shape)} but {model.name} has {shape}: it was "
                    f"fitted on another model ({self.meta.get('model', '?')})")

    def generate(self, model: Model, texts: Sequence, cfg, keys: Sequence[str] | None = None,
                 **options: Any) -> list[list[str]]:
        """Continuations of ``texts`` with the intervention in force (what generation runs call;
        ``keys`` identify the prompts for the per-row random numbers). The default applies
        :meth:`apply` around one batched generate; prompt-side methods override it."""
        from .generation import generate_batch

        try:
            with self.apply(model, **options):
                return generate_batch(model, list(texts), cfg, keys)
        except NonFiniteError as e:
            raise self.nonfinite(e, options) from None

    # --- several settings in one batch ---------------------------------------------------------
    def grid_groups(self, settings: Sequence[dict]) -> list[list[int]]:
        """Which of ``settings`` (apply options) may share one batched generation through
        :meth:`apply_rows`: groups of indices into ``settings``, each index in exactly one group.
        The default keeps every setting alone (one generation per setting, as :meth:`apply`); a
        method whose settings differ only in strengths or in which units are edited groups them."""
        return [[i] for i in range(len(settings))]

    def apply_rows(self, model: Model, settings: Sequence[dict], row_setting: torch.Tensor,
                   strict: bool = True) -> AbstractContextManager:
        """Context manager: every forward call in the block edits row ``r`` of its batch as
        ``apply(model, **settings[row_setting[r]])`` would edit it alone, so the settings of one
        :meth:`grid_groups` group share one batched ``generate`` (rows ordered as
        :func:`steerlab.generation.generate_ids` orders them: text, then sample). Each setting is
        validated as :meth:`apply` validates its options; ``row_setting`` is a ``[batch]`` integer
        tensor of indices into ``settings``, and a forward call with another number of rows is an
        error. The default serves one distinct setting (its :meth:`apply`); methods with per-row
        edits override this with the settings already validated, defaults filled in."""
        used = sorted(set(row_setting.tolist()))
        if len(used) > 1:
            raise InterventionError(f"{self.method} applies one setting to a whole batch; rows of settings {used} "
                                    f"must be generated apart (its grid_groups keeps them apart)")
        return self.apply(model, strict=strict, **settings[used[0]])

    def nonfinite(self, e: NonFiniteError, options: dict) -> NonFiniteError:
        """``e`` (NaN or inf in a forward under this intervention) with the intervention and its apply
        options named."""
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "its defaults"
        return NonFiniteError(f"{self.method} intervention at {', '.join(self.sites[:4]) or '-'} applied with "
                              f"{opts}: {e}")

    def fixed_text_options(self, options: dict) -> dict:
        """The apply options under which a teacher-forced pass over fixed text (side effects on neutral
        text) sees what generation with ``options`` does token by token; default ``options`` unchanged
        (ITI and SLIM, which edit the last position of each call, edit every position instead)."""
        return dict(options)

    # --- files ---------------------------------------------------------------------------------
    def header(self) -> dict:
        from . import __version__

        return {**self.meta, "kind": FILE_KIND, "method": self.method, "steerlab_version": __version__}

    def save(self, path: str | Path) -> Path:
        """safetensors with the JSON header; written atomically, nothing pickled."""
        from safetensors.torch import save

        from .runs import write_atomic

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        return write_atomic(path, save(tensors, metadata={HEADER_KEY: json.dumps(self.header(), default=str)}))

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None, strict: bool = True) -> Intervention:
        """Read a saved intervention (of this class, or of any registered method when called on
        :class:`Intervention`); with ``model``, check that it was fitted on it."""
        meta, tensors = read_file(path)
        method = meta.get("method")
        target = get(method) if cls is Intervention or not cls.method else cls
        if target.method != method:
            raise InterventionError(f"{path} holds a {method!r} intervention, not a {target.method!r} one")
        iv = target.from_tensors(tensors, meta)
        if model is not None:
            iv.check(model, strict)
        return iv


def rows_validated(raw):
    """``raw(self, model, settings, row_setting, strict)`` wrapped as :meth:`Intervention.apply_rows`:
    each setting checked against the class's ``ApplyOptions`` (defaults filled in), ``row_setting``
    checked (:func:`setting_index`), and every forward call in the block checked to have one row per
    entry of ``row_setting`` (:func:`steerlab.hooks.expect_rows`)."""

    @functools.wraps(raw)
    def apply_rows(self, model: Model, settings: Sequence[dict], row_setting, strict: bool = True):
        if isinstance(settings, dict) or not isinstance(settings, Sequence) or not settings:
            raise InterventionError(f"apply_rows takes a non-empty list of settings (dicts of apply options), "
                                    f"got {type(settings).__name__}")
        opts = [type(self).apply_options(dict(s)) for s in settings]
        rows = setting_index(row_setting, len(opts))
        return _checked_rows(model, rows, raw(self, model, opts, rows, strict=strict))

    apply_rows.validates_options = True  # type: ignore[attr-defined]
    return apply_rows


Intervention.apply_rows = rows_validated(Intervention.apply_rows)  # the default validates as every method's does


def groups_by(settings: Sequence[dict], key: Callable[[dict], Hashable | None]) -> list[list[int]]:
    """For :meth:`Intervention.grid_groups`: the indices of ``settings`` grouped by ``key(setting)``
    (groups in order of first appearance); a setting whose key is None stays alone."""
    groups: dict = {}
    for i, s in enumerate(settings):
        k = key(s)
        groups.setdefault(("alone", i) if k is None else ("key", k), []).append(i)
    return list(groups.values())


def setting_index(row_setting, n: int) -> torch.Tensor:
    """``row_setting`` as a 1-D int64 tensor of indices in ``[0, n)`` (one per batch row)."""
    t = torch.as_tensor(row_setting)
    if t.dim() != 1 or not len(t) or t.is_floating_point() or t.dtype == torch.bool:
        raise InterventionError(f"row_setting must be a non-empty 1-D integer tensor (one setting index per batch "
                                f"row), got dtype {t.dtype} and shape {tuple(t.shape)}")
    t = t.long().cpu()
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise InterventionError(f"row_setting holds indices {int(t.min())}..{int(t.max())} but there are {n} "
                                f"settings (valid: 0..{n - 1})")
    return t


@contextmanager
def _checked_rows(model: Model, rows: torch.Tensor, inner: AbstractContextManager):
    from .hooks import expect_rows

    with expect_rows(model, len(rows), "row_setting"), inner as x:
        yield x


def read_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and tensors of an intervention file, with clear errors for a missing,
    truncated or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(path, str | os.PathLike) or not str(path):
        got = "an empty string" if path == "" else type(path).__name__
        raise InterventionError(f"an intervention file path must be a non-empty string or path, got {got}")
    path = Path(path)
    if not path.is_file():
        raise InterventionError(f"intervention file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
        tensors = load_file(str(path))
    except Exception as e:
        raise InterventionError(f"{path} is not a readable safetensors file (truncated or another format?): "
                                f"{type(e).__name__}: {e}") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise InterventionError(f"{path} holds NaN or infinite values in {', '.join(sorted(bad)[:4])}"
                                f"{f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''}: the file is corrupt or was "
                                f"edited; refit the intervention")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise InterventionError(f"{path} is a safetensors file but not a steerlab intervention (no steerlab header)")
    if meta.get("kind") == "steering_vector":  # files written before the protocol existed
        meta = {**meta, "kind": FILE_KIND, "method": "steering"}
    if meta.get("kind") != FILE_KIND or not meta.get("method"):
        raise InterventionError(f"{path} is a safetensors file but not a steerlab intervention (header kind "
                                f"{meta.get('kind')!r})")
    return meta, tensors


def contrast_texts(data: Any, what: str = "the data") -> tuple[list[str], list[str]]:
    """(desirable, undesirable) texts from a :class:`steerlab.data.ContrastSet` or a pair of lists;
    anything else is an :class:`InterventionError` saying what ``what`` must be."""
    if hasattr(data, "desirable") and hasattr(data, "undesirable"):
        return list(data.desirable), list(data.undesirable)
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(data[0], str):
        return list(data[0]), list(data[1])
    raise InterventionError(f"{what} must be a ContrastSet or a (desirable, undesirable) pair of text lists")


def provenance(model: Model, data: Any = None, options: dict | None = None, **extra: Any) -> dict:
    """The provenance every fitted intervention's header carries: the model's name and fingerprint, the
    data's fingerprint (``data``: a fingerprint string, or groups of texts, hashed with
    :func:`fingerprint_texts`), the fit ``options``, then ``extra``."""
    meta: dict[str, Any] = {"model": model.name, "model_fingerprint": model.fingerprint}
    if data is not None:
        meta["data_fingerprint"] = data if isinstance(data, str) else fingerprint_texts(*data)
    if options is not None:
        meta["options"] = dict(options)
    return {**meta, **extra}


def fingerprint_texts(*groups: Sequence[str]) -> str:
    """A short hash of groups of texts (order and grouping count): an intervention's data fingerprint."""
    h = hashlib.sha256()
    for g in groups:
        for t in g:
            h.update(t.encode() + b"\0")
        h.update(b"\1")
    return h.hexdigest()[:16]


def text_ids(*groups: Sequence[str]) -> list[str]:
    """The sorted short hashes (:func:`steerlab.generation.text_id`) of every text an intervention was
    fitted on, stored in its header as ``data_text_ids`` so that an evaluation can tell which of its
    prompts the intervention learned from (:func:`steerlab.evaluation.fitted_prompts`)."""
    from .generation import text_id

    return sorted({text_id(t) for g in groups for t in g})


# --- registry ------------------------------------------------------------------------------------
METHODS: Registry = Registry("intervention method", InterventionError, discover="steerlab.methods")
"""Registered methods by name; the built-in ones are listed in :mod:`steerlab.methods` (imported on first use)."""


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: register an :class:`Intervention` subclass under its ``method`` name."""
    if not cls.method:
        raise InterventionError(f"{cls.__name__} has no method name")
    return METHODS.register(cls.method, cls)


def get(method: str | None) -> type[Intervention]:
    """The registered class of ``method``; an unknown name is an error listing the known ones."""
    return METHODS[method]


def list_interventions() -> dict[str, str]:
    """Registered methods and the first line of each class's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in sorted(METHODS.items())}


def fit(method: str, model: Model, data: Any, **options: Any) -> Intervention:
    """Fit the registered ``method`` on ``model`` from ``data``; an option its ``fit`` does not take
    is an error listing the ones it does."""
    cls = get(method)
    keywords(cls.fit, options, f"fitting {method!r}")
    return cls.fit(model, data, **options)


def load(path: str | Path, model: Model | None = None, strict: bool = True) -> Intervention:
    """Read any registered method's saved file (see :meth:`Intervention.load`)."""
    return Intervention.load(path, model, strict)
