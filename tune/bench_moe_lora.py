"""LoRA on MoE experts' Parameters (PEFT target_parameters): what a training step keeps, with and without
the factored experts (lowmem_ops._moe_lora), on real configs built on meta (lowmem_ops.memory.plan,
fake tensors, every layer), and the CPU time of one real experts layer's forward + backward.

    python tune/bench_moe_lora.py [--seq 1024] [--rank 8] [--layers N] [--time-tokens 512] [--threads 2]

Variants: "stock" is the PEFT model as it is; "converted, merged saved" is lowmem_ops.convert with the
factored forward switched off (convert as it was before it, the experts' gate fused all the same);
"converted" is lowmem_ops.convert. AdamW on the trainable parameters; bf16 weights, float32 adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import peft
import torch
import transformers

import lowmem_ops as lo
from lowmem_ops import _moe_lora

GIB = 2**30
# name -> (config class, model class, the model's published shape)
CONFIGS = {
    "OLMoE-1B-7B": ("OlmoeConfig", "OlmoeForCausalLM",
                    dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304)),
    "Qwen3-30B-A3B": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                           num_experts_per_tok=8, vocab_size=151936, decoder_sparse_step=1)),
    "gpt-oss-20b": ("GptOssConfig", "GptOssForCausalLM",
                    dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                         vocab_size=201088)),
    "Mixtral-8x7B": ("MixtralConfig", "MixtralForCausalLM",
                     dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
}
TARGETS = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def build(name: str, layers: int | None = None, device: str = "meta") -> torch.nn.Module:
    config_cls, model_cls, shape = CONFIGS[name]
    shape = {**shape, **({"num_hidden_layers": layers} if layers else {})}
    if name == "gpt-oss-20b":
        shape["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(shape["num_hidden_layers"])]
    config = getattr(transformers, config_cls)(**shape, experts_implementation="grouped_mm")
    with torch.device(device):
        model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    return model


@contextlib.contextmanager
def merged_saved():
    """convert as before the factored experts: their forward is the class's."""
    factored_weights = _moe_lora._factored_weights
    _moe_lora._factored_weights = lambda module: None
    try:
        yield
    finally:
        _moe_lora._factored_weights = factored_weights


def plans(name: str, seq: int, rank: int, layers: int | None = None) -> dict:
    model = peft.get_peft_model(build(name, layers), peft.LoraConfig(r=rank, lora_alpha=2 * rank, **TARGETS))
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids}
    out = {"stock": lo.memory.plan(model, batch, optimizer="adamw")}
    with merged_saved():
        before = copy.deepcopy(model)
        lo.convert(before)
        out["converted, merged saved"] = lo.memory.plan(before, batch, optimizer="adamw")
    after = copy.deepcopy(model)
    lo.convert(after)
    out["converted"] = lo.memory.plan(after, batch, optimizer="adamw")
    return out


def experts_step_ms(name: str, tokens: int, rank: int, reps: int = 5) -> dict:
    """Forward + backward of one real experts layer of `name` (PEFT LoRA on its two Parameters), stock and
    factored, interleaved; median ms."""
    from lowmem_ops import _moe_experts

    torch.manual_seed(0)
    model = build(name, layers=1, device="cpu")
    module = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    wrapped = peft.get_peft_model(torch.nn.ModuleDict({"experts": module}),
                                  peft.LoraConfig(r=rank, init_lora_weights=False,
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    stock = wrapped.base_model.model.experts  # ParamWrapper(ParamWrapper(experts))
    factored = copy.deepcopy(stock)
    factored.base_layer.base_layer = _moe_experts.factored(factored.base_layer.base_layer)
    hidden = torch.randn(tokens, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    k = model.config.num_experts_per_tok
    index = torch.stack([torch.randperm(module.num_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k).softmax(-1).to(torch.bfloat16)
    times = {"stock": [], "factored": []}
    for _ in range(reps + 1):
        for label, layer in (("stock", stock), ("factored", factored)):
            start = time.perf_counter()
            layer(hidden, index, weights).float().sum().backward()
            times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t[1:]) for label, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="planned layers (default: the model's)")
    p.add_argument("--time-tokens", type=int, default=512, help="tokens of the timed real layer (0: no timing)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--time-only", nargs="*", choices=list(CONFIGS), default=["OLMoE-1B-7B", "gpt-oss-20b"],
                   help="the models whose real layer is timed (Mixtral's takes minutes on two cores)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    print(f"PEFT LoRA r={args.rank} on q/k/v/o and every layer's experts (target_parameters), bf16, "
          f"batch 1 x {args.seq} tokens, AdamW; lowmem_ops.memory.plan (fake tensors), GiB")
    print(f"{'model':15s} {'variant':26s} {'peak':>8s} {'saved':>8s} {'activations':>12s}")
    for name in args.only:
        for variant, plan in plans(name, args.seq, args.rank, args.layers).items():
            print(f"{name:15s} {variant:26s} {plan.peak / GIB:8.2f} {plan.saved / GIB:8.2f} "
                  f"{plan.activations / GIB:12.2f}")
    if args.time_tokens:
        print(f"\none real experts layer, forward + backward, {args.time_tokens} tokens, bf16, "
              f"{args.threads} CPU threads, median of 5 (ms)")
        for name in args.time_only:
            ms = experts_step_ms(name, args.time_tokens, args.rank)
            print(f"{name:15s} stock {ms['stock']:9.1f}   factored {ms['factored']:9.1f}   "
                  f"({ms['factored'] / ms['stock']:.2f}x)")


if __name__ == "__main__":
    main()
