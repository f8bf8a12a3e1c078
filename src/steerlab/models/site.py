"""A site bound to one model: ``model.site("blocks.3.resid_post")``.

:class:`BoundSite` is a parsed :class:`~steerlab.models.adapters.Site` resolved once against a
model: its module, whether the tensor is that module's input or output, and its feature shape at
one position. It reads and writes like the functions of :mod:`steerlab.hooks` it delegates to
(:meth:`BoundSite.capture`, :meth:`BoundSite.edit`, :meth:`BoundSite.record`); everywhere a site
is accepted, its name still is too.

The hooks live a layer above the models (``steerlab.hooks``, and ``Model.generate``'s decoding
loop in ``steerlab.generation``): those modules register their entry points in :data:`UPPER` when
imported, and the first use imports them by name (the registry's ``discover``), so no module of
the models layer imports a higher one."""

from __future__ import annotations

from functools import total_ordering
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import EmptyInputError
from ..registry import Registry
from .adapters import Site

if TYPE_CHECKING:
    from .model import Model

UPPER: dict[str, Registry] = {
    "hooks": Registry("hooks entry point", discover="steerlab.hooks"),
    "generation": Registry("generation entry point", discover="steerlab.generation"),
}
"""Entry points of the layers above the models: ``hooks`` (``capture``, ``edit``, ``record``,
registered by :mod:`steerlab.hooks`) and ``generation`` (``generate_text``, registered by
:mod:`steerlab.generation`)."""


@total_ordering
class BoundSite:
    """One site of one model: ``name``, ``kind``, ``layer`` (as :class:`Site`), ``module`` and
    ``where`` (``"in"``: the module's input, ``"out"``: its output), ``shape`` (features at one
    position; ``(n_heads, d_head)`` for ``attn.heads``). Compares, sorts and hashes like its
    :class:`Site` (by forward order)."""

    __slots__ = ("model", "site", "module", "where", "shape")

    def __init__(self, model: Model, site: Site):
        self.model, self.site = model, site
        self.module, self.where = site.hook_point(model.hf, model.arch)  # a SiteError when missing
        self.shape = _shape(model, site, self.module)

    name = property(lambda self: self.site.name)
    kind = property(lambda self: self.site.kind)
    layer = property(lambda self: self.site.layer)
    order = property(lambda self: self.site.order)

    def hook_point(self, hf: nn.Module | None = None, arch: Any = None) -> tuple[nn.Module, str]:
        """``(module, where)``, resolved when the site was bound (the arguments are ignored; they
        keep :meth:`Site.hook_point`'s signature)."""
        return self.module, self.where

    def _key(self, other: Any) -> Site:
        return other.site if isinstance(other, BoundSite) else other

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, BoundSite | Site) and self.site == self._key(other)

    def __lt__(self, other: Any) -> bool:
        return self.site < self._key(other)

    def __hash__(self) -> int:
        return hash(self.site)

    def __repr__(self) -> str:
        return f"BoundSite({self.name!r}, {self.where} of {type(self.module).__name__}, shape={self.shape})"

    def capture(self, inputs: Any, positions: Any = "last", **kw: Any):
        """This site's activations on ``inputs`` at ``positions`` (:func:`steerlab.hooks.capture`)."""
        return UPPER["hooks"]["capture"](self.model, inputs, [self.name], positions, **kw)[self.name]

    def edit(self, *fns: Any):
        """Context manager writing this site while the body runs (:func:`steerlab.hooks.edit`); each
        ``fn(act, step)`` returns the new activation or None."""
        if not fns:
            raise EmptyInputError(f"{self.name}.edit() got no edit: give fn(act, step), e.g. sl.add(v)")
        return UPPER["hooks"]["edit"](self.model, {self.name: list(fns) if len(fns) > 1 else fns[0]})

    def record(self, positions: str = "all", **kw: Any):
        """Context manager recording this site while the body runs (:func:`steerlab.hooks.record`);
        the recording's ``[name]`` holds the states."""
        return UPPER["hooks"]["record"](self.model, [self.name], positions, **kw)


def _shape(model: Model, site: Site, module: nn.Module) -> tuple[int, ...]:
    if site.kind == "attn.heads":
        return (model.n_heads, model.d_head)
    if site.kind == "mlp.act":
        return (model.d_mlp,)
    if site.kind in ("mlp.gate", "mlp.up"):
        return (module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.out_features,)
    return (model.d_model,)
