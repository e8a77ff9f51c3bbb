"""Checking the op specs of a generated tree's ops.py before any op of the tree is registered.

ops.py is Python that kernelgen wrote, but a tree can be edited by hand, damaged, or written by
another version: a bad field must fail `lo.load` with the tree, the op and the field, not surface
as a wrong gradient or an error deep in a kernel launch. kernelgen/spec.py validates the TOML a
spec starts from; this is the runtime's own (smaller) check of what reached ops.py, so the runtime
needs neither kernelgen nor its dependencies.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from types import ModuleType

from . import _contract

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # kernelgen/spec.py's rule, matched in full
RESERVED = _contract.RESERVED_STEMS  # file stems of an arch folder that are not activations
BITS = (1, 2, 3, 4)
BOUNDARIES = ("lower", "upper")
FLOAT32_MAX = 3.4028234663852886e38
TEXT_FIELDS = ("description", "replaces", "forward")


class TreeSpecError(ValueError):
    """An op spec in a tree's ops.py is malformed; the message names the file, op and field."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def check_ops_module(tree: Path, module: ModuleType) -> None:
    """Raise TreeSpecError for the first malformed entry of the module's SPECS / FORWARD / DERIVATIVE."""
    where = tree / _contract.OPS_FILE
    hint = (f"rebuild it from its spec files with `kernelgen build --arch ARCH --spec FILE --out {tree}` "
            "(the built-in tree: `git checkout generated/` in a checkout, else reinstall lowmem-ops)")

    def fail(field: str, problem: str):
        raise TreeSpecError(f"{where}: {field}: {problem}; {hint}")

    specs = getattr(module, "SPECS", None)
    forward = getattr(module, "FORWARD", None)
    derivative = getattr(module, "DERIVATIVE", {})
    for attr, value in (("SPECS", specs), ("FORWARD", forward), ("DERIVATIVE", derivative)):
        if not isinstance(value, dict):
            fail(attr, f"must be a dict, got {type(value).__name__}")
    for name, spec in specs.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            fail(f"SPECS[{name!r}]", "an op name must be lower-case letters, digits and _, starting with a "
                                     "letter (at most 48)")
        if name in RESERVED:
            fail(f"SPECS[{name!r}]", f"{name!r} is the name of another file of a tree (kernels/, arch folders)")
        if not isinstance(spec, dict):
            fail(f"SPECS[{name!r}]", f"must be a dict, got {type(spec).__name__}")
        _check_spec(name, spec, lambda field, problem, name=name: fail(f"SPECS[{name!r}][{field!r}]", problem))
        if not callable(forward.get(name)):
            fail(f"FORWARD[{name!r}]", "missing or not a function (the torch forward of the op)")
        if spec.get("gated", False) and not callable(derivative.get(name)):
            fail(f"DERIVATIVE[{name!r}]", "missing or not a function (a gated op needs its exact derivative)")


def _check_spec(name: str, spec: dict, fail) -> None:
    for field in ("bits", "boundary", "thresholds", "levels", "fit_error", "description", "replaces"):
        if field not in spec:
            fail(field, "missing")
    for field in TEXT_FIELDS:
        if field in spec and not isinstance(spec[field], str):
            fail(field, f"must be a str, got {type(spec[field]).__name__}")
    if not isinstance(spec.get("gated", False), bool):
        fail("gated", f"must be True or False, got {spec['gated']!r}")
    bits = spec["bits"]
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        fail("bits", f"must be one of {BITS}, got {bits!r}")
    if spec["boundary"] not in BOUNDARIES:
        fail("boundary", f"must be one of {', '.join(map(repr, BOUNDARIES))}, got {spec['boundary']!r}")

    def numbers(field: str, count: int) -> list[float]:
        values = spec[field]
        if not isinstance(values, (tuple, list)):
            fail(field, f"must be a tuple of numbers, got {type(values).__name__}")
        if len(values) != count:
            fail(field, f"needs {count} values for bits = {bits}, got {len(values)}")
        for v in values:
            # the kernels compute in float32: a value beyond its range would be inf there
            if not _is_number(v) or not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                fail(field, f"every value must be a finite float32 number, got {v!r}")
        return [float(v) for v in values]

    thresholds = numbers("thresholds", 2**bits - 1)
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        fail("thresholds", f"must be strictly ascending, got {thresholds}")
    if len({_f32(t) for t in thresholds}) != len(thresholds):
        fail("thresholds", "two thresholds round to the same float32 value (a level would be unreachable)")
    numbers("levels", 2**bits)
    fit_error = spec["fit_error"]
    if not _is_number(fit_error) or not math.isfinite(fit_error) or fit_error < 0:
        fail("fit_error", f"must be a finite number >= 0, got {fit_error!r}")
