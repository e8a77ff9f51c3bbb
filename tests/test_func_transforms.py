"""Forward-mode AD and torch.func through every op family.

The forward is exact, so the tangent is the exact function's: it must equal torch.func.jvp of
torch's own function (F.gelu, silu(gate) * up, F.layer_norm, ...) computed in float64, never zero or
None. torch.func.grad gives what eager backward gives (the ops' approximate backward where they have
one), and under vmap what a loop over the batch gives."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import lowmem_ops as lo

from . import reference as ref

BACKENDS = ("torch", "triton-interpret")
ACTIVATIONS = ["regelu2", "resilu2", "regelu1", "resilu3", "regelu4", "tanh_gelu2", "mish2"]
GATED = {  # op -> (our function, torch's exact activation)
    "swiglu": (lambda g, u, mode: lo.swiglu(g, u, mode), F.silu),
    "geglu": (lambda g, u, mode: lo.geglu(g, u, mode=mode), F.gelu),
    "geglu_tanh": (lambda g, u, mode: lo.geglu(g, u, "tanh", mode), lambda x: F.gelu(x, approximate="tanh")),
}
NORMS = {  # case -> (ours, torch's), both f(x, w, b)
    "layernorm": (lambda x, w, b: lo.ms_layernorm(x, 6), lambda x, w, b: F.layer_norm(x, (6,), eps=1e-5)),
    "layernorm_affine": (lambda x, w, b: lo.ms_layernorm(x, 6, w, b), lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5)),
    "layernorm_weight": (lambda x, w, b: lo.ms_layernorm(x, 6, w), lambda x, w, b: F.layer_norm(x, (6,), w, None, 1e-5)),
    "rmsnorm": (lambda x, w, b: lo.ms_rmsnorm(x, 6), lambda x, w, b: F.rms_norm(x, (6,), eps=1e-6)),
    "rmsnorm_weight": (lambda x, w, b: lo.ms_rmsnorm(x, 6, w), lambda x, w, b: F.rms_norm(x, (6,), w, 1e-6)),
}


def inputs(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * 2 for s in shapes]


def exact_jvp(f, primals, tangents):
    """torch.func.jvp of torch's function in float64: the reference tangent."""
    return torch.func.jvp(f, tuple(p.double() for p in primals), tuple(t.double() for t in tangents))


def check_jvp(ours, exact, primals, tangents, backend, tol=2e-6):
    """Our jvp, through torch.func.jvp and through torch.autograd.forward_ad, equals the exact one."""
    want_y, want_t = exact_jvp(exact, primals, tangents)
    assert want_t.abs().max() > 0.1  # a case where a zero tangent would show
    with ref.backend(backend):
        y, t = torch.func.jvp(ours, tuple(primals), tuple(tangents))
        with forward_ad.dual_level():
            dual = ours(*(forward_ad.make_dual(p, v) for p, v in zip(primals, tangents)))
            y_ad, t_ad = forward_ad.unpack_dual(dual)
    for got_y, got_t in ((y, t), (y_ad, t_ad)):
        assert got_t is not None and got_t.dtype == got_y.dtype == primals[0].dtype
        torch.testing.assert_close(got_y.double(), want_y, rtol=tol, atol=tol)
        torch.testing.assert_close(got_t.double(), want_t, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_jvp_is_the_exact_tangent(name, backend):
    x, v = (t.float() for t in inputs(13, 13))
    check_jvp(lambda x: lo.approx_activation(x, name), ref.EXACT_FORWARD[name], [x], [v], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "approx"])
@pytest.mark.parametrize("which", ["gate", "up", "both"])
@pytest.mark.parametrize("kind", sorted(GATED))
def test_gated_jvp_is_the_exact_tangent(kind, which, mode, backend):
    fn, act = GATED[kind]
    g, u, vg, vu = (t.float() for t in inputs(13, 13, 13, 13))
    if which == "gate":
        check_jvp(lambda g: fn(g, u, mode), lambda g: act(g) * u.double(), [g], [vg], backend)
    elif which == "up":
        check_jvp(lambda u: fn(g, u, mode), lambda u: act(g.double()) * u, [u], [vu], backend)
    else:
        check_jvp(lambda g, u: fn(g, u, mode), lambda g, u: act(g) * u, [g, u], [vg, vu], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(NORMS))
def test_norm_jvp_is_the_exact_tangent(case, backend):
    ours, exact = NORMS[case]
    x, vx, vw, vb = (t.float() for t in inputs((3, 6), (3, 6), 6, 6))
    w = torch.linspace(0.5, 2.0, 6)  # inside inverse mode's rule, so the memory-sharing op runs
    b = torch.linspace(-0.3, 0.3, 6)
    check_jvp(lambda x: ours(x, w, b), lambda x: exact(x, w.double(), b.double()), [x], [vx], backend, tol=1e-5)
    if case.endswith(("affine", "weight")):  # tangents of the parameters too
        check_jvp(lambda x, w, b: ours(x, w, b), exact, [x, w, b], [vx, vw, vb], backend, tol=1e-5)


