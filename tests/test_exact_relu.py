"""relu1 and leaky_relu1 (issue 11): a 1-bit step derivative is ReLU's and LeakyReLU's own, so their
backward equals torch's exact backward, at 1 bit per element, and convert swaps both activations
with no gradient error at all. The references are torch's own F.relu / F.leaky_relu and autograd."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import _bits, memory
from lowmem_ops._tree import get_op
from lowmem_ops.activations import approx_act_bwd, approx_act_fwd

from . import reference as ref

EXACT = {"relu1": F.relu, "leaky_relu1": F.leaky_relu}  # torch's defaults: negative slope 0.01


def _edge_values(dtype) -> torch.Tensor:
    """0, -0, the smallest subnormals and normals of each sign, +-max, +-inf, NaN, then random values
    of both signs over many magnitudes (an odd count, so the last code byte is partial)."""
    info = torch.finfo(dtype)
    smallest = torch.tensor([1], dtype=torch.int16 if dtype == torch.bfloat16 else torch.int32).view(dtype)  # subnormal
    special = [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, float("inf"), -float("inf"), float("nan")]
    x = torch.tensor(special, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    spread = torch.randn(501, generator=g, dtype=torch.float64) * 10 ** (6 * torch.rand(501, generator=g) - 3)
    return torch.cat([x, smallest, -smallest, spread.to(dtype)])


def _torch_grad(name, x, dy):
    leaf = x.clone().requires_grad_()
    EXACT[name](leaf).backward(dy)
    return leaf.grad


def _run(name, x, dy, backend):
    with ref.backend(backend):
        y, codes = approx_act_fwd(x, name, True)
        return y, codes, approx_act_bwd(dy, codes, name)


def _inputs(dtype):
    x = _edge_values(dtype)
    return x, torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_forward_and_backward_equal_torch_exactly(name, dtype):
    x, dy = _inputs(dtype)
    y, _, dx = _run(name, x, dy, "torch")
    want_y, want_dx = EXACT[name](x), _torch_grad(name, x, dy)
    # forward: the same bits, -0.0 included (NaN in the same places)
    assert torch.equal(y.isnan(), want_y.isnan())
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(y[~y.isnan()].view(bits), want_y[~want_y.isnan()].view(bits))
    # backward: the same values at every input (dy * 0 may be -0.0 where torch writes +0.0), except
    # ReLU at NaN: torch passes dy through there (NaN <= 0 is false), the codes give L[0] = 0
    # (docs/numerics.md: NaN takes the lowest level). LeakyReLU gives the slope at NaN, as torch does.
    nan = x.isnan()
    if name == "relu1":
        assert torch.equal(dx[nan], torch.zeros_like(dx[nan])) and bool(want_dx[nan].ne(0).all())
        dx, want_dx = dx[~nan], want_dx[~nan]
    assert torch.equal(dx, want_dx), (x[dx != want_dx], dx[dx != want_dx], want_dx[dx != want_dx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_the_kernels_in_the_interpreter_agree_with_the_torch_path(name, dtype):
    """The same codes; in float32 the same values. In bfloat16 the interpreter rounds float32 results
    toward zero and reads subnormal inputs as 0 (docs/numerics.md, "Interpreter differences"): one
    bfloat16 ulp, or a subnormal, apart, and a positive subnormal input takes the code of 0."""
    x, dy = _inputs(dtype)
    (y_t, c_t, dx_t), (y_i, c_i, dx_i) = _run(name, x, dy, "torch"), _run(name, x, dy, "triton-interpret")
    if dtype == torch.float32:
        assert torch.equal(c_t, c_i)
    else:
        codes_t, codes_i = ref.unpack(c_t, 1, x.numel()), ref.unpack(c_i, 1, x.numel())
        subnormal = ((x.float().abs() < torch.finfo(dtype).tiny) & (x != 0)).numpy()
        assert (codes_t[~subnormal] == codes_i[~subnormal]).all() and (codes_i[subnormal] == 0).all()
        keep = torch.from_numpy(~subnormal)
        y_t, y_i, dx_t, dx_i = y_t[keep], y_i[keep], dx_t[keep], dx_i[keep]
    if dtype == torch.float32:
        torch.testing.assert_close(y_i, y_t, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(dx_i, dx_t)
    else:
        tiny = torch.finfo(dtype).tiny
        torch.testing.assert_close(y_i, y_t, rtol=ref.ulp(dtype), atol=tiny, equal_nan=True)
        torch.testing.assert_close(dx_i, dx_t, rtol=ref.ulp(dtype), atol=tiny)


def test_the_boundary_matches_torch_at_zero():
    """torch's ReLU backward gives 0 at x == 0, LeakyReLU's gives the slope: both are the level below."""
    x, dy = torch.tensor([0.0, -0.0]), torch.tensor([2.0, 2.0])
    for name, at_zero in (("relu1", 0.0), ("leaky_relu1", 2.0 * 0.01)):
        _, codes = approx_act_fwd(x, name, True)
        assert torch.equal(approx_act_bwd(dy, codes, name), torch.full((2,), at_zero, dtype=torch.float32))
        assert torch.equal(_torch_grad(name, x, dy), torch.full((2,), at_zero))


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize("n", [1, 8, 9, 1000, 4099])
def test_codes_take_one_bit_per_element(name, n):
    x = torch.randn(n, dtype=torch.bfloat16)
    _, codes = approx_act_fwd(x, name, True)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-n // 8)
    # the documented layout holds x > 0 (the number of thresholds below x)
    assert (ref.unpack(codes, 1, n) == (x.float() > 0).numpy()).all()
    # what autograd saves for the module: the codes alone, 1/16 of the bf16 input
    layer = lo.nn.Approx(name)
    saved = memory.measure(layer, x.requires_grad_())
    assert saved.total_bytes == -(-n // 8)


def test_specs_are_exact_and_others_are_not():
    assert _bits.is_exact(get_op("relu1")) and _bits.is_exact(get_op("leaky_relu1"))
    assert not any(_bits.is_exact(get_op(f"{f}{k}")) for f in ("regelu", "resilu") for k in (1, 2, 3, 4))


class FeedForward(nn.Module):
    """T5's dense ReLU FF: wi -> act -> dropout -> wo (the dropout's output is what wo saves, so the
    activation's saved output is its own)."""

    def __init__(self, act, d=32, f=64):
        super().__init__()
        self.wi, self.act, self.dropout, self.wo = nn.Linear(d, f), act, nn.Dropout(0.1), nn.Linear(f, d)

    def forward(self, x):
        return x + self.wo(self.dropout(self.act(self.wi(x))))


