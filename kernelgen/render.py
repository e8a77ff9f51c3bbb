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
from .kernels import TuneGroup
from .spec import Spec, to_f32
from .templating import (Code, RenderError, arch_vars, comment_text, num, quoted, render, spec_file_label,
                         template_sha256)

OPS_TEMPLATE = "ops.py.j2"
CONFIGS_TEMPLATE = "configs.py.j2"
CPU_TEMPLATE = "cpu_activation.cpp.j2"
CPU_NORM_TEMPLATE = "cpu_norm.cpp.j2"  # included by CPU_TEMPLATE
CPU_DROPOUT_TEMPLATE = "cpu_dropout.cpp.j2"  # included by CPU_TEMPLATE
_CPP_DTYPE = {"float32": "Float32", "bfloat16": "BFloat16", "float16": "Float16"}  # the C++ kernels' type names


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
                       dtypes=[_CPP_DTYPE[name] for name in contract.CPU_DTYPE_CODES])
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the CPU kernels from templates/{CPU_TEMPLATE}: {err}") from err


_NOTE = re.compile(r"static|tuned( [0-9]+\.[0-9]+x)?")  # what build._choose writes


def render_configs(arch: Arch, choices: list[tuple[TuneGroup, dict, str]], tuned_with: str) -> str:
    """configs.py of an arch: every group's chosen config, with a note on where it came from.
    `tuned_with` names the GPUs and Triton versions of the tuning DB: text from that file."""
    def row(key: tuple, cfg: dict, note: str) -> tuple[Code, Code, Code]:
        if not _NOTE.fullmatch(note):
            raise RenderError(f"unexpected note {note!r:.80} for {key!r}")
        return Code(repr(key)), Code(repr(dict(cfg))), Code(note)  # configs come from the spaces

    tables = {}  # every family's table, empty where the build has none of its groups (a user's tree)
    for family in families.ALL:
        rows = [row(family.config_key(g), cfg, note) for g, cfg, note in choices if g.family == family.name]
        tables.update(family.configs_vars(rows))
    n_tuned = sum(note.startswith("tuned") for _, _, note in choices)
    target = targets.TARGETS[arch.name]  # what the runtime matches a GPU against
    try:
        return render(
            CONFIGS_TEMPLATE,
            arch=arch_vars(arch), template_sha256=template_sha256(CONFIGS_TEMPLATE), **tables,
            vendor=Code(repr(target.vendor)), capability=Code(repr(target.arch)),
            n_tuned=n_tuned, n_total=len(choices),
            tuned_with=comment_text(f" ({tuned_with})" if n_tuned else "", f"{arch.name}: the tuning database's GPU names"),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the launch configs for {arch.name} from templates/{CONFIGS_TEMPLATE}: {err}") from err
