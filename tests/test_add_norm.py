"""Dropout + residual add + memory-sharing norm (lowmem_ops.add_norm): values and gradients against a
float64 autograd reference of norm(dropout(x) + residual) with the same mask, both backends alike,
what autograd saves (y, 4 bytes per row, the seed), the custom op's registrations, the kernels'
ahead-of-time compile, and the errors."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import norms
from lowmem_ops.dropout import keep_mask

from . import reference as ref

BACKENDS = ("torch", "triton-interpret")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the test tolerances on dx / dgamma relative to the gradient's scale (recovering x_hat from a rounded y)
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _reference(x, residual, weight, bias, keep, p, eps, is_rms, dtype):
    """norm(dropout(x) + residual) in float64 from torch's autograd, the dropout rounded to x's dtype
    as `F.dropout(x) + residual` rounds it."""
    dropped = torch.where(keep, (x.to(torch.float32) * torch.tensor(1 / (1 - p), dtype=torch.float32)).to(dtype), 0.0)
    h = dropped.double() + residual.double()
    n = x.shape[-1]
    if is_rms:
        y = F.rms_norm(h, (n,), weight, eps)
    else:
        y = F.layer_norm(h, (n,), weight, bias, eps)
    return y, h


def _leaves(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    r = (3 * torch.randn(shape, generator=g) + 1).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_() if affine else None
    b = (0.3 * torch.randn(shape[-1], generator=g)).requires_grad_() if affine else None
    return x, r, w, b


def _close(got, want, tol):
    scale = want.abs().max().item() + 1e-12
    assert (got.double() - want).abs().max().item() <= tol * scale, (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("affine", [False, True])
def test_matches_float64_autograd_reference(backend, dtype, is_rms, p, affine):
    dtype = DTYPES[dtype]
    x, r, w, b = _leaves((3, 5, 24), dtype, affine)
    eps, seed, offset = 1e-5, 1234, 7
    with ref.backend(backend):
        if is_rms:
            y, h = lo.add_ms_rmsnorm(x, r, w, eps, p=p, seed=seed, offset=offset)
        else:
            y, h = lo.add_ms_layernorm(x, r, w, b, eps, p=p, seed=seed, offset=offset)
        dy, dh = torch.randn_like(y), torch.randn_like(h)
        torch.autograd.backward((y, h), (dy, dh))
    keep = keep_mask(x.shape, seed, offset, p)
    assert keep.float().mean() < 1 if p else keep.all()
    params = [t for t in (w, None if is_rms else b) if t is not None]
    twins = [t.detach().double().requires_grad_() for t in (x, r, *params)]
    want_y, want_h = _reference(twins[0], twins[1], twins[2] if affine else None,
                                twins[3] if affine and not is_rms else None, keep, p, eps, is_rms, dtype)
    torch.autograd.backward((want_y, want_h), (dy.double(), dh.double()))
    assert h.dtype == dtype and y.dtype == dtype
    if backend == "triton-interpret" and dtype == torch.bfloat16:
        # Triton's interpreter truncates float32 -> bfloat16 (the compiled kernel rounds to nearest,
        # cvt.rn: test_cuda_kernels_compile_ahead_of_time): an ulp apart at most in each of its roundings
        bound = 2 ** -7 * (want_h.abs() + x.detach().double().abs() / (1 - p))
        assert ((h.double() - want_h).abs() <= bound).all()
    else:
        assert torch.equal(h, want_h.to(dtype))  # the new residual is the reference's, rounded once
    # y = norm(new_residual): of the op's own new residual (the interpreter's bf16 one is truncated)
    with torch.no_grad():
        own = [t.double() if t is not None else None for t in (h, *twins[2:], None, None)]
        norm_of_h = _reference(torch.zeros_like(own[0]), own[0], own[1] if affine else None,
                               own[2] if affine and not is_rms else None, keep, p, eps, is_rms, dtype)[0]
    _close(y, norm_of_h, TOL[dtype] / 4)
    for got, twin in zip((x, r, *params), twins):
        _close(got.grad, twin.grad, TOL[dtype])


def test_backends_draw_the_same_mask_as_dropout():
    x, r, w, b = _leaves((4, 40), torch.float32, True)
    outs = {}
    for backend in BACKENDS:
        with ref.backend(backend):
            y, h = lo.add_ms_layernorm(x, r, w, b, p=0.5, seed=99, offset=3)
            y.backward(torch.ones_like(y))
            outs[backend] = (y.detach(), h.detach(), x.grad.clone())
            x.grad = None
    (y0, h0, g0), (y1, h1, g1) = outs.values()
    assert torch.equal(h0, h1) and torch.equal(g0 == 0, g1 == 0)
    torch.testing.assert_close(y0, y1, rtol=1e-6, atol=1e-6)
    dropped = lo.dropout(x.detach(), 0.5, seed=99, offset=3)
    assert torch.equal(h0, dropped + r.detach())
    assert torch.equal(g0 == 0, dropped == 0)  # dx is zero exactly where the mask dropped


def test_seed_follows_torch_manual_seed():
    x, r, _, _ = _leaves((4, 32), torch.float32, False)
    torch.manual_seed(3)
    _, a = lo.add_ms_layernorm(x, r, p=0.5)
    torch.manual_seed(3)
    _, b = lo.add_ms_layernorm(x, r, p=0.5)
    _, c = lo.add_ms_layernorm(x, r, p=0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows_take_the_two_kernel_path(backend):
    """Rows wider than the fused kernel holds: dropout + add, then the MS norm's looping kernel."""
    from lowmem_ops import _tree
    tree = _tree.builtin_tree()
    n = _tree.kernel_module_file(tree, _tree.lowest_arch(tree), "add_norm", False).MAX_COLS + 3
    x, r, w, b = _leaves((2, n), torch.float32, True)
    with ref.backend(backend):
        y, h = lo.add_ms_layernorm(x, r, w, b, p=0.1, seed=5)
        y.backward(torch.ones_like(y))
    keep = keep_mask(x.shape, 5, 0, 0.1)
    twins = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    want_y, want_h = _reference(*twins, keep, 0.1, 1e-5, False, torch.float32)
    want_y.backward(torch.ones_like(want_y))
    assert torch.equal(h, want_h.float())
    _close(y, want_y, 1e-5)
    for got, twin in zip((x, r, w, b), twins):
        _close(got.grad, twin.grad, TOL[torch.float32])


