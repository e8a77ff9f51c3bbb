"""Approximate activations: exact forward h(x), backward dx = dy * L[code] from k-bit codes.

Two torch.library custom ops carry them, so torch.compile(fullgraph=True) traces through:

    lowmem_ops::approx_act_fwd(x, name, save_codes) -> (y, codes)
    lowmem_ops::approx_act_bwd(dy, codes, name) -> dx

Eager calls go through an autograd.Function around them that adds forward-mode AD (the exact
tangent) and torch.func support; compiled code calls the ops directly (see _transforms). Plain eager
calls on CPU tensors that take the C++ kernels run as one C++ autograd op instead (_cpp_op_for:
templates/cpu_autograd.cpp.j2), with the same kernels, saved tensors and results.

Under grad mode autograd saves only `codes`, ceil(numel * bits / 8) bytes; without grad (no_grad,
inference_mode, or an input that does not require grad) no codes are computed and nothing is saved.

Backend, per call (lowmem_ops._common.backend): float64 tensors always take the torch path.
Otherwise LOWMEM_OPS_BACKEND picks:
  auto (default)    CUDA tensors -> generated Triton kernels for the GPU's arch; CPU -> generated
                    C++ kernels (compiled on first use; where that fails, a warning and the torch path)
  torch             the torch path everywhere
  cpp               the C++ kernels on CPU tensors (an error where they cannot be compiled, and on
                    CUDA tensors)
  triton            the Triton kernels; CPU tensors are an error
  triton-interpret  the generated Triton kernels through Triton's interpreter, on CPU tensors
"""

from __future__ import annotations

import functools
import os

import torch

from . import _cpp_backend, _torch_backend, _transforms, _triton_backend
from ._common import BACKENDS, check_float_tensor, compute_dtype
from ._common import backend as pick_backend
from ._tree import OpInfo, available, get_op


def _check_input(x: torch.Tensor, name: str, what: str = "input") -> OpInfo:
    op = get_op(name)
    check_float_tensor(x, name, what)
    return op


def _cpp_or_torch(op: OpInfo, backend: str) -> str:
    """'cpp' only where the C++ kernels can run this op: else auto falls back to torch (warning once),
    and a forced LOWMEM_OPS_BACKEND=cpp is an error that says why."""
    if backend != "cpp":
        return backend
    why = _cpp_backend.unavailable(op)
    if why is None:
        return "cpp"
    if os.environ.get("LOWMEM_OPS_BACKEND") == "cpp":
        raise RuntimeError(f"lowmem_ops.{op.name}: LOWMEM_OPS_BACKEND=cpp, but {why}")
    _cpp_backend.warn_fallback(op, why)
    return "torch"


