"""Memory-sharing LayerNorm and RMSNorm (MS-BP).

The norm saves its output y (and one float32 rstd per row), never its input. The linear layer that
consumes y saves that same tensor, so the pair keeps one copy where torch keeps two.

    lowmem_ops::ms_norm_fwd(x, weight?, bias?, n_cols, eps, is_rms, out_dtype?, check_rule) -> (y, rstd, rule_ok)
    lowmem_ops::ms_norm_bwd(dy, y, rstd, weight?, bias?, n_cols, is_rms, x_dtype) -> (dx, dweight, dbias)

Affine modes:
  none     the paper's form, no parameters: fold gamma/beta into the linear layers that follow.
  inverse  gamma/beta stay trainable in the norm; y = x_hat * gamma + beta is saved and backward
           recovers x_hat = (y - beta) / gamma. Only where that is safe (see INVERSE_RULE); else
           that call falls back to the plain path.
  plain    torch's own layer_norm / rms_norm, which saves the input: the non-sharing reference.

Autocast: under torch.autocast the norm computes in float32 and returns the autocast dtype, so the
following linear needs no cast (a cast would make a new tensor and end the sharing).

Plain eager calls on CPU tensors that take the C++ kernels run as one C++ autograd op
(_cpp_op_for: templates/cpu_autograd.cpp.j2) with the same kernels, saved tensors and results;
everything else goes through the custom ops and _MSNorm (docs/norms.md, "How a call runs").
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import _norm_backends as nb
from . import _cpp_norms as _cpp
from . import _transforms
from ._common import backend as pick_backend
from ._common import FLOAT_DTYPES, check_float_tensor, compute_dtype

AFFINE_MODES = ("none", "inverse", "plain")
# Recovering x_hat = (y - beta) / gamma multiplies y's rounding error by (|x_hat| + |beta/gamma|) / |x_hat|.
# Inverse mode is used only while every channel has |gamma| >= GAMMA_MIN and |beta| <= BETA_RATIO * |gamma|,
# which keeps that factor near 1 for normalised activations and avoids dividing by (near) zero.
GAMMA_MIN = 1e-3
BETA_RATIO = 16.0
INVERSE_RULE = f"every |gamma_j| >= {GAMMA_MIN:g} and |beta_j| <= {BETA_RATIO:g} * |gamma_j|"


def _check(x, weight, bias, n_cols, what):
    check_float_tensor(x, what)
    _check_cols(x, n_cols, what)
    if x.numel() % n_cols:
        raise ValueError(f"lowmem_ops.{what}: input of shape {tuple(x.shape)} cannot be normalised over {n_cols} trailing elements")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float_tensor(p, what, name)
        if p.numel() != n_cols:
            raise ValueError(f"lowmem_ops.{what}: {name} has {p.numel()} elements, the normalised shape has {n_cols}")
        if not (p.is_cpu and x.is_cpu) and p.device != x.device:  # (flags first: .device is a new object)
            raise ValueError(f"lowmem_ops.{what}: {name} is on {p.device} but the input is on {x.device}")
    _check_bias_has_weight(weight, bias, what)


# What the memory-sharing path needs beyond torch's argument rules (the public norms check those as
# torch does, then these two).
def _check_cols(x, n_cols, what):
    if n_cols <= 0:
        raise ValueError(f"lowmem_ops.{what}: input of shape {tuple(x.shape)} cannot be normalised over {n_cols} trailing elements")


def _check_bias_has_weight(weight, bias, what):
    if bias is not None and weight is None:
        raise ValueError(f"lowmem_ops.{what}: a bias needs a weight (inverse mode recovers x_hat from y, gamma and beta)")


def _ms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], n_cols: int,
                 eps: float, is_rms: bool, out_dtype: Optional[torch.dtype], check_rule: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, rstd, and with check_rule (and a weight) whether gamma/beta pass INVERSE_RULE as a 0-dim
    int32 tensor on their device (computed there: reading it is up to the caller); else empty."""
    _check(x, weight, bias, n_cols, "ms_norm")
    return _ms_norm_forward(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule)


