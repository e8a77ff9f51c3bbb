"""PEFT all-linear on a transformers MoE wraps the fused experts (and OLMoE's router weight) in ParamWrapper.
4b8a504 leaves those adapters float32; PEFT's get_delta_factors casts them to the expert weight's dtype each
forward, and baddbmm saves the bf16 cast copies. Prints saved bytes: unconverted, converted, and converted
with only the ParamWrapper adapters cast to bf16 beforehand (what the old retype did)."""
import copy, torch, peft, transformers, lowmem_ops as lo
from lowmem_ops import conversion
torch.manual_seed(0)
cfg = transformers.OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
base = transformers.OlmoeForCausalLM(cfg).to(torch.bfloat16)
model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
ids = torch.randint(0, 256, (2, 16)); batch = {"input_ids": ids, "labels": ids}
def saved(m):
    m.train()
    with lo.memory.comparable_runs(m, seed=conversion.RUN_SEED):
        meas = lo.memory.measure(m, **batch)
    casts = sum(s.nbytes for s in meas.storages.values() if s.cast_from is not None and ".mlp.experts" in s.module)
    return meas.total_bytes, casts
wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
print("ParamWrappers:", len(wrapped), wrapped[:3])
old = copy.deepcopy(model)
for n, p in old.named_parameters():
    if ".lora_" in n and ".mlp." in n:
        p.data = p.data.to(torch.bfloat16)
print("unconverted (saved bytes, of which cast copies in experts):", saved(copy.deepcopy(model)))
r = lo.convert(model, example_inputs=batch)
print("converted:", saved(model), "report lines naming mlp.experts/gate:",
      [c.path for c in r.changes if ".mlp." in c.path and "LoRA" in c.before] + [p for p, _ in r.skipped if ".mlp." in p])
lo.convert(old, example_inputs=batch)
print("converted, ParamWrapper adapters bf16 first:", saved(old))
