"""Render the arch-independent files of a tree (ops.py: the specs as the runtime needs them, with
their torch functions; cpu_kernels.cpp: the C++ CPU kernels) and each arch's baked launch configs
(configs.py). The kernel files themselves are each family's (kernelgen/families); what may reach a
template, and how, is kernelgen/templating.py's.
"""

from __future__ import annotations

import math
import re

import jinja2

from . import families, targets
from .archs import Arch
from .contract import contract
from .fit import asymptotes
from .kernels import ConfigTable, TuneGroup
from .spec import Spec, to_f32
from .templating import (Code, RenderError, arch_vars, comment_text, num, quoted, render, spec_file_label,
                         template_sha256)

OPS_TEMPLATE = "ops.py.j2"
CONFIGS_TEMPLATE = "configs.py.j2"
CPU_TEMPLATE = "cpu_activation.cpp.j2"
CPU_NORM_TEMPLATE = "cpu_norm.cpp.j2"  # included by CPU_TEMPLATE
CPU_DROPOUT_TEMPLATE = "cpu_dropout.cpp.j2"  # included by CPU_TEMPLATE
CPU_AUTOGRAD_TEMPLATE = "cpu_autograd.cpp.j2"  # included by CPU_TEMPLATE
_CPP_DTYPE = {"float32": "Float32", "bfloat16": "BFloat16", "float16": "Float16"}  # the C++ kernels' type names
_ATEN_DTYPE = {"float32": "Float", "bfloat16": "BFloat16", "float16": "Half"}  # at::k<name>


def _derivative_fields(s: Spec) -> dict:
    if not s.gated:
        return {}
    asym = asymptotes(s.forward)
    return {"derivative_torch": Code(s.forward.torch_derivative()), "slope_left": num(asym.slope_left),
            "slope_right": num(asym.slope_right)}


