"""LoRA adapters that compute in their input's dtype while their Parameters stay float32
(lowmem_ops/_lora.py), and what lowmem_ops.convert does with them on PEFT models.

Before, convert cast the adapters to bf16: the saved copies went, and so did AdamW steps under half a
bf16 ulp of a weight (20 % of lora_A's elements changed on a step, against 100 % unconverted)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import lowmem_ops as lo
from lowmem_ops._lora import AdapterConv2d, AdapterLinear, in_input_dtype

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t`, held in another layout."""
    if how == "transposed":  # the last dim strided
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "sliced":  # rows taken from a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1:t.shape[-1] + 1] = t
        return wide[..., 1:t.shape[-1] + 1]
    return t


def _close(a: torch.Tensor, reference: torch.Tensor, tolerance: float, terms: torch.Tensor | None = None) -> bool:
    """Within tolerance of the largest magnitude among `terms` (the sums of absolute products behind
    each element: a sum that cancels to near 0 still carries its terms' rounding), or of the
    reference's where not given."""
    scale = (terms if terms is not None else reference).abs().max().item() or 1.0
    return (a.double() - reference).abs().max().item() <= tolerance * scale


@given(rows=st.integers(1, 12), features=st.integers(1, 40), out=st.integers(1, 24), batch=st.sampled_from([(), (3,)]),
       dtype=st.sampled_from(list(LOW)), bias=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       input_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_adapter_linear_matches_a_float64_reference(rows, features, out, batch, dtype, bias, layout, input_grad, seed):
    torch.manual_seed(seed)
    low = LOW[dtype]
    linear = torch.nn.Linear(features, out, bias=bias)
    adapter = in_input_dtype(linear)
    assert isinstance(adapter, AdapterLinear) and adapter.weight is linear.weight
    x = _layout(torch.randn(*batch, rows, features).to(low), layout).requires_grad_(input_grad)
    y = adapter(x)
    assert y.dtype == low and y.shape == (*batch, rows, out)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert linear.weight.grad.dtype == torch.float32 and (not bias or linear.bias.grad.dtype == torch.float32)

    # the reference, in float64 from the same (rounded) inputs: torch's linear, not ours
    x64, w64 = x.detach().double().requires_grad_(), linear.weight.detach().double().requires_grad_()
    b64 = linear.bias.detach().double().requires_grad_() if bias else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(grad.double())
    tol = TOLERANCE[low]
    ax, aw, ag = x64.detach().abs(), w64.detach().abs(), grad.double().abs()
    assert _close(y, y64.detach(), tol, F.linear(ax, aw, None if b64 is None else b64.detach().abs()))
    rows_g, rows_x = ag.reshape(-1, out), ax.reshape(-1, features)
    assert _close(linear.weight.grad, w64.grad, tol, rows_g.t() @ rows_x)
    if bias:
        assert _close(linear.bias.grad, b64.grad, tol, rows_g.sum(0))
    assert (x.grad is None) == (not input_grad)
    if input_grad:
        assert x.grad.dtype == low and _close(x.grad, x64.grad, tol, ag @ aw)


def _saved(fn) -> list:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_adapter_linear_saves_its_input_and_the_float32_weight_only():
    """Not a cast copy of the weight (plain autograd through weight.to(bf16) saves one) nor of the input
    (PEFT's float32 cast)."""
    linear = torch.nn.Linear(64, 8, bias=False)
    adapter = in_input_dtype(linear)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved(lambda: adapter(x))
    assert {t.untyped_storage().data_ptr() for t in saved} == {x.untyped_storage().data_ptr(),
                                                               linear.weight.untyped_storage().data_ptr()}
    plain = _saved(lambda: F.linear(x, linear.weight.to(x.dtype)))
    copies = [t for t in plain if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert [(t.dtype, t.numel()) for t in copies] == [(torch.bfloat16, linear.weight.numel())]  # what we avoid


@pytest.mark.parametrize("bias", [False, True])
def test_adapter_linear_has_first_and_second_derivatives(bias):
    """Its backward is made of differentiable ops: gradcheck and gradgradcheck in float64 (the Function
    itself, which computes in its input's dtype, here float64 throughout)."""
    from lowmem_ops._lora import _LinearInInputDtype

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    args = (x, w, b)
    assert torch.autograd.gradcheck(_LinearInInputDtype.apply, args)
    assert torch.autograd.gradgradcheck(_LinearInInputDtype.apply, args)


def test_adapter_linear_under_autocast_and_in_its_own_dtype_is_torch():
    linear = torch.nn.Linear(12, 5)
    adapter = in_input_dtype(linear)
    x = torch.randn(4, 12)
    assert torch.equal(adapter(x), linear(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = adapter(x), linear(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_adapter_linear_compiles():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    adapter = in_input_dtype(linear)
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    eager = adapter(x)
    eager.sum().backward()
    grads = (x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone())
    x.grad = linear.weight.grad = linear.bias.grad = None
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)(x)
    compiled.sum().backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(a, b) for a, b in zip((x.grad, linear.weight.grad, linear.bias.grad), grads))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adapter_conv_matches_a_float64_reference(layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, 3, padding=1)
    adapter = in_input_dtype(conv)
    assert isinstance(adapter, AdapterConv2d)
    x = torch.randn(2, 6, 7, 5).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = adapter(x)
    y.backward(torch.ones_like(y))
    ref = conv.double()(x.double())
    assert y.dtype == torch.bfloat16 and _close(y, ref.detach(), 2e-2)
    assert conv.weight.dtype == torch.float64 and conv.weight.grad is not None  # conv.double() cast the shared Parameters


def test_a_subclass_has_no_twin():
    class Scaled(torch.nn.Linear):
        pass

    assert in_input_dtype(Scaled(3, 3)) is None and in_input_dtype(torch.nn.Embedding(3, 3)) is None


# ---- convert on PEFT models

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _lora_llama(init=False):
    """A tiny bf16 LLaMA with LoRA on every projection; init=False: lora_B random too (an adapter
    partway through training, so lora_A gets a gradient)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    config = peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"], init_lora_weights=init)
    return peft.get_peft_model(model, config), {"input_ids": torch.randint(0, 300, (2, 32))}


def _adamw_steps(model, batch, steps=2):
    """lora parameter name -> (before, after) of `steps` AdamW steps at lr 1e-4."""
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW(lora.values(), lr=1e-4, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return {n: (start[n], p.detach()) for n, p in lora.items()}


def test_converted_lora_keeps_float32_weights_and_every_step():
    model, batch = _lora_llama()
    stock = copy.deepcopy(model)
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    report = lo.convert(model, example_inputs=batch)
    computing = [c for c in report.applied if c.before.startswith("LoRA adapters")]
    assert len(computing) == 14, str(report)
    assert all(c.after == "computing in bfloat16, weights kept in float32" for c in computing)
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys  # same keys, adapters still float32
    assert report.max_difference <= report.tolerance and report.gradient_cosine >= 0.99, str(report)

    # memory: no float32 copy of any adapter's input is saved (the ratio was 0.87 with PEFT's casts)
    ratio = report.memory_after.total_bytes / report.memory_before.total_bytes
    kept = lo.convert(copy.deepcopy(stock), example_inputs=batch, lora_dtype=False)
    assert ratio < kept.memory_after.total_bytes / kept.memory_before.total_bytes - 0.2, (ratio, str(kept))

    model.train(), stock.train()
    ours, theirs = _adamw_steps(model, batch), _adamw_steps(stock, batch)
    for name, (before, after) in ours.items():
        if "lora_A" in name:  # every element moves, as unconverted (bf16 weights lost 80 % of them)
            assert after.ne(before).float().mean().item() == 1.0, name
            assert theirs[name][1].ne(theirs[name][0]).all(), name
        # and by what the stock model's steps moved it (bf16 compute: close, not equal)
        step, stock_step = (after - before).flatten(), (theirs[name][1] - theirs[name][0]).flatten()
        assert F.cosine_similarity(step, stock_step, dim=0) > 0.97, name


def test_export_gives_back_stock_peft_adapters():
    model, batch = _lora_llama()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    q.lora_A["default"].register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    lo.convert(model, example_inputs=batch)
    assert type(q.lora_A["default"]) is AdapterLinear and q.cast_input_dtype_enabled is False
    model.eval()
    with torch.no_grad():
        calls.clear()
        converted = model(**batch).logits
    assert calls == [torch.bfloat16]  # the hook came along, and the adapter computes in bf16
    lo.export(model)
    assert type(q.lora_A["default"]) is torch.nn.Linear and q.cast_input_dtype_enabled is True
    assert not [m for m in model.modules() if isinstance(m, AdapterLinear)]
    with torch.no_grad():
        calls.clear()
        exported = model(**batch).logits
    assert calls == [torch.float32]  # PEFT casts the input again: the adapter still runs, hooked
    assert (exported.float() - converted.float()).abs().max().item() <= 0.05 * converted.float().abs().max().item()


def test_an_adapter_with_no_twin_keeps_the_cast():
    model, batch = _lora_llama()
    q = model.base_model.model.model.layers[0].self_attn.q_proj

    class Custom(torch.nn.Linear):
        pass

    q.lora_A["default"].__class__ = Custom
    report = lo.convert(model, example_inputs=batch)
    (line,) = [why for path, why in report.skipped if path.endswith("layers.0.self_attn.q_proj")]
    assert "PEFT's float32 cast of its input kept" in line and "Custom" in line
    assert q.cast_input_dtype_enabled is True and type(q.lora_A["default"]) is Custom
    assert type(q.lora_B["default"]) is torch.nn.Linear  # its partner stays too: the layer casts for both
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"]) is AdapterLinear


def test_an_undone_change_puts_peft_adapters_and_cast_back(monkeypatch):
    """Adapters that moved the outputs (here made to, scaling what they compute) are undone: PEFT's
    own adapters and its input cast are back, through convert's snapshot."""
    model, batch = _lora_llama()
    monkeypatch.setattr(AdapterLinear, "forward", lambda self, x: 4 * F.linear(x.to(self.weight.dtype), self.weight))
    report = lo.convert(model, example_inputs=batch, check_gradients=False, activations=False, norms=False,
                        gated=False, dropout=False)
    lines = [c for c in report.changes if c.before.startswith("LoRA adapters")]
    assert len(lines) == 14 and all(c.status == "undone" and "moved" in c.reason for c in lines), str(report)
    fresh, _ = _lora_llama()
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        assert type(a) is type(b), name
        if hasattr(b, "cast_input_dtype_enabled"):
            assert a.cast_input_dtype_enabled is True, name


def test_dora_computes_in_bf16_from_float32_weights():
    """DoRA's variant forward gets the bf16 input too (its weight norm then in bf16: outputs move by
    about 0.004 at PEFT's init, within tolerance); its magnitude and adapters stay float32."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16),
                                peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    batch = {"input_ids": torch.randint(0, 300, (2, 32))}
    report = lo.convert(model, example_inputs=batch)
    computing = [c for c in report.applied if c.before.startswith("LoRA adapters")]
    assert len(computing) == 6 and report.max_difference <= report.tolerance, str(report)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert any("lora_magnitude_vector" in n for n in trainable)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in trainable.values())


def test_a_converted_peft_model_compiles():
    """torch.compile over PEFT's layers with the adapters computing in bf16: the eager gradients."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).to(torch.bfloat16)
    model = peft.get_peft_model(mlp, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    report = lo.convert(model, example_inputs=x, activations=False)
    assert len([c for c in report.applied if c.before.startswith("LoRA adapters")]) == 2, str(report)

    def step(fn):
        model.zero_grad()
        out = fn(x)
        out.float().square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_out, eager = step(model)
    compiled_out, compiled = step(torch.compile(model, backend="aot_eager"))
    assert torch.equal(compiled_out, eager_out)
    assert eager.keys() == compiled.keys() and all(torch.allclose(compiled[n], eager[n], rtol=1e-2, atol=1e-3)
                                                   for n in eager)


def _lora_dropout_llama(**lora):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300)
    config = peft.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05, **lora)
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16), config)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_every_lora_dropout_is_converted(variant):
    """PEFT's lora_dropout inside the projections a GatedMLP keeps was planned as part of the MLP's
    swap, made only where that swap is undone: never, so each kept its mask (LLaMA LoRA with dropout
    0.05: 0.509x, now 0.414x). DoRA calls lora_dropout in training mode only: it was skipped as "did
    not run on the example inputs"."""
    model = _lora_dropout_llama(use_dora=variant == "dora")
    batch = {"input_ids": torch.randint(0, 300, (2, 32))}
    dropouts = {n for n, m in model.named_modules() if n.endswith("lora_dropout.default")}
    assert len(dropouts) == 14
    report = lo.convert(model, example_inputs=batch)
    lines = {c.path: c for c in report.changes if c.path in dropouts}
    assert set(lines) == dropouts and not [p for p, _ in report.skipped if p in dropouts], str(report)
    # layer 0's q, k, v read the embeddings' norm, which needs no gradient under LoRA: no mask either way
    unsaved = {n for n in dropouts if ".layers.0.self_attn." in n and n.split(".")[-3] in ("q_proj", "k_proj", "v_proj")}
    assert {p for p, c in lines.items() if c.status == "undone"} == unsaved, str(report)
    assert all(c.reason.startswith("saves no memory") for p, c in lines.items() if p in unsaved)
    applied = [p for p, c in lines.items() if c.status == "applied"]
    assert all(type(model.get_submodule(p)) is lo.nn.Dropout for p in applied)
    assert any(".mlp." in p for p in applied)
    if variant == "dora":
        assert all("called in training mode only" in lines[p].after for p in applied)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    lo.export(model)
    assert all(type(model.get_submodule(p)) is torch.nn.Dropout for p in dropouts)


