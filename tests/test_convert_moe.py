"""lowmem_ops.convert on transformers 5's MoE experts (one module, 3-D Parameters): the default
_apply_gate, act(gate) * up on two halves of one projection, fused exactly (lowmem_ops._moe_experts);
the stock, unconverted model is the reference for outputs and gradients."""

import copy
import pickle

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops import _moe_experts, _moe_lora, conversion

transformers = pytest.importorskip("transformers")
moe = pytest.importorskip("transformers.integrations.moe")  # transformers 5: experts as one module
if not hasattr(moe, "_default_apply_gate"):
    pytest.skip("this transformers has no default _apply_gate", allow_module_level=True)

BATCH, TOKENS, VOCAB, TOP_K = 2, 16, 300, 2
_SHAPE = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              num_experts_per_tok=TOP_K)
# name -> (config class, model class, tiny config, the experts' intermediate size)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=4), 96),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, moe_intermediate_size=48, num_experts=4, decoder_sparse_step=1), 48),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=80, num_experts=4), 80),
}


# experts with their own _apply_gate (clamped, interleaved halves, biases): not fused, only factored under PEFT
OWN_GATE = {"gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                                  head_dim=16, layer_types=["full_attention"]), 48)}


def build(arch: str, dtype=torch.float32, implementation: str = "grouped_mm"):
    config_cls, model_cls, kwargs, _ = {**ARCHS, **OWN_GATE}[arch]
    cfg = getattr(transformers, config_cls)(**_SHAPE, **kwargs, experts_implementation=implementation)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    return model, {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)}


def experts(model) -> dict:
    """path -> experts module (under PEFT's target_parameters: the innermost base_layer)."""
    return {p: m for p, m in model.named_modules() if type(m).__name__.endswith("Experts")}


def saved_bytes(model, batch) -> int:
    model.train()
    with lo.memory.comparable_runs(model, seed=conversion.RUN_SEED):
        return lo.memory.measure(model, **batch).total_bytes


def outputs_and_gradients(model, batch):
    """Logits and every trainable parameter's gradient (by name) of a fixed projection of them, eval mode."""
    model.eval()
    try:
        logits = model(**batch).logits
        g = torch.Generator().manual_seed(2)
        loss = (logits.double() * torch.randn(logits.shape, generator=g, dtype=torch.float64)).sum()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names], allow_unused=True)
        return logits.detach().double(), {n: g for n, g in zip(names, grads) if g is not None}
    finally:
        model.train()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def convert_as_before(model, batch, monkeypatch, **options):
    """convert as it was before experts were fused: every other change, the experts untouched."""
    with monkeypatch.context() as m:
        m.setattr(_moe_experts, "candidate", lambda module: False)
        return lo.convert(model, example_inputs=batch, **options)


def expected_saving(model, dtype, arch) -> int:
    """act(gate) for every (token, expert) pair of every layer, no longer saved: S x I elements a layer."""
    return len(experts(model)) * BATCH * TOKENS * TOP_K * ARCHS[arch][3] * torch.finfo(dtype).bits // 8


CASES = [pytest.param(arch, dtype, implementation, id=f"{arch}-{str(dtype)[6:]}-{implementation}")
         for arch in ("mixtral", "qwen3_moe") for dtype in (torch.float32, torch.bfloat16)
         for implementation in ("grouped_mm", "batched_mm")]
# OLMoE in float32 only: in bf16 (2 layers, this seed) one token's top-2 experts in the second layer
# differed from the stock model's (a router logit one rounding apart), moving that layer's gradients
# by up to 27%: a routing discontinuity, not a test of the op
CASES.append(pytest.param("olmoe", torch.float32, "grouped_mm", id="olmoe-float32-grouped_mm"))