class UserReLU(nn.Module):
    """A user's own ReLU, unknown to convert by name: found by probing."""

    def forward(self, x):
        return x.clamp_min(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_swaps_relu_and_leaky_relu_with_exact_gradients(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(nn.ReLU()), FeedForward(nn.LeakyReLU()), FeedForward(UserReLU())).to(dtype)
    original = copy.deepcopy(model)
    x = torch.randn(4, 16, 32, dtype=dtype)
    report = lo.convert(model, example_inputs=x)
    swapped = {c.path: c for c in report.applied}
    for path, op in (("0.act", "relu1"), ("1.act", "leaky_relu1"), ("2.act", "relu1")):
        assert swapped[path].bits == 1 and model.get_submodule(path).op_name == op, report
        assert swapped[path].gradient_cosine == pytest.approx(1.0, abs=1e-12)
        assert swapped[path].bytes_after < swapped[path].bytes_before
    assert report.gradient_cosine == pytest.approx(1.0, abs=1e-12)
    # the parameter gradients themselves: the same bits as the unconverted model's (eval mode: no dropout)
    model.eval(), original.eval()
    g = torch.randn(x.shape, dtype=dtype)
    for m in (model, original):
        m(x).backward(g)
    for (n, p), q in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_convert_keeps_the_exact_ops_at_any_tolerance():
    """grad_tolerance 1 (no inexact width meets it): ReLU is still swapped, GELU kept exact."""
    torch.manual_seed(0)
    model = nn.Sequential(FeedForward(nn.ReLU()), FeedForward(nn.GELU()))
    report = lo.convert(model, example_inputs=torch.randn(4, 16, 32), grad_tolerance=1.0)
    assert type(model[0].act) is lo.nn.Approx and model[0].act.op_name == "relu1"
    assert type(model[1].act) is nn.GELU


def test_other_leaky_slopes_are_reported_with_how_to_build_one():
    model = nn.Sequential(FeedForward(nn.LeakyReLU(0.2)))
    report = lo.convert(model, example_inputs=torch.randn(4, 16, 32))
    assert type(model[0].act) is nn.LeakyReLU
    ((path, why),) = [s for s in report.skipped if s[0] == "0.act"]
    assert "no built-in approximation" in why and 'where(x > 0, x, 0.2 * x)' in why and "--bits 1" in why


def test_export_gives_torch_modules_back():
    model = nn.Sequential(FeedForward(nn.ReLU()), FeedForward(nn.LeakyReLU()))
    lo.convert(model, example_inputs=torch.randn(4, 16, 32))
    lo.export(model)
    assert type(model[0].act) is nn.ReLU and type(model[1].act) is nn.LeakyReLU and model[1].act.negative_slope == 0.01


def test_an_activation_swap_is_judged_with_the_other_changes_in_place():
    """OPT with LoRA: a float32 adapter on fc2 casts its input (the ReLU's output) and saves the copy,
    so in the unconverted model torch's ReLU alone saves its output; once convert makes the adapter
    compute in bf16 it saves that very output, the ReLU then costs nothing and 1-bit codes would add
    n/8 bytes. The swap must be judged against the model with the adapters changed: undone."""
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = peft.get_peft_model(Block().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    x = torch.randn(4, 16, 32, dtype=torch.bfloat16)
    report = lo.convert(model, example_inputs=x)
    (relu,) = [c for c in report.changes if c.path.endswith(".act")]
    assert relu.status == "undone" and relu.reason.startswith("saves no memory"), str(report)
    assert type(model.base_model.model.act) is nn.ReLU
    # and the adapters' change, which does save, is kept: the total is below the unconverted model's
    assert report.memory_after.total_bytes < report.memory_before.total_bytes