def render_ops(specs: list[Spec]) -> str:
    rows = [
        {
            "name": s.name,
            "description": quoted(s.description),
            "forward": {"text": quoted(s.forward.text)},
            "replaces": quoted(s.replaces),
            "gated": s.gated,
            "bits": s.bits,
            "boundary": s.boundary,
            "thresholds_f32": [num(to_f32(c)) for c in s.thresholds],
            "levels_f32": [num(to_f32(v)) for v in s.levels],
            "fit_error": num(s.fit_error),
            "sha256": s.sha256,
            "forward_torch": Code(s.forward.torch()),
            **_derivative_fields(s),
        }
        for s in specs
    ]
    try:
        return render(
            OPS_TEMPLATE,
            specs=rows,
            spec_files=[comment_text(spec_file_label(s), f"{s.name}: the spec's file name") for s in specs],
            template_sha256=template_sha256(OPS_TEMPLATE),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the ops module from templates/{OPS_TEMPLATE}: {err}") from err


def _cpp_float(value: float) -> Code:
    """A float32 constant as a C++ hex literal: exact, whatever the compiler's decimal parsing."""
    f = to_f32(value)
    if not math.isfinite(f):
        raise RenderError(f"{value!r} is not a finite float32 (specs are checked for this)")
    return Code(float.hex(f) + "f")


def _cpp_gated_fields(s: Spec) -> dict:
    """h, and h with h', of a gated spec as C++ statements over Vectorized<float> (kernelgen.expr)."""
    def statements(temps):
        return [[name, Code(value)] for name, value in temps]

    # One program for h and h' (their common subexpressions computed once: GELU's erf, SiLU's exp); the
    # forward runs the statements h needs, so forward and backward compute h alike, to the bit.
    temps, (h, dh) = s.forward.cpp_vec_program(derivative=True)
    needed = set(re.findall(r"\bt\d+\b", h))
    for name, value in reversed(temps):
        if name in needed:
            needed |= set(re.findall(r"\bt\d+\b", value))
    h_temps = [(name, value) for name, value in temps if name in needed]
    asym = asymptotes(s.forward)
    return {"h_temps": statements(h_temps), "h": Code(h), "dh_temps": statements(temps),
            "dh": Code(dh), "slope_left": _cpp_float(asym.slope_left),
            "slope_right": _cpp_float(asym.slope_right)}


def render_cpu(specs: list[Spec]) -> str:
    """One C++ translation unit with the codes and gradient kernels of every spec (lowmem_ops compiles it
    on first use on CPU tensors). Free text reaches it only inside comments, as ASCII string literals:
    no line break can end the comment, and no backslash can end its line (which would splice the next
    line into the comment)."""
    rows = [{"name": s.name, "description": quoted(s.description), "bits": s.bits, "planes": s.planes,
             "codes_per_byte": s.codes_per_byte, "boundary": s.boundary,
             "compare": Code(">" if s.boundary == "lower" else ">="),
             "thresholds": [_cpp_float(c) for c in s.thresholds], "levels": [_cpp_float(v) for v in s.levels],
             "gated": s.gated, **(_cpp_gated_fields(s) if s.gated else {})}
            for s in specs]
    try:
        return render(CPU_TEMPLATE, ops=rows, spec_files=[quoted(spec_file_label(s)) for s in specs],
                       template_sha256=template_sha256(CPU_TEMPLATE),
                       norm_template_sha256=template_sha256(CPU_NORM_TEMPLATE),
                       dropout_template_sha256=template_sha256(CPU_DROPOUT_TEMPLATE),
                       autograd_template_sha256=template_sha256(CPU_AUTOGRAD_TEMPLATE),
                       dtypes=[_CPP_DTYPE[name] for name in contract.CPU_DTYPE_CODES],
                       dtype_names=[_ATEN_DTYPE[name] for name in contract.CPU_DTYPE_CODES])
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the CPU kernels from templates/{CPU_TEMPLATE}: {err}") from err


_NOTE = re.compile(r"static|tuned( [0-9]+\.[0-9]+x)?")  # what build._choose writes


def _row(key: tuple, cfg: dict, note: str) -> tuple[Code, Code, Code]:
    if not _NOTE.fullmatch(note):
        raise RenderError(f"unexpected note {note!r:.80} for {key!r}")
    return Code(repr(key)), Code(repr(dict(cfg))), Code(note)  # configs come from the spaces


def _table_vars(table: ConfigTable, rows: list[tuple[tuple, dict, str]]) -> dict:
    """A family's table (rows: key, config, note) as configs.py.j2 renders it, checked against its
    description: every key has its fields, the bucket indices last and each within its bounds, and no
    key comes twice (a dict literal would silently keep the last)."""
    where = f"configs.py table {table.name!r:.40}"
    n_fields, n_bounds = len(table.key), len(table.bounds)
    names = [table.name, *(b.name for b in table.bounds)]
    bad = [n for n in names if not (isinstance(n, str) and n.isidentifier())]
    if bad:
        raise RenderError(f"{where}: variable names must be Python identifiers, got {bad!r:.80}")
    for b in table.bounds:
        values = list(b.values)
        if not values or any(type(v) is not int for v in values) or values != sorted(set(values)):
            raise RenderError(f"{where}: bounds {b.name} must be strictly increasing integers, got {values!r:.80}")
    seen = set()
    for key, _, _ in rows:
        if (not isinstance(key, tuple) or len(key) != n_fields
                or any(type(i) is not int or not 0 <= i <= len(b.values)
                       for i, b in zip(key[n_fields - n_bounds:], table.bounds))):
            raise RenderError(f"{where}: key {key!r:.80} does not fit its fields {table.key} "
                              "(the bucket indices last, each in 0..len(its bounds))")
        if key in seen:
            raise RenderError(f"{where}: key {key!r:.80} twice")
        seen.add(key)
    bound_names = names[1:]
    return {"name": table.name, "quoted_name": quoted(table.name), "rows": [_row(*r) for r in rows],
            "title": comment_text(table.title, f"{where}: title"),
            "key": comment_text(", ".join(table.key), f"{where}: key fields"),
            "bound_names": Code(f"({', '.join(bound_names)}{',' if len(bound_names) == 1 else ''})"),
            "bounds": [{"name": b.name, "tuple": Code(repr(tuple(b.values))),
                        "meaning": comment_text(b.meaning, f"{where}: meaning of {b.name}")} for b in table.bounds]}


def _check_unique(tables: list[dict]) -> None:
    """No variable of configs.py is defined twice (the later would silently replace the earlier)."""
    names = [contract.VENDOR, contract.CAPABILITY, contract.KERNEL_FILES, contract.TABLE_BOUNDS]
    names += [n for t in tables for n in (t["name"], *(b["name"] for b in t["bounds"]))]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RenderError(f"configs.py would define {', '.join(twice)} twice: each table and bounds needs a name of its own")


_KERNEL_NAME = re.compile(r"[a-z][a-z0-9_]*")  # stems are op names (kernelgen/spec.py) or the contract's


def render_configs(arch: Arch, choices: list[tuple[TuneGroup, dict, str]], tuned_with: str,
                   kernel_files: dict[str, str]) -> str:
    """configs.py of an arch: every group's chosen config, with a note on where it came from, and the
    kernel file of each stem (stem -> contract.kernel_name). `tuned_with` names the GPUs and Triton
    versions of the tuning DB: text from that file."""
    bad = [x for pair in kernel_files.items() for x in pair if not _KERNEL_NAME.fullmatch(x)]
    if bad:
        raise RenderError(f"configs.py for {arch.name}: kernel file stems and names must be lower-case words, "
                          f"got {bad[0]!r:.60}")
    tables = []  # every family's table that has rows (a user's tree has none of the builtin-only ones)
    for family in families.ALL:
        rows = [(family.config_key(g), cfg, note) for g, cfg, note in choices if g.family == family.name]
        if rows:
            tables.append(_table_vars(family.configs_table(), rows))
    _check_unique(tables)
    n_tuned = sum(note.startswith("tuned") for _, _, note in choices)
    target = targets.TARGETS[arch.name]  # what the runtime matches a GPU against
    try:
        return render(
            CONFIGS_TEMPLATE,
            arch=arch_vars(arch), template_sha256=template_sha256(CONFIGS_TEMPLATE), tables=tables,
            table_bounds=contract.TABLE_BOUNDS, kernels_dir=contract.KERNELS_DIR,
            kernel_files_name=contract.KERNEL_FILES,
            kernel_files=[(Code(repr(stem)), Code(repr(name))) for stem, name in sorted(kernel_files.items())],
            vendor=Code(repr(target.vendor)), capability=Code(repr(target.arch)),
            n_tuned=n_tuned, n_total=len(choices),
            tuned_with=comment_text(f" ({tuned_with})" if n_tuned else "", f"{arch.name}: the tuning database's GPU names"),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the launch configs for {arch.name} from templates/{CONFIGS_TEMPLATE}: {err}") from err
