"""Fused gated MLP activations: out = h(gate) * up (SwiGLU: h = SiLU; GeGLU: h = GELU).

Eager PyTorch keeps gate, h(gate) and up for `act(gate) * up`. Two fused alternatives:

    exact   saves gate (and up when gate needs a gradient); recomputes h and the exact h' in backward
    approx  saves the 2-bit codes of gate and up (when gate needs a gradient) and h(gate) (when up
            does); d_gate uses the step derivative L[code]

Which stores less depends on which inputs need gradients (docs/gated.md has the measured bytes);
mode="auto" picks the smaller, preferring exact on a tie.

    lowmem_ops::gated_fwd(gate, up, name, approx, need_gate, need_up) -> (out, h, codes)
    lowmem_ops::gated_bwd(dy, gate?, up?, h?, codes?, name, approx, need_gate, need_up) -> (dgate, dup)

Eager calls go through an autograd.Function around them that adds forward-mode AD (the exact
tangent) and torch.func support; compiled code calls the ops directly (see _transforms). Plain eager
calls on CPU tensors that take the C++ kernels run as one C++ autograd op instead (_cpp_op_for:
templates/cpu_autograd.cpp.j2), with the same kernels, saved tensors and results.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common, _cpp_backend, _torch_backend, _transforms, _triton_backend
from ._common import backend as pick_backend
from ._common import check_float_tensor, compute_dtype
from ._tree import OpInfo, get_op

MODES = ("auto", "exact", "approx")


def saved_bytes(mode: str, numel: int, elem_size: int, bits: int, need_gate: bool, need_up: bool) -> int:
    """What autograd keeps for one gated activation, in bytes (mode exact or approx)."""
    tensor = numel * elem_size
    codes = -(-numel * bits // 8)
    if mode == "exact":
        return (2 * tensor if need_gate else tensor if need_up else 0)
    return (codes + tensor if need_gate else 0) + (tensor if need_up else 0)


def choose_mode(numel: int, elem_size: int, bits: int, need_gate: bool, need_up: bool) -> str:
    exact = saved_bytes("exact", numel, elem_size, bits, need_gate, need_up)
    approx = saved_bytes("approx", numel, elem_size, bits, need_gate, need_up)
    return "approx" if approx < exact else "exact"


def gated_op(name: str) -> OpInfo:
    op = get_op(name)
    if not op.gated:
        raise ValueError(f"lowmem_ops: {name!r} has no gated kernels (its spec lacks `gated = true`); "
                         "gated ops: resilu2 (SwiGLU), regelu2 and tanh_gelu2 (GeGLU)")
    return op


def _check(gate, up, name):
    check_float_tensor(gate, name, "gate")
    check_float_tensor(up, name, "up")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"lowmem_ops.{name}: gate and up must have one shape, dtype and device; got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")


def _cpp_or_torch(op: OpInfo, backend: str) -> str:
    return _cpp_backend.choose(backend, lambda: _cpp_backend.gated_unavailable(op), op.name, op.tree)


def _gated_fwd(gate: torch.Tensor, up: torch.Tensor, name: str, approx: bool, need_gate: bool,
               need_up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gated_op(name)
    _check(gate, up, name)
    return _gated_forward(gate, up, name, approx, need_gate, need_up)


def _gated_forward(gate: torch.Tensor, up: torch.Tensor, name: str, approx: bool, need_gate: bool,
                   need_up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_gated_fwd on inputs its caller checked (gated does)."""
    op = get_op(name)
    write_h, write_codes = approx and need_up, approx and need_gate
    backend = _cpp_or_torch(op, pick_backend(gate, has_cpp=True, tree=op.tree))
    # The C++ and Triton kernels read gate and up in place where their rows allow (the halves of one projection).
    if backend == "cpp":
        return _cpp_backend.gated_forward(op, gate, up, write_h, write_codes)
    if backend == "torch":
        return _torch_backend.gated_forward(op, gate.contiguous(), up.contiguous(), write_h, write_codes)
    return _triton_backend.gated_forward(op, gate, up, write_h, write_codes, backend == "triton-interpret")


gated_fwd = torch.library.custom_op("lowmem_ops::gated_fwd", mutates_args=())(_gated_fwd)


@gated_fwd.register_fake
def _(gate, up, name, approx, need_gate, need_up):
    op = gated_op(name)
    _check(gate, up, name)
    h = torch.empty_like(gate, memory_format=torch.contiguous_format) if approx and need_up else gate.new_empty(0)
    codes = gate.new_empty((op.n_code_bytes(gate.numel()) if approx and need_gate else 0,), dtype=torch.uint8)
    return torch.empty_like(gate, memory_format=torch.contiguous_format), h, codes


