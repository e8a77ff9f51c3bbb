"""The C++ CPU kernels of the gated ops and the memory-sharing norms (templates/cpu_activation.cpp.j2,
templates/cpu_norm.cpp.j2), beside tests/test_layouts.py (every layout, both against float64):
- gated: the codes and the approximate d_gate / d_up bit for bit those of the torch path given the same
  saved tensors, on special values (NaN, infinities, thresholds, huge values) and sizes around the vector
  width; the exact path against float64 autograd, and finite h' where the printed derivative overflows;
- norms: y, rstd, dx, dgamma, dbeta against float64 F.layer_norm / F.rms_norm with the bounds of
  tests/test_norms.py, the huge-row rescale, constant rows, autocast's output dtype, 0 rows, and
  results that do not depend on the thread count;
- a missing kernel: auto falls back to torch with a warning, LOWMEM_OPS_BACKEND=cpp raises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import _cpp_backend, _cpp_norms
from lowmem_ops._tree import get_op

from . import reference as ref
from .test_gated import FLOOR as GATED_FLOOR
from .test_gated import TOL as GATED_TOL
from .test_gated import close
from .test_norms import BWD_TOL, FWD_TOL, cancellation_floor, rstd_max

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATED = {"resilu2": F.silu, "regelu2": F.gelu, "tanh_gelu2": lambda x: F.gelu(x, approximate="tanh")}
SIZES = (1, 2, 7, 15, 16, 17, 33, 513, 4099)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    for name in GATED:
        assert _cpp_backend.gated_unavailable(get_op(name)) is None
    assert _cpp_norms.choose_for_norms("cpp") == "cpp"


def specials(name: str) -> list[float]:
    t = ref.thresholds_f32(name)
    return [*t, *(math.nextafter(c, math.inf) for c in t), math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30,
            88.0, -88.0, 3e38, -3e38]


def inputs(name, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(n, generator=gen) * 4)
    s = torch.tensor(specials(name))
    k = min(n, s.numel())
    g[:k] = s[:k]
    u, dy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return g.to(dtype), u.to(dtype), dy.to(dtype)


def assert_identical(got, want, what):
    same = (got.view(torch.int16 if got.element_size() == 2 else torch.int32)
            == want.view(torch.int16 if want.element_size() == 2 else torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("name", sorted(GATED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_approx_path_bit_for_bit(name, dtype):
    for n in SIZES:
        g, u, dy = inputs(name, n, dtype, n)
        with ref.backend("cpp"):
            out, h, codes = torch.ops.lowmem_ops.gated_fwd(g, u, name, True, True, True)
            dg, du = torch.ops.lowmem_ops.gated_bwd(dy, None, u, h, codes, name, True, True, True)
        with ref.backend("torch"):
            _, _, codes_t = torch.ops.lowmem_ops.gated_fwd(g, u, name, True, True, True)
            dg_t, du_t = torch.ops.lowmem_ops.gated_bwd(dy, None, u, h, codes, name, True, True, True)
        what = f"{name} {dtype} n={n}"
        assert torch.equal(codes, codes_t), f"{what}: codes"
        assert_identical(dg, dg_t, f"{what}: d_gate")
        assert_identical(du, du_t, f"{what}: d_up")
        # and independently: codes from the spec's thresholds, d_gate from its float64 levels
        assert (ref.unpack(codes, ref.bits(name), n) == ref.codes(name, g)).all(), what
        levels = torch.from_numpy(ref.levels_f64(name)[ref.codes(name, g)])
        finite = g.isfinite() & (g.float().abs() < 1e30)
        close(dg[finite], (dy.double() * u.double() * levels)[finite], GATED_TOL[dtype], 0.0, GATED_FLOOR[dtype])


@pytest.mark.parametrize("name", sorted(GATED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_exact_path_against_float64(name, dtype):
    for n in SIZES:
        g, u, dy = inputs(name, n, dtype, n)
        finite = g.float().abs() < 1e3  # beyond: inf * 0 and overflow; checked in the next test
        g, u, dy = g[finite], u[finite], dy[finite]
        gl, ul = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        with ref.backend("cpp"):
            out = lo.gated(gl, ul, name, "exact")
            out.backward(dy)
        g64, u64 = g.double().requires_grad_(True), u.double().requires_grad_(True)
        want = GATED[name](g64) * u64
        want.backward(dy.double())
        tol, floor = GATED_TOL[dtype], GATED_FLOOR[dtype]
        close(out.detach(), want.detach(), tol, g64.detach().abs() * u64.detach().abs(), floor)
        close(ul.grad, u64.grad, 2 * tol, g64.detach().abs() * dy.double().abs(), floor)
        close(gl.grad, g64.grad, 2 * tol, (dy.double() * u64.detach()).abs(), floor)


@pytest.mark.parametrize("name", sorted(GATED))
def test_gated_exact_derivative_finite_at_huge_inputs(name):
    """The printed h' overflows (inf / inf) far out; the kernels use h's asymptotic slopes there."""
    g = torch.tensor([-3e38, -1e30, -1e5, -100.0, 100.0, 1e5, 1e30, 3e38])
    u, dy = torch.ones_like(g), torch.ones_like(g)
    with ref.backend("cpp"):
        _, _, _ = torch.ops.lowmem_ops.gated_fwd(g, u, name, False, True, True)
        dg, _ = torch.ops.lowmem_ops.gated_bwd(dy, g, u, None, None, name, False, True, True)
    assert torch.equal(dg, torch.tensor([0.0] * 4 + [1.0] * 4)), dg


# --- norms ---------------------------------------------------------------------------------------

def norm_case(rows, cols, dtype, is_rms, params, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale + 0.5).to(dtype)
    dy = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    w = b = None
    if params != "none":
        w = (torch.where(torch.rand(cols, generator=gen) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(cols, generator=gen))).to(dtype)
    if params == "weight+bias" and not is_rms:
        b = torch.randn(cols, generator=gen).to(dtype)
    return x, dy, w, b


def run_norm(backend, x, dy, w, b, is_rms, eps, out_dtype=None):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True) if w is not None else None
    b = b.clone().requires_grad_(True) if b is not None else None
    with ref.backend(backend):
        y = (lo.ms_rmsnorm(x, x.shape[-1], w, eps, out_dtype=out_dtype) if is_rms
             else lo.ms_layernorm(x, x.shape[-1], w, b, eps, out_dtype=out_dtype))
        y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad if w is not None else None, b.grad if b is not None else None


def check_norm(x, dy, w, b, is_rms, eps, got, dtype):
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if w is not None else None
    b64 = b.double().requires_grad_(True) if b is not None else None
    cols = x.shape[-1]
    y64 = F.rms_norm(x64, (cols,), w64, eps) if is_rms else F.layer_norm(x64, (cols,), w64, b64, eps)
    y64.backward(dy.double())
    floor = cancellation_floor(x, eps, is_rms, dy)
    y, dx, dw, db = got
    assert float((y.double() - y64.detach()).abs().max()) <= FWD_TOL[dtype] * max(1.0, y64.abs().max().item()) + floor
    w_max = w.abs().max().item() if w is not None else 1.0
    dx_scale = max(1.0, rstd_max(x, eps, is_rms) * dy.double().abs().max().item() * w_max)
    assert float((dx.double() - x64.grad).abs().max()) <= BWD_TOL[dtype] * dx_scale + floor
    for got_p, want_p in ((dw, w64), (db, b64)):
        if want_p is not None:
            err = float((got_p.double() - want_p.grad).abs().max())
            assert err <= BWD_TOL[dtype] * max(1.0, want_p.grad.abs().max().item()) + floor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("params", ["none", "weight", "weight+bias"])
def test_norm_against_float64(dtype, is_rms, params):
    for rows, cols in ((1, 1), (3, 7), (5, 33), (70, 17), (9, 769)):
        x, dy, w, b = norm_case(rows, cols, dtype, is_rms, params, rows * cols)
        check_norm(x, dy, w, b, is_rms, 1e-5, run_norm("cpp", x, dy, w, b, is_rms, 1e-5), dtype)


# Rows of at least 2048 columns take the backward's other loop structure (templates/cpu_norm.cpp.j2,
# kSweepMinCols: groups of rows, column chunks of 256): 2100 columns end in a partial chunk, 37 rows in a
# partial group, and 70 rows make two blocks of dgamma / dbeta partial sums.
WIDE = ((37, 2100), (70, 2304))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("params", ["none", "weight", "weight+bias"])
def test_norm_wide_rows_against_float64(dtype, is_rms, params):
    for rows, cols in WIDE:
        x, dy, w, b = norm_case(rows, cols, dtype, is_rms, params, rows + cols)
        check_norm(x, dy, w, b, is_rms, 1e-5, run_norm("cpp", x, dy, w, b, is_rms, 1e-5), dtype)


@pytest.mark.parametrize("rows, cols", [(300, 130), *WIDE])
def test_norm_parameter_grads_are_the_documented_sums(rows, cols):
    """dgamma / dbeta bit for bit: per column, float64 sums of the float32 dy * x_hat (x_hat = (y - beta) /
    gamma from the saved y) and of dy over blocks of rows that depend on the shape only (rows // 32 blocks,
    at most 64), each block summed in row order, the blocks added in order, rounded to float32 once."""
    x, dy, w, b = norm_case(rows, cols, torch.float32, False, "weight+bias", rows * cols)
    y, _, dw, db = run_norm("cpp", x, dy, w, b, False, 1e-5)
    terms_w = (dy * ((y - b) / w)).double()  # float32 operations, as the kernels round them
    terms_b = dy.double()
    blocks = max(1, min(64, rows // 32))
    per_block = -(-rows // blocks)
    want_w, want_b = torch.zeros(cols, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)
    for r0 in range(0, rows, per_block):
        part_w, part_b = torch.zeros(cols, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)
        for r in range(r0, min(rows, r0 + per_block)):
            part_w += terms_w[r]
            part_b += terms_b[r]
        want_w, want_b = (part_w, part_b) if r0 == 0 else (want_w + part_w, want_b + part_b)
    assert_identical(dw, want_w.float(), "dweight")
    assert_identical(db, want_b.float(), "dbias")


@pytest.mark.parametrize("is_rms", [False, True])
def test_norm_huge_and_constant_rows(is_rms):
    """Rows whose squares overflow float32 (rescaled by 2^-80, as the torch path) and constant rows
    (LayerNorm's variance 0: rstd = 1 / sqrt(eps)): rstd against float64."""
    x = torch.tensor([[3e30, -1e31, 2e30, 5e29], [7.0, 7.0, 7.0, 7.0], [1e-30, -2e-30, 0.0, 3e-30]])
    with ref.backend("cpp"):
        y, rstd, _ = torch.ops.lowmem_ops.ms_norm_fwd(x, None, None, 4, 1e-5, is_rms, None)
    x64 = x.double()
    ms = (x64 * x64).mean(-1) if is_rms else x64.var(-1, unbiased=False)
    want = 1.0 / torch.sqrt(ms + 1e-5)
    torch.testing.assert_close(rstd.double(), want, rtol=1e-6, atol=0)
    y64 = F.rms_norm(x64, (4,), None, 1e-5) if is_rms else F.layer_norm(x64, (4,), None, None, 1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)


def test_norm_autocast_output_dtype():
    """A float32 input with a bfloat16 output (autocast), and its backward to a float32 dx."""
    x, dy, w, b = norm_case(6, 40, torch.float32, False, "weight+bias", 3)
    got = run_norm("cpp", x, dy, w, b, False, 1e-5, out_dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    check_norm(x, dy.to(torch.bfloat16).float(), w, b, False, 1e-5, got, torch.bfloat16)


@pytest.mark.parametrize("is_rms", [False, True])
def test_norm_results_do_not_depend_on_thread_count(is_rms):
    """Row sums are per row; dgamma / dbeta sum fixed blocks of rows in order: same bits on 1 or 2 threads."""
    for rows, cols in ((300, 130), (100, 2100)):  # narrow and wide rows (WIDE)
        x, dy, w, b = norm_case(rows, cols, torch.float32, is_rms, "weight+bias", 7)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = run_norm("cpp", x, dy, w, b, is_rms, 1e-5)
            torch.set_num_threads(2)
            two = run_norm("cpp", x, dy, w, b, is_rms, 1e-5)
        finally:
            torch.set_num_threads(threads)
        for a, c in zip(one, two):
            assert (a is None and c is None) or torch.equal(a, c)


# --- fallback -------------------------------------------------------------------------------------

def test_missing_kernels_fall_back_or_raise(monkeypatch):
    """auto: one warning, then the torch path; LOWMEM_OPS_BACKEND=cpp: an error that says why."""
    why = "no kernels here (test)"
    monkeypatch.setattr(_cpp_backend, "gated_unavailable", lambda op: why)
    monkeypatch.setattr(_cpp_backend, "norm_unavailable", lambda tree: why)
    monkeypatch.setattr(_cpp_backend, "_warned", set())
    g, u = torch.randn(8, requires_grad=True), torch.randn(8)
    x = torch.randn(2, 8, requires_grad=True)
    with ref.backend("auto"), pytest.warns(UserWarning, match="no kernels here"):
        lo.swiglu(g, u).sum().backward()
        lo.ms_layernorm(x, 8).sum().backward()
    with ref.backend("cpp"):
        with pytest.raises(RuntimeError, match=r"resilu2: LOWMEM_OPS_BACKEND=cpp, but no kernels here"):
            lo.swiglu(g, u)
        with pytest.raises(RuntimeError, match=r"ms_norm: LOWMEM_OPS_BACKEND=cpp, but no kernels here"):
            lo.ms_layernorm(x, 8)
