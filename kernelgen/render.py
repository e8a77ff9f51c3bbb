"""Render specs into Triton source (one file per op and arch), the arch-independent ops module and
each arch's baked launch configs; enumerate the tuning groups and the kernels they compile.

No free text reaches generated code, by construction: every value handed to a template is checked
(_template_vars) to be an integer, a plain word (identifier, hex digest), or text this module has
marked for where it goes: `Code` (printed here: expressions, float reprs, config dicts), `Quoted`
(any text as an ASCII Python string literal: no quote or line break can end it) or `CommentText`
(text refused if it holds a line break or control character: safe after a `#`). A spec's
description, a file name or a tuning database's GPU name handed over bare is a RenderError, so a
future template cannot paste it into code by mistake.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import jinja2

from . import plaintext
from . import space, targets
from .archs import DTYPES, TRITON_DTYPE, Arch
from .expr import TRITON_HELPERS
from .fit import asymptotes
from .spec import Spec, to_f32

ACTIVATION_TEMPLATE = "activation.py.j2"
OPS_TEMPLATE = "ops.py.j2"
NORM_TEMPLATE = "norm.py.j2"
CONFIGS_TEMPLATE = "configs.py.j2"
CONFIGS_FILE = "configs"
CPU_TEMPLATE = "cpu_activation.cpp.j2"
CPU_NORM_TEMPLATE = "cpu_norm.cpp.j2"  # included by CPU_TEMPLATE
CPU_DROPOUT_TEMPLATE = "cpu_dropout.cpp.j2"  # included by CPU_TEMPLATE
CPU_FILE = "cpu_kernels.cpp"  # at the top of a tree, beside ops.py: arch-independent


class RenderError(RuntimeError):
    pass


def template_dir() -> Path:
    """The installed kernelgen.templates, or templates/ of a checkout used through PYTHONPATH."""
    try:
        return Path(str(resources.files("kernelgen.templates")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"


class Code(str):
    """Code this module printed itself; emitted verbatim."""


class Quoted(str):
    """Text as an ASCII Python string literal (ascii()): no quote, backslash or line break in the
    text can end it, and non-ASCII characters read back exactly whatever the file's encoding."""


class CommentText(str):
    """One line of printable text, for a position after `#`."""


def quoted(text: str) -> Quoted:
    return Quoted(ascii(str(text)))


def comment_text(text: str, what: str) -> CommentText:
    bad = plaintext.problem(str(text))
    if bad:
        raise RenderError(f"{what}: {bad}")
    return CommentText(text)


_WORD = re.compile(r"[A-Za-z0-9_]*")  # identifiers, arch names, hex digests: harmless anywhere