def _ms_norm_forward(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule=False):
    """_ms_norm_fwd on arguments its callers checked (the public norms check them as torch's do)."""
    out_dtype = out_dtype or x.dtype
    rule = (GAMMA_MIN, BETA_RATIO) if check_rule and weight is not None else None
    backend = _cpp.choose_for_norms(pick_backend(x, has_cpp=True))
    if backend == "cpp" and out_dtype != torch.float64:  # y in x's shape, the flag from the same call
        return _cpp.norm_forward(x, n_cols, weight, bias, eps, is_rms, out_dtype, rule)
    x2 = x.reshape(-1, n_cols).contiguous()
    w = weight.reshape(-1).contiguous() if weight is not None else None
    b = bias.reshape(-1).contiguous() if bias is not None else None
    if backend in ("triton", "triton-interpret") and out_dtype != torch.float64:
        y, rstd, flag = nb.triton_forward(x2, w, b, eps, is_rms, out_dtype, backend == "triton-interpret", rule=rule)
    else:  # torch's implementation (float64 always takes it)
        y, rstd = nb.torch_forward(x2, w, b, eps, is_rms, out_dtype)
        flag = nb.inverse_rule_holds(w, b, *rule) if rule else x.new_empty(0, dtype=torch.int32)
    return y.view(x.shape), rstd, flag


ms_norm_fwd = torch.library.custom_op("lowmem_ops::ms_norm_fwd", mutates_args=())(_ms_norm_fwd)


