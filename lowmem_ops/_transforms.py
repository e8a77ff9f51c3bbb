"""What the ops do under forward-mode AD and torch.func.

Each op family has an autograd.Function with a separate setup_context (what torch.func needs), the
custom ops' own backward, and a jvp. The forward is exact, so the exact tangent is right: jvp
differentiates the exact torch function (h(x), h(gate) * up, F.layer_norm / F.rms_norm), using
torch.func.vjp twice, which works both inside torch.func.jvp and under torch.autograd.forward_ad
(where a nested forward-mode transform is not allowed).

torch.func.grad, vjp, jacrev, jacfwd and vmap work. vmap (generate_vmap_rule) runs each custom op
once per sample through torch's fallback for ops without a batching rule, so the codes stay per
sample: correct, a loop over the batch in speed, and torch warns about that once.

torch.compile: Dynamo cannot trace an autograd.Function with a custom jvp, so compiled code calls
the custom ops directly (their register_autograd backward); see `use_custom_op`.

Plain eager calls take a cheaper route to the same code (host time per call is the floor of every
launch on a GPU): `eager_twin` gives each Function a ctx-style twin, which torch applies without
binding the call's signature (about 20 us saved per apply), and `DirectOp` runs a custom op's own
implementation without the dispatcher where nothing needs the dispatcher (about 15 us per call).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode


def use_custom_op() -> bool:
    """True while torch.compile traces: call the custom op itself, not the autograd.Function."""
    return torch.compiler.is_compiling()


def exact_jvp(f: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None],
              compute: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """J_f(primals) @ tangents, computed in `compute` and returned as `out_dtype`. A None tangent is 0.

    f's vjp is linear in its cotangent u; the vjp of that linear map, applied to the tangents, is J @ t."""
    primals = [p.detach().to(compute) for p in primals]
    tangents = [torch.zeros_like(p) if t is None else t.to(compute) for p, t in zip(primals, tangents)]
    out, vjp_fn = torch.func.vjp(f, *primals)
    _, transpose = torch.func.vjp(vjp_fn, torch.zeros_like(out))
    (jv,) = transpose(tuple(tangents))
    return jv.to(out_dtype)



def plain_eager() -> bool:
    """True where a Function's ctx-style twin and an op's own implementation may run: no torch.func
    transform, no dispatch or function mode (fake tensors, tracing, `with torch.device(...)`), not
    compiling. Each check is a flag read (well under a microsecond)."""
    # compiling first: Dynamo cannot trace the mode checks, and needs none of them
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled())


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class DirectOp:
    """A custom op and the function it was made from. In plain eager code on plain tensors, calling
    this runs the function itself; anywhere else (tensor subclasses, fake tensors, modes, torch.func,
    tracing) it calls the op, so those see the op with its fake kernel and registrations."""

    def __init__(self, op, fn: Callable):
        self.op, self.fn = op, fn

    def __call__(self, *args):
        if plain_call(args):
            return self.fn(*args)
        return self.op(*args)


def plain_call(args) -> bool:
    """Plain eager code, and every tensor argument a plain tensor or parameter (a loop: a generator
    costs a microsecond per call here)."""
    if not plain_eager():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN:
            return False
    return True


def plain_kernel_call(args) -> bool:
    """Where an op that runs the kernels directly, without _transforms' support (the C++ autograd ops,
    gated_halves' Triton Function), may run a call: plain_call, on tensors of a dtype the kernels take
    (args[0] decides: not float64), and no forward-mode AD level open (those ops have no jvp; the
    autograd.Functions have)."""
    return args[0].dtype != torch.float64 and forward_ad._current_level < 0 and plain_call(args)


def plain_cpu_call(args) -> bool:
    """Where the C++ autograd ops (templates/cpu_autograd.cpp.j2) may run a call: plain_kernel_call on
    CPU tensors."""
    return args[0].is_cpu and plain_kernel_call(args)


def eager_twin(func: type[torch.autograd.Function], impl: Callable, setup: Callable,
               keep: tuple[int, ...] | None = None) -> type[torch.autograd.Function]:
    """A ctx-style autograd.Function doing what `func` (forward + setup_context style, which torch.func
    needs) does: `impl` (the op's own implementation) as forward, `setup` (func's setup_context less
    marking the outputs the twin drops), func's backward and jvp. Function.apply binds the call's
    signature on every call for the setup_context style only; the twin skips that, and `apply` runs
    it only in plain eager code on plain tensors, where the implementation may run without the
    dispatcher.

    keep: the indices of func's outputs the twin returns (None: all, as func). The others are
    non-differentiable outputs that only setup uses (codes, statistics): every output autograd tracks,
    and every tensor marked non-differentiable, costs host time per call (measured: about 5 us per
    backward for a marked one). The twin's backward and jvp see None for the dropped ones."""

    def forward(ctx, *args):
        output = impl(*args)
        setup(ctx, args, output)
        if keep is None:
            return output
        ctx.n_outputs = len(output)
        return _select(output, keep)

    def backward(ctx, *grads):
        return func.backward(ctx, *(grads if keep is None else _expand(grads, keep, ctx.n_outputs)))

    def jvp(ctx, *tangents):
        out = func.jvp(ctx, *tangents)
        return out if keep is None else _select(out, keep)

    # made with type() so that its grad_fn class is named after it too (<func>EagerBackward)
    twin = type(func.__name__ + "Eager", (torch.autograd.Function,), {
        "__module__": func.__module__, "forward": staticmethod(forward),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp)})
    twin.keep = keep
    return twin


def _select(output, keep: tuple[int, ...]):
    return output[keep[0]] if len(keep) == 1 else tuple(output[i] for i in keep)


def _expand(grads: tuple, keep: tuple[int, ...], n: int) -> tuple:
    full = [None] * n
    for i, g in zip(keep, grads):
        full[i] = g
    return tuple(full)


def apply(func: type[torch.autograd.Function], twin: type[torch.autograd.Function], *args):
    """func.apply(*args), through the twin where plain eager code on plain tensors allows it; either
    way the outputs the twin keeps."""
    if plain_call(args):
        return twin.apply(*args)
    output = func.apply(*args)
    return output if twin.keep is None else _select(output, twin.keep)


def call_directly(fn: Callable, message: str, *args):
    """How a custom op's registered backward calls its backward op (the op's own registration raises
    `message` on a second derivative)."""
    return fn(*args)


def call_differentiable_once(fn: Callable, message: str, *args):
    """How the autograd.Functions' backward calls a backward op: through _BackwardOp, which torch.func
    accepts (the op's own generated autograd.Function lacks setup_context) and which raises `message`
    on a second derivative. A backward run without create_graph records no graph (grad mode is off),
    so there is no second derivative to refuse and fn runs as it is."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return _BackwardOp.apply(fn, message, *args)


class _BackwardOp(torch.autograd.Function):
    generate_vmap_rule = True  # vmap runs fn on batched tensors (torch's per-sample fallback for custom ops)

    @staticmethod
    def forward(fn, message, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(ctx.message)
