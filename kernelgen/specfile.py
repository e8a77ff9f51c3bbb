"""Write a spec file for a fitted activation (what `kernelgen new` produces)."""

from __future__ import annotations

import os
from pathlib import Path

import tomli_w

from .fit import RANGE, Fit


def render(name: str, forward: str, fit: Fit, description: str = "", replaces: str = "") -> str:
    op = {"name": name,
          "description": description or f"{forward} forward, {fit.bits}-bit step-function derivative in backward",
          "forward": forward}
    if replaces:
        op["replaces"] = replaces
    approx = {"bits": fit.bits, "boundary": "lower", "thresholds": [float(v) for v in fit.thresholds],
              "levels": [float(v) for v in fit.levels], "fit_error": float(fit.error), "fit_source": "kernelgen fit"}
    head = (f"# Fitted by `kernelgen fit` at {fit.bits} bits (variable projection, L-BFGS);\n"
            f"# fit_error = integral of (h - g)^2 over [-{RANGE:g}, {RANGE:g}] by Gauss-Legendre quadrature.\n"
            "# The spec format is documented in docs/spec-format.md.\n\n")
    return head + tomli_w.dumps({"op": op, "approx": approx})  # a TOML writer quotes every string right


def write(path: Path, text: str, overwrite: bool = False) -> None:
    """Atomically: a reader never sees half a spec, and a failure leaves the old file. An existing
    file is an error unless `overwrite` (it may be a spec someone edited by hand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        if overwrite:
            tmp.replace(path)
        else:
            _create(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)


def _create(tmp: Path, path: Path) -> None:
    """Move tmp to path unless path exists: a hard link fails on an existing name, with no window
    between check and write; where links are unsupported, check then rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(path) from None
        tmp.replace(path)