def _saved(fn, *args, modules=()):
    """What autograd saves during fn(*args), through lo.memory (dedup by storage; the parameters of
    `modules`, which fn uses, excluded as the meter excludes a model's own)."""
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.held = torch.nn.ModuleList(modules)

        def forward(self, *a):
            return fn(*a)
    return lo.memory.measure(Wrap(), *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_y_four_bytes_per_row_and_the_seed(backend, p):
    rows, d = 48, 64
    norm = lo.nn.AddMSLayerNorm(d, p=p)
    x, r, _, _ = _leaves((rows, d), torch.float32, False)
    with ref.backend(backend):
        m = _saved(norm, x, r, modules=[norm])
        y, _ = norm(x, r)
    sizes = sorted(s.nbytes for s in m.storages.values())
    want = sorted([rows * d * 4, rows * 4] + ([8] if p else []))  # y, rstd (float32 per row), the int64 seed
    assert sizes == want
    assert [s.shape for s in m.storages.values() if s.nbytes == rows * d * 4] == [tuple(y.shape)]
    # torch's dropout + add + LayerNorm keeps a mask and the LayerNorm's input, each of x's size
    base = torch.nn.LayerNorm(d)
    torchs = _saved(lambda a, b: base(F.dropout(a, p) + b), x, r, modules=[base])
    assert torchs.total_bytes >= (1 + (p > 0)) * rows * d * 4


def test_y_is_shared_with_the_next_linear():
    d = 32
    norm, lin = lo.nn.AddMSLayerNorm(d, p=0.1), torch.nn.Linear(d, d)
    x, r, _, _ = _leaves((16, d), torch.float32, False)
    m = _saved(lambda a, b: lin(norm(a, b)[0]), x, r, modules=[norm, lin])
    assert m.total_bytes == 16 * d * 4 + 16 * 4 + 8  # one copy of y for both


@pytest.mark.parametrize("backend", BACKENDS)
def test_p0_and_eval_are_plain_add_and_norm(backend):
    x, r, w, b = _leaves((6, 20), torch.float32, True)
    want = F.layer_norm(x + r, (20,), w, b, 1e-5)
    with ref.backend(backend):
        for p, training in ((0.0, True), (0.4, False)):
            y, h = lo.add_ms_layernorm(x, r, w, b, p=p, training=training)
            assert torch.equal(h, x + r)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        norm = lo.nn.AddMSRMSNorm(20, eps=1e-6, p=0.4).eval()
        y, h = norm(x, r)
        torch.testing.assert_close(y, F.rms_norm(x + r, (20,), norm.weight, 1e-6), rtol=1e-5, atol=1e-5)
        m = _saved(norm, x, r, modules=[norm])
        assert sorted(s.nbytes for s in m.storages.values()) == [6 * 4, 6 * 20 * 4]  # no seed


def test_mixed_dtypes_promote_like_the_add():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 16, requires_grad=True)
    y, h = lo.add_ms_layernorm(x, r, p=0.2, seed=1)
    assert h.dtype == y.dtype == torch.float32
    assert torch.equal(h, lo.dropout(x.detach(), 0.2, seed=1) + r.detach())
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_inverse_rule_saves_the_new_residual_instead(backend):
    x, r, w, b = _leaves((5, 12), torch.float32, True)
    with torch.no_grad():
        w[3] = 0.0  # gamma 0 cannot be inverted
    norms._warned_fallback.discard(id(w))  # warned once per parameter: this w may reuse a freed one's id
    with ref.backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, h = lo.add_ms_layernorm(x, r, w, b, p=0.3, seed=8)
        y.backward(torch.ones_like(y))
    assert any("inverse-mode rule" in str(c.message) for c in caught)
    keep = keep_mask(x.shape, 8, 0, 0.3)
    twins = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    want_y, _ = _reference(*twins, keep, 0.3, 1e-5, False, torch.float32)
    want_y.backward(torch.ones_like(want_y))
    _close(y, want_y, 1e-5)
    for got, twin in zip((x, r, w, b), twins):
        _close(got.grad, twin.grad, 1e-4)


