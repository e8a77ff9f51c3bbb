"""lowmem_ops.convert / export never cost a user their model: folds only where exact, transactional,
no change to the model's state, shared modules as one object, state_dict across conversion."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import conversion


def _fingerprint(model):
    """Everything that must come back bitwise: module objects under every name, Parameter and buffer
    objects, their values and dtypes."""
    modules = [(path, type(m), id(m)) for path, m in model.named_modules(remove_duplicate=False)]
    tensors = {k: (id(v), v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    return modules, tensors


def _assert_unchanged(model, before):
    modules, tensors = _fingerprint(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for key, (ident, dtype, value) in tensors.items():
        assert (ident, dtype) == before[1][key][:2], key
        assert torch.equal(value, before[1][key][2]), key


def _randomise_affine(module, spread=0.5):
    with torch.no_grad():
        module.weight.uniform_(1 - spread, 1 + spread)
        if getattr(module, "bias", None) is not None:
            module.bias.uniform_(-spread, spread)


def _folded(report):
    return {c.path for c in report.applied if "folded" in c.after}


# --- 1. fold only into a layer that only this norm feeds -----------------------------------------

class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(8), nn.Linear(8, 8)

    def other(self, z):
        return self.lin(z)

    def forward(self, x, z):
        return self.lin(self.norm(x)), self.other(z)


class WeightUsedFunctionally(CalledTwice):
    def other(self, z):
        return F.linear(z, self.lin.weight)


class SharedUnderTwoNames(CalledTwice):
    def __init__(self):
        super().__init__()
        self.alias = self.lin

    def other(self, z):
        return self.alias(z)


@pytest.mark.parametrize("spread", [0.5, 1e-3], ids=["gamma far from 1", "gamma near 1"])
@pytest.mark.parametrize("build", [CalledTwice, WeightUsedFunctionally, SharedUnderTwoNames])
def test_no_fold_into_a_linear_reached_from_elsewhere(build, spread):
    torch.manual_seed(0)
    model = build()
    _randomise_affine(model.norm, spread)
    x, z = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        want_main, want_other = model(x, z)
    report = lo.convert(model, example_inputs=(x, z))
    assert [c.after for c in report.applied] == ["MSLayerNorm"], str(report)  # inverse mode, not folded
    with torch.no_grad():
        got_main, got_other = model(x, z)
    assert torch.equal(got_other, want_other)  # the other path: bitwise unchanged
    torch.testing.assert_close(got_main, want_main, rtol=1e-5, atol=1e-5)


def test_fold_into_a_linear_only_this_norm_feeds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    _randomise_affine(model[1])
    x = torch.randn(4, 8)
    want = model(x).detach()
    report = lo.convert(model, example_inputs=x)
    assert _folded(report) == {"1"}, str(report)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# --- 2. transactional -----------------------------------------------------------------------------

class ChannelsFirstLayerNorm(nn.LayerNorm):
    """ConvNeXt's: normalises dim 1 of an NCHW tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _convnext_block():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ChannelsFirstLayerNorm(8), nn.Conv2d(8, 8, 1), nn.GELU())
    _randomise_affine(model[1])
    return model, torch.randn(2, 3, 4, 5)


def _two_dim_norm():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm((4, 8)), nn.Linear(8, 3))
    _randomise_affine(model[1])
    return model, torch.randn(2, 4, 8)


def _inplace_after_norm():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    _randomise_affine(model[1])
    return model, torch.randn(4, 8)


class GatedLayerNorm(nn.LayerNorm):
    """Same parameters as a LayerNorm, another computation: no norm convert knows."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * torch.sigmoid(x)


def test_a_norm_subclass_with_its_own_forward_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), GatedLayerNorm(8), nn.Linear(8, 8), nn.GELU())
    _randomise_affine(model[1])
    x = torch.randn(4, 8)
    want = model(x).detach()
    report = lo.convert(model, example_inputs=x)
    assert type(model[1]) is GatedLayerNorm
    assert report.skipped == [("1", "GatedLayerNorm probed: its output matches none of the known activations and "
                                    "norms")]
    assert [c.path for c in report.applied] == ["3"]  # the GELU
    torch.testing.assert_close(model(x), want)
    model, x = _convnext_block()
    report = lo.convert(model)  # no example inputs: nothing to probe it on
    assert type(model[1]) is ChannelsFirstLayerNorm and "example inputs would check it" in report.skipped[0][1]


class TimmLayerNorm(nn.LayerNorm):
    """timm's: overrides forward, computes torch's LayerNorm all the same."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def test_a_norm_subclass_that_computes_torchs_norm_is_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), TimmLayerNorm(8), nn.Linear(8, 4))
    _randomise_affine(model[1])
    x = torch.randn(4, 8)
    report = lo.convert(model, example_inputs=x)
    assert _folded(report) == {"1"} and isinstance(model[1], lo.nn.MSLayerNorm), str(report)
    model = nn.Sequential(nn.Linear(8, 8), TimmLayerNorm(8))
    report = lo.convert(model)  # nothing to check it on: left alone
    assert type(model[1]) is TimmLayerNorm and "example inputs would check it" in report.skipped[0][1]