def _gated_bwd(dy: torch.Tensor, gate: Optional[torch.Tensor], up: Optional[torch.Tensor], h: Optional[torch.Tensor],
               codes: Optional[torch.Tensor], name: str, approx: bool, need_gate: bool,
               need_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    op = gated_op(name)
    dy = dy.contiguous()
    backend = _cpp_or_torch(op, pick_backend(dy, has_cpp=True, tree=op.tree))
    if backend == "cpp":
        return _cpp_backend.gated_backward(op, dy, gate, up, h, codes, approx, need_gate, need_up)
    if backend == "torch":
        return _torch_backend.gated_backward(op, dy, gate, up, h, codes, approx, need_gate, need_up)
    return _triton_backend.gated_backward(op, dy, gate, up, h, codes, approx, need_gate, need_up,
                                          backend == "triton-interpret")


gated_bwd = torch.library.custom_op("lowmem_ops::gated_bwd", mutates_args=())(_gated_bwd)
# eager calls on plain tensors skip the dispatcher (see _transforms.DirectOp)
_fwd_direct = _transforms.DirectOp(gated_fwd, _gated_fwd)
_bwd_direct = _transforms.DirectOp(gated_bwd, _gated_bwd)


@gated_bwd.register_fake
def _(dy, gate, up, h, codes, name, approx, need_gate, need_up):
    def grad(needed):
        return torch.empty_like(dy, memory_format=torch.contiguous_format) if needed else dy.new_empty(0)

    return grad(need_gate), grad(need_up)


def _setup(ctx, inputs, output):
    gate, up, name, approx, need_gate, need_up = inputs
    _, h, codes = output
    ctx.name, ctx.approx, ctx.need_gate, ctx.need_up = name, approx, need_gate, need_up
    if approx:  # codes + up for d_gate; h(gate) for d_up
        ctx.save_for_backward(None, up if need_gate else None, h if need_up else None, codes if need_gate else None)
    else:  # gate for both; up only for d_gate
        ctx.save_for_backward(gate, up if need_gate else None, None, None)


def _backward(ctx, dout, _dh, _dcodes, call=_transforms.call_directly, bwd_op=None):
    gate, up, h, codes = ctx.saved_tensors
    dgate, dup = call(bwd_op or gated_bwd, NO_DOUBLE_BACKWARD, dout, gate, up, h, codes, ctx.name, ctx.approx, ctx.need_gate,
                      ctx.need_up)
    return (dgate if ctx.need_gate else None), (dup if ctx.need_up else None), None, None, None, None


NO_DOUBLE_BACKWARD = "lowmem_ops: double backward through a fused gated activation is not supported"


def _no_double_backward(ctx, *_):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


gated_fwd.register_autograd(_backward, setup_context=_setup)
gated_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_eager(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.save_for_forward(inputs[0], inputs[1])  # only kept while forward-mode AD runs


class _Gated(torch.autograd.Function):
    """gated_fwd with its backward, plus forward-mode AD and torch.func (see _transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gate, up, name, approx, need_gate, need_up):
        return _fwd_direct(gate, up, name, approx, need_gate, need_up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_eager(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, dout, dh, dcodes):
        return _backward(ctx, dout, dh, dcodes, _transforms.call_differentiable_once, _bwd_direct)

    @staticmethod
    def jvp(ctx, dgate, dup, *_):
        gate, up = ctx.saved_tensors
        h = gated_op(ctx.name).forward
        out = _transforms.exact_jvp(lambda g, u: h(g) * u, (gate, up), (dgate, dup), compute_dtype(gate.dtype),
                                    gate.dtype)
        return out, None, None


_GatedEager = _transforms.eager_twin(_Gated, _gated_forward, _setup_eager, keep=(0,))


def _cpp_op_for(tensors: tuple, op: OpInfo, which: str = "gated"):
    """The C++ autograd op `which` (gated or gated_halves; _cpp_backend.autograd_op) where it may run
    this call on `tensors`: plain eager code on plain CPU tensors that take the C++ kernels, and no
    forward-mode AD level open (the ops have no jvp; _Gated has). None elsewhere: _Gated then runs the
    same kernels."""
    if not _transforms.plain_cpu_call(tensors) \
            or _cpp_or_torch(op, pick_backend(tensors[0], has_cpp=True, tree=op.tree)) != "cpp":
        return None
    return _cpp_backend.autograd_op(op.tree, which)


def gated(gate: torch.Tensor, up: torch.Tensor, name: str, mode: str = "auto") -> torch.Tensor:
    """h(gate) * up with the activation `name`, storing what `mode` says (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"lowmem_ops.gated: mode must be one of {', '.join(MODES)}, got {mode!r}")
    op = gated_op(name)
    _check(gate, up, name)
    grad = torch.is_grad_enabled()
    need_gate, need_up = grad and gate.requires_grad, grad and up.requires_grad
    if mode == "auto":
        mode = choose_mode(gate.numel(), gate.element_size(), op.bits, need_gate, need_up)
    args = (gate, up, name, mode == "approx", need_gate, need_up)
    if _transforms.use_custom_op():
        return torch.ops.lowmem_ops.gated_fwd(*args)[0]
    if (need_gate or need_up) and (cpp_op := _cpp_op_for((gate, up), op)) is not None:
        return cpp_op(*args, op.n_code_bytes(gate.numel()))
    return _transforms.apply(_Gated, _GatedEager, *args)


def _triton_halves_backend(gate_up: torch.Tensor, op: OpInfo) -> str | None:
    """The Triton backend where _GatedHalvesTriton may run this call: a plain kernel call
    (_transforms.plain_kernel_call) on a tensor whose rows the rows kernels read in place. None
    elsewhere, or for a tree rendered before the rows kernels."""
    if not _transforms.plain_kernel_call((gate_up,)) or _common.row_stride(gate_up) < 0:
        return None
    backend = _cpp_or_torch(op, pick_backend(gate_up, has_cpp=True, tree=op.tree))
    if backend not in ("triton", "triton-interpret") \
            or not _triton_backend.has_rows_kernels(op, gate_up.device, backend == "triton-interpret"):
        return None
    return backend


class _GatedHalvesTriton(torch.autograd.Function):
    """gated_halves on the Triton path: the rows kernels read the halves of gate_up in place and write
    gate_up's gradient whole (the chunk path's backward concatenates two). Saves gate_up, the storage
    the chunk path's saved halves share. The C++ op (templates/cpu_autograd.cpp.j2) is its CPU twin."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, name: str, act_half: int, interpret: bool) -> torch.Tensor:
        halves = gate_up.chunk(2, dim=-1)
        out, _, _ = _triton_backend.gated_forward(get_op(name), halves[act_half], halves[1 - act_half], False, False,
                                                  interpret)
        ctx.save_for_backward(gate_up)
        ctx.name, ctx.act_half, ctx.interpret = name, act_half, interpret
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        op, a, interpret = get_op(ctx.name), ctx.act_half, ctx.interpret

        def grad_of(dout, gate_up):
            halves = gate_up.chunk(2, dim=-1)
            grad = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
            grads = grad.chunk(2, dim=-1)
            _triton_backend.gated_backward(op, dout, halves[a], halves[1 - a], None, None, False, True, True, interpret,
                                           grads=(grads[a], grads[1 - a]))
            return grad

        return _transforms.call_differentiable_once(grad_of, NO_DOUBLE_BACKWARD, dout, gate_up), None, None, None


def gated_halves(gate_up: torch.Tensor, name: str, mode: str = "auto", act_half: int = 0) -> torch.Tensor:
    """gated(a, b, name, mode) for a, b = gate_up.chunk(2, -1) (act_half 1: gated(b, a)), the form of a
    fused gated MLP's one projection (Phi-3's gate_up_proj) and of MoE experts. Plain eager calls on
    CPU tensors that need a gradient and take the exact mode (auto's choice here: the halves of one
    tensor share requires_grad) run as one C++ autograd op that writes gate_up's gradient whole, with
    the same values and saved storage; on the Triton backend, as one autograd.Function doing the same
    with the rows kernels; elsewhere the chunk and gated(), whose backward concatenates the two
    halves' gradients (a copy of gate_up's size)."""
    if mode not in MODES:
        raise ValueError(f"lowmem_ops.gated_halves: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if act_half not in (0, 1):
        raise ValueError(f"lowmem_ops.gated_halves: act_half must be 0 or 1 (the half of gate_up the activation "
                         f"takes), got {act_half!r}")
    if (mode != "approx" and gate_up.requires_grad and torch.is_grad_enabled() and gate_up.dim() > 0
            and gate_up.shape[-1] % 2 == 0):
        op = gated_op(name)
        check_float_tensor(gate_up, name, "gate_up")
        if (cpp_op := _cpp_op_for((gate_up,), op, "gated_halves")) is not None:
            return cpp_op(gate_up, name, act_half)
        if (backend := _triton_halves_backend(gate_up, op)) is not None:
            return _GatedHalvesTriton.apply(gate_up, name, act_half, backend == "triton-interpret")
    halves = gate_up.chunk(2, dim=-1)
    return gated(halves[act_half], halves[1 - act_half], name, mode)


def swiglu(gate: torch.Tensor, up: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """silu(gate) * up (LLaMA, Qwen, Mistral MLPs)."""
    return gated(gate, up, "resilu2", mode)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", mode: str = "auto") -> torch.Tensor:
    """gelu(gate) * up; approximate='tanh' for Gemma's gelu_pytorch_tanh."""
    names = {"none": "regelu2", "tanh": "tanh_gelu2"}
    if approximate not in names:
        raise ValueError(f"lowmem_ops.geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return gated(gate, up, names[approximate], mode)


__all__ = ["gated", "gated_halves", "swiglu", "geglu", "saved_bytes", "choose_mode", "MODES"]
