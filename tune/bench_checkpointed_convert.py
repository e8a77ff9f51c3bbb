"""Step peak of a model checkpointed before convert, against the other order (lowmem_ops.memory.plan,
fake tensors): python tune/bench_checkpointed_convert.py. "before" is convert without its checkpointing
switch-off (convert.__wrapped__), as convert behaved until 2026-12-01."""
import copy, warnings, torch, transformers
import lowmem_ops as lo
warnings.simplefilter("ignore")
torch.manual_seed(0)
def llama():
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
def gpt2():
    cfg = transformers.GPT2Config(n_embd=512, n_layer=4, n_head=8, vocab_size=1000)
    return transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
for name, make in (("llama", llama), ("gpt2", gpt2)):
    base = make()
    ids = torch.randint(0, 1000, (8, 1024))
    batch = {"input_ids": ids, "labels": ids}
    small = {"input_ids": ids[:, :64]}
    out = {}
    def gc(m): m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}); m.config.use_cache = False; return m
    m = copy.deepcopy(base); out["baseline"] = m
    m = gc(copy.deepcopy(base)); out["checkpointed"] = m
    m = gc(copy.deepcopy(base)); r = lo.convert.__wrapped__(m, small); out["checkpointed, then converted (before)"] = (m, r)
    m = gc(copy.deepcopy(base)); r = lo.convert(m, small); out["checkpointed, then converted (now)"] = (m, r)
    m = copy.deepcopy(base); r = lo.convert(m, small); gc(m); out["converted, then checkpointed"] = (m, r)
    print(f"{name}: bf16, d=512, 4 layers, batch 8 x 1024 tokens, no optimizer; plan peak / activations")
    for k, v in out.items():
        m, r = v if isinstance(v, tuple) else (v, None)
        p = lo.memory.plan(m, batch, optimizer=None)
        print(f"  {k:40s} applied {len(r.applied) if r else '-':>3}  peak {p.peak/2**20:8.2f} MiB  activations {p.activations/2**20:8.2f} MiB  saved {p.saved/2**20:7.2f} MiB")
