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
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


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



def call_directly(fn: Callable, message: str, *args):
    """How a custom op's registered backward calls its backward op (the op's own registration raises
    `message` on a second derivative)."""
    return fn(*args)


def call_differentiable_once(fn: Callable, message: str, *args):
    """How the autograd.Functions' backward calls a backward op: through _BackwardOp, which torch.func
    accepts (the op's own generated autograd.Function lacks setup_context) and which raises `message`
    on a second derivative."""
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
