"""Defects the Hugging Face sweep (tune/hf_sweep.py) found in lo.convert, each reproduced by a minimal
module with the pattern of the models where it showed."""

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops import conversion


class MeanVarianceNorm(torch.nn.Module):
    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)


class _Branches(torch.nn.Module):
    """A trunk that always runs and a branch only some inputs take (a vision tower fed no image, the
    cross-attention norm of an encoder-decoder model called as a decoder alone)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                         torch.nn.Linear(32, 16))
        self.branch = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                          torch.nn.Linear(32, 16), MeanVarianceNorm())

    def forward(self, x, image=None):
        y = self.trunk(x)
        return y if image is None else y + self.branch(image)


def test_modules_the_example_inputs_do_not_reach_are_left_alone_with_that_reason():
    # before: the branch's LayerNorm and GELU were swapped unverified (the GELU at the 2-bit default,
    # no gradient behind its width) with the LayerDrop note "kept unmeasured"
    torch.manual_seed(0)
    model = _Branches()
    report = lo.convert(model, example_inputs=(torch.randn(8, 16),))
    assert type(model.branch[1]) is torch.nn.LayerNorm and type(model.branch[2]) is torch.nn.GELU
    skipped = dict(report.skipped)
    for path in ("branch.1", "branch.2", "branch.4"):  # branch.4: a norm convert would probe, had it run
        assert "did not run on the example inputs" in skipped[path], report
    assert not any(c.path.startswith("branch.") for c in report.changes), report
    assert "trunk.1" in {c.path for c in report.applied}, report  # the trunk's norm is converted as before


class _LlamaMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(64, 128, bias=False)
        self.up_proj = torch.nn.Linear(64, 128, bias=False)
        self.down_proj = torch.nn.Linear(128, 64, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _UpcastLogits(torch.nn.Module):
    """A bf16 model whose logits come out in float32 (Mllama's `logits.float()`)."""

    def __init__(self):
        super().__init__()
        self.mlp, self.head = _LlamaMLP(), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.head(self.mlp(x)).float()


def test_a_bf16_model_with_float32_outputs_is_checked_at_the_bf16_tolerance():
    # before: the float32 logits set the tolerance to float32's 1e-3, and the exact fused SwiGLU, whose
    # bf16 rounding moves the logits by ~2e-3, was undone ("outputs moved by 0.00163 > 0.001")
    torch.manual_seed(0)
    model = _UpcastLogits().to(torch.bfloat16)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    report = lo.convert(model, example_inputs=(x,))
    assert report.tolerance == 5e-2, report
    assert [c.path for c in report.applied] == ["mlp"] and type(model.mlp).__name__ == "GatedMLP", report
    assert report.gradient_cosine > 0.999, report
    # a float32 model keeps float32's tolerance
    torch.manual_seed(0)
    report32 = lo.convert(_UpcastLogits(), example_inputs=(x.float(),))
    assert report32.tolerance == 1e-3, report32


class _ReadsNormWeight(torch.nn.Module):
    """NemotronH's last norm: its caller reads the norm's weight (`self.norm(h.to(self.norm.weight.dtype))`)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(64)
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.proj(self.norm(x.to(dtype=self.norm.weight.dtype)))


def test_a_norm_whose_weight_is_read_outside_it_is_not_folded():
    # before: the weight went into proj and the MS norm held none, so the caller's read raised and the
    # norm was undone ("AttributeError: 'NoneType' object has no attribute 'dtype'")
    torch.manual_seed(0)
    model = _ReadsNormWeight()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 64)
    expected = model(x)
    report = lo.convert(model, example_inputs=(x,))
    assert [c.path for c in report.applied] == ["norm"], report
    assert "folded" not in report.applied[0].after and model.norm.weight is not None, report
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class RMSNormGated(torch.nn.Module):
    """The gated RMSNorm of Mamba-2 / gated-DeltaNet mixers (NemotronH, OLMo-hybrid, Lara): two inputs."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x, gate):
        x = x * torch.nn.functional.silu(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj, self.gate_proj, self.out_proj = (torch.nn.Linear(16, 16) for _ in range(3))
        self.norm = RMSNormGated(16)

    def forward(self, x):
        return self.out_proj(self.norm(self.in_proj(x), self.gate_proj(x)))


def test_a_gated_norm_is_reported_not_passed_over():
    # before: its name does not end in "norm", so a norm that takes two inputs (not probed) got no line
    model = _Mixer()
    report = lo.convert(model, example_inputs=(torch.randn(8, 16),))
    skipped = dict(report.skipped)
    assert "norm" in skipped and "2 tensor inputs" in skipped["norm"], report
    assert type(model.norm) is RMSNormGated


class _SharedExperts(torch.nn.Module):
    """Inkling's shared experts: gate_proj / up_proj / down_proj are 3-D Parameters, not Linear layers."""

    def __init__(self, n=2, d=16, f=32):
        super().__init__()
        self.gate_proj = torch.nn.Parameter(torch.randn(n, f, d) / 4)
        self.up_proj = torch.nn.Parameter(torch.randn(n, f, d) / 4)
        self.down_proj = torch.nn.Parameter(torch.randn(n, d, f) / 6)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        h = x.reshape(1, -1, x.shape[-1]).expand(self.gate_proj.shape[0], -1, -1)
        gate, up = torch.bmm(h, self.gate_proj.transpose(1, 2)), torch.bmm(h, self.up_proj.transpose(1, 2))
        return torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2)).sum(0).reshape(x.shape)


