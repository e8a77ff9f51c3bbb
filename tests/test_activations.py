"""Forward and backward of the approximate activations against the independent float64 reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowmem_ops as lo
from lowmem_ops.activations import approx_act_fwd

from . import reference as ref

OPS = ["regelu2", "resilu2"]
BUILTINS = sorted(ref.EXACT_FORWARD)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Forward: h(x) is computed in float32 then rounded once to the output dtype, so the result is
# within one rounding (half an ulp) of the float64 truth, plus float32 evaluation error.
FWD_TOL = {torch.float32: (2e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5),
           torch.float64: (1e-12, 1e-14)}  # (rtol, atol)
# Backward: dy * L with L rounded to float32 and one rounding to the grad dtype (float16's
# subnormals, below 6.1e-5, are spaced 6e-8 apart: that spacing is the absolute floor).
BWD_TOL = {torch.float32: (2e-7, 0.0), torch.float16: (1e-3, 6e-8), torch.bfloat16: (8e-3, 0.0),
           torch.float64: (1e-7, 0.0)}


def _values_near_thresholds(name):
    out = []
    for c in ref.thresholds_f32(name).astype(np.float64):
        c32 = np.float32(c)
        out += [float(c32), float(np.nextafter(c32, np.float32(-np.inf))), float(np.nextafter(c32, np.float32(np.inf)))]
    return out


@st.composite
def shaped_inputs(draw, name):
    """A tensor of any rank 0-4 (empty and size-1 dims included), any layout, values that matter."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
    special = _values_near_thresholds(name) + [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4]
    n = math.prod(shape)
    values = draw(st.lists(st.one_of(st.floats(-12, 12, width=32), st.sampled_from(special)), min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, non-contiguous strides
    elif layout == "sliced" and x.dim() >= 1:
        x = torch.cat([x, x], dim=-1)[..., ::2]  # stride 2 in the last dim
    return x


def _check(name, x, y, dx, dy):
    rtol, atol = FWD_TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref.forward(name, x), rtol=rtol, atol=atol, equal_nan=True)
    rtol, atol = BWD_TOL[x.dtype]
    assert dx.dtype == x.dtype and dx.shape == x.shape
    torch.testing.assert_close(dx.double(), ref.grad(name, x, dy), rtol=rtol, atol=atol)


def _flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Triton's interpreter (3.9) reads a bfloat16 subnormal as 0 when it converts to float32 (the GPU
    keeps it: test_interpreter_bf16_subnormal_quirk below watches for the fix), so the interpreter is
    compared on inputs without them."""
    return torch.where(x.abs() < torch.finfo(x.dtype).tiny, torch.zeros_like(x) * x.sign(), x)


def test_interpreter_bf16_subnormal_quirk():
    """When this starts failing, Triton's interpreter keeps bfloat16 subnormals: drop _flush_subnormals."""
    import os

    import triton
    import triton.language as tl

    src = torch.tensor([9.1835e-41, 1e-30], dtype=torch.bfloat16)
    out = torch.empty(2)

    def convert(x_ptr, y_ptr):
        offs = tl.arange(0, 2)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit runs, as for the generated kernels
    try:
        kernel = triton.jit(convert)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before
    kernel[(1,)](src, out)
    assert out[1].item() == src[1].float().item()  # normal values convert exactly
    assert out[0].item() == 0.0 != src[0].float().item()  # the subnormal is read as 0


def test_every_builtin_spec_has_an_exact_forward_to_test_against():
    """The tests reach the built-in ops through EXACT_FORWARD: a spec added without its entry there
    would be tested nowhere."""
    assert {p.stem for p in ref.SPEC_DIR.glob("*.toml")} == set(ref.EXACT_FORWARD)


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
@pytest.mark.parametrize("name", BUILTINS)
@given(data=st.data())
def test_forward_and_backward_match_reference(name, backend, data):
    """Both CPU paths: the torch implementation and the generated Triton kernels (interpreted)."""
    x = data.draw(shaped_inputs(name))
    if backend == "triton-interpret" and x.dtype == torch.bfloat16:
        x = _flush_subnormals(x)
    x.requires_grad_(True)
    seed = data.draw(st.integers(0, 2**31 - 1))  # dy is part of the example: reproducible, shrinkable
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    with ref.backend(backend):
        y = lo.approx_activation(x, name)
        y.backward(dy)
    _check(name, x, y, x.grad, dy)


