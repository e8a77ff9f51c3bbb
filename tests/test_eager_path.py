"""Plain eager calls take the cheap route (ctx-style autograd.Functions, no dispatcher); anything that
needs the dispatcher (fake tensors, dispatch and function modes, torch.func, torch.compile) still sees
the custom ops. Both routes give the same values (the layout and transform tests compare them)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import importlib

import lowmem_ops as lo

activations, gated, norms = (importlib.import_module(f"lowmem_ops.{m}") for m in ("activations", "gated", "norms"))

OPS = {  # family -> (a call, its autograd.Function's name, its module)
    "activation": (lambda x, w: lo.regelu2(x), "_ApproxActivation", activations),
    "gated": (lambda x, w: lo.swiglu(x, x * 2), "_Gated", gated),
    "norm": (lambda x, w: lo.ms_rmsnorm(x, x.shape[-1], w), "_MSNorm", norms),
}


def _inputs():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(16))
    return x, w


@pytest.mark.parametrize("family", OPS)
def test_plain_eager_calls_take_the_twin_and_skip_the_dispatcher(family, monkeypatch):
    f, function, module = OPS[family]
    x, w = _inputs()
    calls = []
    for direct in (module._fwd_direct, module._bwd_direct):
        monkeypatch.setattr(direct, "op", lambda *a: calls.append(a))
    # plain eager calls on CPU take the C++ autograd ops (test_cpu_autograd); the twin is what the
    # other backends (CUDA, the torch path) take
    monkeypatch.setattr(module, "_cpp_op_for", lambda *a: None)
    y = f(x, w)
    assert type(y.grad_fn).__name__ == f"{function}EagerBackward"
    y.sum().backward()
    assert x.grad is not None and not calls


@pytest.mark.parametrize("family", OPS)
def test_fake_tensors_and_modes_go_through_the_custom_ops(family):
    f, function, _ = OPS[family]
    with FakeTensorMode():
        x, w = _inputs()
        y = f(x, w)
        assert type(y.grad_fn).__name__ == f"{function}Backward"
        y.sum().backward()
        assert x.grad.shape == x.shape
    with torch.device("cpu"):  # a function mode: the op itself runs
        x, w = _inputs()
        y = f(x, w)
        assert type(y.grad_fn).__name__ == f"{function}Backward"


@pytest.mark.parametrize("family", OPS)
def test_torch_func_takes_the_transformable_function(family):
    f, function, _ = OPS[family]
    x, w = _inputs()
    g = torch.func.grad(lambda t: f(t, w).sum())(x.detach())
    y = f(x, w)
    y.sum().backward()
    torch.testing.assert_close(g, x.grad)