@ms_norm_fwd.register_fake
def _(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule=False):
    rows = x.numel() // n_cols
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    flag = x.new_empty(() if check_rule and weight is not None else 0, dtype=torch.int32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty((rows,), dtype=stat), flag


def _ms_norm_bwd(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], n_cols: int, is_rms: bool, x_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _cpp.choose_for_norms(pick_backend(y, has_cpp=True))
    if backend == "torch" or x_dtype == torch.float64 or y.dtype == torch.float64:
        backend = "torch"
    if backend == "cpp":  # dx in y's shape, parameter gradients in the parameters' shape
        dx, dw, db = _cpp.norm_backward(dy, y, rstd, n_cols, weight, bias, is_rms, x_dtype)
    else:
        dy2 = dy.reshape(-1, n_cols).contiguous()
        y2 = y.reshape(-1, n_cols)
        w = weight.reshape(-1).contiguous() if weight is not None else None
        b = bias.reshape(-1).contiguous() if bias is not None else None
        if backend == "torch":
            dx, dw, db = nb.torch_backward(dy2, y2, rstd, w, b, is_rms, x_dtype)
        else:
            dx, dw, db = nb.triton_backward(dy2, y2, rstd, w, b, is_rms, x_dtype, backend == "triton-interpret")
        dx = dx.view(y.shape)
    return dx, _param_grad(dw, weight, y), _param_grad(db, bias, y)


def _param_grad(grad: Optional[torch.Tensor], param: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient in its dtype and shape (as it comes where a kernel wrote it so)."""
    if grad is None:
        return _no_grad_tensor(like)
    if grad.dtype == param.dtype and grad.shape == param.shape:
        return grad
    return grad.to(param.dtype).view(param.shape)


ms_norm_bwd = torch.library.custom_op("lowmem_ops::ms_norm_bwd", mutates_args=())(_ms_norm_bwd)
# eager calls on plain tensors skip the dispatcher (see _transforms.DirectOp)
_fwd_direct = _transforms.DirectOp(ms_norm_fwd, _ms_norm_fwd)
_bwd_direct = _transforms.DirectOp(ms_norm_bwd, _ms_norm_bwd)


def _no_grad_tensor(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor for an absent parameter's gradient (outputs may not share storage)."""
    return like.new_empty(0, dtype=torch.float32)


@ms_norm_bwd.register_fake
def _(dy, y, rstd, weight, bias, n_cols, is_rms, x_dtype):
    return (y.new_empty(y.shape, dtype=x_dtype),
            torch.empty_like(weight) if weight is not None else _no_grad_tensor(y),
            torch.empty_like(bias) if bias is not None else _no_grad_tensor(y))


def _setup(ctx, inputs, output):
    x, weight, bias, n_cols, eps, is_rms, out_dtype, *_ = inputs
    y, rstd, _flag = output
    ctx.n_cols, ctx.is_rms, ctx.x_dtype = n_cols, is_rms, x.dtype
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    # y is this op's output: the very tensor the next layer saves. weight/bias are parameters.
    ctx.save_for_backward(y, rstd, weight, bias)


def _backward(ctx, dy, _drstd, _dflag, call=_transforms.call_directly, bwd_op=None):
    y, rstd, weight, bias = ctx.saved_tensors
    dx, dw, db = call(bwd_op or ms_norm_bwd, NO_DOUBLE_BACKWARD, dy, y, rstd, weight, bias, ctx.n_cols, ctx.is_rms, ctx.x_dtype)
    return dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None, None, None, None, None


NO_DOUBLE_BACKWARD = "lowmem_ops: double backward through a memory-sharing norm is not supported"


def _no_double_backward(ctx, *_):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


ms_norm_fwd.register_autograd(_backward, setup_context=_setup)
ms_norm_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_eager(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.eps, ctx.out_dtype = inputs[4], output[0].dtype
    ctx.save_for_forward(*inputs[:3])  # only kept while forward-mode AD runs


class _MSNorm(torch.autograd.Function):
    """ms_norm_fwd with its backward, plus forward-mode AD and torch.func (see _transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule):
        return _fwd_direct(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_eager(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, dy, drstd, dflag):
        return _backward(ctx, dy, drstd, dflag, _transforms.call_differentiable_once, _bwd_direct)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight, bias = ctx.saved_tensors
        n, eps = ctx.n_cols, ctx.eps

        def norm(x, weight=None, bias=None):  # torch's own norm, whose tangent is the exact one
            x2, w, b = x.reshape(-1, n), _flat(weight), _flat(bias)
            y = F.rms_norm(x2, (n,), w, eps) if ctx.is_rms else F.layer_norm(x2, (n,), w, b, eps)
            return y.view(x.shape)

        present = [(p, t) for p, t in ((x, dx), (weight, dweight), (bias, dbias)) if p is not None]
        dy = _transforms.exact_jvp(norm, [p for p, _ in present], [t for _, t in present], compute_dtype(x.dtype),
                                   ctx.out_dtype)
        return dy, None, None


_MSNormEager = _transforms.eager_twin(_MSNorm, _ms_norm_forward, _setup_eager, keep=(0, 2))


def _flat(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return p.reshape(-1) if p is not None else None


def _ms_norm(x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule=False) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-sharing norm's output and rule flag (see _ms_norm_fwd): through _MSNorm in eager
    code, the custom op under torch.compile."""
    args = (x, weight, bias, n_cols, eps, is_rms, out_dtype, check_rule)
    if _transforms.use_custom_op():
        y, _, flag = torch.ops.lowmem_ops.ms_norm_fwd(*args)
    elif (cpp_op := _cpp_op_for(x, weight, bias, out_dtype)) is not None:
        y, flag = cpp_op(*args, GAMMA_MIN, BETA_RATIO)
    else:
        y, flag = _transforms.apply(_MSNorm, _MSNormEager, *args)
    return y, flag


def _cpp_op_for(x, weight, bias, out_dtype):
    """The norms' C++ autograd op (_cpp_backend.autograd_op) where it may run this call: plain
    eager code on plain CPU tensors that take the C++ kernels, and no forward-mode AD level open (the
    op has no jvp; _MSNorm has). None elsewhere: _MSNorm then runs the same kernels."""
    if out_dtype == torch.float64 or not _transforms.plain_cpu_call((x, weight, bias)) \
            or _cpp.choose_for_norms(pick_backend(x, has_cpp=True)) != "cpp":
        return None
    return _cpp.autograd_op()


# --- the public functions --------------------------------------------------------------------------

def _n_cols(x: torch.Tensor, normalized_shape, what: str) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"lowmem_ops.{what}: normalized_shape {list(shape)} does not match the trailing "
                         f"dimensions of an input of shape {list(x.shape)}")
    return math.prod(shape)


def _check_call(x, shape: tuple, weight, bias, out_dtype, what: str) -> None:
    """The argument rules of F.layer_norm / F.rms_norm, checked before anything runs."""
    check_float_tensor(x, what)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float_tensor(p, what, name)
        if tuple(p.shape) != shape:
            raise ValueError(f"lowmem_ops.{what}: {name} has shape {list(p.shape)}, but normalized_shape is {list(shape)} "
                             "(as in torch's norms, it must be the same shape)")
        if not (p.is_cpu and x.is_cpu) and p.device != x.device:  # (flags first: .device is a new object)
            raise ValueError(f"lowmem_ops.{what}: {name} is on {p.device} but the input is on {x.device}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowmem_ops.{what}: out_dtype must be float16, bfloat16, float32 or float64, got {out_dtype}")


def _out_dtype(x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if out_dtype is not None:
        return out_dtype
    device = "cpu" if x.is_cpu else x.device.type
    # Devices without autocast (meta, ...) cannot even be asked whether it is on.
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return None


_warned_fallback: set[int] = set()


def inverse_is_safe(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether y can be inverted to x_hat for these parameters (INVERSE_RULE). Syncs with the device.
    On CPU one C++ pass replaces the torch ops' nine. (The norms' CPU calls do not ask: their forward
    kernel checks the rule in the same pass, see sharing_path.)"""
    if weight.device.type == "cpu" and weight.dtype != torch.float64 and \
            _cpp.choose_for_norms(pick_backend(weight, has_cpp=True)) == "cpp":
        return _cpp.norm_rule(weight, bias, GAMMA_MIN, BETA_RATIO)  # reads them flat, in memory order
    return bool(nb.inverse_rule_holds(weight, bias, GAMMA_MIN, BETA_RATIO))


def _norm(x, normalized_shape, weight, bias, eps, is_rms, out_dtype, affine, what):
    """The public norms' one path: validate, then torch's norm (plain, or inverse mode's fallback)
    or the memory-sharing op."""
    if affine not in ("inverse", "plain"):
        raise ValueError(f"lowmem_ops.{what}: affine must be 'inverse' or 'plain', got {affine!r}")
    _check_call(x, (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape),
                weight, bias, out_dtype, what)
    n_cols = _n_cols(x, normalized_shape, what)
    out = _out_dtype(x, out_dtype)
    if affine == "plain":
        return _plain(x, normalized_shape, weight, bias, eps, is_rms, out)
    _check_cols(x, n_cols, what)  # _check_call and _n_cols checked the rest of _check
    _check_bias_has_weight(weight, bias, what)
    path = sharing_path(weight, bias, _backward_may_run(x, weight, bias))
    if path == "plain":
        return _plain(x, normalized_shape, weight, bias, eps, is_rms, out)
    y, flag = _ms_norm(x, weight, bias, n_cols, eps, is_rms, out, check_rule=path in ("check", "recheck"))
    if path == "check" and not rule_passed(flag, weight):
        return _plain(x, normalized_shape, weight, bias, eps, is_rms, out)
    if path == "recheck":
        _recheck_in_backward(y, flag, weight, what)
    return y


def sharing_path(weight, bias, backward_may_run: bool) -> str:
    """How an inverse-mode call runs: 'share' (save y, nothing to check), 'check' (CPU parameters in
    plain eager code: the forward kernel checks INVERSE_RULE in the same call, and where it fails the
    caller runs the plain path instead, see rule_passed), 'recheck' (save y, and have the kernel check INVERSE_RULE
    again for backward: parameters whose verdict was cached) or 'plain' (the parameters break the
    rule: torch's norm, saving its input)."""
    if weight is None or not backward_may_run or not _has_values(weight):
        # Only backward inverts gamma: without one (no_grad, inference_mode), or with no values to
        # read (meta and fake tensors: shapes only, as when planning memory), the rule does not matter.
        return "share"
    if _reads_for_free(weight) and _transforms.plain_eager():
        return "check"
    if not _inverse_allowed(weight, bias):
        return "plain"
    return "share" if _reads_for_free(weight) else "recheck"


def rule_passed(flag: torch.Tensor, weight: torch.Tensor) -> bool:
    """The verdict of a 'check' call's kernel (a CPU flag: reading it costs no sync), warning once per
    parameter where it fails."""
    return _warn_if_unsafe(weight, bool(flag), stacklevel=5)


def _has_values(t: torch.Tensor) -> bool:
    # while compiling, tensors are fake by design: that case is decided by _inverse_allowed.
    # Plain tensors and parameters (the usual case) skip is_fake's longer checks.
    if t.is_meta:
        return False
    return type(t) in (torch.Tensor, torch.nn.Parameter) or torch.compiler.is_compiling() or not is_fake(t)


def _backward_may_run(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))


def _reads_for_free(weight: torch.Tensor) -> bool:
    """Whether reading the parameters' values on the host costs no device sync (CPU tensors)."""
    return weight.is_cpu


def _inverse_allowed(weight, bias) -> bool:
    if torch.compiler.is_compiling():
        # The rule needs the parameter values on the host: a graph cannot branch on them. Compiled
        # graphs therefore use the plain path for inverse mode (documented in docs/norms.md).
        return False
    if _reads_for_free(weight) or weight.is_inference() or (bias is not None and bias.is_inference()):
        # CPU values (under torch.func transforms: see sharing_path) are checked at every call;
        # inference tensors have no version counter to key on.
        return _warn_if_unsafe(weight, inverse_is_safe(weight, bias))
    # One host sync per parameter update, not per call: the verdict is kept on the weight tensor
    # itself, with the versions (in-place updates such as optimizer steps bump them) and storages
    # (`w.data = t` swaps it) it was made for. Writes through `w.data` bump neither: each call
    # re-checks the rule on the device and its backward reads that (_recheck_in_backward).
    key = _verdict_key(weight, bias)
    cached = getattr(weight, "_lowmem_inverse_rule", None)
    if cached is None or cached[0] != key:
        cached = (key, inverse_is_safe(weight, bias))
        weight._lowmem_inverse_rule = cached
    return _warn_if_unsafe(weight, cached[1])


def _verdict_key(weight, bias) -> tuple:
    return (weight._version, weight.data_ptr(), id(bias),
            (bias._version, bias.data_ptr()) if bias is not None else None)


def _warn_if_unsafe(weight, safe: bool, stacklevel: int = 6) -> bool:
    if not safe and id(weight) not in _warned_fallback:
        _warned_fallback.add(id(weight))
        warnings.warn(f"lowmem_ops: norm parameters break the inverse-mode rule ({INVERSE_RULE}); those calls "
                      "save the input instead of sharing the output", stacklevel=stacklevel)
    return safe


class _DeviceCheck:
    """INVERSE_RULE's verdict on the parameters one forward used, computed on the device (by the norm
    kernel itself, as its rule flag) and read back later. On CUDA the flag is copied to pinned host
    memory without blocking; reading it waits for that copy only (long done by the time backward
    runs), not for the whole stream."""

    def __init__(self, flag: torch.Tensor):
        self._ready = None
        if flag.device.type == "cuda":
            self._flag = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self._flag.copy_(flag, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._flag = flag  # read with a sync, in backward only

    def holds(self) -> bool:
        if self._ready is not None:
            self._ready.synchronize()
        return bool(self._flag)


def _recheck_in_backward(y, flag, weight, what):
    """Make y's backward refuse to run if the parameters this forward used break INVERSE_RULE although
    the cached verdict said they were safe: they were changed where the version counter does not see
    it (`w.data.fill_(0)`, `w.data[3] = 0`). Inverting them would give NaN or wrong gradients."""
    check = _DeviceCheck(flag)

    def hook(grad):
        if not check.holds():
            weight._lowmem_inverse_rule = None  # the next forward checks again and takes the plain path
            raise RuntimeError(
                f"lowmem_ops.{what}: the norm's weight/bias were changed through .data (or another way "
                f"that bypasses autograd's version counter) after the inverse-mode check, and now break its rule "
                f"({INVERSE_RULE}): this backward cannot recover its input from its output. Change "
                f"parameters in place under torch.no_grad() instead of through .data (e.g. "
                f"`with torch.no_grad(): w.fill_(0)`). The next forward re-checks them and saves its input.")
        return None  # the gradient passes unchanged

    y.register_hook(hook)


def _plain(x, normalized_shape, weight, bias, eps, is_rms, out_dtype):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    compute = x if x.dtype == torch.float64 else x.float()
    w = weight.to(compute.dtype) if weight is not None else None
    b = bias.to(compute.dtype) if bias is not None else None
    no_autocast = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else nullcontext()
    with no_autocast:
        y = F.rms_norm(compute, shape, w, eps) if is_rms else F.layer_norm(compute, shape, w, b, eps)
    return y.to(out_dtype or x.dtype)


def ms_layernorm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, eps: float = 1e-5, out_dtype: Optional[torch.dtype] = None,
                 affine: str = "inverse") -> torch.Tensor:
    """LayerNorm that saves its output. Without weight/bias: the paper's form (fold the affine into
    the next linear). With them: inverse mode, or affine='plain' for torch's own layer_norm."""
    return _norm(x, normalized_shape, weight, bias, eps, False, out_dtype, affine, "ms_layernorm")


def ms_rmsnorm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: Optional[torch.Tensor] = None,
               eps: Optional[float] = 1e-6, out_dtype: Optional[torch.dtype] = None, affine: str = "inverse") -> torch.Tensor:
    """RMSNorm that saves its output (see ms_layernorm). eps=None means torch.finfo(x.dtype).eps, as F.rms_norm."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _norm(x, normalized_shape, weight, None, eps, True, out_dtype, affine, "ms_rmsnorm")


__all__ = ["ms_layernorm", "ms_rmsnorm", "inverse_is_safe", "AFFINE_MODES", "INVERSE_RULE"]
