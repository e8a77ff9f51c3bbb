"""The Triton kernels of dropout + residual add + memory-sharing norm (hand-written;
lowmem_ops.add_norm launches them).

For the flat row-major index i of x:

    d[i] = round_x(x[i] * scale) if tl.rand(seed, offset + i) >= threshold else 0   (DROPOUT only; else x[i])
    h[i] = round_h(d[i] + residual[i])                                              stored: the new residual
    y    = norm(h) row by row, as lowmem_ops' MS norm kernels compute it (float32 statistics, rows with
           max |h| >= 2^40 normalised at 2^-80, rstd = 1 / sqrt(var + eps) stored per row)

round_x / round_h are the roundings to x's and h's dtypes: the same numbers as torch's
`F.dropout(x) + residual`, and the same mask as lowmem_ops.dropout draws for (seed, offset). The
backward is the MS norm's backward kernel (from y) followed by the dropout kernel on the summed
gradient: nothing of x's size is kept.

`add_norm_forward_kernel` holds one row in registers (rows up to MAX_COLS); wider rows run
`dropout_add_kernel` and then the MS norm's own forward kernel on h. `rand` is replaced by an
interpreted copy under the interpreter (lowmem_ops.dropout._kernel_module).
"""

import triton
import triton.language as tl
from triton.language.random import rand

MAX_COLS = 8192   # widest row add_norm_forward_kernel holds in registers
BLOCK = 1024      # dropout_add_kernel's elements per program
NUM_WARPS = 4

# Triton's own combiners: the interpreter sums them with numpy (see the generated ms_norm.py)
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max
HUGE_ROW = tl.constexpr(2.0 ** 40)
ROW_SCALE = tl.constexpr(2.0 ** -80)


def num_warps(block_cols: int) -> int:
    """Warps for a row of block_cols (a power of two) held in registers: about 8 floats per thread."""
    return max(1, min(16, block_cols // 256))


@triton.jit
def dropout_add_kernel(x_ptr, r_ptr, h_ptr, seed_ptr, offset, n, threshold, scale, DROPOUT: tl.constexpr,
                       BLOCK: tl.constexpr):
    # (written out in both kernels: the interpreter leaves triton.language patched after a nested
    # @jit call of our own, which breaks later compiles in the process)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    x = tl.load(x_ptr + i, mask=inside, other=0.0)
    if DROPOUT:
        keep = rand(tl.load(seed_ptr), offset + i) >= threshold
        x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
    h = x.to(tl.float32) + tl.load(r_ptr + i, mask=inside, other=0.0).to(tl.float32)
    tl.store(h_ptr + i, h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def add_norm_forward_kernel(x_ptr, r_ptr, h_ptr, y_ptr, rstd_ptr, w_ptr, b_ptr, ok_ptr, seed_ptr, offset, n_cols,
                            eps, threshold, scale, gamma_min, beta_ratio, DROPOUT: tl.constexpr,
                            IS_RMS: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            CHECK_RULE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    i = row * n_cols + cols
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    if DROPOUT:
        keep = rand(tl.load(seed_ptr), offset + i) >= threshold
        x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
    h = (x.to(tl.float32) + tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + i, h, mask=mask)
    h = tl.where(mask, h.to(tl.float32), 0.0)  # the norm reads the stored (rounded) new residual
    s = tl.where(tl.reduce(tl.abs(h), 0, _max) >= HUGE_ROW, ROW_SCALE, 1.0)
    hs = h * s
    if IS_RMS:
        hc = hs
    else:
        hc = tl.where(mask, hs - tl.reduce(hs, 0, _add) / n_cols, 0.0)
    # inv turns the scaled centred row into y; rstd = s * inv = 1 / sqrt(var(h) + eps). A scaled
    # constant row, where eps * s^2 underflows to 0, gets rstd = 1 / sqrt(eps), its exact value.
    den = tl.reduce(hc * hc, 0, _add) / n_cols + eps * s * s
    inv = tl.where(den > 0, 1.0 / tl.sqrt_rn(den), 1.0 / (s * tl.sqrt_rn(eps)))
    y = hc * inv
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
        y = y * w
        holds = tl.abs(w) >= gamma_min
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = y + b
            holds = holds & (tl.abs(b) <= beta_ratio * tl.abs(w))
        if CHECK_RULE:
            # inverse mode's rule on the gamma/beta this forward used (lowmem_ops.norms.INVERSE_RULE);
            # masked lanes loaded gamma 1, beta 0 and pass; NaN fails every comparison
            if row == 0:
                tl.store(ok_ptr, tl.where(tl.reduce(tl.where(holds, 0, 1), 0, _add) == 0, 1, 0))
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, s * inv)
