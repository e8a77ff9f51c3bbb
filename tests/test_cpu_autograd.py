"""The C++ autograd ops of the memory-sharing norms and the approximate activations
(templates/cpu_autograd.cpp.j2), which plain eager calls on CPU tensors take, against the Python routes
(_MSNorm, _ApproxActivation and _Gated around the same kernels, which torch.func, forward-mode AD and the other
backends take): the same outputs and gradients bit for bit, the same gradients present, the same tensors
saved, over ops, dtypes, layouts, shapes and which parameters are trained."""

import pytest
import torch

import lowmem_ops as lo
import importlib

from lowmem_ops import _cpp_norms, activations, norms

from . import reference as ref

gated = importlib.import_module("lowmem_ops.gated")  # the module (lowmem_ops.gated is also a function)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def contents(t: torch.Tensor) -> tuple:
    """A saved tensor's shape, dtype and bytes."""
    flat = t.detach().clone(memory_format=torch.contiguous_format).reshape(-1)  # fresh strides, even of size-1 dims
    return tuple(t.shape), t.dtype, bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""


def node_name(fn) -> str:
    """The grad_fn's name: a C++ node's (which names its Function), or a Python Function's class name
    (whose ctx attributes may shadow .name)."""
    return fn.name() if type(fn).__name__ == "CppFunction" else type(fn).__name__


@pytest.fixture(autouse=True)
def cpp_backend():
    if _cpp_norms.autograd_op() is None:
        pytest.skip("no C++ kernels on this machine")
    with ref.backend("cpp"):
        yield


def run(route, x, shape, w, b, is_rms, dy, out_dtype=None):
    """(y, grads of x/w/b or None, saved tensors, grad_fn name) through `route`: 'cpp' or 'python'."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x, w, b = (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b))
    old = norms._cpp_op_for
    if route == "python":
        norms._cpp_op_for = lambda *args: None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lo.ms_rmsnorm(x, shape, w, 1e-5, out_dtype=out_dtype) if is_rms else \
                lo.ms_layernorm(x, shape, w, b, 1e-5, out_dtype=out_dtype)
    finally:
        norms._cpp_op_for = old
    name = node_name(y.grad_fn) if y.grad_fn is not None else None
    if y.requires_grad:
        y.backward(dy.to(y.dtype))
    grads = [t.grad if t is not None else None for t in (x, w, b)]
    return y.detach(), grads, [(tuple(t.shape), t.dtype) for t in saved], name


def case(rows_shape, shape, dtype, params, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    full = (*rows_shape, *shape)
    x = torch.randn(full, generator=gen).to(dtype)
    if layout == "transposed" and len(full) >= 2:  # the same values, non-contiguous
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        x = torch.randn((*full[:-1], 2 * full[-1]), generator=gen).to(dtype)[..., ::2]
    x.requires_grad_(True)
    dy = torch.randn(full, generator=gen)
    w = b = None
    if params != "none":
        w = (0.5 + torch.rand(shape, generator=gen)).to(dtype).requires_grad_(params != "frozen")
    if params in ("weight+bias", "frozen", "bias only"):
        b = (0.1 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_(params != "frozen")
    if params == "bias only":
        w.requires_grad_(False)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("params", ["none", "weight", "weight+bias", "frozen", "bias only"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_cpp_op_equals_the_python_route(dtype, is_rms, params, layout):
    if is_rms and params in ("weight+bias", "frozen", "bias only"):
        params = "weight"
    for rows_shape, shape in (((3,), (8,)), ((2, 5), (24,)), ((0,), (8,)), ((3,), (2, 4))):
        x, w, b, dy = case(rows_shape, shape, dtype, params, layout, hash((rows_shape, shape)) % 1000)
        b = None if is_rms else b
        got = run("cpp", x, list(shape), w, b, is_rms, dy)
        want = run("python", x, list(shape), w, b, is_rms, dy)
        assert "MSNorm" in got[3] and got[3] != want[3], (got[3], want[3])  # each route taken
        assert torch.equal(got[0], want[0]), "y"
        for what, g, h in zip(("dx", "dweight", "dbias"), got[1], want[1]):
            assert (g is None) == (h is None), what
            if g is not None:
                assert g.dtype == h.dtype and torch.equal(g, h), what
        assert got[2] == want[2], "saved tensors"


def test_autocast_output_dtype_and_rule_fallback():
    """Under autocast the op returns the autocast dtype; parameters that break inverse mode's rule take
    the plain path (torch's norm) through either route, with the same results."""
    x, w, b, dy = case((4,), (16,), torch.float32, "weight+bias", "contiguous", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run("cpp", x, 16, w, b, False, dy), run("python", x, 16, w, b, False, dy)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0])
    assert all(torch.equal(g, h) for g, h in zip(got[1], want[1]))
    with torch.no_grad():
        w[3] = 0.0  # |gamma| < GAMMA_MIN: y cannot be inverted
    with pytest.warns(UserWarning, match="break the inverse-mode rule"):
        got = run("cpp", x, 16, w, b, False, dy)
    want = run("python", x, 16, w, b, False, dy)
    assert "MSNorm" not in got[3] and got[3] == want[3]  # torch's own norm, saving its input
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, h) for g, h in zip(got[1], want[1]))


