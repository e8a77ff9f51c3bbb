"""Fused gated activations (SwiGLU, GeGLU): gradients against float64 torch, saved bytes per mode."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lowmem_ops as lo
from lowmem_ops.gated import saved_bytes

from . import reference as ref
from .test_memory import saved_tensors

KINDS = {  # our op -> (our function, torch's exact activation)
    "resilu2": (lambda g, u, mode: lo.swiglu(g, u, mode), F.silu),
    "regelu2": (lambda g, u, mode: lo.geglu(g, u, mode=mode), F.gelu),
    "tanh_gelu2": (lambda g, u, mode: lo.geglu(g, u, "tanh", mode), lambda x: F.gelu(x, approximate="tanh")),
}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # a few roundings of each dtype
FLOOR = {torch.float32: 0.0, torch.float16: 6e-8, torch.bfloat16: 0.0}  # float16 subnormals are 6e-8 apart


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
@pytest.mark.parametrize("mode", ["exact", "approx"])
@pytest.mark.parametrize("name", sorted(KINDS))
@given(n=st.integers(0, 3000), dtype=st.sampled_from(sorted(TOL, key=str)), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 6.0, 60.0]))
def test_gradients(name, mode, backend, n, dtype, seed, scale):
    fn, act = KINDS[name]
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    u = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    dy = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    with ref.backend(backend):
        out = fn(g, u, mode)
        out.backward(dy)
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    (act(g64) * u64).backward(dy.double())
    want_out = act(g64.detach()) * u64.detach()
    tol = TOL[dtype]
    gd, ud = g.detach().double(), u.detach().double()
    # GELU's far negative tail, 0.5 x (1 + erf(x / sqrt 2)), cancels in float32: errors there are
    # absolute, about |x| eps, so each check allows tol * (|want| + |x| * |other factor|).
    floor = FLOOR[dtype]
    close(out, want_out, tol, gd.abs() * ud.abs(), floor)
    close(u.grad, u64.grad, 2 * tol, gd.abs() * dy.double().abs(), floor)  # approx: h(gate) was stored rounded
    # d_gate = dy * up * h'(gate): h' is a sum that cancels where it crosses 0 (GELU near x = -0.75),
    # so its float32 error is absolute, on the scale of |dy * up|.
    scale = (dy.double() * u.detach().double()).abs()
    if mode == "exact":
        want = g64.grad
    else:  # the step derivative: dy * up * L[code(gate)], levels from the spec file
        want = dy.double() * u.detach().double() * torch.from_numpy(ref.levels_f64(name)[ref.codes(name, g)])
    close(g.grad, want, 2 * tol, scale, floor)


def close(got, want, tol, scale, floor):
    err = (got.double() - want).abs()
    bad = ~(err <= tol * (want.abs() + scale) + floor)
    assert not bool(bad.any()), f"{int(bad.sum())} elements off, e.g. {got[bad][:3].tolist()} vs {want[bad][:3].tolist()}"


def _bytes(saved, exclude=()):
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in skip}.values())


@pytest.mark.parametrize("need_gate, need_up", [(True, True), (True, False), (False, True)])
def test_saved_bytes_per_mode(need_gate, need_up):
    n = 4096
    results = {}
    for mode in ("exact", "approx", "auto"):
        g = torch.randn(n, dtype=torch.bfloat16, requires_grad=need_gate)
        u = torch.randn(n, dtype=torch.bfloat16, requires_grad=need_up)
        _, saved = saved_tensors(lambda a, b: lo.swiglu(a, b, mode), g, u)
        results[mode] = _bytes(saved)
    for mode in ("exact", "approx"):
        assert results[mode] == saved_bytes(mode, n, 2, 2, need_gate, need_up)
    # independent expectations (bf16: 2 bytes; codes: n / 4 bytes)
    expect = {(True, True): (2 * 2 * n, 2 * 2 * n + n // 4), (True, False): (2 * 2 * n, 2 * n + n // 4),
              (False, True): (2 * n, 2 * n)}[(need_gate, need_up)]
    assert (results["exact"], results["approx"]) == expect
    assert results["auto"] == min(expect)
    # eager PyTorch keeps gate, silu(gate) and up when both need gradients
    g = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    _, saved = saved_tensors(lambda a, b: F.silu(a) * b, g, u)
    assert _bytes(saved) == 3 * 2 * n


def test_llama_mlp_from_config():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, hidden_act="silu")
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg)
    ours = lo.nn.GatedMLP.from_mlp(mlp, act="resilu2", mode="exact")
    assert ours.gate_proj is mlp.gate_proj  # the same modules: PEFT adapters and state_dict keys survive
    x = torch.randn(2, 8, 64, requires_grad=True)
    want, saved_torch = saved_tensors(mlp, x)
    got, saved_ours = saved_tensors(ours, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(mlp.parameters()) + [x]
    assert _bytes(saved_torch, params) - _bytes(saved_ours, params) == 2 * 8 * 176 * 4  # silu(gate) no longer kept
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    (gx_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-5, atol=1e-6)
    assert set(ours.state_dict()) == {f"{k}" for k in mlp.state_dict()}


def test_phi3_mlp_one_projection_from_config():
    """Phi-3's MLP (gate, up = gate_up_proj(x).chunk(2)): the same outputs and gradients as
    transformers' module, silu(gate) no longer saved, the same state_dict keys."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=176, hidden_act="silu")
    torch.manual_seed(0)
    mlp = Phi3MLP(cfg)
    ours = lo.nn.FusedGatedMLP(("gate_up_proj", "down_proj", None), mlp.gate_up_proj, mlp.down_proj, act="resilu2")
    assert ours.gate_up_proj is mlp.gate_up_proj and set(ours.state_dict()) == set(mlp.state_dict())
    x = torch.randn(2, 8, 64, requires_grad=True)
    want, saved_torch = saved_tensors(mlp, x)
    got, saved_ours = saved_tensors(ours, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(mlp.parameters()) + [x]
    assert _bytes(saved_torch, params) - _bytes(saved_ours, params) == 2 * 8 * 176 * 4  # silu(gate)
    grads_want = torch.autograd.grad(want.square().sum(), [x, *mlp.parameters()])
    grads_got = torch.autograd.grad(got.square().sum(), [x, *mlp.parameters()])
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_modernbert_mlp_with_dropout():
    """ModernBERT's MLP: Wo(drop(act(input) * gate)) for input, gate = Wi(x).chunk(2): exact in eval
    mode; in training, with lo.nn.Dropout in place of its dropout, the dropped output and gradients
    are those of the same mask applied by hand, and neither the mask nor gelu(input) is saved."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.modernbert.modeling_modernbert import ModernBertMLP

    cfg = transformers.ModernBertConfig(hidden_size=32, intermediate_size=48, mlp_dropout=0.25, mlp_bias=True)
    torch.manual_seed(0)
    mlp = ModernBertMLP(cfg)
    ours = lo.nn.FusedGatedMLP(("Wi", "Wo", "drop"), mlp.Wi, mlp.Wo, lo.nn.Dropout(0.25), act="regelu2")
    assert set(ours.state_dict()) == set(mlp.state_dict())
    x = torch.randn(3, 5, 32, requires_grad=True)
    torch.testing.assert_close(ours.eval()(x), mlp.eval()(x), rtol=1e-5, atol=1e-6)
    ours.train()
    torch.manual_seed(1)
    got, saved_ours = saved_tensors(ours, x)
    a, b = mlp.Wi(x).chunk(2, dim=-1)
    torch.manual_seed(1)
    keep = lo.dropout(torch.ones_like(a), 0.25, True) != 0  # the mask lo's dropout draws from this seed
    want = mlp.Wo(F.gelu(a) * b * keep / 0.75)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < (~keep).sum() < keep.numel()
    g_got = torch.autograd.grad(got.square().sum(), [x, mlp.Wi.weight])
    g_want = torch.autograd.grad(want.square().sum(), [x, mlp.Wi.weight])
    for u, v in zip(g_got, g_want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    n = 3 * 5 * 48
    # Wi's output (both halves, one storage) and Wo's input; Wi's input x is the caller's
    assert _bytes(saved_ours, list(mlp.parameters()) + [x]) <= 3 * n * 4 + 64


def test_gated_mlp_under_other_names_with_a_dropout():
    """T5's gated feed-forward keeps its names (wi_0, wi_1, wo, dropout): the same state_dict keys,
    and in eval mode the same outputs as act(wi_0(x)) * wi_1(x) into wo."""
    torch.manual_seed(0)
    wi_0, wi_1, wo = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 8)
    mlp = lo.nn.GatedMLP(wi_0, wi_1, wo, "regelu2", dropout=lo.nn.Dropout(0.5), names=("wi_0", "wi_1", "wo", "dropout"))
    assert set(mlp.state_dict()) == {"wi_0.weight", "wi_1.weight", "wo.weight", "wo.bias"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp.eval()(x), wo(F.gelu(wi_0(x)) * wi_1(x)))
    with pytest.raises(ValueError, match="names must be the .gate, up, down, dropout. attribute names"):
        lo.nn.GatedMLP(wi_0, wi_1, wo, names=("wi_0", "wi_1", "wo", "dropout"))  # no dropout given


def test_fused_gated_mlp_checks_its_names():
    proj, down = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)
    with pytest.raises(ValueError, match="names must be the .proj, down, dropout. attribute names"):
        lo.nn.FusedGatedMLP(("p", "d", "drop"), proj, down)  # a name for a dropout not given
    with pytest.raises(ValueError, match="other than 'act'"):
        lo.nn.FusedGatedMLP(("p", "act", None), proj, down)


@pytest.mark.parametrize("kind", ["two projections", "one projection"])
def test_compiled_gated_mlps(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "two projections":
        mlp = lo.nn.GatedMLP(torch.nn.Linear(16, 48), torch.nn.Linear(16, 48), torch.nn.Linear(48, 16), act="regelu2")
    else:
        mlp = lo.nn.FusedGatedMLP(("w_in", "w_out", None), torch.nn.Linear(16, 96), torch.nn.Linear(48, 16))
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mlp(x))
    (a,) = torch.autograd.grad(compiled(x).sum(), x)
    (b,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(a, b)


def test_errors():
    g, u = torch.randn(4), torch.randn(5)
    with pytest.raises(ValueError, match="gate and up must have one shape, dtype and device"):
        lo.swiglu(g, u)
    with pytest.raises(ValueError, match="'mish2' has no gated kernels"):
        lo.gated(torch.randn(4), torch.randn(4), "mish2")
    with pytest.raises(ValueError, match="mode must be one of auto, exact, approx"):
        lo.swiglu(torch.randn(4), torch.randn(4), "fast")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        lo.geglu(torch.randn(4), torch.randn(4), approximate="erf")
    np.testing.assert_equal(lo.gated.__name__, "gated")
