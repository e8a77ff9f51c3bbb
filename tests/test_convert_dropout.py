"""convert stores no dropout masks: nn.Dropout -> lo.nn.Dropout, BERT-family post-LN output blocks ->
DropoutAddNorm (fused dropout + add + MS LayerNorm), HF sdpa attention -> regenerated probability
dropout off CUDA; recognised by behaviour, verified, measured, and undone by lo.export."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowmem_ops as lo
from lowmem_ops import _attention
from lowmem_ops._post_ln import DropoutAddNorm
from lowmem_ops.dropout import draw_seed, keep_mask

transformers = pytest.importorskip("transformers")

# docs/convert.md ("Dropout"): measured 0.603x (no LoRA) and 0.613x (LoRA r=8); issue 13's target is 0.65x
RATIO_BOUND = 0.65


def roberta():
    cfg = transformers.RobertaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, vocab_size=1000, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=0.1, max_position_embeddings=130)
    torch.manual_seed(0)
    return transformers.RobertaModel(cfg), {"input_ids": torch.randint(3, 1000, (4, 64))}


def _lora(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["query", "key", "value", "dense"]))


@pytest.mark.parametrize("lora", [False, True])
def test_roberta_saves_at_most_0_65x(lora):
    model, batch = roberta()
    if lora:
        model = _lora(model)
    report = lo.convert(model, example_inputs=batch)
    fused = [c for c in report.applied if c.after == "DropoutAddNorm"]
    attention = [c for c in report.applied if "regenerated" in c.after]
    assert len(fused) == 4 and {c.before for c in fused} == {"RobertaSelfOutput", "RobertaOutput"}, str(report)
    assert len(attention) == 2, str(report)
    ratio = report.memory_after.total_bytes / report.memory_before.total_bytes
    assert ratio <= RATIO_BOUND, str(report)
    assert report.gradient_cosine is not None and report.gradient_cosine > 0.99, str(report)
    # no saved tensor is a dropout mask any more: a dropout saves its 8-byte seed only, and each
    # attention block saves one (b, h, s, s) tensor fewer
    assert {s.nbytes for s in report.memory_after.storages.values() if s.module.endswith("dropout")} <= {8}
    square = lambda m: sum(1 for s in m.storages.values() if len(s.shape) >= 3 and s.shape[-1] == s.shape[-2] == 64)  # noqa: E731
    assert square(report.memory_after) == square(report.memory_before) - 2
    # the converted model trains
    model.train()
    out = model(**batch).last_hidden_state
    out.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_block_is_the_original_with_the_same_mask():
    model, batch = roberta()
    block = model.encoder.layer[0].output
    fused_model = nn.ModuleDict({"b": copy.deepcopy(block)})
    lo.convert(fused_model)  # no example inputs: the block's own probe decides
    assert isinstance(fused_model["b"], DropoutAddNorm)
    h, res = torch.randn(2, 7, 512, requires_grad=True), torch.randn(2, 7, 128, requires_grad=True)
    torch.manual_seed(4)
    seed = draw_seed("cpu")
    keep = keep_mask((2, 7, 128), seed, 0, 0.1)
    projected = block.dense(h)
    want = F.layer_norm(torch.where(keep, projected / 0.9, 0.0) + res, (128,), block.LayerNorm.weight,
                        block.LayerNorm.bias, block.LayerNorm.eps)
    fused_model.train()
    torch.manual_seed(4)
    got = fused_model["b"](h, res)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad(want.square().sum(), (h, res, block.dense.weight))
    g_got = torch.autograd.grad(got.square().sum(), (h, res, fused_model["b"].dense.weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _DropAfterNorm(nn.Module):
    """dense, dropout and LayerNorm, but the dropout after the norm: not the post-LN block."""

    def __init__(self):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = nn.Linear(8, 8), nn.Dropout(0.1), nn.LayerNorm(8)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.LayerNorm(self.dense(hidden_states) + input_tensor))


class _NoResidual(_DropAfterNorm):
    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states))) + input_tensor


@pytest.mark.parametrize("cls", [_DropAfterNorm, _NoResidual])
def test_look_alike_blocks_are_not_fused(cls):
    model = nn.ModuleDict({"block": cls()})
    report = lo.convert(model)
    assert type(model["block"]) is cls
    assert any(path == "block" and "not fused" in why for path, why in report.skipped), str(report)


def test_dropout_modules_are_swapped_and_save_the_seed_only():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.2), nn.Linear(16, 4), nn.Dropout(0.0))
    x = torch.randn(8, 16)
    report = lo.convert(model, example_inputs=x)
    assert type(model[1]) is lo.nn.Dropout and model[1].p == 0.2 and type(model[3]) is nn.Dropout, str(report)
    assert report.memory_after.total_bytes == report.memory_before.total_bytes - 8 * 16 * 4 + 8
    lo.export(model)
    assert type(model[1]) is nn.Dropout and model[1].p == 0.2
    model.eval()
    lo.convert(model, example_inputs=x)
    model.train()  # converted in eval mode, trained, exported in eval mode: the dropout comes back in eval
    model.eval()
    lo.export(model)
    assert not model[1].training and torch.equal(model(x), model[2](model[0](x)))
    hand_built = nn.Sequential(lo.nn.Dropout(0.3))
    assert type(lo.export(hand_built)[0]) is nn.Dropout


def test_export_restores_stock_modules_and_save_pretrained_round_trips(tmp_path):
    model, batch = roberta()
    stock_keys = list(model.state_dict())
    lo.convert(model, example_inputs=batch)
    assert list(model.state_dict()) == stock_keys
    assert model.config._attn_implementation == "sdpa"  # only the attention modules' own copies changed
    lo.export(model)
    layer = model.encoder.layer[0]
    assert type(layer.output).__name__ == "RobertaOutput" and type(layer.output.dropout) is nn.Dropout
    assert layer.attention.self.config is model.config
    model.save_pretrained(tmp_path)
    loaded = transformers.RobertaModel.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    assert loaded.config._attn_implementation == "sdpa"


def _qkv(heads=4, kv_heads=4, seq=6, dim=8):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, seq, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, seq, dim, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "gqa"])
def test_regenerated_sdpa_is_torchs_without_dropout(case):
    q, k, v = _qkv(kv_heads=2 if case == "gqa" else 4)
    kwargs = {"scale": 0.3}
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
        kwargs["attn_mask"][..., 0] = True  # no fully masked row
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "gqa":
        kwargs["enable_gqa"] = True
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(_attention.sdpa_with_regenerated_dropout(q, k, v, **kwargs), want)


def test_regenerated_sdpa_drops_probabilities_with_lo_dropouts_mask():
    q, k, v = _qkv()
    torch.manual_seed(11)
    got = _attention.sdpa_with_regenerated_dropout(q, k, v, dropout_p=0.25)
    torch.manual_seed(11)
    seed = draw_seed("cpu")
    probs = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
    want = torch.where(keep_mask(probs.shape, seed, 0, 0.25), probs / 0.75, 0.0) @ v
    torch.testing.assert_close(got, want)


def test_attention_module_saves_no_mask_in_training_and_is_unchanged_in_eval():
    model, batch = roberta()
    attn = model.encoder.layer[0].attention.self
    new = _attention.with_regenerated_dropout(attn)
    assert new.query is attn.query and new.config is not attn.config and attn.config._attn_implementation == "sdpa"
    x = torch.randn(4, 64, 128, requires_grad=True)
    new.eval(), attn.eval()
    torch.testing.assert_close(new(x)[0], attn(x)[0])
    new.train(), attn.train()
    holder = nn.ModuleDict({"a": attn})
    before = lo.memory.measure(holder["a"], x)
    after = lo.memory.measure(new, x)
    mask = 4 * 4 * 64 * 64 * 4  # a float32 (b, h, s, s) mask
    assert after.total_bytes == before.total_bytes - mask + 8


def test_a_model_in_eval_mode_converts_as_for_training():
    """from_pretrained returns a model in eval mode, where a dropout saves nothing. convert measured
    it in that mode and undid every dropout swap ("saves no memory (+8 bytes)"); it measures in
    training mode, as training will run, and gives every module its flag back."""
    trained, batch = roberta()
    want = lo.convert(trained.train(), example_inputs=batch)
    model, _ = roberta()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    report = lo.convert(model, example_inputs=batch)
    assert not any(m.training for m in model.modules())  # the new modules too: no dropout at evaluation
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, expected)
    assert [(c.path, c.after, c.status) for c in report.changes] == [(c.path, c.after, c.status) for c in want.changes]
    assert report.memory_after.total_bytes == want.memory_after.total_bytes, str(report)
    assert report.memory_after.total_bytes / report.memory_before.total_bytes <= RATIO_BOUND, str(report)


def test_a_dropout_frozen_in_eval_mode_in_a_training_model_stays():
    """A model in training mode is measured as its user set it up: a dropout they put in eval mode
    saves no mask, so its swap would only add a seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.2), nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 4)).train()
    model[3].eval()
    report = lo.convert(model, example_inputs=torch.randn(8, 16))
    status = {c.path: (c.status, c.reason) for c in report.changes}
    assert status["1"] == ("applied", ""), str(report)
    assert status["3"][0] == "undone" and "saves no memory" in status["3"][1], str(report)
    assert model.training and not model[3].training
