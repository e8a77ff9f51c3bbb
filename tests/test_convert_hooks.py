"""Hooks on the modules convert replaces run on their replacements, or the module stays as it is
(lowmem_ops/_hooks.py). Before, a swap silently dropped them: a logging hook stopped firing, and
accelerate's device hook or DeepSpeed's parameter gathering would have been skipped."""

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo

pytest.importorskip("transformers")


def _mlp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 4))


def _change(report, path):
    (change,) = [c for c in report.changes if c.path == path]
    return change


def test_activation_hooks_run_on_the_swap_and_their_handles_still_remove_them():
    model, x = _mlp_model(), torch.randn(6, 8)
    calls = []

    def forward_hook(module, inputs, output):
        with torch.no_grad():  # a GELU here with grad on would save the input itself
            calls.append(("forward", (output - F.gelu(inputs[0])).abs().max().item()))

    def backward_hook(module, grad_input, grad_output):
        calls.append(("backward", tuple(grad_output[0].shape)))

    handles = [model[1].register_forward_hook(forward_hook), model[1].register_full_backward_hook(backward_hook)]
    report = lo.convert(model, x)
    assert _change(report, "1").status == "applied", str(report)
    assert type(model[1]).__name__ == "Approx"

    calls.clear()
    model(x).sum().backward()
    assert [c[0] for c in calls] == ["forward", "backward"]
    assert calls[0][1] == 0.0  # the hook sees the exact GELU output
    assert calls[1][1] == (6, 32)

    for h in handles:
        h.remove()
    calls.clear()
    model(x).sum().backward()
    assert calls == []


def test_a_norm_whose_output_a_hook_sees_is_not_folded():
    model, x = _mlp_model(), torch.randn(6, 8)
    with torch.no_grad():
        model[3].weight.uniform_(0.5, 2.0)
        model[3].bias.uniform_(-1, 1)
    outputs = []
    model[3].register_forward_hook(lambda m, i, o: outputs.append((o.detach(), F.layer_norm(i[0], (8,), m.weight, m.bias).detach())))
    report = lo.convert(model, x)
    change = _change(report, "3")
    assert change.status == "applied" and "folded" not in change.after, str(report)
    outputs.clear()
    model(x)
    (got, want), = outputs
    torch.testing.assert_close(got, want)  # the hook sees what torch's LayerNorm returned


def test_pre_hooks_on_a_norm_allow_folding_but_hooks_on_its_consumer_do_not():
    model, x = _mlp_model(), torch.randn(6, 8)
    model[3].register_forward_pre_hook(lambda m, i: None)  # sees the norm's input, unchanged by a fold
    report = lo.convert(model, x)
    assert "folded into 4" in _change(report, "3").after, str(report)

    model, seen = _mlp_model(), []
    model[4].register_forward_pre_hook(lambda m, i: seen.append(i[0]))  # would see the norm's output without its affine
    report = lo.convert(model, x)
    assert "folded" not in _change(report, "3").after, str(report)
    seen.clear()
    model(x)
    torch.testing.assert_close(seen[0], model[3](model[2](model[1](model[0](x)))))


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=2, hidden_act="silu")
    return torch.nn.Sequential(LlamaMLP(config), torch.nn.Linear(16, 4))


def test_a_gated_mlp_whose_activation_has_a_hook_is_not_fused_and_the_activation_is_swapped_with_it():
    model, x = _llama_mlp(), torch.randn(2, 5, 16)
    fired = []
    model[0].act_fn.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    report = lo.convert(model, x)
    skipped = dict(report.skipped)
    assert "0" in skipped and "0.act_fn" in skipped["0"] and "forward hooks" in skipped["0"], str(report)
    assert _change(report, "0.act_fn").status == "applied", str(report)
    fired.clear()
    model(x)
    assert fired == [torch.Size([2, 5, 48])]


def test_hooks_on_a_fused_gated_mlp_itself_run_on_the_fused_module():
    model, x = _llama_mlp(), torch.randn(2, 5, 16)
    expected = model[0](x)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    report = lo.convert(model, x)
    assert type(model[0]).__name__ == "GatedMLP", str(report)
    seen.clear()
    model(x)
    torch.testing.assert_close(seen[0], expected)


def test_a_module_whose_forward_accelerate_wraps_stays():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, x = _mlp_model(), torch.randn(6, 8)
    add_hook_to_module(model[3], ModelHook())  # what dispatch_model does for a device_map or offload
    report = lo.convert(model, x)
    assert type(model[3]) is torch.nn.LayerNorm
    assert "accelerate's ModelHook" in dict(report.skipped)["3"], str(report)
    assert _change(report, "1").status == "applied"  # the rest converts


def test_hooks_survive_undo_on_the_original_module():
    """A swap that is undone puts back the original, whose hooks were never moved off it."""
    model, x = _mlp_model(), torch.randn(6, 8)
    fired = []
    model[1].register_forward_hook(lambda m, i, o: fired.append(1))
    report = lo.convert(model, x, grad_tolerance=1.0)  # no width can reach it: kept exact
    assert type(model[1]) is torch.nn.GELU, str(report)
    fired.clear()
    model(x)
    assert fired == [1]


def test_export_keeps_the_hooks_registered_on_the_converted_model():
    model, x = _mlp_model(), torch.randn(6, 8)
    lo.convert(model, x)
    fired = []
    model[1].register_forward_hook(lambda m, i, o: fired.append("act"))  # on ours, after convert
    model[3].register_forward_pre_hook(lambda m, i: fired.append("norm"))
    by_hand = torch.nn.Sequential(lo.nn.ReGELU2())
    by_hand[0].register_forward_hook(lambda m, i, o: fired.append("by hand"))
    lo.export(model)
    lo.export(by_hand)
    assert type(model[1]) is torch.nn.GELU and type(model[3]) is torch.nn.LayerNorm
    assert type(by_hand[0]) is torch.nn.GELU
    model(x)
    by_hand(x)
    assert fired == ["act", "norm", "by hand"]


class _Times(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, w):
        return w * self.k


def test_a_norm_whose_weight_a_parametrization_computes_stays():
    """Before: swapped for an MSLayerNorm holding a fresh weight of ones. At k = 1 the outputs matched,
    so the check passed, and the parametrization's `original` (what the optimizer holds) got no gradient."""
    from torch.nn.utils import parametrize

    model, x = _mlp_model(), torch.randn(6, 8)
    parametrize.register_parametrization(model[3], "weight", _Times(1.0))
    report = lo.convert(model, x)
    assert parametrize.is_parametrized(model[3], "weight")
    assert "computed by torch.nn.utils.parametrize" in dict(report.skipped)["3"], str(report)
    model(x).sum().backward()
    assert model[3].parametrizations.weight.original.grad is not None
