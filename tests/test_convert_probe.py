"""lowmem_ops.convert recognises activations and norms by what they compute (issue 11, section 1):
hand-written and Hugging Face modules whose class names convert does not know are probed on inputs
shaped like the example run's, swapped, trained, measured, and exported back."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import _recognition, conversion, memory


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class HandRMSNorm(nn.Module):
    """A hand-written RMSNorm with its eps under a name convert does not read: found by trying eps values."""

    def __init__(self, n, offset=0.0, epsilon=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n) if offset else torch.ones(n))
        self.offset, self.tiny = offset, epsilon

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.tiny)
        return (y * (self.offset + self.weight.float())).to(x.dtype)


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _randomise(module, spread=0.3):
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(torch.empty_like(p).uniform_(-spread, spread))


def _mlp(middle, width=16):
    return nn.Sequential(nn.Linear(width, width), middle, nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))


def _check_converted(model, batch, report, original_types):
    """Outputs agree, a training step runs, fewer bytes are saved, export restores the classes."""
    call = (lambda m: m(**batch)) if isinstance(batch, dict) else (lambda m: m(batch))
    assert report.max_difference is not None and report.max_difference <= report.tolerance, str(report)
    assert report.memory_after.total_bytes < report.memory_before.total_bytes, str(report)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    outputs = [t for t in conversion._tensors(call(model)) if t.is_floating_point()]
    sum(t.float().square().mean() for t in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    optimizer.step()
    model.eval()  # no dropout: the same outputs before and after export
    with torch.no_grad():
        trained = call(model)
    lo.export(model)
    types = {type(m).__name__ for m in model.modules()}
    assert original_types <= types and not any(t.startswith("MS") or t == "Approx" for t in types), types
    with torch.no_grad():
        exported = call(model)
    first = lambda o: o if isinstance(o, torch.Tensor) else o[0]  # noqa: E731
    torch.testing.assert_close(first(exported), first(trained), atol=1e-2, rtol=1e-2)


# --- hand-written modules --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["swish", "rmsnorm", "gemma offset rmsnorm", "non-parametric layernorm"])
def test_hand_written_modules_are_recognised_and_converted(case):
    torch.manual_seed(0)
    middle, expect = {
        "swish": (Swish(), "Approx (probed: SiLU)"),
        "rmsnorm": (HandRMSNorm(16), "MSRMSNorm (probed: RMSNorm over the last dim, weight, eps 1e-06)"),
        "gemma offset rmsnorm": (HandRMSNorm(16, offset=1.0, epsilon=1e-5),
                                 "MSRMSNorm (probed: RMSNorm over the last dim, 1 + weight, eps 1e-05)"),
        "non-parametric layernorm": (_NoAffineLayerNorm(), "MSLayerNorm (probed: LayerNorm over the last dim, "
                                                           "no weight, eps 1e-12)"),
    }[case]
    _randomise(middle)
    model = _mlp(middle)
    x = torch.randn(8, 16)
    report = lo.convert(model, example_inputs=x)
    changes = {c.path: c.after for c in report.applied}
    assert changes.get("1", "").startswith(expect), str(report)
    if case == "gemma offset rmsnorm":  # no fold for an offset norm: inverse mode, the same weight object
        assert model[1].weight_offset == 1.0 and model[1].weight is middle.weight and model[1].affine == "inverse"
    assert report.skipped == [("3", "Tanh probed: its output matches none of the known activations and norms")]
    _check_converted(model, x, report, {type(middle).__name__})


class _NoAffineLayerNorm(nn.Module):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-12)


def test_channels_first_layernorm_shares_its_output_with_the_next_conv():
    torch.manual_seed(0)
    norm = ChannelsFirstLayerNorm(8)
    _randomise(norm)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), norm, nn.Conv2d(8, 8, 1), nn.GELU())
    x = torch.randn(2, 3, 6, 6)
    report = lo.convert(model, example_inputs=x)
    assert {c.path: c.after for c in report.applied}["1"] == (
        "MSLayerNorm (probed: LayerNorm over dim 1 (channels first), weight, bias, eps 1e-06)"), str(report)
    assert model[1].channels_first and model[1].affine == "inverse"
    # the norm saves nothing of its own beyond one float32 per row: its output is the tensor conv 2 saves
    saved = memory.measure(model, x)
    assert saved.exclusive_bytes("1") <= 2 * 6 * 6 * 4, saved
    assert any(s.module == "1" and "2" in s.also_saved_by or s.module == "2" and "1" in s.also_saved_by
               for s in saved.shared), saved
    _check_converted(model, x, report, {"ChannelsFirstLayerNorm"})


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_swaps_where_it_saves_memory_and_other_leaky_slopes_are_reported(inplace):
    # each activation's output is read by a dropout, so what the activation saves is its own
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace), nn.Dropout(0.1), nn.Linear(8, 8),
                          nn.LeakyReLU(0.2, inplace), nn.Dropout(0.1), nn.Linear(8, 2))
    report = lo.convert(model, example_inputs=torch.randn(4, 8), dropout=False)  # the dropouts stay torch's
    assert [(c.path, c.bits) for c in report.applied] == [("1", 1)] and model[1].op_name == "relu1", str(report)
    assert report.skipped == [("4", "LeakyReLU with these arguments has no built-in approximation; build one: "
                                    "kernelgen new NAME --expr \"where(x > 0, x, 0.2 * x)\" --bits 1, then "
                                    "lo.nn.Approx(NAME)")]
    assert "1 modules swapped, 0 undone, 1 left alone" in str(report)


def test_a_relu_whose_output_the_next_layer_saves_anyway_is_not_swapped():
    """nn.Linear -> ReLU -> nn.Linear: torch's ReLU saves its output, which the next Linear saves as its
    input, so it costs nothing; 1-bit codes would add n/8 bytes."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    report = lo.convert(model, example_inputs=torch.randn(4, 8))
    assert type(model[1]) is nn.ReLU and report.applied == []
    ((change,),) = [[c for c in report.changes if c.path == "1"]]
    assert change.status == "undone" and "saves no memory" in change.reason, str(report)


class SwishThenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(8, 8), Swish(), nn.Linear(8, 2)

    def forward(self, x):
        h = self.act(self.lin(x))
        h.mul_(2.0)  # the activation's output written in place: fine, it saves its codes, not its output
        return self.out(h)


def test_an_activation_whose_output_is_written_in_place_is_still_swapped():
    torch.manual_seed(0)
    model = SwishThenInPlace()
    report = lo.convert(model, example_inputs=torch.randn(4, 8))
    assert [c.path for c in report.applied] == ["act"] and report.skipped == [], str(report)


class Raises(nn.Module):
    """Works on the model's own activations, raises on the probe's wider ones."""

    def forward(self, x):
        if x.abs().max() > 5:
            raise RuntimeError("input out of range")
        return F.silu(x)


class WritesItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        with torch.no_grad():
            self.weight.mul_(1.0)
        return F.rms_norm(x, (8,), self.weight, 1e-6)


class Noisy(nn.Module):
    def forward(self, x):
        return F.silu(x) + 1e-3 * torch.rand_like(x)


class GatedAct(nn.Module):
    def forward(self, x, gate):
        return F.silu(x) * gate


class UsesGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(8, 8), GatedAct()

    def forward(self, x):
        return self.act(self.lin(x), x)


@pytest.mark.parametrize("build, why", [
    (Raises, "Raises probed: raised on a probe input of shape [4, 8]: RuntimeError: input out of range"),
    (WritesItsWeight, "WritesItsWeight probed: it writes its parameters when called"),
    (Noisy, "Noisy probed: it gives different outputs for the same input"),
])
def test_a_module_that_cannot_be_probed_is_a_report_line_and_unchanged(build, why):
    torch.manual_seed(0)
    module = build()
    model = nn.Sequential(nn.Linear(8, 8), module, nn.Linear(8, 2))
    x = torch.randn(4, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    versions = [p._version for p in module.parameters()]
    rng = torch.get_rng_state()
    report = lo.convert(model, example_inputs=x)
    assert model[1] is module and ("1", why) in report.skipped, str(report)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    if build is WritesItsWeight:  # the probe's own parameter values went through .data and came back
        assert [p._version for p in module.parameters()] >= versions


def test_a_module_named_like_an_activation_with_two_inputs_is_a_report_line():
    report = lo.convert(UsesGated(), example_inputs=torch.randn(4, 8))
    assert report.skipped == [("act", "GatedAct takes 2 tensor inputs, so it was not probed")]


def test_probing_leaves_parameters_and_buffers_bitwise_and_the_module_in_its_mode():
    torch.manual_seed(0)
    norm = HandRMSNorm(16, offset=1.0)
    _randomise(norm)
    norm.register_buffer("count", torch.zeros(()))
    before = [p.detach().clone() for p in norm.parameters()]
    data = [p.data for p in norm.parameters()]
    match = _recognition.identify(norm.train(), (4, 16), torch.float32, "cpu")
    assert match.weight_offset == 1.0 and match.rms and norm.training
    assert all(torch.equal(a, b) for a, b in zip(before, norm.parameters()))
    assert all(p.data is d or p.data.data_ptr() == d.data_ptr() for p, d in zip(norm.parameters(), data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case, want", [
    (lambda: nn.GELU(), "erf GELU"), (lambda: nn.SiLU(), "SiLU"), (lambda: nn.Mish(), "Mish"),
    (lambda: nn.ELU(), "ELU"), (lambda: nn.Softplus(), "Softplus"), (lambda: _QuickGELU(), "QuickGELU"),
    (lambda: nn.ReLU(), "ReLU"), (lambda: nn.LeakyReLU(), "LeakyReLU(0.01)"),
])
def test_identify_each_activation_in_each_dtype(case, want, dtype):
    assert _recognition.identify(case(), (4, 32), dtype, "cpu").name == want


def test_identify_tells_erf_from_tanh_gelu_in_float32():
    assert _recognition.identify(nn.GELU(approximate="tanh"), (4, 32), torch.float32, "cpu").op == "tanh_gelu2"


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-12])
def test_identify_reads_the_eps_from_the_match(eps):
    norm = _EpsLayerNorm(eps)
    assert _recognition.identify(norm, (6, 16), torch.float32, "cpu").eps == eps


