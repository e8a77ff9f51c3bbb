"""lo.memory.plan: one training step on fake tensors, live bytes tracked. Checked against the same
tracker on real CPU tensors, and against hand arithmetic on a small MLP."""

import copy
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lowmem_ops as lo
from lowmem_ops.plan import VARIANTS

F32 = 4


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))

    def forward(self, x):
        return x + checkpoint(self.f, x, use_reentrant=False)


def checkpointed():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), Block(), Block(), torch.nn.Linear(32, 4))


def hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=172, vocab_size=128)
    ids = torch.randint(0, 128, (2, 16))
    return transformers.LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}


def hf_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=3)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16),
                                                         "labels": torch.tensor([0, 2])}


CASES = {"mlp": lambda: (mlp(), torch.randn(8, 16)), "checkpointed": lambda: (checkpointed(), torch.randn(8, 16)),
         "llama": hf_llama, "vit": hf_vit}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", None])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_step_is_the_real_step(case, optimizer):
    """Every number, the peak's phase, module and make-up included, is the real CPU run's."""
    model, inputs = CASES[case]()
    real = lo.memory.plan(model, inputs, optimizer=optimizer, fake=False)
    fake = lo.memory.plan(model, inputs, optimizer=optimizer)
    assert real.peak > real.weights > 0
    assert fake == real
    assert sum(fake.at_peak.values()) == fake.peak


def test_meta_model_plans_as_the_cpu_model():
    model, inputs = hf_llama()
    meta = copy.deepcopy(model).to("meta")
    ids = inputs["input_ids"].to("meta")  # one tensor as both, as on CPU
    assert lo.memory.plan(meta, {"input_ids": ids, "labels": ids}) == lo.memory.plan(model, inputs)