def _approx_act_fwd(x: torch.Tensor, name: str, save_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(x, name)
    return _approx_act_forward(x, name, save_codes)


def _approx_act_forward(x: torch.Tensor, name: str, save_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """_approx_act_fwd on an input its caller checked (approx_activation does)."""
    op = get_op(name)
    x = x.contiguous()
    backend = _cpp_or_torch(op, pick_backend(x, has_cpp=True, tree=op.tree))
    if backend == "cpp":
        return _cpp_backend.forward(op, x, save_codes)
    if backend == "torch":
        return _torch_backend.forward(op, x, save_codes)
    return _triton_backend.forward(op, x, save_codes, interpret=backend == "triton-interpret")


approx_act_fwd = torch.library.custom_op("lowmem_ops::approx_act_fwd", mutates_args=())(_approx_act_fwd)


@approx_act_fwd.register_fake
def _(x, name, save_codes):
    op = _check_input(x, name)
    codes = x.new_empty((op.n_code_bytes(x.numel()) if save_codes else 0,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), codes


def _approx_act_bwd(dy: torch.Tensor, codes: torch.Tensor, name: str) -> torch.Tensor:
    op = _check_input(dy, name, "grad_output")
    _check_codes(op, dy, codes)
    dy = dy.contiguous()
    backend = _cpp_or_torch(op, pick_backend(dy, has_cpp=True, tree=op.tree))
    if backend == "cpp":
        return _cpp_backend.backward(op, dy, codes)
    if backend == "torch":
        return _torch_backend.backward(op, dy, codes)
    return _triton_backend.backward(op, dy, codes, interpret=backend == "triton-interpret")


approx_act_bwd = torch.library.custom_op("lowmem_ops::approx_act_bwd", mutates_args=())(_approx_act_bwd)
# eager calls on plain tensors skip the dispatcher (see _transforms.DirectOp)
_fwd_direct = _transforms.DirectOp(approx_act_fwd, _approx_act_fwd)
_bwd_direct = _transforms.DirectOp(approx_act_bwd, _approx_act_bwd)


def _check_codes(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor, check_size: bool = True) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise TypeError(f"lowmem_ops.{op.name}: codes must be a 1-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.device != dy.device:
        raise ValueError(f"lowmem_ops.{op.name}: grad_output is on {dy.device} but the saved codes are on {codes.device}")
    need = op.n_code_bytes(dy.numel())
    if check_size and codes.numel() != need:
        raise ValueError(f"lowmem_ops.{op.name}: grad_output has {dy.numel()} elements, which need {need} code bytes "
                         f"at {op.bits} bits, but {codes.numel()} were given")


@approx_act_bwd.register_fake
def _(dy, codes, name):
    # Sizes may be symbolic while tracing; the real kernel call checks them.
    _check_codes(_check_input(dy, name, "grad_output"), dy, codes, check_size=False)
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


def _setup_fwd(ctx, inputs, output):
    _, name, save_codes = inputs
    ctx.name, ctx.had_codes = name, save_codes
    ctx.save_for_backward(output[1])


def _backward_fwd(ctx, dy, _dcodes, call=_transforms.call_directly, bwd_op=None):
    if not ctx.had_codes:
        raise RuntimeError(f"lowmem_ops.{ctx.name}: the forward ran with save_codes=False, so there is nothing to "
                           "backpropagate through; call the op through lowmem_ops, which saves codes when grad is needed")
    (codes,) = ctx.saved_tensors
    return call(bwd_op or approx_act_bwd, _double_backward_message(ctx.name), dy, codes, ctx.name), None, None


def _setup_bwd(ctx, inputs, output):
    ctx.name = inputs[2]


@functools.cache  # formatted once per op, not per backward
def _double_backward_message(name: str) -> str:
    return (f"lowmem_ops.{name}: double backward is not supported. Its backward uses a step-function derivative "
            "stored as codes, whose own derivative is zero almost everywhere; use the exact torch activation where "
            "second derivatives are needed.")


def _double_backward(ctx, _ddx):
    raise RuntimeError(_double_backward_message(ctx.name))


approx_act_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
approx_act_bwd.register_autograd(_double_backward, setup_context=_setup_bwd)


def _setup_eager(ctx, inputs, output):
    _setup_fwd(ctx, inputs, output)
    ctx.save_for_forward(inputs[0])  # only kept while forward-mode AD runs


class _ApproxActivation(torch.autograd.Function):
    """approx_act_fwd with its backward, plus forward-mode AD and torch.func (see _transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, name, save_codes):
        return _fwd_direct(x, name, save_codes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_eager(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, dcodes):
        return _backward_fwd(ctx, dy, dcodes, _transforms.call_differentiable_once, _bwd_direct)

    @staticmethod
    def jvp(ctx, dx, _dname, _dsave):
        (x,) = ctx.saved_tensors
        op = get_op(ctx.name)
        return _transforms.exact_jvp(op.forward, (x,), (dx,), compute_dtype(x.dtype), x.dtype), None


_ApproxActivationEager = _transforms.eager_twin(_ApproxActivation, _approx_act_forward, _setup_eager, keep=(0,))


def _cpp_op_for(x: torch.Tensor, op: OpInfo):
    """The activations' C++ autograd op (_cpp_backend.autograd_op) where it may run this call: plain
    eager code on a plain CPU tensor that takes the C++ kernels, and no forward-mode AD level open (the
    op has no jvp; _ApproxActivation has). None elsewhere: _ApproxActivation then runs the same kernels."""
    if not _transforms.plain_cpu_call((x,)) or _cpp_or_torch(op, pick_backend(x, has_cpp=True, tree=op.tree)) != "cpp":
        return None
    return _cpp_backend.autograd_op(op.tree, "approx_activation")


def approx_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the approximate activation `name` (see lowmem_ops.available()) to x."""
    op = _check_input(x, name)
    save_codes = torch.is_grad_enabled() and x.requires_grad
    if _transforms.use_custom_op():
        return torch.ops.lowmem_ops.approx_act_fwd(x, name, save_codes)[0]
    if save_codes and (cpp_op := _cpp_op_for(x, op)) is not None:
        y = _cpp_backend.forward_value(op, x.detach().contiguous())  # torch's h(x), as the Python route's
        return cpp_op(x, y, name, save_codes, op.n_code_bytes(x.numel()))
    return _transforms.apply(_ApproxActivation, _ApproxActivationEager, x, name, save_codes)


def regelu2(x: torch.Tensor) -> torch.Tensor:
    """GELU (erf form) forward, exact; 2-bit step derivative (ReGELU2) in backward."""
    return approx_activation(x, "regelu2")


def resilu2(x: torch.Tensor) -> torch.Tensor:
    """SiLU forward, exact; 2-bit step derivative (ReSiLU2) in backward."""
    return approx_activation(x, "resilu2")


__all__ = ["approx_activation", "regelu2", "resilu2", "available", "BACKENDS"]
