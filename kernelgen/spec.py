"""Activation-approximation specs: load a TOML file, validate every field, return a Spec.

The format is documented in docs/spec-format.md. Every error names the file, the line of the
offending field when it can be found, the field, and what is wrong.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import expr, plaintext
from .expr import to_f32

SUPPORTED_BITS = (1, 2, 3, 4)
BOUNDARIES = {
    "lower": "x == c_i takes the level below c_i (code = number of thresholds strictly below x)",
    "upper": "x == c_i takes the level above c_i (code = number of thresholds at or below x)",
}
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # always with fullmatch: `$` would let a trailing newline through
# An op's name becomes kernels/<name>_<hash>.py and <name>_forward in ops.py: it must not be a file the tree
# layout already uses (kernelgen/build.py) nor a Python keyword.
RESERVED_NAMES = frozenset({"configs", "ops", "ms_norm", "manifest", "__init__"}
                           | {k for k in keyword.kwlist + keyword.softkwlist if k.islower()})
_FIELDS = {
    "op": {"name": True, "description": False, "forward": True, "replaces": False, "gated": False},
    "approx": {"bits": True, "boundary": True, "thresholds": True, "coefficients": False, "levels": False,
               "fit_error": True, "fit_source": False},
}


class SpecError(ValueError):
    """A spec file is malformed. The message says file:line, field and the problem."""


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    forward: expr.Expr
    replaces: str
    gated: bool  # also generate fused gated-MLP kernels: out = h(gate) * up
    bits: int
    boundary: str
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]  # 2**bits derivative levels, levels[code]
    fit_error: float
    fit_source: str
    path: str  # as given to load(); for messages only
    sha256: str  # of the file's bytes

    @property
    def planes(self) -> int:
        """3-bit codes are stored as 3 bit planes (3 bits per element); the others interleaved."""
        return 3 if self.bits == 3 else 1

    @property
    def codes_per_byte(self) -> int:
        """Codes per byte of one plane."""
        return 8 if self.bits == 3 else 8 // self.bits


def load(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read spec: {err.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML: {err}") from None
    return _validate(data, path, text, hashlib.sha256(raw).hexdigest())


def builtin_paths() -> list[Path]:
    folder = resources.files("kernelgen.specs")
    return sorted((Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")), key=lambda p: p.name)


def load_builtin() -> list[Spec]:
    specs = [load(p) for p in builtin_paths()]
    check_unique(specs)
    return specs


def check_unique(specs: list[Spec]) -> None:
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise SpecError(f"{s.path}: [op].name: {s.name!r} is already defined by {seen[s.name]}")
        seen[s.name] = s.path


def _line_of(text: str, table: str, key: str | None) -> int | None:
    """1-based line of `key = ...` inside `[table]` (or of the table header), if present."""
    in_table = False
    for i, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_table = stripped == f"[{table}]"
            if in_table and key is None:
                return i
            continue
        if in_table and key is not None and re.match(rf"{re.escape(key)}\s*=", stripped):
            return i
    return None


def name_problem(name: str) -> str | None:
    """What is wrong with `name` as an op name, or None."""
    if not NAME_RE.fullmatch(name):
        return f"{name!r} must be lower-case letters, digits and _, starting with a letter (max 48)"
    if name in RESERVED_NAMES:
        return f"{name!r} is reserved (a file of the generated tree or a Python keyword); choose another name"
    return None


def _label(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)  # a message stays one line


def _validate(data: dict, path: Path, text: str, sha: str) -> Spec:
    def fail(table: str, key: str | None, problem: str) -> None:
        line = _line_of(text, table, key) or _line_of(text, table, None)  # else the table header
        where = f"{path}:{line}" if line else f"{path}"
        field = f"[{_label(table)}].{_label(key)}" if key else f"[{_label(table)}]"
        raise SpecError(f"{where}: {field}: {problem}")

    for table in data:
        if table not in _FIELDS:
            fail(table, None, f"unknown table; expected {', '.join('[' + t + ']' for t in _FIELDS)}")
    for table, fields in _FIELDS.items():
        if not isinstance(data.get(table), dict):
            fail(table, None, "missing table")
        for key in data[table]:
            if key not in fields:
                fail(table, key, f"unknown field; allowed: {', '.join(fields)}")
        for key, required in fields.items():
            if required and key not in data[table]:
                fail(table, key, "missing required field")

    ap = data["approx"]

    def typed(table: str, key: str, kinds: tuple, default=None):
        value = data[table].get(key, default)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            names = " or ".join(k.__name__ for k in kinds)
            fail(table, key, f"must be {names}, got {type(value).__name__} {value!r}")
        return value

    def text_field(table: str, key: str) -> str:
        value = typed(table, key, (str,), "")
        bad = plaintext.problem(value)
        if bad:
            fail(table, key, bad)
        return value

    name = typed("op", "name", (str,))
    if name_problem(name):
        fail("op", "name", name_problem(name))
    description, replaces = text_field("op", "description"), text_field("op", "replaces")
    fit_source = text_field("approx", "fit_source")
    gated = typed("op", "gated", (bool,), False)
    try:
        forward = expr.parse(typed("op", "forward", (str,)))
        if gated:  # the gated kernels print h' too
            forward.check_printable(derivative=True)
    except expr.ExprError as err:
        fail("op", "forward", str(err))

    bits = typed("approx", "bits", (int,))
    if bits not in SUPPORTED_BITS:
        fail("approx", "bits", f"{bits} is not supported; choose one of {SUPPORTED_BITS}")
    boundary = typed("approx", "boundary", (str,))
    if boundary not in BOUNDARIES:
        fail("approx", "boundary", f"{boundary!r} is not one of {', '.join(BOUNDARIES)}")

    def numbers(key: str, count: int) -> tuple[float, ...]:
        values = typed("approx", key, (list,))
        if len(values) != count:
            fail("approx", key, f"needs {count} values for bits = {bits}, got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail("approx", key, f"every value must be a finite number, got {v!r}")
            if not math.isfinite(to_f32(float(v))):  # kernels hold these as float32 constants
                fail("approx", key, f"{v!r} overflows float32 (|value| <= 3.4e38)")
        return tuple(float(v) for v in values)

    m = 2**bits - 1
    thresholds = numbers("thresholds", m)
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        fail("approx", "thresholds", f"must be strictly ascending, got {list(thresholds)}")
    # Kernels compare in float32: thresholds that collide there would make a level unreachable.
    as_f32 = [to_f32(t) for t in thresholds]
    if len(set(as_f32)) != len(as_f32):
        fail("approx", "thresholds", "two thresholds round to the same float32 value")

    has_coeff, has_levels = "coefficients" in ap, "levels" in ap
    if has_coeff == has_levels:
        fail("approx", "coefficients" if has_coeff else None,
             "give exactly one of `coefficients` (a_1..a_m, levels are their prefix sums from 0) or `levels`")
    if has_coeff:
        coeff = numbers("coefficients", m)
        levels = tuple([0.0] + [math.fsum(coeff[: j + 1]) for j in range(m)])
        if not all(math.isfinite(to_f32(v)) for v in levels):
            fail("approx", "coefficients", f"a level (prefix sum) overflows float32: {list(levels)}")
    else:
        levels = numbers("levels", m + 1)

    fit_error = typed("approx", "fit_error", (int, float))
    if not math.isfinite(fit_error) or fit_error < 0:
        fail("approx", "fit_error", f"must be a finite number >= 0, got {fit_error!r}")
    return Spec(
        name=name,
        description=description,
        forward=forward,
        replaces=replaces,
        gated=gated,
        bits=bits,
        boundary=boundary,
        thresholds=thresholds,
        levels=levels,
        fit_error=float(fit_error),
        fit_source=fit_source,
        path=str(path),
        sha256=sha,
    )

