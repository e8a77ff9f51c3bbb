"""The memory-sharing norms at the edges: parameters changed behind autograd's back, rows whose
squares overflow float32, parameters made under inference_mode, bad arguments and meta tensors.
Each is checked against torch's own norms (float64 where float32 torch itself overflows)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo

from . import reference as ref

BACKENDS = ["torch", "triton-interpret"]
MODULES = {"layernorm": (lo.nn.MSLayerNorm, torch.nn.LayerNorm), "rmsnorm": (lo.nn.MSRMSNorm, torch.nn.RMSNorm)}


def float64_norm(x, w, b, eps, is_rms, dy):
    """F.layer_norm / F.rms_norm in float64: (y, dx, dw, db)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    shape = (x.shape[-1],)
    y = F.rms_norm(x64, shape, w64, eps) if is_rms else F.layer_norm(x64, shape, w64, b64, eps)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, b64.grad if b is not None else None


# --- a verdict made stale by an edit through .data ------------------------------------------------

EDITS = {  # none of these bumps weight._version
    "data = zeros": lambda w: setattr(w, "data", torch.zeros_like(w)),
    "data.fill_(0)": lambda w: w.data.fill_(0.0),
    "data[3] = 0": lambda w: w.data.__setitem__(3, 0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("readback", ["each call", "in backward"])
def test_data_edit_after_a_safe_verdict_never_gives_a_wrong_gradient(backend, edit, kind, readback, monkeypatch):
    """A first call caches 'gamma is safe to invert'; then gamma gets zeros through .data. CPU values
    are re-checked at every call (the plain path, exact gradients). Where reading them would sync
    (CUDA, emulated here) the rule is re-checked on the device and read in backward: an edit that
    kept the storage makes that backward raise a clear error, and the next call is exact again."""
    if readback == "in backward":
        monkeypatch.setattr(lo.norms, "_reads_for_free", lambda weight: False)
    torch.manual_seed(0)
    d = 8
    norm = MODULES[kind][0](d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, d, requires_grad=True)
    dy = torch.randn(3, d)
    with ref.backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning is given once per parameter
        norm(x).backward(dy)  # caches the safe verdict
        EDITS[edit](norm.weight)
        expect_error = readback == "in backward" and edit != "data = zeros"  # a new storage is seen at once
        for attempt in range(2 if expect_error else 1):
            x.grad = norm.weight.grad = None
            if norm.bias is not None:
                norm.bias.grad = None
            y = norm(x)
            if expect_error and attempt == 0:
                with pytest.raises(RuntimeError, match=r"changed through \.data.*torch\.no_grad\(\)"):
                    y.backward(dy)
                continue
            y.backward(dy)
    _, dx_ref, dw_ref, db_ref = float64_norm(x, norm.weight, norm.bias, norm.eps, kind == "rmsnorm", dy)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), dw_ref, rtol=1e-5, atol=1e-5)
    if norm.bias is not None:
        torch.testing.assert_close(norm.bias.grad.double(), db_ref, rtol=1e-5, atol=1e-5)


# --- rows whose squares overflow float32 ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODULES)
# bfloat16 stops at 1e36: beyond it dx is subnormal in bfloat16, and the Triton interpreter's float32
# -> bfloat16 cast gets subnormals wrong (the GPU's is right). float64 always takes the torch path.
@pytest.mark.parametrize("width, dtype, scales", [(16, torch.float32, (1, 1e20, 1e30, 3e38)), (16, torch.bfloat16, (1, 1e20, 1e30, 1e36)),
                                                  (9000, torch.float32, (1, 1e20, 1e30, 3e38)), (16, torch.float64, (1e160, 1e200, 1e250, 1e300))],
                         ids=["registers-fp32", "registers-bf16", "looped-fp32", "fp64"])
