"""Memory layout never changes a result: every op family, given its inputs as views in any layout
(halves of a fused projection, stride 2, transposed, broadcast with stride 0, offset slices), gives on
the Triton path (the interpreter) the forward and every gradient that the torch path gives (the C++
CPU path of the activations: their gradients bit for bit; of the gated ops: the approximate d_gate bit
for bit), and the torch and C++ paths agree with the independent float64 references.

Inputs that need gradients are views of a leaf, as in a model (`gate, up = proj(x).chunk(2, -1)`), so
each gradient is checked both where the op returns it (the view) and where autograd accumulates it
(the leaf)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_ops as lo

from . import reference as ref
from .test_gated import TOL as GATED_TOL
from .test_gated import close
from .test_norms import BWD_TOL, FWD_TOL, cancellation_floor, rstd_max
from .test_norms import reference as norm_reference

LAYOUTS = ("contiguous", "chunked", "interleaved", "transposed", "expanded", "offset")
DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("torch", "triton-interpret")
EXAMPLES = 6  # per parametrised case; the interpreter is slow, the cases cover the layouts one by one

layout = st.tuples(st.sampled_from(LAYOUTS), st.integers(0, 1))  # (layout, which half / which axis)
shapes = st.tuples(st.integers(1, 3), st.integers(1, 11))  # (rows, cols): odd sizes cross code bytes


def leaf_shape(kind: str, k: int, rows: int, cols: int) -> tuple[int, int]:
    """The shape of the tensor that the (rows, cols) view of this layout is taken from."""
    return {"contiguous": (rows, cols), "chunked": (rows, 2 * cols), "interleaved": (rows, 2 * cols),
            "transposed": (cols, rows), "expanded": (1, cols) if k == 0 else (rows, 1),
            "offset": (rows + 1, cols + 2)}[kind]


def view(leaf: torch.Tensor, kind: str, k: int, rows: int, cols: int) -> torch.Tensor:
    """The (rows, cols) view of `leaf` in this layout."""
    if kind == "chunked":
        return leaf.chunk(2, dim=-1)[k]
    if kind == "interleaved":
        return leaf[:, k::2]
    if kind == "transposed":
        return leaf.t()
    if kind == "expanded":
        return leaf.expand(rows, cols)
    if kind == "offset":
        return leaf[1:, 2:]
    return leaf


class Input:
    """A (rows, cols) input in a layout: the same leaf values for every backend, a fresh leaf each run."""

    def __init__(self, lay, rows, cols, dtype, gen, scale=1.0, shift=0.0, sign=False):
        self.lay, self.rows, self.cols = lay, rows, cols
        values = torch.randn(leaf_shape(*lay, rows, cols), generator=gen, dtype=torch.float64) * scale + shift
        if sign:  # norm weights: |gamma| in [0.5, 2] either sign, inside inverse mode's rule
            values = torch.where(torch.rand(values.shape, generator=gen) < 0.5, -1.0, 1.0) * (0.5 + values.abs() % 1.5)
        self.values = values.to(dtype)

    def make(self, requires_grad: bool):
        leaf = self.values.clone().requires_grad_(requires_grad)
        v = view(leaf, *self.lay, self.rows, self.cols)
        assert v.shape == (self.rows, self.cols)
        if requires_grad:
            v.retain_grad()
        return leaf, v


def path_rtol(dtype):
    return ref.ulp(dtype) if dtype == torch.bfloat16 else 1e-5


def same(got, want, dtype, what, atol=1e-6, roundings=1):
    """Triton path == torch path. float32: to 1e-5, a few roundings (exp/erf/tanh come from numpy in the
    interpreter, from torch in the torch path, and h' = d/dx gelu_tanh cancels); a layout bug is off by
    O(1). bfloat16: within one ulp per rounding to bfloat16 on the way (the interpreter rounds float32
    -> bfloat16 toward zero, torch to nearest)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    rtol = roundings * path_rtol(dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def same_sum(got, want, dtype, what):
    """A leaf's gradient: torch sums the view's gradients into it (up to 11 terms for a broadcast
    input), each term as close as `same` allows, so the sum is close relative to its largest term."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=2 * path_rtol(dtype), atol=8 * path_rtol(dtype) * scale,
                               msg=lambda m: f"{what}: {m}")


def run_both(fn):
    return {b: fn(b) for b in BACKENDS}


# --- approximate activations ------------------------------------------------------------------------

ACTIVATIONS = ["regelu2", "resilu2", "regelu1", "resilu3", "regelu4", "tanh_gelu2", "mish2"]


@pytest.mark.parametrize("kind", LAYOUTS)
@settings(max_examples=EXAMPLES)
@given(name=st.sampled_from(ACTIVATIONS), k=st.integers(0, 1), shape=shapes, dy_lay=layout,
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_activation_layouts(kind, name, k, shape, dy_lay, dtype, seed):
    rows, cols = shape
    gen = torch.Generator().manual_seed(seed)
    x_in = Input((kind, k), rows, cols, dtype, gen, scale=3.0)  # reaches every threshold
    dy_in = Input(dy_lay, rows, cols, dtype, gen)

    def run(backend):
        leaf, x = x_in.make(True)
        _, dy = dy_in.make(False)
        with ref.backend(backend):
            y = lo.approx_activation(x, name)
            y.backward(dy)
        return x.detach(), dy, y.detach(), x.grad, leaf.grad

    out = run_both(run)
    cpp = run("cpp")  # the C++ CPU kernels: the torch path's gradients bit for bit; y from torch's own
    for i, what in ((3, "dx"), (4, "leaf grad")):  # function, in bf16 maybe its bf16 kernel (one rounding)
        assert torch.equal(cpp[i], out["torch"][i]), f"{name} {kind} {what}: cpp differs from torch"
    same(cpp[2], out["torch"][2], dtype, f"{name} {kind} y (cpp)", atol=4e-6)
    for i, what in ((2, "y"), (3, "dx")):
        same(out["triton-interpret"][i], out["torch"][i], dtype, f"{name} {kind} {what}", atol=4e-6)
    same_sum(out["triton-interpret"][4], out["torch"][4], dtype, f"{name} {kind} leaf grad")
    x, dy, y, dx, _ = out["torch"]
    torch.testing.assert_close(y.double(), ref.forward(name, x), rtol=ref.ulp(dtype), atol=4e-6)
    torch.testing.assert_close(dx.double(), ref.grad(name, x, dy), rtol=ref.ulp(dtype), atol=0)


# --- fused gated activations ------------------------------------------------------------------------

GATED = {  # op -> (our function, torch's exact activation)
    "resilu2": (lambda g, u, mode: lo.swiglu(g, u, mode), F.silu),
    "regelu2": (lambda g, u, mode: lo.geglu(g, u, mode=mode), F.gelu),
    "tanh_gelu2": (lambda g, u, mode: lo.geglu(g, u, "tanh", mode), lambda x: F.gelu(x, approximate="tanh")),
}
NEEDS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("kind", LAYOUTS + ("fused",))  # fused: gate and up are the halves of one leaf
@settings(max_examples=EXAMPLES)
@given(name=st.sampled_from(sorted(GATED)), mode=st.sampled_from(["exact", "approx"]), needs=st.sampled_from(NEEDS),
       k=st.integers(0, 1), up_lay=layout, dy_lay=layout, shape=shapes, dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_gated_layouts(kind, name, mode, needs, k, up_lay, dy_lay, shape, dtype, seed):
    rows, cols = shape
    need_gate, need_up = needs
    fn, act = GATED[name]
    gen = torch.Generator().manual_seed(seed)
    fused = kind == "fused"
    g_in = Input(("chunked", 0) if fused else (kind, k), rows, cols, dtype, gen, scale=3.0)
    u_in = Input(up_lay, rows, cols, dtype, gen)
    dy_in = Input(dy_lay, rows, cols, dtype, gen)

    def run(backend):
        if fused:
            g_leaf = u_leaf = g_in.values.clone().requires_grad_(need_gate or need_up)
            g, u = g_leaf.chunk(2, dim=-1)
            g, u = (g if need_gate else g.detach()), (u if need_up else u.detach())
            for t in (g, u):
                if t.requires_grad:
                    t.retain_grad()
        else:
            g_leaf, g = g_in.make(need_gate)
            u_leaf, u = u_in.make(need_up)
        _, dy = dy_in.make(False)
        with ref.backend(backend):
            out = fn(g, u, mode)
            if need_gate or need_up:
                out.backward(dy)
        return (g.detach(), u.detach(), dy, out.detach(), g.grad, u.grad,
                g_leaf.grad if need_gate else None, u_leaf.grad if need_up else None)

    res = run_both(run)
    res["cpp"] = run("cpp")  # the C++ CPU kernels: checked below against float64 like the torch path
    for i, what in ((3, "out"), (4, "dgate"), (5, "dup"), (6, "gate leaf grad"), (7, "up leaf grad")):
        got, want = res["triton-interpret"][i], res["torch"][i]
        assert (got is None) == (want is None), what
        if want is not None:
            what = f"{name} {mode} {kind} needs={needs} {what}"
            if "leaf" in what:
                same_sum(got, want, dtype, what)
            else:  # approx mode's d_up = dy * h(gate) reads h as stored: rounded to the dtype once before
                # The two paths' erf/exp differ by an ulp of the terms of h (of size |gate|, as GELU's
                # 0.5 x (1 + erf) cancels), which the product scales by |up| or |dy|: atol on that scale.
                g, u, dy = res["torch"][:3]
                mag = max(1.0, g.abs().max().item() * max(u.abs().max().item(), dy.abs().max().item())) if g.numel() else 1.0
                same(got, want, dtype, what, atol=1e-6 * mag, roundings=2 if mode == "approx" and i == 5 else 1)
    # Against float64 torch: exact forward; exact gradients, or the step derivative in approx mode.
    g, u, dy = res["torch"][:3]
    g64, u64, dy64 = g.double().requires_grad_(True), u.double().requires_grad_(True), dy.double()
    want_out = act(g64) * u64
    want_out.backward(dy64)
    tol = GATED_TOL[dtype]
    for backend in ("torch", "cpp"):
        out, dg, du = res[backend][3:6]
        close(out, want_out.detach(), tol, g64.detach().abs() * u64.detach().abs(), 0.0)
        if need_up:
            close(du, u64.grad, 2 * tol, g64.detach().abs() * dy64.abs(), 0.0)
        if need_gate:
            want = g64.grad if mode == "exact" else (
                dy64 * u64.detach() * torch.from_numpy(ref.levels_f64(name)[ref.codes(name, g)]).view(g.shape))
            close(dg, want, 2 * tol, (dy64 * u64.detach()).abs(), 0.0)
    if mode == "approx" and need_gate:  # d_gate from the codes: the torch path's bit for bit
        assert torch.equal(res["cpp"][4], res["torch"][4]), f"{name} {kind} dgate: cpp differs from torch"


# --- memory-sharing norms ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYOUTS)
@settings(max_examples=EXAMPLES)
@given(is_rms=st.booleans(), params=st.sampled_from(["none", "weight", "weight+bias"]), k=st.integers(0, 1),
       w_lay=layout, b_lay=layout, dy_lay=layout, shape=shapes, dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_norm_layouts(kind, is_rms, params, k, w_lay, b_lay, dy_lay, shape, dtype, seed):
    rows, cols = shape
    if is_rms and params == "weight+bias":
        params = "weight"  # RMSNorm has no bias
    gen = torch.Generator().manual_seed(seed)
    x_in = Input((kind, k), rows, cols, dtype, gen, scale=2.0, shift=0.5)
    # Parameters are 1-D: the first row of a (1, cols) view in their own layout.
    w_in = Input(w_lay, 1, cols, dtype, gen, sign=True) if params != "none" else None
    b_in = Input(b_lay, 1, cols, dtype, gen) if params == "weight+bias" else None
    dy_in = Input(dy_lay, rows, cols, dtype, gen)
    eps = 1e-5

    def run(backend):
        x_leaf, x = x_in.make(True)
        leaves, params = [x_leaf], []
        for p_in in (w_in, b_in):
            if p_in is not None:
                leaf, p = p_in.make(True)
                p = p[0]  # 1-D, still a view of the leaf
                p.retain_grad()
                leaves.append(leaf)
                params.append(p)
        w, b = params + [None] * (2 - len(params))
        _, dy = dy_in.make(False)
        with ref.backend(backend):
            y = lo.ms_rmsnorm(x, cols, w, eps) if is_rms else lo.ms_layernorm(x, cols, w, b, eps)
            y.backward(dy)
        grads = [x.grad] + [p.grad for p in params] + [t.grad for t in leaves]
        return x.detach(), w, b, dy, y.detach(), grads

    res = run_both(run)
    res["cpp"] = run("cpp")  # the C++ CPU kernels: against float64 below, like the torch path
    x, w, b, dy, y, grads = res["torch"]
    floor = cancellation_floor(x, eps, is_rms, dy)
    same(res["triton-interpret"][4], y, dtype, f"norm {kind} y", atol=1e-5 + floor)
    # dx is rstd * (a combination of dy * w and x_hat): its errors lie on that scale, which can exceed
    # |dx| itself (with 2 columns LayerNorm's dx is 0 up to rounding).
    w_max = w.detach().abs().max().item() if w is not None else 1.0
    dx_scale = max(1.0, rstd_max(x.reshape(-1, cols), eps, is_rms) * dy.double().abs().max().item() * w_max)
    # The backward reads y, which itself may differ by a bfloat16 ulp between the paths.
    tol = 4 * path_rtol(dtype)
    n_params = (w is not None) + (b is not None)
    # dgamma_j = sum over rows of dy * x_hat, dbeta_j of dy: the paths' y (so x_hat) may differ by an ulp,
    # an error on the scale of the terms, which can cancel to a far smaller sum
    param_scale = [max(1.0, t.abs().sum(dim=0).max().item())
                   for t in (dy.double().reshape(-1, cols) * _x_hat(x, cols, eps, is_rms), dy.double().reshape(-1, cols))]
    for i, (got, want) in enumerate(zip(res["triton-interpret"][5], grads)):
        assert got.shape == want.shape and got.dtype == want.dtype
        # x's leaf sums up to `rows` rows of dx when x is broadcast
        param = i - 1 if i < 1 + n_params else i - 2 - n_params  # 0: weight, 1: bias
        scale = rows * dx_scale if i in (0, 1 + n_params) else param_scale[param]
        within(got, want.double(), tol * scale + floor, f"norm {kind} {params} gradient {i}")
    want_y, want_dx, want_dw, want_db = norm_reference(x, (cols,), w, b, eps, is_rms, dy)
    for backend in ("torch", "cpp"):
        y, grads = res[backend][4], res[backend][5]
        within(y, want_y, FWD_TOL[dtype] * max(1.0, want_y.abs().max().item()) + floor, f"{backend} y vs float64")
        within(grads[0], want_dx, BWD_TOL[dtype] * dx_scale + floor, f"{backend} dx vs float64")
        for got, want, what in zip(grads[1:1 + n_params], (want_dw, want_db), ("dw", "db")):
            within(got, want, BWD_TOL[dtype] * max(1.0, want.abs().max().item()) + floor, f"{backend} {what} vs float64")


def _x_hat(x, cols, eps, is_rms):
    """The normalised input in float64: (x - mean) * rstd, or x * rstd for RMSNorm."""
    x64 = x.detach().double().reshape(-1, cols)
    xc = x64 if is_rms else x64 - x64.mean(dim=-1, keepdim=True)
    return xc / torch.sqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)


def within(got, want, bound, what):
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# --- the mechanism, and the custom ops themselves ---------------------------------------------------

def test_kernels_never_get_a_strided_view():
    """launch() is the one door to the kernels: a strided tensor there is refused, never indexed flat."""
    from lowmem_ops._tree import builtin_tree, kernel_module, lowest_arch
    from lowmem_ops._triton_backend import dense, launch

    module = kernel_module("regelu2", lowest_arch(builtin_tree()), interpret=True)
    x = torch.randn(8, 4).t()
    y = torch.empty(4, 8)
    with pytest.raises(RuntimeError, match=r"x_ptr of forward_kernel is a strided view \(shape \(4, 8\), strides \(1, 4\)\)"):
        launch(module.forward_kernel, (1,), x, y, torch.zeros(16, dtype=torch.uint8), x.numel(), WRITE_CODES=False,
               BLOCK_BYTES=64)
    assert dense(x).is_contiguous() and torch.equal(dense(x), x)
    c = torch.randn(3, 3)
    assert dense(c) is c  # no copy of what is already dense


@pytest.mark.parametrize("backend", BACKENDS + ("cpp",))
@pytest.mark.parametrize("is_rms", [False, True])
def test_empty_batch_through_affine_norm(backend, is_rms):
    """0 rows: y is empty and the parameter gradients are zeros, each its own tensor."""
    x = torch.randn(0, 3, 8, requires_grad=True)
    w = (torch.rand(8) + 0.5).requires_grad_(True)
    b = None if is_rms else torch.randn(8).requires_grad_(True)
    with ref.backend(backend):
        y = lo.ms_rmsnorm(x, 8, w) if is_rms else lo.ms_layernorm(x, 8, w, b)
        y.sum().backward()
    assert y.shape == (0, 3, 8) and x.grad.shape == (0, 3, 8)
    assert torch.equal(w.grad, torch.zeros(8))
    if b is not None:
        assert torch.equal(b.grad, torch.zeros(8))


@pytest.mark.parametrize("backend", BACKENDS + ("cpp",))
@pytest.mark.parametrize("rows", [0, 3])
def test_norm_ops_pass_opcheck(backend, rows):
    x = torch.randn(rows, 8, requires_grad=True)
    w = (torch.rand(8) + 0.5).requires_grad_(True)
    b = torch.randn(8, requires_grad=True)
    with ref.backend(backend):
        torch.library.opcheck(torch.ops.lowmem_ops.ms_norm_fwd.default, (x, w, b, 8, 1e-5, False, None))
        torch.library.opcheck(torch.ops.lowmem_ops.ms_norm_fwd.default, (x, w, b, 8, 1e-5, False, None, True))
        y, rstd, _ = torch.ops.lowmem_ops.ms_norm_fwd(x.detach(), w.detach(), b.detach(), 8, 1e-5, False, None)
        torch.library.opcheck(torch.ops.lowmem_ops.ms_norm_bwd.default,
                              (torch.randn(rows, 8), y, rstd, w.detach(), b.detach(), 8, False, torch.float32))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_gated_ops_pass_opcheck_on_views(kind):
    """The custom ops themselves (schema, fake tensors, autograd registration) on strided inputs."""
    gen = torch.Generator().manual_seed(0)
    g = view(torch.randn(leaf_shape(kind, 1, 2, 5), generator=gen, requires_grad=True), kind, 1, 2, 5)
    u = view(torch.randn(leaf_shape(kind, 0, 2, 5), generator=gen, requires_grad=True), kind, 0, 2, 5)
    for backend in ("triton-interpret", "cpp"):
        with ref.backend(backend):
            for approx in (False, True):
                torch.library.opcheck(torch.ops.lowmem_ops.gated_fwd.default, (g, u, "resilu2", approx, True, True))
                _, h, codes = torch.ops.lowmem_ops.gated_fwd(g, u, "resilu2", approx, True, True)
                saved = (None, u, h, codes) if approx else (g, u, None, None)
                saved = tuple(t.detach() if t is not None else None for t in saved)
                torch.library.opcheck(torch.ops.lowmem_ops.gated_bwd.default,
                                      (torch.randn(2, 5), *saved, "resilu2", approx, True, True))
            torch.library.opcheck(torch.ops.lowmem_ops.approx_act_fwd.default, (g, "regelu3", True))
