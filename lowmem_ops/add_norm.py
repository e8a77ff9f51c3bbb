"""Dropout + residual add + memory-sharing norm in one op.

    y, new_residual = lo.add_ms_layernorm(x, residual, weight, bias, eps=1e-5, p=0.1, training=True)
    y, new_residual = lo.add_ms_rmsnorm(x, residual, weight, eps=1e-6)      # p=0: LLaMA's pre-LN stream

    new_residual = dropout(x, p) + residual        (the mask of lo.dropout: Philox from a per-call seed)
    y            = norm(new_residual)              over the last dimension, as lo.ms_layernorm / ms_rmsnorm

The post-LN block of BERT/RoBERTa/ViT/Whisper, `LN(dropout(h) + residual)`, and the pre-LN residual
stream of LLaMA, `residual = residual + h; y = norm(residual)`. Autograd saves y (the op's output:
the next linear saves that same storage), one float32 rstd per row and, with p > 0, the 8-byte seed.
Nothing of x's size: the norm's backward works from y (docs/norms.md, inverse mode for gamma/beta
included) and the dropout mask is regenerated from the seed. Backward, with g the gradient reaching
new_residual from its other uses:

    total = dnorm(dy) + g;    d residual = total;    dx = keep * total / (1 - p)

new_residual has the promoted dtype of x and residual (as `x + residual` has); the dropped x is
rounded to x's dtype before the add, so the numbers are those of torch's `F.dropout(x) + residual`.
The generated Triton kernels (kernels/add_norm_<hash>.py of the built-in tree, templates/add_norm.py.j2; launch
configs from its configs.py, per dtype and row width) run CUDA tensors (and CPU tensors under
LOWMEM_OPS_BACKEND=triton-interpret); the host path (CPU, float64) draws the same mask with the
dropout op's host implementation (C++ or torch) and runs the MS norm's host forward. Where a call's gamma/beta break inverse mode's rule, that
call saves new_residual instead (torch's norm on it), as lo.ms_layernorm does.

    lowmem_ops::add_ms_norm_fwd(x, residual, weight?, bias?, seed?, offset, p, eps, is_rms, out_dtype?,
                                check_rule) -> (y, new_residual, rstd, rule_ok)
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _configs
from . import _contract as C
from . import _norm_backends as nb
from . import dropout as _dropout
from . import norms
from ._common import backend as pick_backend
from ._common import check_float_tensor
from ._tree import arch_for, builtin_tree
from ._triton_backend import launch, placeholder


def _check_pair(x, residual, what: str) -> None:
    check_float_tensor(x, what)
    check_float_tensor(residual, what, "residual")
    if x.shape != residual.shape:
        raise ValueError(f"lowmem_ops.{what}: x has shape {list(x.shape)} but residual has shape {list(residual.shape)} "
                         "(they are added elementwise: no broadcasting)")
    if x.device != residual.device:
        raise ValueError(f"lowmem_ops.{what}: x is on {x.device} but residual is on {residual.device}")
    if x.dim() == 0:
        raise ValueError(f"lowmem_ops.{what}: x is a scalar; the norm runs over the last dimension")


def _check_dropout(x, seed, offset, p, what: str) -> None:
    if p > 0.0:
        if seed is None:
            raise ValueError(f"lowmem_ops.{what}: p = {p} needs a seed")
        _dropout._check_args(x, seed, offset, p)
        _dropout._check_offset(offset, x.numel())


def _add_ms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], offset: int, p: float, eps: float,
                     is_rms: bool, out_dtype: Optional[torch.dtype], check_rule: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair(x, residual, "add_ms_norm")
    n_cols = x.shape[-1]
    norms._check(x, weight, bias, n_cols, "add_ms_norm")
    _check_dropout(x, seed, offset, p, "add_ms_norm")
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = out_dtype or h_dtype
    x2, r2 = x.reshape(-1, n_cols).contiguous(), residual.reshape(-1, n_cols).contiguous()
    w = weight.reshape(-1).contiguous() if weight is not None else None
    b = bias.reshape(-1).contiguous() if bias is not None else None
    rule = (norms.GAMMA_MIN, norms.BETA_RATIO) if check_rule and w is not None else None
    backend = pick_backend(x if h_dtype == x.dtype else residual)
    if backend in ("triton", "triton-interpret") and out_dtype != torch.float64:
        y, h, rstd, flag = triton_forward(x2, r2, w, b, seed, offset, p, eps, is_rms, h_dtype, out_dtype, rule,
                                          backend == "triton-interpret")
    else:
        h = _torch_dropout_add(x2, r2, seed, offset, p, h_dtype)
        y, rstd, flag = norms._ms_norm_fwd(h, w, b, n_cols, eps, is_rms, out_dtype, check_rule)
    return y.view(x.shape), h.view(x.shape), rstd, flag


def _torch_dropout_add(x2, r2, seed, offset, p, h_dtype) -> torch.Tensor:
    # the dropout op's own host implementation (its C++ kernel on CPU, else torch ops): the same mask
    dropped = _dropout._dropout_apply(x2, seed, offset, p) if p > 0.0 else x2
    return torch.add(dropped, r2).to(h_dtype)  # torch adds mixed dtypes in the promoted one


def triton_forward(x2, r2, w, b, seed, offset, p, eps, is_rms, h_dtype, out_dtype, rule, interpret,
                   cfg: dict | None = None):
    """The generated kernels on (rows, cols) x2 and r2, with the baked launch config of h's dtype and
    the row width, or `cfg` (the tuner's)."""
    rows, cols = x2.shape
    device = x2.device
    tree = builtin_tree()
    arch = arch_for(device, tree, interpret)
    module = _dropout.rand_kernel_module(tree, arch, C.ADD_NORM_STEM, interpret)
    h = torch.empty((rows, cols), dtype=h_dtype, device=device)
    dropout = p > 0.0
    seed_arg = seed.reshape(1) if dropout else placeholder(device, torch.int64)
    scale = _dropout._scale(p)
    if rows == 0 or cols > module.MAX_COLS:
        # wide rows: dropout + add, then the MS norm's own forward kernel (which loops over the row) on h
        n = h.numel()
        if n:
            cfg = cfg or _configs.lookup(tree, arch, C.ADD_NORM_TABLE,
                                         (C.ADD_NORM_DROPOUT_ADD, _configs.DTYPE_NAMES[h_dtype]), (cols,))
            launch(module.dropout_add_kernel, (-(-n // cfg["BLOCK"]),), x2, r2, h, seed_arg, offset, n, p, scale,
                   DROPOUT=dropout, **cfg)
        y, rstd, flag = nb.triton_forward(h, w, b, eps, is_rms, out_dtype, interpret, rule=rule)
        return y, h, rstd, flag
    y = torch.empty((rows, cols), dtype=out_dtype, device=device)
    rstd = torch.empty(rows, dtype=torch.float32, device=device)
    flag = torch.empty(() if rule else 0, dtype=torch.int32, device=device)
    affine = w is not None
    w_arg = w if affine else rstd  # never read when AFFINE / HAS_BIAS are off
    b_arg = b if b is not None else w_arg
    gamma_min, beta_ratio = rule or (0.0, 0.0)
    cfg = cfg or _configs.lookup(tree, arch, C.ADD_NORM_TABLE, (C.ADD_NORM_FORWARD, _configs.DTYPE_NAMES[h_dtype]),
                                 (cols,))
    launch(module.add_norm_forward_kernel, (rows,), x2, r2, h, y, rstd, w_arg, b_arg,
           flag if rule else placeholder(device, torch.int32), seed_arg, offset, cols, eps, p, scale, gamma_min,
           beta_ratio, DROPOUT=dropout, IS_RMS=is_rms, AFFINE=affine, HAS_BIAS=b is not None,
           **cfg)
    return y, h, rstd, flag


add_ms_norm_fwd = torch.library.custom_op("lowmem_ops::add_ms_norm_fwd", mutates_args=())(_add_ms_norm_fwd)


@add_ms_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, offset, p, eps, is_rms, out_dtype, check_rule=False):
    _check_pair(x, residual, "add_ms_norm")
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat = torch.float64 if h_dtype == torch.float64 else torch.float32  # rstd: h's compute dtype
    flag = x.new_empty(() if check_rule and weight is not None else 0, dtype=torch.int32)
    return (x.new_empty(x.shape, dtype=out_dtype or h_dtype), x.new_empty(x.shape, dtype=h_dtype),
            x.new_empty((rows,), dtype=stat), flag)


def _setup(ctx, inputs, output):
    x, residual, weight, bias, seed, ctx.offset, ctx.p, _eps, ctx.is_rms, *_ = inputs
    y, h, rstd, _flag = output
    ctx.x_dtype, ctx.r_dtype, ctx.h_dtype, ctx.n_cols = x.dtype, residual.dtype, h.dtype, x.shape[-1]
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    # y is the op's output (the next layer saves it too), rstd 4 bytes per row, the seed 8 bytes
    ctx.save_for_backward(y, rstd, weight, bias, seed)


def _backward(ctx, dy, dh, _drstd, _dflag):
    y, rstd, weight, bias, seed = ctx.saved_tensors
    total, dw, db = norms.ms_norm_bwd(dy, y, rstd, weight, bias, ctx.n_cols, ctx.is_rms, ctx.h_dtype)
    if dh is not None:
        total = total + dh
    dx = _dropout.dropout_apply(total.to(ctx.x_dtype), seed, ctx.offset, ctx.p) if ctx.p > 0.0 else total.to(ctx.x_dtype)
    return (dx, total.to(ctx.r_dtype), dw if ctx.has_weight else None, db if ctx.has_bias else None,
            None, None, None, None, None, None, None)


add_ms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def _add_norm(x, residual, weight, bias, eps, p, training, is_rms, seed, offset, out_dtype, affine, what):
    if affine not in ("inverse", "plain"):
        raise ValueError(f"lowmem_ops.{what}: affine must be 'inverse' or 'plain', got {affine!r}")
    _check_pair(x, residual, what)
    n_cols = x.shape[-1]
    norms._check_call(x, (n_cols,), weight, bias, out_dtype, what)
    p = _dropout.check_p(p, what)
    if p == 1.0:
        raise ValueError(f"lowmem_ops.{what}: p must be in [0, 1), got 1.0 (everything dropped: the sum is the "
                         "residual alone)")
    p = p if training else 0.0
    seed = _dropout._seed_tensor(seed, x.device) if p > 0.0 else None
    if p > 0.0:
        _dropout._check_offset(offset, x.numel())
    out = norms._out_dtype(x, out_dtype)
    path = "share" if affine == "inverse" else "plain"
    if path == "share":
        norms._check(x, weight, bias, n_cols, what)
        path = norms.sharing_path(weight, bias, norms._backward_may_run(x, weight, bias)
                                   or (torch.is_grad_enabled() and residual.requires_grad))

    def plain():  # saves new_residual: lo.dropout (no mask saved, the same mask), the add, torch's norm
        h = (_dropout.dropout(x, p, seed=seed, offset=offset) if p > 0.0 else x) + residual
        return norms._plain(h, n_cols, weight, bias, eps, is_rms, out), h

    if path == "plain":
        return plain()
    y, h, _, flag = torch.ops.lowmem_ops.add_ms_norm_fwd(x, residual, weight, bias, seed, offset, p, eps, is_rms, out,
                                                         path in ("check", "recheck"))
    if path == "check" and not norms.rule_passed(flag, weight):
        return plain()
    if path == "recheck":
        norms._recheck_in_backward(y, flag, weight, what)
    return y, h


def add_ms_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5, p: float = 0.0, training: bool = True,
                     *, seed=None, offset: int = 0, out_dtype: Optional[torch.dtype] = None,
                     affine: str = "inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(dropout(x, p) + residual), dropout(x, p) + residual), saving the output and 4 bytes
    per row (see the module doc). p = 0 or training=False: no dropout. seed/offset as in lo.dropout."""
    return _add_norm(x, residual, weight, bias, eps, p, training, False, seed, offset, out_dtype, affine,
                     "add_ms_layernorm")


def add_ms_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   eps: Optional[float] = 1e-6, p: float = 0.0, training: bool = True, *, seed=None, offset: int = 0,
                   out_dtype: Optional[torch.dtype] = None, affine: str = "inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """add_ms_layernorm with RMSNorm. eps=None means torch.finfo(dtype).eps, as F.rms_norm."""
    if eps is None:
        eps = torch.finfo(torch.promote_types(x.dtype, residual.dtype)).eps
    return _add_norm(x, residual, weight, None, eps, p, training, True, seed, offset, out_dtype, affine,
                     "add_ms_rmsnorm")


__all__ = ["add_ms_layernorm", "add_ms_rmsnorm"]
