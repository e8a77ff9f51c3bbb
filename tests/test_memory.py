"""What autograd keeps: exactly the packed codes under grad, nothing without it."""

import math

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops import _torch_backend

from . import reference as ref


def saved_tensors(fn, *args):
    """Every tensor autograd saves while fn runs, as seen by saved-tensor hooks."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["regelu2", "resilu2"])
@pytest.mark.parametrize("numel", [1, 7, 4096, 3 * 1000 + 1])
def test_saves_only_the_packed_codes(name, dtype, numel, backend):
    x = torch.randn(numel, dtype=dtype, requires_grad=True)
    with ref.backend(backend):
        y, saved = saved_tensors(lo.approx_activation, x, name)
    assert len(saved) == 1, [(t.dtype, t.shape) for t in saved]
    (codes,) = saved
    assert codes.dtype == torch.uint8
    nbytes = codes.untyped_storage().nbytes()
    assert nbytes == math.ceil(numel * ref.bits(name) / 8)  # 2 bits per element, nothing else
    assert nbytes * 8 / numel <= 2 + 6 / numel
    with ref.backend(backend):
        y.sum().backward()  # and those bytes are enough for the backward
    assert x.grad is not None


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_without_grad_saves_and_computes_nothing(context, monkeypatch):
    def no_codes(*_):
        raise AssertionError("codes were computed without grad")

    monkeypatch.setattr(_torch_backend, "pack_codes", no_codes)
    x = torch.randn(100, requires_grad=True)
    with context():
        y, saved = saved_tensors(lo.regelu2, x)
    assert saved == [] and not y.requires_grad
    # An input that needs no grad under grad mode: the same.
    y, saved = saved_tensors(lo.resilu2, torch.randn(100))
    assert saved == [] and not y.requires_grad


def test_mlp_saves_a_sixteenth_of_gelu_input_in_bf16():
    """In an MLP the activation's share of saved bytes drops from 2 bytes to 2 bits per element."""
    torch.manual_seed(0)
    d, hidden, tokens = 32, 128, 64

    def mlp(act):
        return torch.nn.Sequential(torch.nn.Linear(d, hidden), act, torch.nn.Linear(hidden, d)).to(torch.bfloat16)

    def saved_bytes(model):
        x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)
        _, saved = saved_tensors(model, x)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(n for ptr, n in storages.items() if ptr not in params)

    base = saved_bytes(mlp(torch.nn.GELU()))
    ours = saved_bytes(mlp(lo.nn.ReGELU2()))
    # torch keeps: x (linear1 input), h (GELU input), GELU output (linear2 input). We drop h for codes.
    hidden_bytes = tokens * hidden * 2
    assert base - ours == hidden_bytes - hidden_bytes // 8


def test_double_backward_is_a_clear_error():
    x = torch.randn(10, requires_grad=True)
    # (y**2).sum(): the incoming gradient 2y depends on x, so the backward itself gets differentiated.
    (g,) = torch.autograd.grad(lo.regelu2(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()
