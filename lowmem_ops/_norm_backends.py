"""The two implementations of the memory-sharing norms: torch (CPU, float64) and the generated
Triton kernels (CUDA, or CPU tensors through the interpreter). Both take 2-D (rows, cols) views.

Both follow the kernels' rules: statistics in float32 (float64 for float64), rstd = 1/sqrt(var + eps)
saved as one float per row, and a backward that reads only y, rstd and dy (plus gamma, beta).
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype
from . import _configs
from ._configs import DTYPE_NAMES
from . import _contract as C
from ._tree import builtin_tree, kernel_module_file
from ._triton_backend import arch_for, dense, launch, placeholder

NORM_FILE = C.NORM_STEM


# --- torch ---------------------------------------------------------------------------------------

def _row_scale(xf: torch.Tensor) -> torch.Tensor:
    """Per row: 1, or for a row whose sums of squares could overflow (max |x| >= 2^(E/2 - 24), E the
    dtype's max exponent: 2^40 in float32), 2^-(E/2 + 16) (2^-80). The kernels do the same. A power of
    two rescales exactly, so rows that would not overflow give the same bits either way."""
    max_exp = math.frexp(torch.finfo(xf.dtype).max)[1]  # 128, 1024
    row_max = xf.abs().amax(dim=-1, keepdim=True)
    return torch.where(row_max >= 2.0 ** (max_exp // 2 - 24), torch.full_like(row_max, 2.0 ** -(max_exp // 2 + 16)),
                       torch.ones_like(row_max))


def inverse_rule_holds(weight: torch.Tensor, bias: torch.Tensor | None, gamma_min: float, beta_ratio: float) -> torch.Tensor:
    """Inverse mode's rule, every |gamma_j| >= gamma_min and |beta_j| <= beta_ratio * |gamma_j|, as a
    0-dim int32 tensor (1: holds) on the parameters' device, computed in float32 as the kernels do."""
    w = weight.detach().abs().float()
    ok = w >= gamma_min
    if bias is not None:
        ok &= bias.detach().abs().float() <= beta_ratio * w
    return ok.all().to(torch.int32)


def torch_forward(x, weight, bias, eps, is_rms, out_dtype):
    xf = x.to(compute_dtype(x.dtype))
    s = _row_scale(xf)
    xs = xf * s
    xc = xs if is_rms else xs - xs.mean(dim=-1, keepdim=True)
    # inv = 1 / sqrt(var(x s) + eps s^2) and rstd = s * inv = 1 / sqrt(var(x) + eps); a scaled constant
    # row, where eps s^2 underflows to 0, gets inv = 1 / (s sqrt(eps)): its exact rstd, 1 / sqrt(eps).
    den = (xc * xc).mean(dim=-1, keepdim=True) + eps * s * s
    inv = torch.where(den > 0, 1.0 / torch.sqrt(den), 1.0 / (s * torch.full_like(s, eps).sqrt()))
    rstd = s * inv
    y = xc * inv
    if weight is not None:
        y = y * weight.to(y.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.to(out_dtype), rstd.squeeze(-1)


def torch_backward(dy, y, rstd, weight, bias, is_rms, x_dtype):
    compute = compute_dtype(x_dtype)
    dyf, x_hat = dy.to(compute), y.to(compute)
    g = dyf
    if weight is not None:
        w = weight.to(compute)
        x_hat = (x_hat - bias.to(compute) if bias is not None else x_hat) / w
        g = dyf * w
    c1 = (g * x_hat).mean(dim=-1, keepdim=True)
    dx = g - x_hat * c1 if is_rms else g - g.mean(dim=-1, keepdim=True) - x_hat * c1
    dx = (dx * rstd.to(compute)[:, None]).to(x_dtype)
    dw = (dyf * x_hat).sum(dim=0) if weight is not None else None
    db = dyf.sum(dim=0) if bias is not None else None
    return dx, dw, db


# --- Triton --------------------------------------------------------------------------------------

def _module(device: torch.device, interpret: bool):
    tree = builtin_tree()
    arch = arch_for(device, tree, interpret)
    return kernel_module_file(tree, arch, NORM_FILE, interpret), tree, arch


def kernel_name(is_rms: bool, affine: bool, stage: str) -> str:
    """The kernel's name in configs.py and the tuning DB: layernorm.affine.backward, ..."""
    return C.norm_kernel("rmsnorm" if is_rms else "layernorm", affine, stage)


def _launch_args(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in C.LAUNCH_ONLY}  # a grid size, not a kernel argument


def triton_forward(x, weight, bias, eps, is_rms, out_dtype, interpret, cfg: dict | None = None,
                   rule: tuple[float, float] | None = None):
    """Returns (y, rstd, flag). `rule` = (gamma_min, beta_ratio): the affine kernel also reports
    whether gamma/beta pass inverse mode's rule, in flag (0-dim int32, 1: passes); without `rule`
    flag is empty. `cfg`: a launch config to use instead of the baked one (the tuner's)."""
    x, weight, bias = dense(x), dense(weight), dense(bias)
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    affine = weight is not None
    flag = torch.empty(() if affine and rule else 0, dtype=torch.int32, device=x.device)
    if rows == 0:
        if flag.dim() == 0:  # no row ran the kernel: check the rule here (rare)
            flag.copy_(inverse_rule_holds(weight, bias, *rule))
        return y, rstd, flag
    module, tree, arch = _module(x.device, interpret)
    cfg = cfg or _configs.lookup(tree, arch, C.NORM_TABLE, (kernel_name(is_rms, affine, "forward"), DTYPE_NAMES[x.dtype]),
                                 (cols, rows))
    w = weight if affine else rstd  # never read when AFFINE is off
    b = bias if bias is not None else w
    ok = flag if flag.dim() == 0 else placeholder(x.device, torch.int32)  # the flag nobody asked for
    gamma_min, beta_ratio = rule or (0.0, 0.0)
    launch(module.forward_kernel, (rows,), x, y, rstd, w, b, ok, cols, eps, gamma_min, beta_ratio, IS_RMS=is_rms,
           AFFINE=affine, HAS_BIAS=bias is not None, **_launch_args(cfg))
    return y, rstd, flag


_sm_counts: dict[int, int] = {}


def _backward_programs(cfg: dict, device, rows, interpret) -> int:
    if interpret or device.type != "cuda":
        return min(rows, 4)
    sms = _sm_counts.get(device.index)
    if sms is None:
        sms = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return min(rows, sms * cfg[C.PROGRAMS_PER_SM])


def triton_backward(dy, y, rstd, weight, bias, is_rms, x_dtype, interpret, cfg: dict | None = None,
                    param_cfg: dict | None = None):
    """`cfg` / `param_cfg`: launch configs of the backward / dgamma kernels instead of the baked ones."""
    dy, y, rstd, weight, bias = (dense(t) for t in (dy, y, rstd, weight, bias))
    rows, cols = y.shape
    dx = torch.empty((rows, cols), dtype=x_dtype, device=y.device)
    affine, has_bias = weight is not None, bias is not None
    if rows == 0:  # no rows: zero parameter gradients, one tensor each (outputs may not share storage)
        def zeros(needed):
            return torch.zeros(cols, dtype=torch.float32, device=y.device) if needed else None
        return dx, zeros(affine), zeros(has_bias)
    module, tree, arch = _module(y.device, interpret)
    cfg = cfg or _configs.lookup(tree, arch, C.NORM_TABLE, (kernel_name(is_rms, affine, "backward"), DTYPE_NAMES[y.dtype]),
                                 (cols, rows))
    w = weight if affine else rstd  # placeholders are never read when AFFINE / HAS_BIAS are off
    b = bias if has_bias else w
    if cfg["SINGLE_PASS"]:
        programs = _backward_programs(cfg, y.device, rows, interpret)
        # One partial dgamma / dbeta row per program, summed below (deterministic: no atomics). Every
        # program has a row (programs <= rows) and writes its whole partial row: no zero fill needed.
        dw = torch.empty((programs, cols), dtype=torch.float32, device=y.device) if affine else rstd
        db = torch.empty((programs, cols), dtype=torch.float32, device=y.device) if has_bias else dw
    else:
        programs = rows
        dw = db = rstd
    launch(module.backward_kernel, (programs,), dy, y, rstd, w, b, dx, dw, db, rows, cols, IS_RMS=is_rms,
           AFFINE=affine, HAS_BIAS=has_bias, **_launch_args(cfg))
    if not affine:
        return dx, None, None
    if cfg["SINGLE_PASS"]:
        return dx, dw.sum(dim=0), db.sum(dim=0) if has_bias else None
    pcfg = param_cfg or _configs.lookup(tree, arch, C.NORM_TABLE,
                                       (kernel_name(is_rms, affine, "param_grad"), DTYPE_NAMES[y.dtype]), (cols, rows))
    dw = torch.empty(cols, dtype=torch.float32, device=y.device)
    db = torch.empty(cols, dtype=torch.float32, device=y.device) if has_bias else dw
    launch(module.param_grad_kernel, (-(-cols // pcfg["BLOCK_C"]),), dy, y, w, b, dw, db, rows, cols,
           HAS_BIAS=has_bias, **pcfg)
    return dx, dw, db if has_bias else None