def test_plan_leaves_the_model_alone():
    model, x = mlp(), torch.randn(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lo.memory.plan(model, x, fake=False)
    lo.memory.plan(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_categories_by_hand(dtype):
    B, size = 8, torch.tensor([], dtype=dtype).element_size()
    n_params = 16 * 32 + 32 + 32 * 4 + 4
    p = lo.memory.plan(mlp(dtype), torch.randn(B, 16, dtype=dtype))
    assert p.weights == p.trainable == p.grads == n_params * size
    # AdamW: exp_avg and exp_avg_sq in the parameter's dtype, and a float32 step count per parameter tensor
    assert p.optimizer_states == 2 * n_params * size + 4 * F32
    # autograd saves the input (first linear) and ReLU's output (ReLU and the second linear share it)
    assert p.saved == (B * 16 + B * 32) * size
    # forward leaves ReLU's output, the model's output and the loss alive (the first linear's output is freed)
    assert p.activations == (B * 32 + B * 4 + 1) * size
    assert p.at_peak["weights"] == p.weights and p.at_peak["inputs"] == B * 16 * size
    sgd = lo.memory.plan(mlp(dtype), torch.randn(B, 16, dtype=dtype), optimizer="sgd")
    assert sgd.optimizer_states == n_params * size  # one momentum buffer
    assert lo.memory.plan(mlp(dtype), torch.randn(B, 16, dtype=dtype), optimizer=None).optimizer_states == 0


def test_peaks_by_hand_without_optimizer():
    """Linear(16,32) -> ReLU -> Linear(32,4), sum, float32, batch 8, no optimizer, op by op."""
    B = 8
    p = lo.memory.plan(mlp(), torch.randn(B, 16), optimizer=None)
    weights, x, h = (16 * 32 + 32 + 32 * 4 + 4) * F32, B * 16 * F32, B * 32 * F32
    # forward: the first linear's output and ReLU's output are both alive while ReLU runs
    assert p.phase_peaks["forward"] == weights + x + h + h
    # backward, at its end: every parameter gradient, the gradient reaching the first linear (h), the
    # outputs (B x 4) and the loss still held, and the loss's gradient (one float); ReLU's output was
    # freed with its node
    assert p.grads == weights
    assert p.phase_peaks["backward"] == p.peak == weights + x + p.grads + h + B * 4 * F32 + F32 + F32
    assert p.at_peak == {"weights": weights, "grads": p.grads, "optimizer_states": 0, "inputs": x,
                         "activations": h + B * 4 * F32 + 2 * F32}
    assert p.peak_phase == "backward" and p.peak_module == "0"


def test_lora_adapters_alone_are_trainable():
    peft = pytest.importorskip("peft")
    model, inputs = hf_llama()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    p = lo.memory.plan(model, inputs)
    assert p.trainable == p.grads == lora_bytes
    assert p.optimizer_states == 2 * lora_bytes + F32 * len(lora)
    assert p.weights == sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def test_compare_on_a_small_llama():
    model, inputs = hf_llama()
    c = lo.memory.compare(model, inputs)
    base, conv, ckpt, both = (c.plans[v] for v in VARIANTS)
    assert conv.saved < base.saved and conv.peak < base.peak
    assert ckpt.activations < base.activations
    assert base.weights == ckpt.weights
    assert both.saved <= ckpt.saved and both.peak <= ckpt.peak
    assert "checkpointed" in str(c) and "converted" in str(c)


def test_max_batch_fits_and_one_more_does_not():
    model = mlp()

    def make(batch):
        return torch.randn(batch, 16)

    calls = []
    counted = lambda b: calls.append(b) or make(b)  # noqa: E731
    budget = lo.memory.plan(model, make(40)).peak + 100
    best = lo.memory.max_batch(model, counted, budget)
    assert len(calls) <= 8  # solved for, not searched
    assert lo.memory.plan(model, make(best)).peak <= budget < lo.memory.plan(model, make(best + 1)).peak
    assert lo.memory.max_batch(model, make, 1000) == 0  # not even the weights fit
    assert lo.memory.max_batch(model, make, [1000, budget]) == [0, best]


def test_checkpointing_lowers_the_peak():
    """A checkpointed model's recompute frees what it recomputes (module tracking holds nothing: torch's
    ModuleTracker kept the recomputed graphs alive, and the checkpointed peak was above the baseline's)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=172, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 256))
    inputs = {"input_ids": ids, "labels": ids}
    base = lo.memory.plan(model, inputs, optimizer=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = lo.memory.plan(model, inputs, optimizer=None)
    # activations: 4 layers' worth against one layer's inputs per layer; the peak: a recomputed layer
    assert ckpt.activations < base.activations / 4
    assert ckpt.peak < base.peak / 2
    assert ckpt.peak_phase == "backward" and ckpt.peak_module.startswith("model.layers.")


SEVEN_B_WIDE = """
import sys, torch, transformers
import lowmem_ops as lo
cfg = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=2, num_attention_heads=32,
                               intermediate_size=11008, vocab_size=32000)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
ids = torch.zeros(4, 640, dtype=torch.long, device="meta")
p = lo.memory.plan(model, {"input_ids": ids, "labels": ids})
# VmHWM: this process's own high-water mark. ru_maxrss would not do: Linux carries the parent's
# (pytest's, gigabytes late in a suite) over fork and exec into it.
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(p.weights, p.peak, hwm_kib * 1024)
"""


def test_a_7b_sized_layer_allocates_nothing():
    """In a process of its own (the high-water mark of this one is other tests'): 1.2 GiB of weights
    and a 6 GiB peak planned, the whole process (torch and transformers imported) under 1 GiB."""
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", SEVEN_B_WIDE], capture_output=True, text=True, check=True)
    weights, peak, max_rss = map(int, out.stdout.split()[-3:])
    assert weights > 2**30 and peak > 5 * 2**30
    assert max_rss < 2**30 < weights


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        lo.memory.plan(mlp(), torch.randn(2, 16), optimizer="lion")
    with pytest.raises(ValueError, match="scalar tensor"):
        lo.memory.plan(mlp(), torch.randn(2, 16), loss_fn=lambda out: out)
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        lo.memory.compare(mlp(), torch.randn(2, 16), variants=["checkpointed"])


def test_layerdrop_is_a_clear_error_with_what_to_do():
    """A forward that branches on a drawn value (LayerDrop) cannot run on fake tensors: the error says so and
    how to plan the worst case; following it, the plan runs and equals the real step with every layer."""
    from .test_convert_gradients import LayerDropStack

    torch.manual_seed(0)
    model, x = LayerDropStack(layers=3), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"LayerDrop .* set the model's layerdrop to 0"):
        lo.memory.plan(model, x)
    model.layerdrop = 0.0
    fake, real = lo.memory.plan(model, x), lo.memory.plan(model, x, fake=False)
    assert fake == real and fake.peak > fake.weights > 0


def test_a_value_shaped_op_is_a_clear_error():
    """Boolean-mask indexing (Wav2Vec2's SpecAugment in training) sizes its output by the values."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)[x > 0].sum()

    with pytest.raises(ValueError, match=r"runs aten\.nonzero.* fake=False"):
        lo.memory.plan(Masked(), torch.randn(4, 16))


def test_plot_draws_the_plans_numbers(tmp_path):
    """The data handed to matplotlib (not pixels): one stacked layer per category, the total line, in MiB
    here; its top is the peak, each phase's top that phase's peak, the layers at the top the peak's make-up."""
    from lowmem_ops.plan import TIMELINE_CATEGORIES

    model, inputs = hf_llama()
    p = lo.memory.plan(model, inputs)
    fig = p.plot(tmp_path / "step.png")
    assert (tmp_path / "step.png").stat().st_size > 10_000
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.collections] == [c.replace("_", " ") for c in TIMELINE_CATEGORIES]
    total = ax.lines[0].get_ydata()
    series = [p.timeline[c] for c in TIMELINE_CATEGORIES]
    assert list(total) == pytest.approx([sum(v) / 2**20 for v in zip(*series)])
    sums = [sum(v) for v in zip(*series)]
    assert max(sums) == p.peak
    bounds = sorted(p.phase_starts.values()) + [len(sums)]
    for phase, start in p.phase_starts.items():
        end = min(b for b in bounds if b > start)
        assert max(sums[start:end]) == p.phase_peaks[phase], phase
    top = sums.index(p.peak)
    at = {c: p.timeline[c][top] for c in TIMELINE_CATEGORIES}
    assert at["weights"] == p.at_peak["weights"] and at["grads"] == p.at_peak["grads"]
    assert at["optimizer_states"] == p.at_peak["optimizer_states"]
    assert at["saved"] + at["other"] == p.at_peak["inputs"] + p.at_peak["activations"]
    # the stacked layers: each one's top edge is the running sum of the categories below it
    running = [0] * len(sums)
    for layer, c in zip(ax.collections, TIMELINE_CATEGORIES):
        running = [r + n for r, n in zip(running, p.timeline[c])]
        assert layer.get_paths()[0].vertices[:, 1].max() == pytest.approx(max(running) / 2**20)
    with pytest.raises(ValueError, match="no timeline"):
        lo.plan.Plan(**{**p.__dict__, "timeline": {}}).plot(tmp_path / "none.png")