def test_data_write_under_a_cached_verdict_is_refused_in_backward():
    """On CUDA the rule's verdict is cached per parameter version and the kernel re-checks it per call
    (its flag); CPU parameters are checked per call, so that path is forced here."""
    from lowmem_ops import norms
    x, r, w, b = _leaves((4, 8), torch.float32, True)
    old = norms._reads_for_free
    norms._reads_for_free = lambda weight: False
    try:
        for backend in BACKENDS:
            with ref.backend(backend):
                lo.add_ms_layernorm(x, r, w, b, p=0.2)  # the verdict is cached for this version of w
                w.data[2] = 0.0  # bypasses the version counter
                y, _ = lo.add_ms_layernorm(x, r, w, b, p=0.2)
                with pytest.raises(RuntimeError, match="changed through .data"):
                    y.sum().backward()
                w.data[2] = 1.0
                w._lowmem_inverse_rule = None
    finally:
        norms._reads_for_free = old


LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.transpose(0, 1),
    "strided": lambda t: t[:, ::2],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_passes_opcheck(backend, dtype, layout):
    dtype = DTYPES[dtype]
    make = LAYOUTS[layout]
    base = (4, 6, 16) if layout != "strided" else (4, 12, 16)
    g = torch.Generator().manual_seed(1)
    x = make(torch.randn(base, generator=g).to(dtype)).requires_grad_()
    r = make(torch.randn(base, generator=g).to(dtype)).requires_grad_()
    w = (torch.rand(16, generator=g) + 0.5).requires_grad_()
    b = torch.randn(16, generator=g).mul(0.1).requires_grad_()
    seed = torch.tensor(42)
    with ref.backend(backend):
        for args in ((x, r, w, b, seed, 5, 0.25, 1e-5, False, None, True),
                     (x, r, None, None, None, 0, 0.0, 1e-6, True, torch.float32, False)):
            torch.library.opcheck(torch.ops.lowmem_ops.add_ms_norm_fwd.default, args)


def test_compiled_call_matches_eager():
    x, r, w, b = _leaves((4, 16), torch.float32, True)
    f = lambda a, c: lo.add_ms_layernorm(a, c, w, b, p=0.2, seed=9, affine="inverse")  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (y0, h0), (y1, h1) = f(x, r), compiled(x, r)
    assert torch.equal(h0, h1)
    torch.testing.assert_close(y0, y1)