@pytest.mark.parametrize("arch, dtype, implementation", CASES)
def test_experts_fused_exactly_and_save_act_gate(arch, dtype, implementation, monkeypatch):
    model, batch = build(arch, dtype, implementation)
    stock = copy.deepcopy(model)
    # no folds: a norm folded into q / k / v changes their parameterisation, so their gradients
    before = copy.deepcopy(model)
    convert_as_before(before, batch, monkeypatch, fold=False)
    originals = experts(model)
    params = {n: id(p) for n, p in model.named_parameters() if ".experts." in n}
    keys = sorted(model.state_dict())

    report = lo.convert(model, example_inputs=batch, fold=False)
    fused = [c for c in report.changes if c.path in originals]
    assert originals and len(fused) == len(originals), str(report)
    assert all(c.status == "applied" and "_apply_gate fused: resilu2" in c.after for c in fused), str(report)
    assert all(c.bytes_after < c.bytes_before for c in fused), str(report)
    for path, old in originals.items():
        new = model.get_submodule(path)
        assert new is not old and type(new) is type(old) and _moe_experts.is_fused(new) and not _moe_experts.is_fused(old)
    # the experts' very Parameter objects under the same names; every state_dict key as it was (folds included)
    assert {n: id(p) for n, p in model.named_parameters() if ".experts." in n} == params
    assert sorted(model.state_dict()) == keys

    # outputs and parameter gradients: those of the stock model (the op is exact; bf16 rounds act(gate) once less)
    out, grads = outputs_and_gradients(model, batch)
    ref_out, ref_grads = outputs_and_gradients(stock, batch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(out, ref_out) < tol
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads and all(relative_error(grads[n], ref_grads[n]) < tol for n in grads)

    # saved for backward: exactly act(gate) less than convert saved before (lo.memory, params excluded)
    stock_bytes, before_bytes, after_bytes = saved_bytes(stock, batch), saved_bytes(before, batch), saved_bytes(model, batch)
    assert after_bytes < before_bytes < stock_bytes
    assert before_bytes - after_bytes == expected_saving(model, dtype, arch)
    assert report.memory_after.total_bytes == after_bytes

    # export: the stock modules (the same objects) under their names, computing what they did
    lo.export(model)
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert relative_error(outputs_and_gradients(model, batch)[0], ref_out) == 0


def test_eager_experts_are_undone_with_the_reason():
    model, batch = build("mixtral", torch.float32, "eager")
    originals = experts(model)
    report = lo.convert(model, example_inputs=batch)
    undone = [c for c in report.changes if c.path in originals]
    assert len(undone) == len(originals) and all(c.status == "undone" for c in undone), str(report)
    assert all("saves no memory" in c.reason and "'eager'" in c.reason and "act_fn directly" in c.reason
               for c in undone), str(report)
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert all("parts were tried one by one" in c.reason for c in undone), str(report)
    # the activation alone saves nothing there: the loop's gate and up are halves of one storage, which
    # the product keeps anyway, so SiLU's own saving of the gate costs nothing and codes would add
    alone = [c for c in report.changes if c.before == "SiLUActivation"]
    assert [c.path for c in alone] == [p + ".act_fn" for p in originals], str(report)
    assert all(c.status == "undone" and "saves no memory" in c.reason for c in alone), str(report)


def test_converted_model_pickles_deep_copies_and_converts_again():
    model, batch = build("qwen3_moe")
    lo.convert(model, example_inputs=batch)
    ref_out, _ = outputs_and_gradients(model, batch)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(_moe_experts.is_fused(m) for m in experts(twin).values())
        out, grads = outputs_and_gradients(twin, batch)
        assert torch.equal(out, ref_out) and grads
        assert list(twin.state_dict()) == list(model.state_dict())
    again = lo.convert(model, example_inputs=batch)  # already fused: nothing more to do for the experts
    assert not [c for c in again.changes if c.path in experts(model)], str(again)


def test_peft_lora_on_expert_parameters(monkeypatch):
    """target_parameters wraps the experts in ParamWrappers, which parametrize gate_up_proj / down_proj
    while they run: the fused clone under them computes what the stock experts do, adapters included."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft.tuners.lora.layer, "ParamWrapper"):
        pytest.skip("this peft has no target_parameters")
    model, batch = build("mixtral")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,  # B != 0: real deltas
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, config)
    stock, before = copy.deepcopy(model), copy.deepcopy(model)
    convert_as_before(before, batch, monkeypatch)
    originals = experts(model)
    assert all(p.endswith(".base_layer.base_layer") for p in originals)
    report = lo.convert(model, example_inputs=batch)
    fused = [c for c in report.changes if c.path in originals]
    assert len(fused) == len(originals) and all(c.status == "applied" for c in fused), str(report)
    assert all(not p.requires_grad for m in originals.values() for p in m.parameters())  # frozen, still the same
    out, grads = outputs_and_gradients(model, batch)
    ref_out, ref_grads = outputs_and_gradients(stock, batch)
    assert relative_error(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("experts" in n and "lora_A" in n for n in grads)
    assert all(relative_error(grads[n], ref_grads[n]) < 1e-5 for n in grads)
    assert saved_bytes(model, batch) < saved_bytes(before, batch)
    lo.export(model)
    assert all(model.get_submodule(p) is m for p, m in originals.items())


def with_expert_adapters(model, r: int = 4):
    """PEFT LoRA on the experts' Parameters (target_parameters) and on q_proj, B != 0 (real deltas)."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft.tuners.lora.layer, "ParamWrapper"):
        pytest.skip("this peft has no target_parameters")
    config = peft.LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return peft.get_peft_model(model, config)


def factor_experts(model) -> dict:
    """Every experts module replaced by its factored clone, by hand; path -> the original."""
    originals = experts(model)
    for path, module in originals.items():
        setattr(*conversion._home(model, path), _moe_experts.factored(module))
    return originals


def saved_stacks(model, batch, stacks: dict) -> list:
    """Shapes of the tensors autograd saves in a training-mode forward that are as large as an expert
    stack of `stacks` (path -> experts module) and are no Parameter."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    smallest = min(getattr(m, n).numel() for m in stacks.values() for n in ("gate_up_proj", "down_proj"))
    found = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() >= smallest:
            found.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", [*ARCHS, *OWN_GATE])
def test_factored_experts_match_a_float64_reference_and_save_no_merged_stack(arch, dtype):
    """PEFT's proxy merges W + s * lhs @ rhs in place of each adapted expert stack, and the grouped matmul
    saved that copy. The factored forward computes x @ W + s * (x @ lhs) @ rhs: outputs and every
    gradient as close to a float64 run of the stock model (its eager loop) as the stock model's own, and
    nothing of an expert stack's size saved."""
    model, batch = build(arch, dtype)
    model = with_expert_adapters(model)
    stock, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    reference.get_base_model().set_experts_implementation("eager")  # grouped_mm has no float64
    originals = factor_experts(model)
    assert originals and all(_moe_experts.is_factored(m) for m in experts(model).values())
    floor = 1e-7 if dtype == torch.float32 else 1e-4
    (out, grads), (stock_out, stock_grads), (ref_out, ref_grads) = (
        outputs_and_gradients(m, batch) for m in (model, stock, reference))
    assert relative_error(out, ref_out) <= 2 * relative_error(stock_out, ref_out) + floor
    assert grads.keys() == stock_grads.keys() == ref_grads.keys()
    assert any("experts" in n and "lora_B" in n for n in grads)
    for n in grads:
        assert relative_error(grads[n], ref_grads[n]) <= 2 * relative_error(stock_grads[n], ref_grads[n]) + floor, n
    stacks = [getattr(m, n).shape for m in originals.values() for n in ("gate_up_proj", "down_proj")]
    assert len(saved_stacks(stock, batch, originals)) >= len(stacks)  # what the stock path saves
    assert saved_stacks(model, batch, originals) == []
    merged = sum(getattr(m, name).nbytes for m in originals.values() for name in ("gate_up_proj", "down_proj"))
    assert 0.75 * merged < saved_bytes(stock, batch) - saved_bytes(model, batch) < merged  # less the factors, x @ lhs


def test_factored_experts_run_the_class_forward_where_the_factoring_does_not_apply(monkeypatch):
    """No adapter, the eager implementation, or a parametrization that is not PEFT's factor proxy:
    the class's own forward runs, with its results."""
    calls = []
    original = _moe_lora._rank_operands
    monkeypatch.setattr(_moe_lora, "_rank_operands", lambda *a: (calls.append(1), original(*a))[1])
    model, batch = build("mixtral", implementation="eager")
    model = with_expert_adapters(model)
    stock = copy.deepcopy(model)
    factor_experts(model)
    out, _ = outputs_and_gradients(model, batch)  # eager: the class's per-expert loop
    assert not calls and torch.equal(out, outputs_and_gradients(stock, batch)[0])
    module = build("mixtral")[0].model.layers[0].mlp.experts
    factored = _moe_experts.factored(module)
    hidden = torch.randn(6, module.gate_up_proj.shape[-1])
    index, weights = torch.randint(0, module.num_experts, (6, TOP_K)), torch.rand(6, TOP_K)
    assert torch.equal(factored(hidden, index, weights), module(hidden, index, weights)) and not calls

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(factored, "down_proj", Doubled())
    assert _moe_lora.factors(factored, "down_proj") is None and not _moe_lora.applies(factored)
    assert factored(hidden, index, weights).shape == hidden.shape and not calls


def test_convert_factors_experts_with_their_own_gate_under_peft_only():
    """GPT-OSS's experts (own gate: not fused) become the factored clone under PEFT's target_parameters,
    with outputs and gradients as the stock model's; without adapters convert leaves them alone."""
    model, batch = build("gpt_oss")
    report = lo.convert(model, example_inputs=batch)
    assert not [c for c in report.changes if c.path.endswith("experts")], str(report)
    model = with_expert_adapters(build("gpt_oss")[0])
    stock = copy.deepcopy(model)
    originals = experts(model)
    report = lo.convert(model, example_inputs=batch)
    changes = [c for c in report.changes if c.path in originals]
    assert len(changes) == len(originals) and all(c.status == "applied" for c in changes), str(report)
    assert all("no merged expert stack made or saved" in c.after for c in changes)
    out, grads = outputs_and_gradients(model, batch)
    ref_out, ref_grads = outputs_and_gradients(stock, batch)
    assert relative_error(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys() and all(relative_error(grads[n], ref_grads[n]) < 1e-5 for n in grads)
    twin = copy.deepcopy(model)  # the forward is bound to each copy, not to the module it was copied from
    assert all(m.forward.args[0] is m for m in experts(twin).values())
    lo.export(model)
    assert all(model.get_submodule(p) is m and "forward" not in vars(m) for p, m in originals.items())
    eager, batch = build("gpt_oss", implementation="eager")  # the class's loop: nothing factored, undone
    report = lo.convert(with_expert_adapters(eager), example_inputs=batch)
    assert [c.status for c in report.changes if c.path.endswith("experts.base_layer.base_layer")] == ["undone"]
    assert "the factored LoRA matmuls replace grouped_mm's only" in str(report)


def test_experts_with_their_own_gate_are_left_alone():
    """GPT-OSS clamps and interleaves in its own _apply_gate: not the default, so not a candidate."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no GPT-OSS")
    from transformers.models.gpt_oss import modeling_gpt_oss

    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=32, num_local_experts=2, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gpt_oss = modeling_gpt_oss.GptOssExperts(cfg)
    mixtral = transformers.MixtralConfig(hidden_size=32, intermediate_size=32, num_local_experts=2)
    stock = transformers.models.mixtral.modeling_mixtral.MixtralExperts(mixtral)
    assert not _moe_experts.candidate(gpt_oss) and _moe_experts.candidate(stock)
    with pytest.raises(ValueError, match="GptOssExperts is not a transformers experts module with the default"):
        _moe_experts.fused(gpt_oss, "resilu2")
    with pytest.raises(ValueError, match="mode must be one of"):
        _moe_experts.fused(stock, "resilu2", "fast")


def test_experts_whose_activation_has_no_fused_kernel_are_a_report_line():
    cfg = transformers.MixtralConfig(**_SHAPE, intermediate_size=32, num_local_experts=2,
                                     hidden_act="relu")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    report = lo.convert(model, example_inputs={"input_ids": torch.randint(0, VOCAB, (1, 8))})
    assert ("model.layers.0.mlp.experts", "MoE experts with activation ReLU, which has no fused kernel") in report.skipped
    assert not _moe_experts.is_fused(model.model.layers[0].mlp.experts)