def _template_vars(value, where: str = "template variables"):
    """`value`, after checking that nothing in it is text a template could paste unmarked."""
    if isinstance(value, (Code, Quoted, CommentText, int)):  # bool is an int
        return value
    if isinstance(value, str):
        if _WORD.fullmatch(value):
            return value
        raise RenderError(f"{where}: text {value!r:.60} handed to a template unmarked; wrap it in "
                          "quoted(), comment_text() or (if printed by kernelgen) Code()")
    if isinstance(value, dict):
        return {k: _template_vars(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_template_vars(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise RenderError(f"{where}: {type(value).__name__} handed to a template; pass its fields")


def _finalize(value):
    # Only strings and integers print; a None or a float would print as Python spells it, silently.
    if isinstance(value, (str, int)):
        return value
    raise RenderError(f"a template prints {type(value).__name__} {value!r:.60}")


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """One environment per process: it caches the compiled templates (and reloads a changed file)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_finalize,
    )


def _render(template: str, **variables) -> str:
    return _env().get_template(template).render(**_template_vars(variables))


def template_sha256(name: str) -> str:
    return hashlib.sha256((template_dir() / name).read_bytes()).hexdigest()


def spec_file_label(spec: Spec) -> str:
    """A path that is the same on every machine: builtins by package path, others by file name."""
    path = Path(spec.path)
    builtin = Path(str(resources.files("kernelgen.specs")))
    return f"kernelgen/specs/{path.name}" if path.resolve().parent == builtin.resolve() else path.name


def _num(value: float) -> Code:
    return Code(repr(float(value)))


def _level_select(levels: tuple[float, ...]) -> Code:
    # A chain of selects: Triton has no gather from a constant table. 2**k - 1 compares per element.
    expr = repr(levels[-1])
    for c in range(len(levels) - 2, -1, -1):
        expr = f"tl.where(code == {c}, {levels[c]!r}, {expr})"
    return Code(expr)


def _pack_rounds(spec: Spec) -> list[dict]:
    """Round r packs neighbouring fields of width field * 2**r in pairs: groups of 2**(r+1) codes."""
    rounds, width, group = [], 1 if spec.planes > 1 else spec.bits, 2
    while width < 8:
        rounds.append({"width": width, "group": group})
        width, group = width * 2, group * 2
    return rounds


SIZE_ARGS = ("n_elements", "n_cols")


@dataclass(frozen=True)
class KernelVariant:
    """One compiled unit: a kernel function of a generated file, for a dtype, with a config.

    `signature` and the constexprs are what triton.compile gets; they mirror what the runtime
    launches with: pointers 16-byte aligned (torch's allocator guarantees it and Triton's JIT
    specialises on it) and integer sizes as i32, as Triton specialises them below 2**31. Triton's
    JIT also specialises an integer that is a multiple of 16 (it may then vectorise accesses):
    `aligned` compiles the kernel as it runs when its size arguments are (the common case, and
    what pruning and ranking judge), `aligned=False` the fallback for other sizes.
    """

    op: str  # the generated file's stem: regelu2, ms_norm, ...
    kernel: str  # forward | backward | layernorm.affine.forward | ...: what a tuning group names
    dtype: str
    fn: str  # the @triton.jit function in that file
    signature: dict
    flags: dict  # constexprs that select what the kernel does (WRITE_CODES, IS_RMS, ...)
    config: dict  # tunable constexprs + num_warps (+ num_stages): what a compiled config is
    aligned: bool = True  # the size arguments (SIZE_ARGS) are multiples of 16

    @property
    def key(self) -> str:
        return f"{self.op}.{self.kernel}[{self.dtype}]"

    @property
    def aligned_args(self) -> tuple[str, ...]:
        """The size arguments the aligned specialisation marks as multiples of 16: those that set
        addresses (flat offsets, row starts). A row count only bounds loops and is left unmarked, so
        both specialisations describe any number of rows."""
        return tuple(name for name in SIZE_ARGS if name in self.signature) if self.aligned else ()

    @property
    def specialisation(self) -> dict:
        """What the manifest records of which runtime case this compile describes."""
        spec = {"sizes": "multiples of 16" if self.aligned else "any"}
        if "w_ptr" in self.signature and self.flags.get("AFFINE", True):
            spec["weight"] = {f"*{t}": name for name, t in TRITON_DTYPE.items()}[self.signature["w_ptr"]]
        return spec

    def unaligned(self) -> "KernelVariant":
        return replace(self, aligned=False)

    @property
    def constexprs(self) -> dict:
        return {**self.flags, **{k: v for k, v in self.config.items() if k not in ("num_warps", "num_stages")}}

    @property
    def num_warps(self) -> int:
        return self.config["num_warps"]

    @property
    def num_stages(self) -> int | None:
        return self.config.get("num_stages")


@dataclass(frozen=True)
class TuneGroup:
    """One choice `kernelgen build` bakes: a kernel of an op, for a dtype and a shape bucket, among
    candidate configs (the static one first). `index` is the bucket's position in configs.py."""

    op: str
    kernel: str
    dtype: str
    bucket: str
    index: tuple[int, ...]
    candidates: tuple[dict, ...]

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.op, self.kernel, self.dtype, self.bucket)


KERNELS = ("forward", "forward_nograd", "backward")
GATED_KERNELS = ("gated_forward", "gated_forward_approx", "gated_backward", "gated_backward_approx")

# kernel -> (@triton.jit function, pointer arguments, flags). The signature is pointers, then
# n_elements, then the flags, then BLOCK_BYTES: the order of the functions' parameters.
_T, _U8 = "*{t}", "*u8"
_GATED_FWD = {"gate_ptr": _T, "up_ptr": _T, "out_ptr": _T, "h_ptr": _T, "codes_ptr": _U8}
_GATED_BWD = {"dy_ptr": _T, "gate_ptr": _T, "up_ptr": _T, "h_ptr": _T, "codes_ptr": _U8, "dgate_ptr": _T, "dup_ptr": _T}
ELEMENTWISE_KERNELS = {
    "forward": ("forward_kernel", {"x_ptr": _T, "y_ptr": _T, "codes_ptr": _U8}, {"WRITE_CODES": True}),
    "forward_nograd": ("forward_kernel", {"x_ptr": _T, "y_ptr": _T, "codes_ptr": _U8}, {"WRITE_CODES": False}),
    "backward": ("backward_kernel", {"dy_ptr": _T, "codes_ptr": _U8, "dx_ptr": _T}, {}),
    "gated_forward": ("gated_forward_kernel", _GATED_FWD, {"WRITE_H": False, "WRITE_CODES": False}),
    "gated_forward_approx": ("gated_forward_kernel", _GATED_FWD, {"WRITE_H": True, "WRITE_CODES": True}),
    "gated_backward": ("gated_backward_kernel", _GATED_BWD, {"APPROX": False, "NEED_GATE": True, "NEED_UP": True}),
    "gated_backward_approx": ("gated_backward_kernel", _GATED_BWD, {"APPROX": True, "NEED_GATE": True, "NEED_UP": True}),
}


def activation_kernels(spec: Spec) -> tuple[str, ...]:
    return KERNELS + (GATED_KERNELS if spec.gated else ())


def activation_groups(spec: Spec, arch: Arch) -> list[TuneGroup]:
    sp = space.activation_space()
    out = []
    for kernel in activation_kernels(spec):
        for dtype in DTYPES:
            candidates = tuple(sp.configs(arch, dtype, spec.codes_per_byte))
            out += [TuneGroup(spec.name, kernel, dtype, label, (i,), candidates) for i, label in enumerate(sp.buckets)]
    return out


def _activation_variant(op: str, kernel: str, dtype: str, config: dict) -> KernelVariant:
    fn, pointers, flags = ELEMENTWISE_KERNELS[kernel]
    sig = {name: kind.format(t=TRITON_DTYPE[dtype]) for name, kind in pointers.items()}
    sig.update({"n_elements": "i32", **{f: "constexpr" for f in flags}, "BLOCK_BYTES": "constexpr"})
    return KernelVariant(op, kernel, dtype, fn, sig, dict(flags), dict(config))


NORM_FILE = "ms_norm"
NORM_KINDS = ("layernorm", "rmsnorm")


def norm_kernel(kind: str, affine: bool, stage: str) -> str:
    return f"{kind}{'.affine' if affine else ''}.{stage}"


def norm_groups(arch: Arch) -> list[TuneGroup]:
    """forward and backward of LayerNorm and RMSNorm, without and with the (inverted) affine, and
    the looped path's dgamma/dbeta kernel, per (row width, row count) bucket."""
    sp = space.norm_space()
    out = []
    for kind in NORM_KINDS:
        for affine in (False, True):
            for stage in ("forward", "backward", "param_grad"):
                if stage == "param_grad" and not affine:
                    continue
                for dtype in DTYPES:
                    for w, wlabel in enumerate(sp.width_buckets):
                        candidates = tuple(sp.configs(arch, stage, dtype, w))
                        out += [TuneGroup(NORM_FILE, norm_kernel(kind, affine, stage), dtype, f"{wlabel},{rlabel}",
                                          (w, r), candidates) for r, rlabel in enumerate(sp.row_buckets)]
    return out


def norm_weight_dtypes(kernel: str, dtype: str) -> tuple[str, ...]:
    """The gamma/beta dtypes the runtime launches a norm kernel with, the usual one first: a model's
    own dtype (a bf16 model has bf16 norm weights), and float32 beside 16-bit activations (float32
    master weights under autocast). Kernels without the affine read no weights: float32 placeholders."""
    if ".affine." not in kernel or dtype == "float32":
        return ("float32",)
    return (dtype, "float32")


def _norm_variant(kernel: str, dtype: str, config: dict, weight_dtype: str) -> KernelVariant:
    kind, *rest = kernel.split(".")
    affine, stage = rest[0] == "affine", rest[-1]
    t, wt = TRITON_DTYPE[dtype], TRITON_DTYPE[weight_dtype]
    if stage == "param_grad":
        sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}", "dw_ptr": "*fp32",
               "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
               "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        return KernelVariant(NORM_FILE, kernel, dtype, "param_grad_kernel", sig,
                             {"HAS_BIAS": kind == "layernorm"}, dict(config))
    flags = {"IS_RMS": kind == "rmsnorm", "AFFINE": affine, "HAS_BIAS": affine and kind == "layernorm"}
    if stage == "forward":
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}",
               "ok_ptr": "*i32", "n_cols": "i32", "eps": "fp32", "gamma_min": "fp32", "beta_ratio": "fp32"}
    else:
        sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}",
               "dx_ptr": f"*{t}", "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
    sig.update({k: "constexpr" for k in (*flags, "BLOCK_N", "SINGLE_PASS")})
    return KernelVariant(NORM_FILE, kernel, dtype, f"{stage}_kernel", sig, flags, dict(config))


