"""`kernelgen plot`: h against g, and h' against the step levels, with the fit error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import expr as expr_mod
from .fit import asymptotes, error_of, numeric


def plot(forward: expr_mod.Expr, thresholds, levels, title: str, out: Path) -> float:
    """Write a PNG to `out`; returns the fit error it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, dh = numeric(forward.sym), numeric(forward.derivative())
    c, lv = np.asarray(thresholds, dtype=float), np.asarray(levels, dtype=float)
    span = max(6.0, 1.3 * float(np.max(np.abs(c))))
    x = np.linspace(-span, span, 2001)
    offset = asymptotes(forward).offset_left
    g = offset + lv[0] * x + np.maximum(x[:, None] - c[None, :], 0.0) @ np.diff(lv)
    step = lv[np.searchsorted(c, x, side="left")]  # boundary "lower": x == c_i takes the level below
    err = error_of(forward, c, lv)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, np.broadcast_to(h(x), x.shape), label="h(x) (forward)")
    ax1.plot(x, g, "--", label="g(x) (its derivative is stored)")
    ax1.set_title(f"{title}: h and g, E = {err:.6g}")
    ax2.plot(x, np.broadcast_to(dh(x), x.shape), label="h'(x)")
    ax2.step(x, step, where="post", label=f"g'(x): {len(lv)} levels")
    for ci in c:
        ax2.axvline(ci, color="grey", lw=0.5)
    ax2.set_title("derivatives (thresholds in grey)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        ax.set_xlabel("x")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return err
