"""The activation family: one kernel file per spec (templates/activation.py.j2) with its forward,
backward and, for a gated spec, fused gated-MLP kernels; launch configs per element-count bucket
(templates/activation.space.toml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .. import space
from ..archs import DRAM_LATENCY_NS, DTYPE_BYTES, DTYPES, TRITON_DTYPE, VECTOR_BYTES
from ..contract import contract as C
from ..expr import TRITON_HELPERS
from ..fit import asymptotes
from ..kernels import Bounds, ConfigTable, KernelVariant, Source, TargetInfo, TuneGroup
from ..spec import Spec, to_f32
from ..templating import (Code, RenderError, comment_text, num, render, spec_file_label,
                          template_sha256)

TEMPLATE = "activation.py.j2"
SPACE_FILE = "activation.space.toml"
NUM_WARPS = 4  # the static config's


# --- the static config -----------------------------------------------------------------------

def static_config(arch: TargetInfo, dtype: str, codes_per_byte: int) -> dict[str, int]:
    """Launch config for a streaming kernel that handles BLOCK_BYTES code bytes per program.

    By Little's law an SM must keep bandwidth x latency / SMs bytes in flight. Each thread gets
    enough 16-byte vectors for that at full occupancy, and never fewer than two (so loads overlap).
    """
    in_flight_per_thread = arch.dram_gbps * DRAM_LATENCY_NS / arch.compute_units / arch.max_threads_per_cu
    vectors = max(2, 2 ** math.ceil(math.log2(max(1.0, in_flight_per_thread / VECTOR_BYTES))))
    elems_per_thread = vectors * VECTOR_BYTES // DTYPE_BYTES[dtype]
    elems_per_program = elems_per_thread * arch.warp_size * NUM_WARPS
    return {"BLOCK_BYTES": elems_per_program // codes_per_byte, "num_warps": NUM_WARPS}


# --- the config space ------------------------------------------------------------------------

@dataclass(frozen=True)
class ElementwiseSpace(space.ElementSpace):
    vectors_per_thread: tuple[int, ...]

    def configs(self, arch: TargetInfo, dtype: str, codes_per_byte: int) -> list[dict]:
        """The static config first, then the space's (for dtypes it covers), without repeats."""
        out = [static_config(arch, dtype, codes_per_byte)]
        if dtype in self.dtypes:
            per_vector = VECTOR_BYTES // DTYPE_BYTES[dtype]
            for vectors in self.vectors_per_thread:
                for warps in self.num_warps:
                    elems = vectors * per_vector * arch.warp_size * warps
                    out.append({"BLOCK_BYTES": elems // codes_per_byte, "num_warps": warps})
        return space.unique(out)


def load_space(path: Path) -> ElementwiseSpace:
    return space.load_element_space(ElementwiseSpace, path, "vectors_per_thread")


def config_space() -> ElementwiseSpace:
    return space.load(load_space, SPACE_FILE)


# --- kernels and their compiles --------------------------------------------------------------

# kernel -> (@triton.jit function, pointer arguments, flags). The signature is pointers, then
# n_elements, then the flags, then BLOCK_BYTES: the order of the functions' parameters.
_T, _U8 = "*{t}", "*u8"
_GATED_FWD = {"gate_ptr": _T, "up_ptr": _T, "out_ptr": _T, "h_ptr": _T, "codes_ptr": _U8}
_GATED_BWD = {"dy_ptr": _T, "gate_ptr": _T, "up_ptr": _T, "h_ptr": _T, "codes_ptr": _U8, "dgate_ptr": _T, "dup_ptr": _T}
ELEMENTWISE_KERNELS = {
    C.FORWARD: ("forward_kernel", {"x_ptr": _T, "y_ptr": _T, "codes_ptr": _U8}, {"WRITE_CODES": True}),
    C.FORWARD_NOGRAD: ("forward_kernel", {"x_ptr": _T, "y_ptr": _T, "codes_ptr": _U8}, {"WRITE_CODES": False}),
    C.BACKWARD: ("backward_kernel", {"dy_ptr": _T, "codes_ptr": _U8, "dx_ptr": _T}, {}),
    C.GATED_FORWARD: ("gated_forward_kernel", _GATED_FWD, {"WRITE_H": False, "WRITE_CODES": False}),
    C.GATED_FORWARD_APPROX: ("gated_forward_kernel", _GATED_FWD, {"WRITE_H": True, "WRITE_CODES": True}),
    C.GATED_BACKWARD: ("gated_backward_kernel", _GATED_BWD, {"APPROX": False, "NEED_GATE": True, "NEED_UP": True}),
    C.GATED_BACKWARD_APPROX: ("gated_backward_kernel", _GATED_BWD, {"APPROX": True, "NEED_GATE": True, "NEED_UP": True}),
}


def kernels_of(spec: Spec) -> tuple[str, ...]:
    return C.ACTIVATION_KERNELS + (C.GATED_KERNELS if spec.gated else ())


def groups_of(spec: Spec, arch: TargetInfo) -> list[TuneGroup]:
    sp = config_space()
    out = []
    for kernel in kernels_of(spec):
        for dtype in DTYPES:
            candidates = tuple(sp.configs(arch, dtype, spec.codes_per_byte))
            out += [TuneGroup(spec.name, kernel, dtype, label, (i,), candidates, ACTIVATION.name)
                    for i, label in enumerate(sp.buckets)]
    return out


# The gated kernels' twins that read strided views by rows (templates/activation.py.j2): the same
# pointers and flags, then the sizes below after n_elements, then UNIT (KernelVariant.unit).
_ROW_SIZES = {"gated_forward_kernel": ("n_cols", "ld_gate", "ld_up"),
              "gated_backward_kernel": ("n_cols", "ld_gate", "ld_up", "ld_dgate", "ld_dup")}


def variant(op: str, kernel: str, dtype: str, config: dict, rows: bool = False) -> KernelVariant:
    """The compile of `kernel` a launch with `config` runs: the flat kernel, or (rows) its twin that
    reads strided views by rows, launched for the same tuning group with the same config."""
    fn, pointers, flags = ELEMENTWISE_KERNELS[kernel]
    sig = {name: kind.format(t=TRITON_DTYPE[dtype]) for name, kind in pointers.items()}
    sig["n_elements"] = "i32"
    if rows:
        sig.update({name: "i32" for name in _ROW_SIZES[fn]})
    sig.update({f: "constexpr" for f in flags})
    if rows:
        sig["UNIT"] = "constexpr"
    sig["BLOCK_BYTES"] = "constexpr"
    fn = fn.removesuffix("_kernel") + "_rows_kernel" if rows else fn
    return KernelVariant(op, kernel, dtype, fn, sig, dict(flags), dict(config), unit="UNIT" if rows else "")


# --- rendering -------------------------------------------------------------------------------

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


def _spec_vars(spec: Spec) -> dict:
    """What the activation template shows of a spec; free text only after a `#`."""
    return {"name": spec.name, "sha256": spec.sha256, "bits": spec.bits, "boundary": spec.boundary,
            "gated": spec.gated, "description": comment_text(spec.description, f"{spec.name}: [op].description"),
            "forward": {"text": comment_text(spec.forward.text, f"{spec.name}: [op].forward")}}


def render_activation(spec: Spec, arch: TargetInfo) -> str:
    forward = spec.forward.triton()
    derivative = spec.forward.triton_derivative() if spec.gated else ""
    asym = asymptotes(spec.forward) if spec.gated else None
    try:
        return render(
            TEMPLATE,
            spec=_spec_vars(spec),
            spec_file=comment_text(spec_file_label(spec), f"{spec.name}: the spec's file name"),
            template_sha256=template_sha256(TEMPLATE),
            thresholds=[num(to_f32(c)) for c in spec.thresholds],
            levels=[num(to_f32(v)) for v in spec.levels],
            compare=Code(">" if spec.boundary == "lower" else ">="),
            forward_triton=Code(forward),
            level_select=_level_select(tuple(to_f32(v) for v in spec.levels)),
            pack_rounds=_pack_rounds(spec),
            cpb=spec.codes_per_byte,
            planes=spec.planes,
            field=spec.bits if spec.planes == 1 else 1,
            uses_tanh="_tanh(" in forward + derivative,
            derivative_triton=Code(derivative),
            slope_left=num(asym.slope_left) if asym else "",
            slope_right=num(asym.slope_right) if asym else "",
            triton_helpers=Code(TRITON_HELPERS.strip()),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering {spec.name} for {arch.name} from templates/{TEMPLATE}: {err}") from err


# --- timing ----------------------------------------------------------------------------------

_TRAFFIC = {  # (elements of the dtype read + written, code arrays touched) per element
    C.FORWARD: (2, 1), C.FORWARD_NOGRAD: (2, 0), C.BACKWARD: (2, 1),
    C.GATED_FORWARD: (3, 0), C.GATED_FORWARD_APPROX: (4, 1),
    C.GATED_BACKWARD: (5, 0), C.GATED_BACKWARD_APPROX: (5, 1),
}


class ActivationFamily:
    name = "activation"
    space_file = SPACE_FILE
    builtin_only = False  # a tree of a user's specs holds their activations

    def stems(self, specs: list[Spec]) -> list[str]:
        return [s.name for s in specs]

    def sources(self, specs: list[Spec], arch: TargetInfo) -> list[Source]:
        return [Source(s.name, render_activation(s, arch),
                       {"spec": spec_file_label(s), "spec_sha256": s.sha256, "template": TEMPLATE,
                        "template_sha256": template_sha256(TEMPLATE)}) for s in specs]

    def space(self) -> ElementwiseSpace:
        return config_space()

    def groups(self, specs: list[Spec], arch: TargetInfo) -> list[TuneGroup]:
        return [g for s in specs for g in groups_of(s, arch)]

    def variants(self, group: TuneGroup, config: dict) -> list[KernelVariant]:
        flat = variant(group.op, group.kernel, group.dtype, config)
        if group.kernel in C.GATED_KERNELS:  # one config serves the flat and the rows kernel
            return [flat, variant(group.op, group.kernel, group.dtype, config, rows=True)]
        return [flat]

    def config_key(self, group: TuneGroup) -> tuple:
        return (group.op, group.kernel, group.dtype, *group.index)

    def configs_table(self) -> ConfigTable:
        return ConfigTable(C.ACTIVATION_TABLE, "Activations", ("op", "kernel", "dtype"),
                           (Bounds(C.ELEMENT_BOUNDS, config_space().element_bounds, "element bucket",
                                   "buckets the launch's n_elements"),))

    def problem(self, group: TuneGroup) -> tuple[int, ...]:
        return (config_space().problem_size(group.index[0]),)

    def bytes_moved(self, group: TuneGroup, problem: tuple[int, ...], specs: list[Spec]) -> int:
        (n,) = problem
        bits = next((s.bits for s in specs if s.name == group.op), 0)
        tensors, codes = _TRAFFIC[group.kernel]
        return tensors * DTYPE_BYTES[group.dtype] * n + codes * -(-n * bits // 8)

    def measure_inputs(self, group: TuneGroup, shape: tuple[int, ...], device: str, interpret: bool, gen) -> dict:
        import torch

        from lowmem_ops import _triton_backend as tb
        from lowmem_ops._tree import get_op

        dtype = getattr(torch, group.dtype)

        def randn(*s):
            return torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)

        op = get_op(group.op)
        x, dy = randn(*shape), randn(*shape)
        args = {"op": op, "x": x, "dy": dy, "up": randn(*shape)}
        if group.kernel == C.BACKWARD:
            args["codes"] = tb.forward(op, x, True, interpret)[1]
        if group.kernel == C.GATED_BACKWARD_APPROX:
            _, args["h"], args["codes"] = tb.gated_forward(op, x, args["up"], True, True, interpret)
        return args

    def launcher(self, group: TuneGroup, a: dict, cfg: dict, interpret: bool, arch: TargetInfo):
        from lowmem_ops import _triton_backend as tb

        op, x, dy, up, it = a["op"], a["x"], a["dy"], a["up"], interpret
        return {
            C.FORWARD: lambda: tb.forward(op, x, True, it, cfg),
            C.FORWARD_NOGRAD: lambda: tb.forward(op, x, False, it, cfg),
            C.BACKWARD: lambda: tb.backward(op, dy, a.get("codes"), it, cfg),
            C.GATED_FORWARD: lambda: tb.gated_forward(op, x, up, False, False, it, cfg),
            C.GATED_FORWARD_APPROX: lambda: tb.gated_forward(op, x, up, True, True, it, cfg),
            C.GATED_BACKWARD: lambda: tb.gated_backward(op, dy, x, up, None, None, False, True, True, it, cfg),
            C.GATED_BACKWARD_APPROX: lambda: tb.gated_backward(op, dy, None, up, a.get("h"), a.get("codes"), True, True,
                                                               True, it, cfg),
        }[group.kernel]


ACTIVATION = ActivationFamily()
