"""Memory-sharing LayerNorm / RMSNorm against torch's own norms computed in float64."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lowmem_ops as lo

from . import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Forward: one rounding of y to the dtype. Backward: x_hat is recovered from the rounded y, so
# gradients carry an error of about eps(dtype) relative to their row's scale (tolerances below are
# relative to max |reference| over the tensor). float32 also accumulates over rows up to 70000 wide.
FWD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
BWD_TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float64: 1e-8}


def close_scaled(got, want, tol, what, floor=0.0):
    """max |got - want| <= tol * max(1, max |want|) + floor."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert err <= tol * scale + floor, f"{what}: max error {err:.3g} > {tol} x {scale:.3g} + {floor:.3g}"


def rstd_max(x2d, eps, is_rms):
    x64 = x2d.detach().double()
    if x64.numel() == 0:
        return 0.0
    ms = (x64 * x64).mean(dim=-1) if is_rms else x64.var(dim=-1, unbiased=False)
    return (1.0 / torch.sqrt(ms + eps)).max().item()


def cancellation_floor(x, eps, is_rms, dy):
    """LayerNorm subtracts the mean in float32: an error of a few ulp of |x| that rstd then scales
    (up to 1/sqrt(eps) for a constant row). Any float32 implementation has it; torch's too."""
    if is_rms or x.numel() == 0:
        return 0.0
    unit = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return 64 * unit * x.detach().double().abs().max().item() * rstd_max(x, eps, is_rms) * max(1.0, dy.double().abs().max().item())


def reference(x, shape, w, b, eps, is_rms, dy):
    """F.layer_norm / F.rms_norm in float64 through torch.autograd: (y, dx, dw, db)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if w is not None else None
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    y = F.rms_norm(x64, shape, w64, eps) if is_rms else F.layer_norm(x64, shape, w64, b64, eps)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad if w is not None else None, b64.grad if b is not None else None


WIDTHS = [1, 2, 3, 7, 64, 257, 1000, 8192, 8193, 12000]


@st.composite
def norm_case(draw, max_width):
    dtype = draw(st.sampled_from(DTYPES))
    width = draw(st.sampled_from([w for w in WIDTHS if w <= max_width]))
    split = draw(st.booleans()) and width % 2 == 0 and width > 2  # normalise over two trailing dims
    shape = (width // 2, 2) if split else (width,)
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    if width > 4096:
        lead = lead[:1]  # keep the interpreter fast
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    x = torch.randn(*lead, *shape, dtype=torch.float64) * scale + draw(st.sampled_from([0.0, 3.0]))
    if draw(st.booleans()) and x.numel():
        x[..., :] = x.reshape(-1)[0]  # constant rows: variance 0
    x = x.to(dtype)
    if draw(st.booleans()) and x.dim() >= 2 and not split:
        x = torch.cat([x, x], dim=-2)[..., ::2, :]  # non-contiguous rows
    affine = draw(st.sampled_from(["none", "inverse"]))
    return x, shape, affine


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@given(case=norm_case(max_width=12000))
def test_matches_torch_norms(is_rms, case):
    check_against_torch(is_rms, "torch", case)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@given(case=norm_case(max_width=12000))
def test_generated_kernels_match_torch_norms(is_rms, case):
    """The same property through the generated kernels, run by Triton's interpreter."""
    check_against_torch(is_rms, "triton-interpret", case)