def test_gated_mlp_names_on_parameters_are_not_taken_for_linear_layers():
    # before: the attribute names alone sent it to GatedMLP.from_mlp, which raised on the Parameters
    # ("could not be converted: TypeError: torch.FloatTensor is not a Module subclass")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), _SharedExperts())
    report = lo.convert(model, example_inputs=(torch.randn(8, 16),))
    assert type(model[1]) is _SharedExperts, report
    assert not any("could not be converted" in why for _, why in report.skipped), report
    assert all(c.path != "1" for c in report.changes), report


class _GradModeRounding(torch.nn.Module):
    """A model whose output rounds differently with the autograd graph built, as CPU SDPA in bf16 does
    (MT5: outputs 0.23 apart, |a-b|/(1+|b|), between a no-grad and a grad run of the same model)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(x)))
        return y if torch.is_grad_enabled() else y + 0.2


def test_the_reference_run_builds_the_graph_as_the_checks_do():
    # before: the reference was a no-grad run and every check a grad run, so even a dropout swap read
    # as "outputs moved by 0.229" on MT5 and all 28 of its changes were undone
    torch.manual_seed(0)
    model = _GradModeRounding()
    report = lo.convert(model, example_inputs=(torch.randn(8, 16),))
    assert [c.path for c in report.applied] == ["act"] and report.max_difference < 1e-6, report


def _llama_with_large_logits():
    """A tiny bf16 LLaMA whose logits reach about 40, as a trained LLM's do (random init gives ~1)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model, {"input_ids": torch.randint(0, 1000, (2, 64))}


def test_large_outputs_are_compared_at_their_own_scale(monkeypatch):
    # before: |a-b|/(1+|b|) read the bf16 rounding of the exact fused MLPs (about 2^-8 of logits ~40)
    # as "outputs moved" wherever a logit is near 0, and undid them
    model, batch = _llama_with_large_logits()
    with torch.no_grad():
        assert model(**batch).logits.abs().max() > 20
    report = lo.convert(model, example_inputs=batch)
    assert not [c for c in report.changes if c.status == "undone"], report
    assert {c.after.split()[0] for c in report.applied} == {"GatedMLP", "MSRMSNorm"}, report
    # a wrong swap at that scale is still caught: the MLPs computing GELU in place of SiLU
    monkeypatch.setitem(conversion._ACTIVATIONS, "SiLUActivation", lambda m: "regelu2")
    model, batch = _llama_with_large_logits()
    report = lo.convert(model, example_inputs=batch)
    undone = [c for c in report.changes if c.status == "undone"]
    assert {c.after for c in undone} == {"GatedMLP"} and all("outputs moved" in c.reason for c in undone), report