def test_a_multi_dimensional_norm_is_not_folded_into_a_smaller_linear():
    torch.manual_seed(0)
    model, x = _two_dim_norm()
    want = model(x).detach()
    report = lo.convert(model, example_inputs=x)
    assert [c.after for c in report.applied] == ["MSLayerNorm"] and not _folded(report), str(report)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# Each forced past the check that now prevents it: the failure comes during apply or verification.
FORCED = {
    "channels-first subclass": (_convnext_block, "_has_torch_forward", lambda norm, observation=None: True, "ValueError"),
    "2-d norm folded into a smaller linear": (_two_dim_norm, "_fold_fits", lambda gamma, linear: True, "ValueError"),
    # an in-place add (an in-place ReLU is itself swapped now, for relu1, which is not in place)
    "in-place op after the norm": (lambda: _adds_in_place_after_norm(), "_observe", None, "RuntimeError"),
}


@pytest.mark.parametrize("case", sorted(FORCED))
def test_a_failure_during_convert_leaves_the_model_exactly_as_it_was(case, monkeypatch):
    build, seam, replacement, error = FORCED[case]
    if seam == "_observe":  # blind the in-place detection
        real = conversion._observe

        def replacement(model, inputs):
            seen = real(model, inputs)
            seen.modified.clear()
            return seen

    monkeypatch.setattr(conversion, seam, replacement)
    torch.manual_seed(0)
    model, x = build()
    model = nn.Sequential(model[:-1]) if case == "channels-first subclass" else model  # no GELU: every swap fails
    before = _fingerprint(model)
    rng = torch.get_rng_state()
    report = lo.convert(model, example_inputs=x)
    _assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert conversion._originals(model) == {} and conversion.folded(model) == {}
    undone = [c for c in report.changes if c.status == "undone"]
    assert undone and not report.applied, str(report)
    assert all(c.reason.startswith(error) for c in undone), str(report)
    assert error in str(report)
    model(x).sum().backward()  # still trains


def test_one_failing_swap_is_undone_and_the_others_kept(monkeypatch):
    monkeypatch.setattr(conversion, "_has_torch_forward", lambda norm, observation=None: True)
    torch.manual_seed(0)
    model, x = _convnext_block()
    norm, params = model[1], [id(p) for p in model[1].parameters()]
    report = lo.convert(model, example_inputs=x)
    assert [(c.path, c.status) for c in report.changes] == [("1", "undone"), ("3", "applied")], str(report)
    assert model[1] is norm and [id(p) for p in model[1].parameters()] == params
    assert isinstance(model[3], lo.nn.Approx)
    assert report.max_difference <= report.tolerance


def test_a_module_that_cannot_be_built_is_a_report_line(monkeypatch):
    monkeypatch.setitem(conversion._ACTIVATIONS, "GELU", lambda m: "no_such_op")
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4))
    report = lo.convert(model, example_inputs=torch.randn(2, 4))
    assert isinstance(model[1], nn.GELU) and isinstance(model[2], lo.nn.MSLayerNorm)
    assert len(report.skipped) == 1 and report.skipped[0][0] == "1"
    assert report.skipped[0][1].startswith("could not be converted:") and "no_such_op" in report.skipped[0][1]


def test_an_interrupt_rolls_everything_back(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.GELU())
    _randomise_affine(model[1])
    before = _fingerprint(model)
    monkeypatch.setattr(conversion, "_checker", lambda *a: interrupted)
    with pytest.raises(KeyboardInterrupt):
        lo.convert(model, example_inputs=torch.randn(4, 8))
    _assert_unchanged(model, before)  # the fold into model[2] written back too