def test_bad_input_says_what():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x has shape \[4, 8\] but residual has shape \[4, 9\]"):
        lo.add_ms_layernorm(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        lo.add_ms_layernorm(x, x, p=1.0)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            lo.add_ms_rmsnorm(x, x, p=p)
    with pytest.raises(ValueError, match=r"weight has shape \[7\], but normalized_shape is \[8\]"):
        lo.add_ms_layernorm(x, x, torch.ones(7))
    with pytest.raises(ValueError, match=r"bias has shape \[4\]"):
        lo.add_ms_layernorm(x, x, torch.ones(8), torch.zeros(4))
    with pytest.raises(TypeError, match="residual must be float16, bfloat16, float32 or float64"):
        lo.add_ms_layernorm(x, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="affine must be 'inverse' or 'plain'"):
        lo.add_ms_layernorm(x, x, affine="none")
    with pytest.raises(ValueError, match="normalized_shape must have one element"):
        lo.nn.AddMSLayerNorm((2, 4))
    with pytest.raises(ValueError, match=r"input of shape \(4, 0\) cannot be normalised"):
        lo.add_ms_layernorm(torch.randn(4, 0), torch.randn(4, 0))


def test_modules_keep_layernorm_state_dict_and_repr():
    norm = lo.nn.AddMSLayerNorm(8, eps=1e-12, p=0.1)
    assert set(norm.state_dict()) == set(torch.nn.LayerNorm(8).state_dict()) and "p=0.1" in repr(norm)
    assert set(lo.nn.AddMSRMSNorm(8).state_dict()) == set(torch.nn.RMSNorm(8).state_dict())
    x = torch.randn(3, 8)
    assert lo.add_ms_layernorm(torch.randn(3, 8, device="meta"), torch.randn(3, 8, device="meta"), p=0.5)[0].is_meta
    assert lo.nn.AddMSLayerNorm(8)(x, x)[0].shape == (3, 8)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_kernels_compile_ahead_of_time(arch, dtype):
    """The kernels CUDA tensors run compile for sm80 / sm90 without a GPU (after an interpreted run,
    which must leave triton.language as it found it)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowmem_ops import _configs, _tree

    tree = _tree.builtin_tree()
    k = _tree.kernel_module_file(tree, f"sm{arch}", "add_norm", False)
    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    fused_cfg = _configs.lookup(tree, f"sm{arch}", "ADD_NORM", ("forward", name), (1000,))
    wide_cfg = _configs.lookup(tree, f"sm{arch}", "ADD_NORM", ("dropout_add", name), (k.MAX_COLS + 1,))
    with ref.backend("triton-interpret"):
        lo.add_ms_layernorm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), torch.zeros(8), p=0.5, seed=1)
    pointers = {name: f"*{dtype}" for name in ("x_ptr", "r_ptr", "h_ptr", "y_ptr", "w_ptr", "b_ptr")}
    signature = {**pointers, "rstd_ptr": "*fp32", "ok_ptr": "*i32", "seed_ptr": "*i64", "offset": "i64",
                 "n_cols": "i32", "eps": "fp32", "threshold": "fp32", "scale": "fp32", "gamma_min": "fp32",
                 "beta_ratio": "fp32", "DROPOUT": "constexpr", "IS_RMS": "constexpr", "AFFINE": "constexpr",
                 "HAS_BIAS": "constexpr", "BLOCK_C": "constexpr"}
    signature = {name: signature[name] for name in k.add_norm_forward_kernel.arg_names}
    constexprs = {"DROPOUT": True, "IS_RMS": False, "AFFINE": True, "HAS_BIAS": True, "BLOCK_C": fused_cfg["BLOCK_C"]}
    assert fused_cfg["BLOCK_C"] == 1024  # the baked config of a row of 1000 columns
    target = GPUTarget("cuda", arch, 32)
    fused = triton.compile(ASTSource(fn=k.add_norm_forward_kernel, signature=signature, constexprs=constexprs),
                           target=target, options={"num_warps": fused_cfg["num_warps"]})
    ptx = fused.asm["ptx"]
    assert ptx.count("mul.hi.u32") >= 20 and "sqrt.rn.f32" in ptx
    if dtype == "bf16":
        assert "cvt.rn.bf16.f32" in ptx  # h and y rounded to nearest (the interpreter truncates)
    flat = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "seed_ptr": "*i64", "offset": "i64",
            "n_elements": "i64", "threshold": "fp32", "scale": "fp32", "DROPOUT": "constexpr", "BLOCK": "constexpr"}
    wide = triton.compile(ASTSource(fn=k.dropout_add_kernel, signature=flat, constexprs={"DROPOUT": True,
                                                                                          "BLOCK": wide_cfg["BLOCK"]}),
                          target=target, options={"num_warps": wide_cfg["num_warps"]})
    assert wide.asm["ptx"].count("mul.hi.u32") >= 20
    assert math.isfinite(fused.metadata.shared)