def variants(groups: list[TuneGroup]) -> list[list[KernelVariant]]:
    """Every distinct compiled config the groups' candidates need (launch-only parameters aside), as
    the aligned compiles it is launched as: one per weight dtype for the norms' affine kernels, the
    usual one first. A config is judged on all of them (one baked config serves every case)."""
    seen, out = set(), []
    for g in groups:
        for c in g.candidates:
            cfg = space.compile_part(c)
            ident = (g.op, g.kernel, g.dtype, space.config_id(cfg))
            if ident in seen:
                continue
            seen.add(ident)
            if g.op == NORM_FILE:
                out.append([_norm_variant(g.kernel, g.dtype, cfg, w) for w in norm_weight_dtypes(g.kernel, g.dtype)])
            else:
                out.append([_activation_variant(g.op, g.kernel, g.dtype, cfg)])
    return out


def _arch_vars(arch: Arch) -> dict:
    return {"name": arch.name}


def _spec_vars(spec: Spec) -> dict:
    """What the activation template shows of a spec; free text only after a `#`."""
    return {"name": spec.name, "sha256": spec.sha256, "bits": spec.bits, "boundary": spec.boundary,
            "gated": spec.gated, "description": comment_text(spec.description, f"{spec.name}: [op].description"),
            "forward": {"text": comment_text(spec.forward.text, f"{spec.name}: [op].forward")}}