# --- 3. in-place writes into a norm's output -----------------------------------------------------

class AddsInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.norm(x)
        y.add_(1.0)
        return self.lin(y)


def _adds_in_place_after_norm():
    model = AddsInPlace()
    _randomise_affine(model.norm)
    return model, torch.randn(4, 8)


class ReluThroughAView(AddsInPlace):
    def forward(self, x):
        y = self.norm(x)
        F.relu_(y.view(-1))
        return self.lin(y)


@pytest.mark.parametrize("build", [lambda: _inplace_after_norm()[0], AddsInPlace, ReluThroughAView],
                         ids=["ReLU(inplace=True)", "y.add_", "relu_ on a view"])
def test_a_norm_whose_output_is_modified_in_place_stays_torchs(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, 8)
    report = lo.convert(model, example_inputs=x)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, lo.nn.MSLayerNorm))]
    assert len(norms) == 1 and type(norms[0]) is nn.LayerNorm
    assert len([w for _, w in report.skipped if "modified in place" in w]) == 1, str(report)
    assert all("modified in place" in w for _, w in report.skipped), str(report)
    model.train()
    model(x).square().sum().backward()  # training works
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- 4. no change to the model's state -----------------------------------------------------------

def test_convert_leaves_buffers_and_the_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Dropout(0.5), nn.LayerNorm(8), nn.Linear(8, 4))
    x = torch.randn(16, 8)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    rng = torch.get_rng_state()
    report = lo.convert(model, example_inputs=x)
    assert report.applied and report.memory_after is not None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items()), {k: after[k] for k in buffers}
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())


# --- 5. shared modules ----------------------------------------------------------------------------

class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.a = nn.LayerNorm(8)
        self.b = self.a  # one module, two names
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.f1(self.a(h)) + self.f2(self.b(2 * h))


def test_a_shared_norm_is_converted_and_exported_as_one_object():
    torch.manual_seed(0)
    model = SharedNorm()
    original = model.a
    x = torch.randn(4, 8)
    report = lo.convert(model, example_inputs=x)
    assert model.a is model.b and isinstance(model.a, lo.nn.MSLayerNorm), str(report)
    assert not _folded(report) and model.a.weight is original.weight  # not folded: trained where it is
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    trained = model.a.weight.detach().clone(), model.a.bias.detach().clone()
    assert not torch.equal(trained[0], torch.ones(8))
    with torch.no_grad():
        want = model(x)
    lo.export(model)
    assert model.a is original and model.b is original
    assert torch.equal(original.weight, trained[0]) and torch.equal(original.bias, trained[1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_a_shared_activation_is_swapped_under_every_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    model.append(model[1])
    lo.convert(model, example_inputs=torch.randn(2, 4))
    assert model[1] is model[3] and isinstance(model[1], lo.nn.Approx)
    lo.export(model)
    assert model[1] is model[3] and type(model[1]) is nn.GELU


# --- 6. state_dict across conversion --------------------------------------------------------------

def _prenorm(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    _randomise_affine(model[1])
    return model


@pytest.mark.parametrize("strict", [True, False])
def test_a_stock_checkpoint_loads_into_a_converted_model(strict):
    stock, x = _prenorm(1), torch.randn(4, 8)
    model = _prenorm(0)
    report = lo.convert(model, example_inputs=x)
    assert _folded(report) == {"1"}
    result = model.load_state_dict(stock.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [True, False])
def test_a_converted_models_state_dict_loads_into_the_stock_model(strict):
    x = torch.randn(4, 8)
    model = _prenorm(0)
    lo.convert(model, example_inputs=x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as after training
    stock = _prenorm(1)  # its norm's gamma/beta are not the identity
    result = stock.load_state_dict(model.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(stock(x), model(x), rtol=1e-5, atol=1e-5)
    again = _prenorm(2)
    lo.convert(again, example_inputs=x)
    again.load_state_dict(model.state_dict(), strict=strict)  # converted -> converted
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_folded_norms_affine_without_its_linear_is_a_clear_error():
    model = _prenorm(0)
    lo.convert(model, example_inputs=torch.randn(4, 8))
    partial = {k: v for k, v in _prenorm(1).state_dict().items() if not k.startswith("2.")}
    with pytest.raises(RuntimeError, match=r"1\.weight, 1\.bias: .*folded.*2\.weight, 2\.bias"):
        model.load_state_dict(partial, strict=False)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*\"1\.weight\", \"1\.bias\""):
        model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("1.")})


def test_export_drops_the_state_dict_hooks():
    model = _prenorm(0)
    lo.convert(model, example_inputs=torch.randn(4, 8))
    lo.export(model)
    assert not model._state_dict_hooks and not model._load_state_dict_pre_hooks
    assert set(model.state_dict()) == set(_prenorm(1).state_dict())


# --- 7. export and RMSNorm without affine ----------------------------------------------------------

def test_export_restores_plain_and_affine_free_norms():
    model = nn.Sequential(lo.nn.MSLayerNorm(8, affine="plain"), lo.nn.MSRMSNorm(8, affine="none"),
                          lo.nn.MSLayerNorm(8, affine="none"))
    _randomise_affine(model[0])
    x = torch.randn(3, 8)
    want = model(x)
    gamma = model[0].weight
    lo.export(model)
    assert [type(m) for m in model] == [nn.LayerNorm, nn.RMSNorm, nn.LayerNorm]
    assert model[0].weight is gamma and model[1].weight is None and model[2].weight is None
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"elementwise_affine": False}, {}, {"eps": 1e-6}])
def test_torch_rmsnorm_of_any_parameterisation_converts(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, **kwargs), nn.GELU())
    x = torch.randn(4, 8)
    want = model(x).detach()
    # no memory filter: followed by a GELU that becomes 2-bit, the MS norm saves no fewer bytes here
    report = lo.convert(model, example_inputs=x, measure_memory=False)
    assert isinstance(model[1], lo.nn.MSRMSNorm) and not report.skipped, str(report)
    assert model[1].eps == kwargs.get("eps") and model[1].affine == ("inverse" if kwargs != {"elementwise_affine": False} else "none")
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    lo.export(model)
    assert type(model[1]) is nn.RMSNorm and model[1].elementwise_affine == kwargs.get("elementwise_affine", True)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.SiLU(inplace=True)], ids=["relu", "silu"])
