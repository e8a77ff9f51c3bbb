"""Render specs into Triton source (one file per op and arch) and the arch-independent ops module."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from .archs import DTYPES, TRITON_DTYPE, Arch, elementwise_config, norm_config
from .expr import TRITON_HELPERS
from .fit import asymptotes
from .spec import Spec, to_f32

ACTIVATION_TEMPLATE = "activation.py.j2"
OPS_TEMPLATE = "ops.py.j2"
NORM_TEMPLATE = "norm.py.j2"


class RenderError(RuntimeError):
    pass


def template_dir() -> Path:
    """The installed kernelgen.templates, or templates/ of a checkout used through PYTHONPATH."""
    try:
        return Path(str(resources.files("kernelgen.templates")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_sha256(name: str) -> str:
    return hashlib.sha256((template_dir() / name).read_bytes()).hexdigest()


def spec_file_label(spec: Spec) -> str:
    """A path that is the same on every machine: builtins by package path, others by file name."""
    path = Path(spec.path)
    builtin = Path(str(resources.files("kernelgen.specs")))
    return f"kernelgen/specs/{path.name}" if path.resolve().parent == builtin.resolve() else path.name


def _level_select(levels: tuple[float, ...]) -> str:
    # A chain of selects: Triton has no gather from a constant table. 2**k - 1 compares per element.
    expr = repr(levels[-1])
    for code in range(len(levels) - 2, -1, -1):
        expr = f"tl.where(code == {code}, {levels[code]!r}, {expr})"
    return expr


def _pack_rounds(spec: Spec) -> list[dict]:
    """Round r packs neighbouring fields of width field * 2**r in pairs: groups of 2**(r+1) codes."""
    rounds, width, group = [], 1 if spec.planes > 1 else spec.bits, 2
    while width < 8:
        rounds.append({"width": width, "group": group})
        width, group = width * 2, group * 2
    return rounds


@dataclass(frozen=True)
class KernelVariant:
    """One compiled unit: a kernel function of a generated file, for a dtype, with a config.

    `signature` and `constexprs` are what triton.compile gets; they mirror what the runtime
    launches with: pointers 16-byte aligned (torch's allocator guarantees it and Triton's JIT
    specialises on it) and integer sizes as i32, as Triton specialises them below 2**31.
    """

    op: str  # the generated file's stem: regelu2, ms_norm, ...
    kernel: str  # forward | forward_nograd | backward | layernorm.forward | ...
    dtype: str
    fn: str  # the @triton.jit function in that file
    signature: dict
    constexprs: dict
    num_warps: int

    @property
    def key(self) -> str:
        return f"{self.op}.{self.kernel}[{self.dtype}]"

    @property
    def config(self) -> dict:
        return {**{k: v for k, v in self.constexprs.items() if k.isupper()}, "num_warps": self.num_warps}


KERNELS = ("forward", "forward_nograd", "backward")
GATED_KERNELS = ("gated_forward", "gated_forward_approx", "gated_backward", "gated_backward_approx")

# kernel -> (@triton.jit function, pointer arguments, constexpr flags). The signature is pointers,
# then n_elements, then the flags, then BLOCK_BYTES: the order of the functions' parameters.
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


def activation_variants(spec: Spec, arch: Arch) -> list[KernelVariant]:
    out = []
    for kernel in KERNELS + (GATED_KERNELS if spec.gated else ()):
        fn, pointers, flags = ELEMENTWISE_KERNELS[kernel]
        for dtype in DTYPES:
            cfg = elementwise_config(arch, dtype, spec.codes_per_byte)
            sig = {name: kind.format(t=TRITON_DTYPE[dtype]) for name, kind in pointers.items()}
            sig.update({"n_elements": "i32", **{f: "constexpr" for f in flags}, "BLOCK_BYTES": "constexpr"})
            const = {**flags, "BLOCK_BYTES": cfg["BLOCK_BYTES"]}
            out.append(KernelVariant(spec.name, kernel, dtype, fn, sig, const, cfg["num_warps"]))
    return out


NORM_FILE = "ms_norm"
NORM_KINDS = ("layernorm", "rmsnorm")


def norm_variants(arch: Arch) -> list[KernelVariant]:
    """forward and backward of LayerNorm and RMSNorm, without and with the (inverted) affine, for a
    narrow and the widest single-pass row and for the looped path."""
    cfg = norm_config(arch)
    paths = [("single", 1024, cfg["single_warps"][1024]),
             ("single", cfg["max_single_block"], cfg["single_warps"][cfg["max_single_block"]]),
             ("loop", cfg["loop_block"], cfg["loop_warps"])]
    out = []
    for kind in NORM_KINDS:
        for affine in (False, True):
            for dtype in DTYPES:
                t = TRITON_DTYPE[dtype]
                for path, block, warps in paths:
                    flags = {"IS_RMS": kind == "rmsnorm", "AFFINE": affine, "HAS_BIAS": affine and kind == "layernorm",
                             "BLOCK_N": block, "SINGLE_PASS": path == "single"}
                    suffix = ".affine" if affine else ""
                    fwd = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                           "n_cols": "i32", "eps": "fp32"}
                    bwd = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                           "dx_ptr": f"*{t}", "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
                    for kernel, sig in (("forward", fwd), ("backward", bwd)):
                        sig = {**sig, **{k: "constexpr" for k in flags}}
                        out.append(KernelVariant(NORM_FILE, f"{kind}{suffix}.{kernel}.{path}{block}", dtype,
                                                 f"{kernel}_kernel", sig, dict(flags), warps))
                if affine:  # wide rows' dgamma/dbeta
                    sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "w_ptr": "*fp32", "b_ptr": "*fp32", "dw_ptr": "*fp32",
                           "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                           "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
                    const = {"HAS_BIAS": kind == "layernorm", "BLOCK_R": cfg["param_grad_block_r"],
                             "BLOCK_C": cfg["param_grad_block_c"]}
                    out.append(KernelVariant(NORM_FILE, f"{kind}{suffix}.param_grad", dtype, "param_grad_kernel",
                                             sig, const, cfg["param_grad_warps"]))
    return out


def render_activation(spec: Spec, arch: Arch) -> str:
    configs = [(repr((v.kernel, v.dtype)), repr({"BLOCK_BYTES": v.constexprs["BLOCK_BYTES"], "num_warps": v.num_warps}))
               for v in activation_variants(spec, arch)]
    forward = spec.forward.triton()
    derivative = spec.forward.triton_derivative() if spec.gated else ""
    asym = asymptotes(spec.forward) if spec.gated else None
    try:
        return _env().get_template(ACTIVATION_TEMPLATE).render(
            spec=spec,
            arch=arch,
            spec_file=spec_file_label(spec),
            template_sha256=template_sha256(ACTIVATION_TEMPLATE),
            thresholds=[repr(to_f32(c)) for c in spec.thresholds],
            levels=[repr(to_f32(v)) for v in spec.levels],
            compare=">" if spec.boundary == "lower" else ">=",
            forward_triton=forward,
            level_select=_level_select(tuple(to_f32(v) for v in spec.levels)),
            configs=configs,
            pack_rounds=_pack_rounds(spec),
            cpb=spec.codes_per_byte,
            planes=spec.planes,
            field=spec.bits if spec.planes == 1 else 1,
            uses_tanh="_tanh(" in forward + derivative,
            derivative_triton=derivative,
            slope_left=repr(asym.slope_left) if asym else "",
            slope_right=repr(asym.slope_right) if asym else "",
            triton_helpers=TRITON_HELPERS.strip(),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering {spec.name} for {arch.name} from templates/{ACTIVATION_TEMPLATE}: {err}") from err


def _derivative_fields(s: Spec) -> dict:
    if not s.gated:
        return {}
    asym = asymptotes(s.forward)
    return {"derivative_torch": s.forward.torch_derivative(), "slope_left": repr(asym.slope_left),
            "slope_right": repr(asym.slope_right)}


def render_ops(specs: list[Spec]) -> str:
    rows = [
        {
            "name": s.name,
            "description": s.description,
            "forward": s.forward,
            "replaces": s.replaces,
            "gated": s.gated,
            "bits": s.bits,
            "boundary": s.boundary,
            "thresholds_f32": [repr(to_f32(c)) for c in s.thresholds],
            "levels_f32": [repr(to_f32(v)) for v in s.levels],
            "fit_error": repr(s.fit_error),
            "sha256": s.sha256,
            "forward_torch": s.forward.torch(),
            **_derivative_fields(s),
        }
        for s in specs
    ]
    try:
        return _env().get_template(OPS_TEMPLATE).render(
            specs=rows,
            spec_files=[spec_file_label(s) for s in specs],
            template_sha256=template_sha256(OPS_TEMPLATE),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the ops module from templates/{OPS_TEMPLATE}: {err}") from err


def render_norm(arch: Arch) -> str:
    try:
        return _env().get_template(NORM_TEMPLATE).render(
            arch=arch, cfg=norm_config(arch), template_sha256=template_sha256(NORM_TEMPLATE)
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the norm kernels for {arch.name} from templates/{NORM_TEMPLATE}: {err}") from err