def render_activation(spec: Spec, arch: Arch) -> str:
    forward = spec.forward.triton()
    derivative = spec.forward.triton_derivative() if spec.gated else ""
    asym = asymptotes(spec.forward) if spec.gated else None
    try:
        return _render(
            ACTIVATION_TEMPLATE,
            spec=_spec_vars(spec),
            arch=_arch_vars(arch),
            spec_file=comment_text(spec_file_label(spec), f"{spec.name}: the spec's file name"),
            template_sha256=template_sha256(ACTIVATION_TEMPLATE),
            thresholds=[_num(to_f32(c)) for c in spec.thresholds],
            levels=[_num(to_f32(v)) for v in spec.levels],
            compare=Code(">" if spec.boundary == "lower" else ">="),
            forward_triton=Code(forward),
            level_select=_level_select(tuple(to_f32(v) for v in spec.levels)),
            pack_rounds=_pack_rounds(spec),
            cpb=spec.codes_per_byte,
            planes=spec.planes,
            field=spec.bits if spec.planes == 1 else 1,
            uses_tanh="_tanh(" in forward + derivative,
            derivative_triton=Code(derivative),
            slope_left=_num(asym.slope_left) if asym else "",
            slope_right=_num(asym.slope_right) if asym else "",
            triton_helpers=Code(TRITON_HELPERS.strip()),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering {spec.name} for {arch.name} from templates/{ACTIVATION_TEMPLATE}: {err}") from err


def _derivative_fields(s: Spec) -> dict:
    if not s.gated:
        return {}
    asym = asymptotes(s.forward)
    return {"derivative_torch": Code(s.forward.torch_derivative()), "slope_left": _num(asym.slope_left),
            "slope_right": _num(asym.slope_right)}


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
            "thresholds_f32": [_num(to_f32(c)) for c in s.thresholds],
            "levels_f32": [_num(to_f32(v)) for v in s.levels],
            "fit_error": _num(s.fit_error),
            "sha256": s.sha256,
            "forward_torch": Code(s.forward.torch()),
            **_derivative_fields(s),
        }
        for s in specs
    ]
    try:
        return _render(
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
        return _render(CPU_TEMPLATE, ops=rows, spec_files=[quoted(spec_file_label(s)) for s in specs],
                       template_sha256=template_sha256(CPU_TEMPLATE),
                       norm_template_sha256=template_sha256(CPU_NORM_TEMPLATE),
                       dropout_template_sha256=template_sha256(CPU_DROPOUT_TEMPLATE), dtypes=["Float32", "BFloat16", "Float16"])
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the CPU kernels from templates/{CPU_TEMPLATE}: {err}") from err


def render_norm(arch: Arch) -> str:
    try:
        return _render(NORM_TEMPLATE, arch=_arch_vars(arch), template_sha256=template_sha256(NORM_TEMPLATE))
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the norm kernels for {arch.name} from templates/{NORM_TEMPLATE}: {err}") from err


_NOTE = re.compile(r"static|tuned( [0-9]+\.[0-9]+x)?")  # what build._choose writes


def render_configs(arch: Arch, choices: list[tuple[TuneGroup, dict, str]], tuned_with: str) -> str:
    """configs.py of an arch: every group's chosen config, with a note on where it came from.
    `tuned_with` names the GPUs and Triton versions of the tuning DB: text from that file."""
    def row(key: tuple, cfg: dict, note: str) -> tuple[Code, Code, Code]:
        if not _NOTE.fullmatch(note):
            raise RenderError(f"unexpected note {note!r:.80} for {key!r}")
        return Code(repr(key)), Code(repr(dict(cfg))), Code(note)  # configs come from the spaces

    act = [row((g.op, g.kernel, g.dtype, *g.index), cfg, note) for g, cfg, note in choices if g.op != NORM_FILE]
    norm = [row((g.kernel, g.dtype, *g.index), cfg, note) for g, cfg, note in choices if g.op == NORM_FILE]
    n_tuned = sum(note.startswith("tuned") for _, _, note in choices)
    target = targets.TARGETS[arch.name]  # what the runtime matches a GPU against
    try:
        return _render(
            CONFIGS_TEMPLATE,
            arch=_arch_vars(arch), template_sha256=template_sha256(CONFIGS_TEMPLATE), activation=act, norm=norm,
            vendor=Code(repr(target.vendor)), capability=Code(repr(target.arch)),
            n_tuned=n_tuned, n_total=len(choices),
            tuned_with=comment_text(f" ({tuned_with})" if n_tuned else "", f"{arch.name}: the tuning database's GPU names"),
            element_bounds=Code(repr(space.activation_space().element_bounds)),
            norm_widths=Code(repr(space.norm_space().widths)),
            norm_row_bounds=Code(repr(space.norm_space().row_bounds)),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the launch configs for {arch.name} from templates/{CONFIGS_TEMPLATE}: {err}") from err