@pytest.mark.parametrize("name", BUILTINS)
def test_codes_follow_documented_layout_and_boundary(name):
    # On, just below and just above every float32 threshold, at sizes that leave padding codes.
    vals = _values_near_thresholds(name) + [-100.0, 100.0, 0.0]
    for n in (1, 2, 3, 5, len(vals)):
        x = torch.tensor(vals[:n], dtype=torch.float32)
        _, packed = approx_act_fwd(x, name, True)
        k = ref.bits(name)
        assert packed.numel() == (3 * math.ceil(n / 8) if k == 3 else math.ceil(n * k / 8))
        np.testing.assert_array_equal(ref.unpack(packed, k, n), ref.codes(name, x))
        padding = ref.unpack(packed, k, packed.numel() * 8 // k)[n:]
        assert (padding == 0).all()


@pytest.mark.parametrize("name", OPS)
def test_levels_are_the_published_ones(name):
    op = lo.activations.get_op(name)
    np.testing.assert_allclose(op.levels, ref.PUBLISHED[name]["levels"], atol=5e-7)
    np.testing.assert_allclose(op.thresholds, ref.PUBLISHED[name]["c"], rtol=1e-7)
    # g(x) = sum a_i relu(x - c_i) tends to x: the levels end at 1.
    assert op.levels[0] == 0.0 and abs(op.levels[-1] - 1.0) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
@pytest.mark.parametrize("name", OPS)
def test_special_values(name, backend):
    """NaN and infinities, as documented in docs/numerics.md."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38], requires_grad=True)
    with ref.backend(backend):
        y = lo.approx_activation(x, name)
        y.backward(torch.ones_like(y))
    assert torch.isnan(y[0]) and y[4] == 0.0
    assert torch.isnan(y[2])  # -inf * 0, as torch's own GELU and SiLU give
    if backend == "torch":  # torch's fused CPU kernels, bit for bit (its GELU: NaN at +inf, inf at 3e38)
        torch.testing.assert_close(y, ref.EXACT_FORWARD[name](x.detach()), rtol=0, atol=0, equal_nan=True)
    else:  # the kernels evaluate the formula in float32: h(+inf) = +inf, h(3e38) = 3e38
        assert y[1] == float("inf") and y[3] == 3e38
    # Backward: NaN sits below every threshold (level 0); +inf takes the top level 1, -inf level 0.
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", OPS)
def test_leaves_input_untouched(name):
    x = torch.randn(33, requires_grad=True)
    before = x.detach().clone()
    lo.approx_activation(x, name).sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("module, torch_module", [(lo.nn.ReGELU2, torch.nn.GELU), (lo.nn.ReSiLU2, torch.nn.SiLU)])
def test_modules_are_drop_ins(module, torch_module):
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), module(), torch.nn.Linear(16, 4))
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), torch_module(), torch.nn.Linear(16, 4))
    theirs.load_state_dict(ours.state_dict())  # no parameters or buffers of its own
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    assert "bits=2" in repr(ours)


def test_autocast_follows_torch():
    """torch runs GELU/SiLU in the input dtype under autocast (they are in no cast list); so do we."""
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lo.regelu2(x).dtype == torch.nn.functional.gelu(x).dtype == torch.float32
        h = torch.nn.Linear(8, 8)(x)  # bf16 under autocast
        assert lo.resilu2(h).dtype == torch.nn.functional.silu(h).dtype == torch.bfloat16