def test_in_place_activations_are_judged_on_their_real_input(act):
    """An activation built with inplace=True (timm's, torchvision's) overwrites its input: the bit width
    must be chosen from the input it received, not from its output written over it, and the gradient
    check must run (it fed the module a leaf, which an in-place op refuses)."""
    from lowmem_ops import _gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), act, nn.Dropout(0.1), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    with torch.no_grad():
        pre = model[0](x)  # what the activation receives
    calls, handles = _gradients._record_calls({"act": model[1]})
    try:
        model(x).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert len(calls["act"]) == 1 and torch.equal(calls["act"][0][0], pre)
    report = lo.convert(model, example_inputs=(x,), dropout=False)
    assert type(model[1]) is lo.nn.Approx, report
    assert report.gradient_cosine is not None and report.gradient_cosine > 0.9, report


class _AdditiveMLP(torch.nn.Module):
    """LLaMA's names (gate_proj, up_proj, down_proj, act_fn), another computation: act(gate) + up."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(16, 48, bias=False)
        self.down_proj, self.act_fn = torch.nn.Linear(48, 16, bias=False), torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_a_fused_module_undone_has_its_parts_converted_one_by_one():
    """Before: the MLP's swap was undone with its outputs' reason, and the SiLU inside it was neither
    swapped nor reported (what is inside a module replaced whole was never planned)."""
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(_AdditiveMLP(), torch.nn.Linear(16, 4)), torch.randn(2, 5, 16)
    expected = model(x)
    report = lo.convert(model, x)
    mlp = {c.path: c for c in report.changes}
    assert mlp["0"].status == "undone" and "outputs moved" in mlp["0"].reason, str(report)
    assert "parts were tried one by one" in mlp["0"].reason
    assert mlp["0.act_fn"].status == "applied" and mlp["0.act_fn"].bits is not None, str(report)
    assert type(model[0]) is _AdditiveMLP and type(model[0].act_fn).__name__ == "Approx"
    torch.testing.assert_close(model(x), expected)  # forward exact
    assert report.gradient_cosine is not None and report.gradient_cosine >= 0.95