def test_rows_that_overflow_float32_match_float64_torch(backend, kind, width, dtype, scales):
    """Rows of scale 1, 1e20, 1e30 and up to float32's limit side by side. float32 torch gives NaN
    (layer_norm) or zeros (rms_norm) for the large ones; the norms here match float64 torch.
    (float64: the same up to its own limit, where float64 torch overflows too: its reference is
    torch on the row divided by its max with eps / max^2, far below float64's resolution, as 0.)"""
    is_rms = kind == "rmsnorm"
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(4, width, generator=gen, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)[:, None]
    x = x.clamp(-3e38, 3e38).to(dtype) if dtype != torch.float64 else x  # finite in bfloat16 too
    x.requires_grad_(True)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(width, generator=gen, dtype=pdtype) + 0.5).requires_grad_(True)
    b = None if is_rms else (torch.randn(width, generator=gen, dtype=pdtype) * 0.2).requires_grad_(True)
    eps = 1e-5
    dy = torch.randn(4, width, generator=gen).to(dtype)
    with ref.backend(backend):
        y = lo.ms_rmsnorm(x, width, w, eps) if is_rms else lo.ms_layernorm(x, width, w, b, eps)
        y.backward(dy)
    if dtype == torch.float64:
        row_max = x.detach().abs().amax(-1, keepdim=True)
        y_ref, dx_ref, dw_ref, db_ref = float64_norm(x / row_max, w, b, 0.0, is_rms, dy)  # eps / max^2 is 0
        dx_ref = dx_ref / row_max
        xs = x.detach() / row_max
        rstd = 1.0 / (row_max.squeeze(-1) * torch.sqrt((xs * xs).mean(-1) if is_rms else xs.var(-1, unbiased=False)))
    else:
        y_ref, dx_ref, dw_ref, db_ref = float64_norm(x, w, b, eps, is_rms, dy)
        x64 = x.detach().double()
        rstd = 1.0 / torch.sqrt(((x64 * x64).mean(-1) if is_rms else x64.var(-1, unbiased=False)) + eps)
    # one rounding of y to the dtype (test_norms.FWD_TOL)
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}[dtype]
    assert (y.double() - y_ref).abs().max().item() <= tol * 2
    # dx is rstd * O(dy * gamma): compare it on that scale, row by row (rstd is 1e-38 for the last)
    assert ((x.grad.double() - dx_ref) / rstd[:, None]).abs().max().item() <= 5 * tol
    assert (w.grad.double() - dw_ref).abs().max().item() <= 5 * tol * max(1.0, dw_ref.abs().max().item())
    if b is not None:
        torch.testing.assert_close(b.grad.double(), db_ref, rtol=1e-5, atol=1e-5)


# --- parameters made under torch.inference_mode ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODULES)
def test_parameters_made_under_inference_mode(backend, kind):
    """Inference tensors have no version counter. Like torch's norms: they work inside inference_mode
    and under no_grad, and autograd refuses to save them (torch's own error, not ours)."""
    ours_cls, theirs_cls = MODULES[kind]
    with torch.inference_mode():
        ours, theirs = ours_cls(8), theirs_cls(8)
        w, b = torch.rand(8) + 0.5, torch.rand(8)
        ours.weight.mul_(w)
        theirs.weight.mul_(w)
    fn = lo.ms_rmsnorm if kind == "rmsnorm" else lo.ms_layernorm
    args = (w,) if kind == "rmsnorm" else (w, b)
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = theirs(x)
    with ref.backend(backend):
        for mode in (torch.inference_mode, torch.no_grad):
            with mode():
                torch.testing.assert_close(ours(x), want)
                torch.testing.assert_close(fn(x, 8, *args), torch_norm(kind, x, *args))
        xg = x.clone().requires_grad_(True)
        for call in (lambda: ours(xg), lambda: fn(xg, 8, *args), lambda: ours(x)):
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                call()
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            theirs(xg)
        # torch's advice, a normal copy of the parameters, trains as usual
        trainable = ours_cls(8)
        trainable.load_state_dict(ours.state_dict())
        trainable(xg).sum().backward()
        assert torch.isfinite(trainable.weight.grad).all() and torch.isfinite(xg.grad).all()


def torch_norm(kind, x, w, b=None):
    return F.rms_norm(x, (8,), w) if kind == "rmsnorm" else F.layer_norm(x, (8,), w, b)


# --- argument checks and meta tensors -------------------------------------------------------------

@pytest.mark.parametrize("affine", ["inverse", "plain"])
def test_bad_arguments_are_refused_as_torch_refuses_them(affine):
    x = torch.randn(2, 32)
    ones = torch.ones(32)
    with pytest.raises(RuntimeError, match=r"weight of shape \[4, 8\] and normalized_shape = \[32\]"):
        F.layer_norm(x, (32,), ones.view(4, 8))  # torch: same number of elements, still refused
    with pytest.raises(ValueError, match=r"weight has shape \[4, 8\], but normalized_shape is \[32\]"):
        lo.ms_layernorm(x, 32, ones.view(4, 8), affine=affine)
    with pytest.raises(ValueError, match=r"weight has shape \[32, 1\], but normalized_shape is \[32\]"):
        lo.ms_rmsnorm(x, 32, ones.view(32, 1), affine=affine)
    with pytest.raises(ValueError, match=r"bias has shape \[4, 8\], but normalized_shape is \[32\]"):
        lo.ms_layernorm(x, 32, ones, ones.view(4, 8), affine=affine)
    for dtype in (torch.int64, torch.complex64, torch.bool):
        with pytest.raises(TypeError, match=f"weight must be float16, bfloat16, float32 or float64, got {dtype}"):
            lo.ms_layernorm(x, 32, ones.to(dtype), affine=affine)
        with pytest.raises(TypeError, match=f"bias must be float16, bfloat16, float32 or float64, got {dtype}"):
            lo.ms_layernorm(x, 32, ones, ones.to(dtype), affine=affine)
    for dtype in (torch.int32, torch.complex64, torch.uint8):
        with pytest.raises(TypeError, match=f"out_dtype must be float16, bfloat16, float32 or float64, got {dtype}"):
            lo.ms_rmsnorm(x, 32, out_dtype=dtype, affine=affine)
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64, got torch.complex64"):
        lo.ms_rmsnorm(x.to(torch.complex64), 32, affine=affine)