def test_second_derivative_is_refused_first_with_create_graph_works():
    x, w, b, dy = case((3,), (8,), torch.float32, "weight+bias", "contiguous", 2)
    y = lo.ms_layernorm(x, 8, w, b)
    assert "MSNorm" in y.grad_fn.name()
    (dx,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
    (plain,) = torch.autograd.grad((lo.ms_layernorm(x, 8, w, b) * dy).sum(), x)
    assert torch.equal(dx.detach(), plain)
    with pytest.raises(RuntimeError, match="double backward through a memory-sharing norm is not supported"):
        dx.sum().backward()


def test_the_next_linear_shares_the_saved_output():
    """The op saves y itself: the linear after it saves the same storage (one copy kept, not two)."""
    x = torch.randn(4, 16, requires_grad=True)
    linear = torch.nn.Linear(16, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lo.ms_layernorm(x, 16)
        linear(y)
    assert "MSNorm" in y.grad_fn.name()
    storages = {t.untyped_storage().data_ptr() for t in saved if t.numel() == y.numel()}
    assert storages == {y.untyped_storage().data_ptr()}


# --- activations ----------------------------------------------------------------------------------

def run_activation(route, name, x, dy):
    """(y, dx, saved tensors' (shape, dtype, bytes), grad_fn name) through `route`."""
    saved = []
    x = x.detach().clone().requires_grad_(True)
    old = activations._cpp_op_for
    if route == "python":
        activations._cpp_op_for = lambda *args: None
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lo.approx_activation(x, name)
    finally:
        activations._cpp_op_for = old
    node = node_name(y.grad_fn)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, [contents(t) for t in saved], node


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_activation_cpp_op_equals_the_python_route(dtype, layout):
    gen = torch.Generator().manual_seed(3)
    for name in lo.available():
        for shape in ((0, 5), (1, 1), (3, 7), (6, 50)):
            x = (torch.randn(shape, generator=gen) * 3).to(dtype)
            if layout == "transposed":
                x = x.t().contiguous().t()
            elif layout == "strided":
                x = (torch.randn((shape[0], 2 * shape[1]), generator=gen) * 3).to(dtype)[:, ::2]
            dy = torch.randn(shape, generator=gen)
            got, want = run_activation("cpp", name, x, dy), run_activation("python", name, x, dy)
            assert "ApproxActivation" in got[3] and got[3] != want[3], (got[3], want[3])
            assert torch.equal(got[0], want[0]) and got[0].dtype == want[0].dtype, (name, "y")
            assert torch.equal(got[1], want[1]), (name, "dx")
            assert got[2] == want[2], (name, "saved: the codes alone")


def test_activation_output_takes_in_place_ops_and_frees_nothing_it_needs():
    """The op's output is a tensor of its own (not a view of an input), so in-place ops after it work as
    after torch's GELU; a second derivative is refused as on the Python route."""
    x = torch.randn(4, 16, requires_grad=True)
    y = lo.regelu2(x)
    assert "ApproxActivation" in node_name(y.grad_fn) and y._base is None
    torch.nn.functional.dropout(y, 0.5, training=True, inplace=True).sum().backward()
    assert x.grad is not None
    (g,) = torch.autograd.grad(lo.regelu2(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


# --- gated activations ----------------------------------------------------------------------------

def run_gated(route, name, mode, g, u, dy):
    """(out, d_gate, d_up, saved tensors' (shape, dtype, bytes), grad_fn name) through `route`."""
    saved = []
    g, u = (t.detach().clone().requires_grad_(t.requires_grad) for t in (g, u))
    old = gated._cpp_op_for
    if route == "python":
        gated._cpp_op_for = lambda *args: None
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = lo.gated(g, u, name, mode)
    finally:
        gated._cpp_op_for = old
    node = node_name(out.grad_fn)
    out.backward(dy.to(out.dtype))
    return (out.detach(), g.grad, u.grad, [contents(t) for t in saved], node)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["exact", "approx"])
@pytest.mark.parametrize("trained", ["both", "gate", "up"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_gated_cpp_op_equals_the_python_route(dtype, mode, trained, layout):
    gen = torch.Generator().manual_seed(5)
    for name in ("resilu2", "regelu2", "tanh_gelu2"):
        for shape in ((0, 4), (1, 1), (3, 7), (5, 40)):
            g, u = ((torch.randn(shape, generator=gen) * 3).to(dtype) for _ in range(2))
            if layout == "strided":
                g = (torch.randn((shape[0], 2 * shape[1]), generator=gen) * 3).to(dtype)[:, ::2]
            g.requires_grad_(trained in ("both", "gate"))
            u.requires_grad_(trained in ("both", "up"))
            dy = torch.randn(shape, generator=gen)
            got, want = run_gated("cpp", name, mode, g, u, dy), run_gated("python", name, mode, g, u, dy)
            assert "Gated" in got[4] and got[4] != want[4], (got[4], want[4])
            for what, a, b in zip(("out", "d_gate", "d_up"), got[:3], want[:3]):
                assert (a is None) == (b is None), (name, what)
                assert a is None or torch.equal(a, b), (name, what)
            assert got[3] == want[3], (name, "saved tensors")


def test_gated_second_derivative_is_refused():
    g, u = (torch.randn(3, 5, requires_grad=True) for _ in range(2))
    out = lo.swiglu(g, u, "exact")
    assert "Gated" in node_name(out.grad_fn)
    (dg,) = torch.autograd.grad(out.sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through a fused gated activation is not supported"):
        dg.sum().backward()
