"""What an EigenShift edit dampens: ``delta`` per singular direction with the dampened ones marked
(``figures/eigenshift_delta.png``), and the tokens each dampened direction carries under the logit
lens (``eigenshift_tokens.csv``: the tokens whose logits the direction raises and lowers most,
i.e. the largest and smallest entries of ``U b_i = s_i a_i``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..explain.lens import top_tokens
from ..models.model import Model
from ..report import figures as F
from ..runs import write_csv
from .svd import svd

if TYPE_CHECKING:
    from .eigenshift import EigenShift


def direction_tokens(model: Model, iv: EigenShift, k: int = 8) -> list[dict]:
    """One row per dampened direction: index, delta, singular value and its top tokens both ways."""
    dec = svd(model.unembed.weight)
    rows = []
    for i in iv.indices.tolist():
        ts = top_tokens(model, dec.Vt[i].to(model.dtype), k=k)
        rows.append({"direction": i, "delta": round(float(iv.delta[i]), 5), "sigma": round(float(dec.s[i]), 5),
                     "raises": " ".join(t for t, _ in ts.promoted), "lowers": " ".join(t for t, _ in ts.suppressed)})
    return rows


def report(model: Model, iv: EigenShift, out_dir: str | Path, k: int = 8) -> list[Path]:
    """Write the delta figure and the token table of ``iv`` under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    delta = iv.delta.numpy()
    fig, axes = F.figure(title="EigenShift: toxic - non-toxic projection per singular direction", width=9)
    ax = np.ravel(axes)[0]
    x = np.arange(len(delta))
    ax.bar(x, delta, width=1.0, color=F.PALETTE[5], label="delta_i")
    idx = iv.indices.numpy()
    ax.scatter(idx, delta[idx], color=F.PALETTE[1], zorder=3, s=18,
               label=f"dampened (k={len(idx)}, alpha={iv.alpha:g})")
    F.label(ax, "singular direction i (descending singular value)", "mean_toxic(p_i) - mean_nontoxic(p_i)")
    rows = direction_tokens(model, iv, k)
    return [F.save(fig, out / "figures" / "eigenshift_delta.png"),
            write_csv(out / "eigenshift_tokens.csv", rows)]