@pytest.mark.parametrize("affine", ["none", "inverse", "plain"])
@pytest.mark.parametrize("kind", MODULES)
def test_meta_tensors_propagate_shapes_as_torch(kind, affine):
    ours_cls, theirs_cls = MODULES[kind]
    ours = ours_cls((4, 8), affine=affine, device="meta")
    theirs = theirs_cls((4, 8), elementwise_affine=affine != "none", device="meta")
    x = torch.empty(3, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y, want = ours(x), theirs(x.float()).bfloat16()
    assert (y.shape, y.dtype, y.device) == (want.shape, want.dtype, want.device)
    y.sum().backward()
    assert (x.grad.shape, x.grad.device) == (x.shape, x.device)
    for p in ours.parameters():
        assert (p.grad.shape, p.grad.device) == (p.shape, p.device)
    fn = lo.ms_rmsnorm if kind == "rmsnorm" else lo.ms_layernorm
    assert fn(x.detach(), (4, 8), out_dtype=torch.float32).dtype == torch.float32


# --- the rule flag the affine forward kernel reports -------------------------------------------------

def _rule_reference(w: torch.Tensor, b) -> bool:
    """INVERSE_RULE evaluated element by element in numpy float32 (the kernels' and torch's precision)."""
    import numpy as np

    w32 = np.abs(w.float().numpy())
    ok = w32 >= np.float32(lo.norms.GAMMA_MIN)
    if b is not None:
        ok &= np.abs(b.float().numpy()) <= np.float32(lo.norms.BETA_RATIO) * w32
    return bool(ok.all())


_SPECIAL = [0.0, -0.0, 1e-3, -1e-3, 0.00099999, 0.0010001, 1.0, -2.0, float("nan"), float("inf"), 1e-30]


@pytest.mark.parametrize("width", [5, 64, 9000])  # odd, one block, the looped path's several blocks
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MODULES)
def test_forward_kernel_rule_flag_matches_the_rule(width, pdtype, kind):
    """The flag the affine forward kernel computes on the device (what backward reads on CUDA) against
    the rule evaluated independently, for parameters that pass, and for each way of breaking it at
    the first, a middle or the last column: |gamma| just below the bound, 0, NaN, |beta| just over
    16 |gamma|, NaN beta. The torch backend's flag and the C++ check CPU parameters get are held to the
    same reference."""
    from lowmem_ops import _norm_backends as nb

    gen = torch.Generator().manual_seed(width)
    is_rms = kind == "rmsnorm"
    x = torch.randn(3, width, generator=gen)
    cases = []
    base_w = (torch.rand(width, generator=gen) + 0.5).to(pdtype)
    base_b = None if is_rms else (torch.randn(width, generator=gen) * 0.3).to(pdtype)
    cases.append((base_w, base_b))
    for col in (0, width // 2, width - 1):
        for value in _SPECIAL:
            w = base_w.clone()
            w[col] = value
            b = None if base_b is None else base_b.clone()
            if b is not None:
                b[col] = 0.0  # gamma alone decides
            cases.append((w, b))
            if base_b is not None:
                b = base_b.clone()
                b[col] = value
                cases.append((base_w, b))
        if base_b is not None:  # |beta| exactly 16 |gamma| (passes), and just over it (breaks)
            for factor in (16.0, -16.0, 16.0 * (1 + 2 ** -6)):
                b = base_b.clone()
                b[col] = factor * float(base_w[col].float())
                cases.append((base_w, b))
    rule = (lo.norms.GAMMA_MIN, lo.norms.BETA_RATIO)
    outcomes = set()
    for w, b in cases:
        expected = _rule_reference(w, b)
        outcomes.add(expected)
        _, _, flag = nb.triton_forward(x, w, b, 1e-5, is_rms, torch.float32, interpret=True, rule=rule)
        assert flag.shape == () and flag.dtype == torch.int32
        assert bool(flag) == expected, (w, b)
        assert bool(nb.inverse_rule_holds(w, b, *rule)) == expected
        with ref.backend("cpp"):
            assert lo.norms.inverse_is_safe(w, b) == expected, (w, b)
    assert outcomes == {True, False}  # both verdicts were exercised