def check_against_torch(is_rms, backend, case):
    x, shape, affine = case
    x = x.requires_grad_(True)
    w = b = None
    if affine == "inverse":
        g = torch.Generator().manual_seed(x.numel())
        w = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(x.dtype).requires_grad_(True)
        b = None if is_rms else (torch.randn(shape, generator=g, dtype=torch.float64) * 0.2).to(x.dtype).requires_grad_(True)
    eps = 1e-5
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(x.numel() + 1)).to(x.dtype)
    with ref.backend(backend):
        y = lo.ms_rmsnorm(x, shape, w, eps) if is_rms else lo.ms_layernorm(x, shape, w, b, eps)
        y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, shape, w, b, eps, is_rms, dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    x2d = x.reshape(-1, math.prod(shape))
    floor = cancellation_floor(x2d, eps, is_rms, dy)
    close_scaled(y, y_ref, FWD_TOL[x.dtype], "y", floor)
    # dx's natural scale is rstd * |dy * gamma|: x_hat recovered from the rounded y errs by about
    # eps(dtype), and dx multiplies that by rstd * dy (very visibly so in 1- or 2-wide rows).
    g_max = (dy.double() * (w.detach().double() if w is not None else 1.0)).abs().max().item() if dy.numel() else 0.0
    dx_floor = floor + BWD_TOL[x.dtype] * rstd_max(x2d, eps, is_rms) * g_max
    close_scaled(x.grad, dx_ref, BWD_TOL[x.dtype] * math.sqrt(max(1, shape[0] // 1000)), "dx", dx_floor)
    if w is not None:  # sums dy * x_hat over the rows: their x_hat errors add up
        close_scaled(w.grad, dw_ref, BWD_TOL[x.dtype], "dweight", floor * (x.numel() // math.prod(shape)))
    if b is not None:
        close_scaled(b.grad, db_ref, BWD_TOL[x.dtype], "dbias")


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("width", [1, 5, 1024, 8192, 8193, 65536, 70001])
def test_wide_rows_both_paths(is_rms, width):
    """Both code paths of the generated kernels (rows in registers, looped rows) and the torch path,
    each against float64 torch; the widest row is 70001 columns (Liger-Kernel stops at 65536)."""
    torch.manual_seed(width)
    rows = 3 if width < 10000 else 2
    x = torch.randn(rows, width, dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.rand(width) + 0.5).requires_grad_(True)
    b = None if is_rms else (torch.randn(width) * 0.1).requires_grad_(True)
    dy = torch.randn(rows, width, dtype=torch.bfloat16)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, (width,), w, b, 1e-5, is_rms, dy)
    for backend in ("torch", "triton-interpret"):
        for p in (x, w, b):
            if p is not None:
                p.grad = None
        with ref.backend(backend):
            y = lo.ms_rmsnorm(x, width, w, 1e-5) if is_rms else lo.ms_layernorm(x, width, w, b, 1e-5)
            y.backward(dy)
        close_scaled(y, y_ref, FWD_TOL[torch.bfloat16], f"{backend} y")
        close_scaled(x.grad, dx_ref, BWD_TOL[torch.bfloat16], f"{backend} dx")
        close_scaled(w.grad, dw_ref, BWD_TOL[torch.bfloat16], f"{backend} dweight")
        if b is not None:
            close_scaled(b.grad, db_ref, BWD_TOL[torch.float32], f"{backend} dbias")


def saved_storages(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args)
    return out, saved


def storage_bytes(tensors, exclude=()):
    seen = {}
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
    return seen


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", ["none", "inverse"])
def test_norm_and_linear_share_one_saved_tensor(kind, affine):
    torch.manual_seed(0)
    rows, d = 48, 64
    ours = (lo.nn.MSLayerNorm if kind == "layernorm" else lo.nn.MSRMSNorm)(d, affine=affine)
    theirs = torch.nn.LayerNorm(d) if kind == "layernorm" else torch.nn.RMSNorm(d)
    for norm in (ours, theirs):
        block = torch.nn.Sequential(norm, torch.nn.Linear(d, 3 * d))
        x = torch.randn(rows, d, requires_grad=True)
        _, saved = saved_storages(block, x)
        params = list(block.parameters())
        stor = storage_bytes(saved, exclude=params)
        if norm is ours:
            ours_bytes = sum(stor.values())
            y_like = [t for t in saved if t.shape == (rows, d)]
            assert len({t.untyped_storage().data_ptr() for t in y_like}) == 1  # norm's y == linear's input
            assert ours_bytes == rows * d * 4 + rows * 4  # one (rows, d) float32 tensor + one rstd per row
        else:
            theirs_bytes = sum(stor.values())
    assert theirs_bytes - ours_bytes >= rows * d * 4  # torch keeps the norm's input as well


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_sharing_with_a_peft_lora_adapter(model_dtype):
    """frozen linear -> norm -> frozen linear with a LoRA adapter (adapter in the model's dtype, so
    nothing casts between norm and adapter): the norm's output is the adapter's saved input, and the
    norm's input is no longer kept."""
    peft = pytest.importorskip("peft")

    class Block(torch.nn.Module):
        def __init__(self, norm, d):
            super().__init__()
            self.pre, self.norm, self.proj = torch.nn.Linear(d, d), norm, torch.nn.Linear(d, d)

        def forward(self, x):
            return self.proj(self.norm(self.pre(x)))

    torch.manual_seed(0)
    rows, d = 32, 64
    elem = torch.finfo(model_dtype).bits // 8
    totals = {}
    for name, norm in (("ours", lo.nn.MSLayerNorm(d, affine="none")), ("torch", torch.nn.LayerNorm(d, elementwise_affine=False))):
        model = peft.get_peft_model(Block(norm, d), peft.LoraConfig(r=8, target_modules=["proj"])).to(model_dtype)
        x = torch.randn(rows, d, dtype=model_dtype, requires_grad=True)  # like a residual stream
        _, saved = saved_storages(model, x)
        stor = storage_bytes(saved, exclude=list(model.parameters()) + [x])
        totals[name] = sum(stor.values())
        if name == "ours":
            activations = [t for t in saved if t.shape == (rows, d)]
            assert len({t.untyped_storage().data_ptr() for t in activations}) == 1
    # torch's LayerNorm statistics, as torch saves them for this dtype
    _, ln_saved = saved_storages(torch.nn.LayerNorm(d, elementwise_affine=False).to(model_dtype),
                                 torch.randn(rows, d, dtype=model_dtype, requires_grad=True))
    ln_stats = sum(n for n in storage_bytes(ln_saved).values() if n < rows * d * elem)
    assert totals["torch"] - totals["ours"] == rows * d * elem + ln_stats - rows * 4


def test_autocast_returns_autocast_dtype_and_keeps_sharing():
    torch.manual_seed(0)
    d = 32
    block = torch.nn.Sequential(lo.nn.MSLayerNorm(d, affine="none"), torch.nn.Linear(d, d))
    x = torch.randn(16, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_norm = block[0](x)
        assert y_norm.dtype == torch.bfloat16
        _, saved = saved_storages(block, x)
    acts = [t for t in saved if t.shape == (16, d) and t.dtype == torch.bfloat16]
    assert len({t.untyped_storage().data_ptr() for t in acts}) == 1  # no cast between norm and linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.LayerNorm(d)(x).dtype == torch.float32  # torch's: the linear must cast


def test_small_gamma_falls_back_to_exact_gradients():
    torch.manual_seed(0)
    d = 16
    norm = lo.nn.MSLayerNorm(d)
    with torch.no_grad():
        norm.weight.normal_()
        norm.weight[3] = 0.0  # cannot be inverted
    x = torch.randn(4, d, requires_grad=True)
    dy = torch.randn(4, d)
    with pytest.warns(UserWarning, match="break the inverse-mode rule"):
        _, saved = saved_storages(norm, x)
    norm(x).backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, (d,), norm.weight, norm.bias, norm.eps, False, dy)
    close_scaled(x.grad, dx_ref, 1e-5, "dx")
    close_scaled(norm.weight.grad, dw_ref, 1e-5, "dweight")
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)  # saved x
    assert not lo.norms.inverse_is_safe(norm.weight, norm.bias)
    with torch.no_grad():
        norm.weight.fill_(1.0)
    assert lo.norms.inverse_is_safe(norm.weight, norm.bias)


@pytest.mark.parametrize("affine", ["none", "inverse"])
def test_compiled_norm_linear_block(affine):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(lo.nn.MSRMSNorm(32, eps=1e-6, affine=affine), torch.nn.Linear(32, 32), lo.nn.ReSiLU2(),
                                lo.nn.MSLayerNorm(32, affine=affine), torch.nn.Linear(32, 8))
    compiled_model = torch.nn.Sequential(*[m for m in eager])  # same parameters
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 32, requires_grad=True)
    y_e = eager(x)
    (gx_e,) = torch.autograd.grad(y_e.square().sum(), x)
    y_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c.square().sum(), x)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module, torch_module", [(lo.nn.MSLayerNorm, torch.nn.LayerNorm), (lo.nn.MSRMSNorm, torch.nn.RMSNorm)])
def test_modules_are_drop_ins(module, torch_module):
    ours, theirs = module((4, 8)), torch_module((4, 8))
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert "affine='inverse'" in repr(ours)
    assert module(8, elementwise_affine=False).affine == "none"


def test_errors_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"normalized_shape \[6\] does not match the trailing dimensions of an input of shape \[2, 8\]"):
        lo.ms_layernorm(x, 6)
    with pytest.raises(ValueError, match=r"weight has shape \[4\], but normalized_shape is \[8\]"):
        lo.ms_layernorm(x, 8, torch.ones(4))
    with pytest.raises(ValueError, match="a bias needs a weight"):
        lo.ms_layernorm(x, 8, None, torch.zeros(8))
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64, got torch.int64"):
        lo.ms_rmsnorm(torch.zeros(2, 8, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="affine must be one of none, inverse, plain"):
        lo.nn.MSLayerNorm(8, affine="folded")


def test_without_grad_saves_nothing():
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, saved = saved_storages(lo.ms_layernorm, x, 8)
    assert saved == [] and not y.requires_grad


def test_inverse_rule_is_rechecked_after_an_update():
    norm = lo.nn.MSLayerNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, saved = saved_storages(norm, x)  # safe: shares, no warning
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)
    with torch.no_grad():
        norm.weight[0] = 0.0  # an in-place update, as an optimizer step makes
    with pytest.warns(UserWarning, match="inverse-mode rule"):
        _, saved = saved_storages(norm, x)
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