def test_lora_dropout_inside_a_swapped_attention_is_converted():
    """The attention module swapped for one regenerating its dropout keeps its projections, PEFT
    layers with their lora_dropout: those are converted too (BERT, dropout 0.05: 0.439x -> 0.398x)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=300)
    model = peft.get_peft_model(transformers.BertForMaskedLM(cfg).to(torch.bfloat16),
                                peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.05))
    report = lo.convert(model, example_inputs={"input_ids": torch.randint(0, 300, (2, 16))})
    attention = [c for c in report.applied if c.path.endswith("layer.1.attention.self")]
    assert attention and "regenerated" in attention[0].after, str(report)
    (query,) = [c for c in report.changes if c.path.endswith("layer.1.attention.self.query.lora_dropout.default")]
    assert query.status == "applied", str(report)
    assert type(model.get_submodule(query.path)) is lo.nn.Dropout
    assert model.get_submodule(query.path.rpartition(".lora_dropout")[0]) is \
        model.get_submodule(attention[0].path).query  # the swapped attention calls that very layer


def test_an_adapter_added_after_convert_computes_in_bf16_too():
    """PEFT's add_adapter after convert: the layer's input cast is off, so the new float32 adapter
    would have failed its first forward on a dtype mismatch; it is made to compute in bf16 as PEFT
    puts it in. One that cannot be is refused there, saying what to do."""
    model, batch = _lora_llama()
    lo.convert(model, example_inputs=batch)
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.lora_A["second"]) is AdapterLinear and q.lora_A["second"].weight.dtype == torch.float32
    model.base_model.set_adapter(["default", "second"])
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert q.lora_A["second"].weight.grad.dtype == torch.float32 and q.lora_A["second"].weight.grad.abs().sum() > 0

    class Custom(torch.nn.Linear):
        pass

    with pytest.raises(TypeError, match=r"layers\.0\.self_attn\.q_proj\.lora_A.*lowmem_ops\.export"):
        q.lora_A["third"] = Custom(64, 4)

    lo.export(model)
    assert type(q.lora_A) is torch.nn.ModuleDict and q.cast_input_dtype_enabled is True
    assert {type(m) for m in q.lora_A.values()} == {torch.nn.Linear}
    assert set(q.lora_A) == {"default", "second"}
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_adapters_saved_from_a_converted_model_load_into_stock_peft(tmp_path):
    """save_pretrained straight from the converted model (no export): PEFT's float32 adapter file,
    which a stock PEFT model loads to the same outputs, and which the converted model loads again as
    a second adapter computing in bf16."""
    model, batch = _lora_llama()
    lo.convert(model, example_inputs=batch)
    model.save_pretrained(tmp_path / "adapter")
    stock, _ = _lora_llama()
    stock.load_adapter(tmp_path / "adapter", adapter_name="saved")
    saved = {n: p for n, p in stock.named_parameters() if ".saved." in n}
    ours = {n.replace(".default.", ".saved."): p for n, p in model.named_parameters() if ".default." in n}
    assert saved.keys() == ours.keys() and all(p.dtype == torch.float32 for p in saved.values())
    assert all(torch.equal(saved[n], ours[n]) for n in saved)

    model.load_adapter(tmp_path / "adapter", adapter_name="again")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.lora_A["again"]) is AdapterLinear and q.lora_A["again"].weight.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        model.base_model.set_adapter("default")
        first = model(**batch).logits
        model.base_model.set_adapter("again")
        second = model(**batch).logits
    assert torch.equal(first, second)
