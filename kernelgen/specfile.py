"""Write a spec file for a fitted activation (what `kernelgen new` produces)."""

from __future__ import annotations

import json
from pathlib import Path

from .fit import RANGE, Fit


def render(name: str, forward: str, fit: Fit, description: str = "", replaces: str = "") -> str:
    def nums(values) -> str:
        return "[" + ", ".join(repr(float(v)) for v in values) + "]"

    lines = [
        f"# {name}: fitted by `kernelgen fit` at {fit.bits} bits (variable projection, L-BFGS);",
        f"# fit_error = integral of (h - g)^2 over [-{RANGE:g}, {RANGE:g}] by Gauss-Legendre quadrature.",
        "# The spec format is documented in docs/spec-format.md.",
        "",
        "[op]",
        f"name = {json.dumps(name)}",
        f"description = {json.dumps(description or f'{forward} forward, {fit.bits}-bit step-function derivative in backward')}",
        f"forward = {json.dumps(forward)}",
    ]
    if replaces:
        lines.append(f"replaces = {json.dumps(replaces)}")
    lines += [
        "",
        "[approx]",
        f"bits = {fit.bits}",
        'boundary = "lower"',
        f"thresholds = {nums(fit.thresholds)}",
        f"levels = {nums(fit.levels)}",
        f"fit_error = {fit.error!r}",
        'fit_source = "kernelgen fit"',
        "",
    ]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a spec, and a failure leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