class _EpsLayerNorm(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.hidden = eps  # not an attribute name convert reads

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), eps=self.hidden)


# --- the module wrappers ----------------------------------------------------------------------------

@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("offset, channels_first", [(1.0, False), (0.0, True), (1.0, True)])
def test_offset_and_channels_first_norms_match_torch_and_share_their_output(rms, offset, channels_first):
    torch.manual_seed(0)
    cls = lo.nn.MSRMSNorm if rms else lo.nn.MSLayerNorm
    norm = cls(8, eps=1e-6, weight_offset=offset, channels_first=channels_first)
    with torch.no_grad():
        norm.weight.uniform_(-0.3, 0.3) if offset else norm.weight.uniform_(0.7, 1.3)
    consumer = nn.Conv2d(8, 8, 1) if channels_first else nn.Linear(8, 8)
    x = torch.randn(2, 8, 3, 5) if channels_first else torch.randn(2, 5, 8)
    x_ref, w_ref = x.clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    v = x_ref.movedim(1, -1) if channels_first else x_ref
    ref = F.rms_norm(v, (8,), w_ref + offset, 1e-6) if rms else F.layer_norm(v, (8,), w_ref + offset, None, 1e-6)
    ref = ref.movedim(-1, 1) if channels_first else ref
    x.requires_grad_()
    y = norm(x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, atol=1e-5, rtol=1e-4)
    saved = memory.measure(nn.Sequential(norm, consumer), x)
    assert any(s.module == "0" and "1" in s.also_saved_by for s in saved.shared), saved  # one copy for both
    assert f"weight_offset={offset:g}" in repr(norm) if offset else "weight_offset" not in repr(norm)


