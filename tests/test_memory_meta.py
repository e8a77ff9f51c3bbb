"""lo.memory.measure on meta and fake tensors: exactly the bytes, per module, of the same model on CPU
(storages told apart by identity; by data_ptr every meta storage was one, and everything 0 B)."""

import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lowmem_ops as lo
from lowmem_ops.plan import fake_copy

transformers = pytest.importorskip("transformers")


def vit(attn: str):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=3, attn_implementation=attn)
    return transformers.ViTForImageClassification(cfg).train(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def llama(attn: str):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=172, vocab_size=128, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).train(), {"input_ids": torch.randint(0, 128, (2, 16))}


def on_meta(model, inputs):
    return copy.deepcopy(model).to("meta"), {k: v.to("meta") for k, v in inputs.items()}


def on_fake(model, inputs, mode: FakeTensorMode):
    """A copy of model and inputs on fake tensors (every tensor they hold; ties kept)."""
    return fake_copy((model, inputs), mode)


def assert_same(a: lo.memory.Measurement, b: lo.memory.Measurement):
    assert a.total_bytes > 0
    assert b.total_bytes == a.total_bytes
    assert b.by_module() == a.by_module()
    assert sorted((s.module, s.nbytes, s.shape, s.dtype) for s in b.storages.values()) == \
        sorted((s.module, s.nbytes, s.shape, s.dtype) for s in a.storages.values())


@pytest.mark.parametrize("build", [vit, llama])
def test_meta_and_fake_measure_what_cpu_measures(build):
    # eager attention: on meta, sdpa takes torch's math path (it saves the attention matrix) where CPU
    # takes its flash kernel, a different computation; eager attention is one computation everywhere
    torch.manual_seed(0)
    model, inputs = build("eager")
    cpu = lo.memory.measure(model, **inputs)
    meta_model, meta_inputs = on_meta(model, inputs)
    assert_same(cpu, lo.memory.measure(meta_model, **meta_inputs))
    with FakeTensorMode() as mode:
        fake_model, fake_inputs = on_fake(model, inputs, mode)
        assert_same(cpu, lo.memory.measure(fake_model, **fake_inputs))


@pytest.mark.parametrize("build", [vit, llama])
def test_fake_measures_what_cpu_measures_with_sdpa(build):
    torch.manual_seed(0)
    model, inputs = build("sdpa")
    cpu = lo.memory.measure(model, **inputs)
    with FakeTensorMode() as mode:
        fake_model, fake_inputs = on_fake(model, inputs, mode)
        assert_same(cpu, lo.memory.measure(fake_model, **fake_inputs))


def test_converted_model_on_meta_and_fake():
    torch.manual_seed(0)
    model, inputs = llama("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lo.convert(model, inputs)
    assert report.applied
    cpu = lo.memory.measure(model, **inputs)
    assert cpu.total_bytes == report.memory_after.total_bytes
    meta_model, meta_inputs = on_meta(model, inputs)
    assert_same(cpu, lo.memory.measure(meta_model, **meta_inputs))
    with FakeTensorMode() as mode:
        fake_model, fake_inputs = on_fake(model, inputs, mode)
        assert_same(cpu, lo.memory.measure(fake_model, **fake_inputs))


def test_views_of_one_meta_storage_count_once():
    x = torch.empty(8, 16, device="meta", requires_grad=True)

    class TwoViews(torch.nn.Module):
        def forward(self, x):
            y = x * 2  # one new storage: 8*16*4 bytes
            return (y[:4].exp() + y[4:].exp()).sum()  # exp saves its outputs: two more, 4*16*4 each

    m = lo.memory.measure(TwoViews(), x)
    assert m.total_bytes == 2 * 4 * 16 * 4 + 0  # mul by a Python scalar saves nothing of x
