"""lowmem_ops.convert makes PEFT LoRA adapters compute in the dtype their base computes in (their
weights stay float32), where that base holds no floating weight: bitsandbytes 4-bit (QLoRA) and
8-bit layers; adapters on MoE expert parameters (PEFT's target_parameters) cast nothing and are left
alone. A norm is never folded into a quantized weight."""

import pytest
import torch

import lowmem_ops as lo

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_llama(tmp_path, bits: int, lora: bool = True):
    """A tiny LLaMA, bf16, its decoder linears quantized by bitsandbytes on CPU (lm_head stays bf16)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
             if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu",
                                                          dtype=torch.bfloat16)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS))
    return model, {"input_ids": torch.randint(0, 300, (2, 64))}


def _quantized_weights(model) -> dict:
    import bitsandbytes as bnb
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _adapter_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_adapters_take_the_compute_dtype(tmp_path, bits):
    baseline, batch = quantized_llama(tmp_path / "a", bits)
    assert _adapter_dtypes(baseline) == {torch.float32}  # PEFT's default
    unaligned = lo.convert(baseline, example_inputs=batch, lora_dtype=False)

    model, batch = quantized_llama(tmp_path / "b", bits)
    quantized = _quantized_weights(model)
    assert quantized and all(not w.is_floating_point() for w in quantized.values())
    report = lo.convert(model, example_inputs=batch)
    # Only the memory filter may undo a change here: the first norm, whose input needs no gradient
    # under LoRA, saves nothing either way.
    assert not [c for c in report.changes if c.status == "undone" and not c.reason.startswith("saves no memory")], \
        str(report)
    assert report.max_difference <= report.tolerance
    computing = [c for c in report.applied if c.before.startswith("LoRA adapters")]
    assert len(computing) == 2 * len(TARGETS), str(report)
    assert all(c.after == "computing in bfloat16, weights kept in float32" for c in computing), str(report)
    assert _adapter_dtypes(model) == {torch.float32}

    # every adapter casting its input costs most of what the MS ops save
    ratio = report.memory_after.total_bytes / report.memory_before.total_bytes
    ratio_unaligned = unaligned.memory_after.total_bytes / unaligned.memory_before.total_bytes
    assert unaligned.memory_before.total_bytes == report.memory_before.total_bytes
    assert ratio <= 0.5 and ratio_unaligned >= 0.8, (ratio, ratio_unaligned)

    # no norm folded into a quantized layer: inverse mode there, quantized weights untouched
    assert not [c for c in report.applied if "folded" in c.after], str(report)
    for name, weight in _quantized_weights(model).items():
        assert torch.equal(weight, quantized[name]), name

    # a training step: the adapters, and only they, learn (LoRA's B starts at zero, so it moves first).
    # Every B, q_proj's too: convert's eval-mode runs must not have switched bitsandbytes to its CPU
    # inference layout (AVX512-BF16 CPUs), through which no gradient reaches a layer's input.
    model.train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    opt = torch.optim.SGD(lora.values(), lr=1e-2)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    opt.step()
    assert [n for n, p in lora.items() if "lora_B" in n and not p.ne(0).any()] == []
    for name, weight in _quantized_weights(model).items():
        assert torch.equal(weight, quantized[name]), name


def test_norms_before_quantized_layers_are_not_folded(tmp_path):
    """Without LoRA, each norm feeds only 4-bit layers, which a plain nn.Linear would have taken the fold."""
    model, batch = quantized_llama(tmp_path, 4, lora=False)
    quantized = _quantized_weights(model)
    report = lo.convert(model, example_inputs=batch)
    norms = [c for c in report.applied if c.after.startswith("MSRMSNorm")]
    assert len(norms) == 5 and not [c for c in norms if "folded" in c.after], str(report)
    assert report.max_difference <= report.tolerance
    for name, weight in _quantized_weights(model).items():
        assert torch.equal(weight, quantized[name]), name


def test_adapters_on_moe_expert_parameters():
    """target_parameters wraps the experts' gate_up_proj / down_proj (no `.weight`) in ParamWrappers,
    which PEFT computes with in the parameter's dtype already."""
    if not hasattr(peft.tuners.lora.layer, "ParamWrapper"):
        pytest.skip("this peft has no target_parameters")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=300, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
    if not hasattr(model.model.layers[0].mlp.experts, "gate_up_proj"):
        pytest.skip("this transformers holds Mixtral's experts as Linear modules")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, config)
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrappers) == 2 and _adapter_dtypes(model) == {torch.float32}
    report = lo.convert(model, example_inputs={"input_ids": torch.randint(0, 300, (2, 32))})
    assert report.max_difference <= report.tolerance
    assert _adapter_dtypes(model) == {torch.float32}, str(report)
    # the experts' adapters make a weight delta cast to bf16 by PEFT: no input cast to remove
    assert [c.path.rpartition(".")[2] for c in report.applied if c.before.startswith("LoRA")] == ["q_proj"], str(report)
    # and the report says so, with what the float32 factors cost
    kept = [p.rpartition(".")[2] for p, why in report.skipped if why.startswith("LoRA adapters on a bare parameter")]
    assert sorted(kept) == ["base_layer", "experts"], str(report)


def test_qlora_prepared_for_kbit_training(tmp_path):
    """The QLoRA recipe: peft.prepare_model_for_kbit_training puts the norms and embeddings in float32,
    so the residual stream and every adapter's input are float32 (PEFT's cast is a no-op there: no
    adapter line), while the 4-bit layers still compute in bf16, which sets the output tolerance
    (against 1e-3, a norm's exact swap 'moved' the outputs through bf16 rounding and was undone)."""
    model, batch = quantized_llama(tmp_path, 4, lora=False)
    model = peft.prepare_model_for_kbit_training(model)
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float32}
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    report = lo.convert(model, example_inputs=batch)
    assert report.tolerance == 5e-2 and report.max_difference <= report.tolerance, str(report)
    assert not [c for c in report.changes if c.before.startswith("LoRA adapters")], str(report)
    norms = [c for c in report.changes if c.after.startswith("MSRMSNorm")]
    assert len(norms) == 5 and not [c for c in norms if c.status == "undone" and "moved" in c.reason], str(report)
    assert report.memory_after.total_bytes < 0.8 * report.memory_before.total_bytes, str(report)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