class CastingRMSNorm(nn.Module):
    """T5LayerNorm's rule: float32 statistics, the output in the weight's dtype (bf16 for a float32
    input: a bf16 T5 whose `wo` transformers keeps in float32 feeds its norms float32)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * y.to(self.weight.dtype)


def test_a_norm_returning_another_dtype_becomes_an_ms_norm_with_that_out_dtype():
    match = _recognition.identify(CastingRMSNorm(32), (4, 32), torch.float32, "cpu")
    assert match.rms and match.out_dtype == torch.bfloat16 and "output in bfloat16" in match.describe()
    assert _recognition.identify(HandRMSNorm(32), (4, 32), torch.float32, "cpu").out_dtype is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), CastingRMSNorm(32), nn.Linear(32, 8, dtype=torch.bfloat16))
    x = torch.randn(6, 16)
    report = lo.convert(model, example_inputs=x)
    assert type(model[1]) is lo.nn.MSRMSNorm and model[1].out_dtype == torch.bfloat16, str(report)
    assert model(x).dtype == torch.bfloat16
    # what the norm saves is its bf16 output, the very tensor the next linear saves
    saved = memory.measure(model, x)
    assert saved.total_bytes == 6 * 16 * 4 + 6 * 32 * 2 + 6 * 4, saved  # x for Linear 1; bf16 y; rstd (float32)


def test_an_activation_returning_another_dtype_is_a_report_line():
    class CastingSiLU(nn.Module):
        def forward(self, x):
            return F.silu(x).to(torch.bfloat16)

    model = nn.Sequential(nn.Linear(16, 32), CastingSiLU(), nn.Linear(32, 8, dtype=torch.bfloat16))
    report = lo.convert(model, example_inputs=torch.randn(6, 16))
    assert type(model[1]) is CastingSiLU
    assert any(p == "1" and "returns torch.bfloat16 for torch.float32 input" in why for p, why in report.skipped), str(report)


def test_channels_first_needs_one_normalised_dim():
    with pytest.raises(ValueError, match="channels_first normalises one dimension"):
        lo.nn.MSLayerNorm((4, 8), channels_first=True)
    with pytest.raises(ValueError, match=r"needs an \(N, C, ...\) input"):
        lo.nn.MSRMSNorm(8, channels_first=True)(torch.randn(8))


# --- Hugging Face modules (built from config, tiny) ------------------------------------------------

transformers = pytest.importorskip("transformers")


def _t5():
    cfg = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=4,
                                vocab_size=100, feed_forward_proj="gated-gelu")
    ids = torch.randint(0, 100, (2, 12))
    return transformers.T5Model(cfg), {"input_ids": ids, "decoder_input_ids": ids}


def _bloom():
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100)
    return transformers.BloomModel(cfg), {"input_ids": torch.randint(0, 100, (2, 12))}


def _olmo():
    cfg = transformers.OlmoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=100)
    return transformers.OlmoModel(cfg), {"input_ids": torch.randint(0, 100, (2, 12))}


def _gemma():
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=100)
    return transformers.GemmaModel(cfg), {"input_ids": torch.randint(0, 100, (2, 12))}


def _cohere():
    cfg = transformers.CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100)
    return transformers.CohereModel(cfg), {"input_ids": torch.randint(0, 100, (2, 12))}


def _convnext():  # ConvNextLayerNorm: channels first in the stem and downsampling, channels last in blocks
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], image_size=32, num_stages=2)
    return transformers.ConvNextModel(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


HF = {"t5": (_t5, "T5LayerNorm"), "convnext": (_convnext, "ConvNextLayerNorm"), "bloom": (_bloom, "BloomGelu"), "olmo": (_olmo, "OlmoLayerNorm"),
      "gemma": (_gemma, "GemmaRMSNorm"), "cohere": (_cohere, "CohereLayerNorm")}


@pytest.mark.parametrize("arch", sorted(HF))
def test_hugging_face_modules_unknown_by_name_convert(arch):
    torch.manual_seed(0)
    build, cls = HF[arch]
    model, batch = build()
    for m in model.modules():  # trained-looking affine parameters, not the initial ones
        if type(m).__name__ == cls:
            _randomise(m, 0.2)
    # Recognition is under test, not the bit width: at random init no width of tanh GELU (built at
    # 2 bits only) reaches the default grad_tolerance, and BloomGelu would be kept exact.
    report = lo.convert(model, example_inputs=batch, grad_tolerance=None)
    assert not any(type(m).__name__ == cls for m in model.modules()), str(report)
    assert not [c for c in report.changes if c.status == "undone"], str(report)
    assert all(c.gradient_cosine is None or c.gradient_cosine > 0.5 for c in report.applied), str(report)
    _check_converted(model, batch, report, {cls})


def test_batch_and_instance_norms_are_report_lines():
    # no memory-sharing kernel for them; left alone, and said so ("0 left alone" means nothing was)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.InstanceNorm2d(8, affine=True), nn.GELU())
    report = lo.convert(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert [path for path, _ in report.skipped] == ["1", "2"], str(report)
    assert report.skipped[0][1].startswith("BatchNorm2d: normalises with batch or instance statistics")
    assert report.skipped[1][1].startswith("InstanceNorm2d: normalises with batch or instance statistics")
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.InstanceNorm2d
    assert lo.convert(nn.Sequential(nn.BatchNorm1d(4)), example_inputs=torch.randn(3, 4), norms=False).skipped == []


def test_every_candidate_left_alone_is_reported_and_nothing_else():
    model = nn.Sequential(nn.Linear(8, 8), nn.GLU(), nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Softmax(-1),
                          nn.Dropout(0.1), nn.Linear(8, 2))
    report = lo.convert(model, example_inputs=torch.randn(4, 8))
    assert report.skipped == [
        ("1", "GLU does not return one tensor of its input's shape, so it was not probed"),
        ("3", "GroupNorm probed: its output matches none of the known activations and norms"),
        ("4", "Softmax probed: its output matches none of the known activations and norms")], str(report)