def test_jvp_in_half_precision_returns_the_input_dtype():
    x, v = (t.to(torch.bfloat16) for t in inputs(9, 9))
    y, t = torch.func.jvp(lo.regelu2, (x,), (v,))
    assert t.dtype == torch.bfloat16
    want = torch.func.jvp(F.gelu, (x.double(),), (v.double(),))[1]
    torch.testing.assert_close(t.double(), want, rtol=ref.ulp(torch.bfloat16), atol=1e-6)


# --- reverse mode through torch.func: the same gradients as eager backward ---------------------------

def eager_grads(f, primals):
    leaves = [p.detach().clone().requires_grad_(True) for p in primals]
    f(*leaves).square().sum().backward()
    return [p.grad for p in leaves]


def func_grads(f, primals):
    return list(torch.func.grad(lambda *a: f(*a).square().sum(), argnums=tuple(range(len(primals))))(*primals))


CASES = {  # name -> (f, input shapes)
    "regelu2": (lo.regelu2, [(4, 5)]),
    "regelu3": (lambda x: lo.approx_activation(x, "regelu3"), [(4, 5)]),
    "swiglu_exact": (lambda g, u: lo.swiglu(g, u, "exact"), [(4, 5), (4, 5)]),
    "swiglu_approx": (lambda g, u: lo.swiglu(g, u, "approx"), [(4, 5), (4, 5)]),
    "layernorm_affine": (lambda x, w, b: lo.ms_layernorm(x, 5, w.abs() + 0.5, b), [(4, 5), 5, 5]),
    "rmsnorm": (lambda x: lo.ms_rmsnorm(x, 5), [(4, 5)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_func_grad_equals_eager_backward(case, backend):
    f, shapes = CASES[case]
    primals = [t.float() for t in inputs(*shapes)]
    with ref.backend(backend):
        want = eager_grads(f, primals)
        got = func_grads(f, primals)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_func_grad_uses_the_approximate_backward():
    """grad of regelu2 is the step derivative L[code(x)] (what eager backward gives), not GELU's."""
    (x,) = (t.float() for t in inputs(50))
    got = torch.func.grad(lambda x: lo.regelu2(x).sum())(x)
    torch.testing.assert_close(got.double(), ref.grad("regelu2", x, torch.ones_like(x)), rtol=0, atol=1e-7)


def test_jacobians():
    """jacfwd batches only tangents (the exact derivative), jacrev only cotangents (the step derivative)."""
    (x,) = (t.float() for t in inputs(6))
    jf = torch.func.jacfwd(lo.regelu2)(x)
    torch.testing.assert_close(jf, torch.func.jacfwd(F.gelu)(x), rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="batching rule"):  # torch's per-sample fallback for the backward op
        jr = torch.func.jacrev(lo.regelu2)(x)
    torch.testing.assert_close(jr.double(), torch.diag(ref.grad("regelu2", x, torch.ones_like(x))), rtol=0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's per-sample fallback
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_vmap_per_sample_gradients_equal_a_loop(case, backend):
    """vmap(grad(f)) over the first input (per-sample gradients) and vmap(f) equal a loop over the batch:
    each sample keeps its own codes."""
    f, shapes = CASES[case]
    x, *rest = (t.float() for t in inputs((3, *shapes[0]), *shapes[1:]))
    in_dims = (0,) + (None,) * len(rest)
    loss = lambda *a: f(*a).square().sum()  # noqa: E731
    argnums = tuple(range(1 + len(rest)))
    with ref.backend(backend):
        y = torch.vmap(f, in_dims)(x, *rest)
        got = torch.vmap(torch.func.grad(loss, argnums), in_dims)(x, *rest)
        want_y = torch.stack([f(xi, *rest) for xi in x])
        want = [torch.func.grad(loss, argnums)(xi, *rest) for xi in x]
    torch.testing.assert_close(y, want_y)
    for k, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([w[k] for w in want]))
    # and the per-sample gradient of x is eager backward's on that sample alone
    torch.testing.assert_close(got[0][1], eager_grads(f, [x[1], *rest])[0])


def test_double_backward_still_refused():
    g, u = (t.float().requires_grad_(True) for t in inputs(5, 5))
    (dg,) = torch.autograd.grad(lo.swiglu(g, u, "exact").sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through a fused gated activation is not supported"):
        dg.sum().backward()
    x, w = inputs((2, 5), 5)
    x, w = x.float().requires_grad_(True), (w.float().abs() + 0.5).requires_grad_(True)
    (dx,) = torch.autograd.grad(lo.ms_layernorm(x, 5, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through a memory-sharing norm is not supported"):
        dx.sum().backward()


def test_forward_ad_support_keeps_no_input_alive():
    """jvp needs the input, but it is saved for forward-mode AD only: in training the op still keeps
    nothing of its input (the whole point of the ops)."""
    import gc
    import weakref

    leaf = torch.randn(4, 8, requires_grad=True)
    for f in (lo.regelu2, lambda a: lo.swiglu(a, torch.ones(4, 8), "approx"), lambda a: lo.ms_layernorm(a, 8)):
        a = leaf * 2
        alive = weakref.ref(a)
        y = f(a)
        del a
        gc.collect()
        assert alive() is None and y.grad_fn is not None
