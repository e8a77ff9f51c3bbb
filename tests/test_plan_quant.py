"""Planning QLoRA: bitsandbytes 4-bit / 8-bit bases accounted as bitsandbytes stores them. The layout
lowmem_ops.quantized builds on meta is the one a real quantisation on CPU makes; the bytes are
bitsandbytes' documented layout by hand; the fake plan of a real quantised model is its real CPU run."""

import math

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops.plan import _tensors_in
from lowmem_ops.quantized import quantize_linears

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=300)


def nf4_bytes(n: int, k: int, double_quant: bool) -> int:
    """bitsandbytes' 4-bit layout for an n x k weight, by hand: two weights a byte; one absmax per block of
    64 (float32; with double quant a uint8, plus a float32 absmax per 256 of those, their 256-entry
    float32 code and a float32 offset); the 16-entry float32 code of nf4."""
    blocks = math.ceil(n * k / 64)
    absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return n * k // 2 + absmax + 4 * 16


def storage_bytes(model) -> int:
    """Every storage the model holds (parameters, buffers, quant states), once each: measured on the objects."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in _tensors_in(model)}.values())


def real_quantized(tmp_path, quant: str, double_quant: bool = True):
    """A tiny LLaMA, bf16, quantised on loading by transformers' BitsAndBytesConfig on CPU, with LoRA r=8."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).save_pretrained(tmp_path)
    config = (transformers.BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else
              transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                              bnb_4bit_use_double_quant=double_quant,
                                              bnb_4bit_compute_dtype=torch.bfloat16))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                          dtype=torch.bfloat16)
    model.train()
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS))


def meta_quantized(quant: str, double_quant: bool = True):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CFG), dtype=torch.bfloat16)
    quantize_linears(model, quant, double_quant=double_quant, skip=("lm_head",))
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS))


def quant_layout(model) -> dict:
    """name -> (shape, dtype) of every quantised weight and quant-state tensor."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            out[name] = [(tuple(m.weight.shape), m.weight.dtype)] + [
                (tuple(t.shape), t.dtype) for t in (state.absmax, state.code, state.offset,
                                                    *([state.state2.absmax, state.state2.code] if state.nested else []))
                if t is not None]
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            out[name] = [(tuple(m.weight.shape), m.weight.dtype), (tuple(scb.shape), scb.dtype)]
    return out


@pytest.mark.parametrize("quant, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_meta_quantisation_is_bitsandbytes_layout(tmp_path, quant, double_quant):
    """The meta build holds the tensors a real CPU quantisation makes, and their bytes are the layout by hand."""
    real, meta = real_quantized(tmp_path, quant, double_quant), meta_quantized(quant, double_quant)
    layout = quant_layout(real)
    assert len(layout) == 2 * len(TARGETS)
    assert quant_layout(meta) == layout
    assert all(t.device.type == "meta" for t in _tensors_in(meta))
    shapes = {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128),
              "gate_proj": (320, 128), "up_proj": (320, 128), "down_proj": (128, 320)}
    per_layer = sum(n * k if quant == "int8" else nf4_bytes(n, k, double_quant) for n, k in shapes.values())
    scales = sum(4 * n for n, _ in shapes.values()) if quant == "int8" else 0  # int8: a float32 scale a row
    bf16 = 2 * (300 * 128 * 2 + 128 * 5)  # embedding, head; 2 norms a layer and the last
    rotary = 2 * 4 * 16  # inv_freq and original_inv_freq, float32
    lora = 4 * 8 * sum(n + k for n, k in shapes.values())  # A (8 x k) and B (n x 8), float32
    assert storage_bytes(real) == storage_bytes(meta) == 2 * (per_layer + scales + lora) + bf16 + rotary


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_plan_is_the_real_run(tmp_path, quant):
    """The fake plan of a real quantised model is the tracker's real CPU run, field for field, and the plan
    of the meta build is the same plan; the weights are every quantised byte, the adapters alone train."""
    real = real_quantized(tmp_path, quant)
    ids = torch.randint(0, 300, (2, 16))
    on_cpu = lo.memory.plan(real, {"input_ids": ids, "labels": ids}, fake=False)
    fake = lo.memory.plan(real, {"input_ids": ids, "labels": ids})
    assert fake == on_cpu
    meta_ids = ids.to("meta")
    assert lo.memory.plan(meta_quantized(quant), {"input_ids": meta_ids, "labels": meta_ids}) == fake
    assert fake.weights == storage_bytes(real)
    lora = [p for n, p in real.named_parameters() if "lora_" in n]
    assert fake.trainable == fake.grads == sum(p.numel() * 4 for p in lora)
    assert fake.optimizer_states == 2 * fake.trainable + 4 * len(lora)


def test_linear4bit_saves_nothing_and_dequantises_in_backward():
    """bitsandbytes' MatMul4Bit keeps the packed weight on its context (not a saved tensor) and nothing else;
    its backward dequantises the whole weight (and the double-quantised absmax) for the input's gradient."""
    n, k, batch = 256, 128, 8
    model = quantize_linears(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(torch.bfloat16), "nf4")
    x = torch.randn(batch, k, dtype=torch.bfloat16, requires_grad=True)
    assert lo.memory.measure(model, x).total_bytes == 0
    p = lo.memory.plan(model, x, optimizer=None, fake=False)
    assert lo.memory.plan(model, x, optimizer=None) == p
    assert p.weights == nf4_bytes(n, k, double_quant=True) and p.saved == 0
    output, loss = batch * n * 2, 2
    # forward's peak: the output and the loss (the fused kernel dequantises inside one op: not seen)
    assert p.phase_at_peak["forward"]["activations"] == output + loss
    # backward's: the output and loss still held, the loss's gradient, the absmax and the weight dequantised
    assert p.phase_at_peak["backward"]["activations"] == output + loss + 2 + 4 * (n * k // 64) + 2 * n * k


def test_a_meta_build_leaves_real_quantisation_working(monkeypatch):
    """bitsandbytes caches its double-quant code map on the first device it quantises on: a meta build
    first must not leave it on meta (every real quantisation after it failed: 'Bnb4bitQuantize' errors
    loading a 4-bit model)."""
    monkeypatch.setattr(bnb.functional, "name2qmap", {})
    meta_quantized("nf4")
    packed, state = bnb.functional.quantize_4bit(torch.randn(64, 64), compress_statistics=True, quant_type="nf4")
    assert packed.device.type == "cpu" and state.state2.code.device.type == "cpu"


def test_quantize_linears_errors():
    with pytest.raises(ValueError, match="quant must be one of"):
        quantize_linears(torch.nn.Linear(4, 4), "nf3")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_linears(torch.nn.Sequential(torch.nn.ReLU()), "nf4")
