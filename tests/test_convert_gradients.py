"""lowmem_ops.convert checks gradients (overall and per activation), keeps only swaps that save
memory, and measures memory deterministically (tiny torch models, fast)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import conversion
from lowmem_ops._gradients import PROJECTION_SEED


def mlp(width=64, spread=1.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.GELU(), torch.nn.Linear(width, 16),
                                torch.nn.BatchNorm1d(16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(spread)
    return model, torch.randn(32, 16)


def _manual_gradients(model, x):
    """Parameter gradients under the documented loss: <output, R>, R ~ N(0, 1) from a generator seeded
    with PROJECTION_SEED, in eval mode."""
    model = copy.deepcopy(model).eval()
    out = model(x)
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(PROJECTION_SEED))
    (out * direction).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _cos(a, b):
    a = torch.cat([t.flatten().double() for t in a])
    b = torch.cat([t.flatten().double() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


def test_gradient_cosine_matches_a_manual_computation():
    model, x = mlp()
    expected = _manual_gradients(model, x)
    report = lo.convert(model, example_inputs=x, fold=False)  # no fold: every parameter comparable
    assert {c.after for c in report.applied} == {"Approx", "MSLayerNorm"}
    got = _manual_gradients(model, x)
    manual = _cos([got[n] for n in expected], [expected[n] for n in expected])
    assert manual < 0.999  # the 2-bit GELU derivative does change the gradient
    assert report.gradient_cosine == pytest.approx(manual, abs=1e-6)
    assert report.gradient_loss == "random projection"
    assert "gradients: cosine" in str(report)
    assert "max relative output difference |a-b|/(|b|+max(1, rms b))" in str(report)  # what it is, labelled so


def test_local_cosine_of_an_activation_is_its_own_backward_against_the_exact_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU())  # the activation's output is returned
    x = torch.randn(8, 16)
    with torch.no_grad():
        h = model[0](x)
    direction = torch.randn(8, 32, generator=torch.Generator().manual_seed(PROJECTION_SEED))  # g at its output
    leaf = h.clone().requires_grad_()
    (exact,) = torch.autograd.grad(F.silu(leaf), leaf, direction)
    (approx,) = torch.autograd.grad(lo.nn.Approx("resilu2")(leaf), leaf, direction)
    report = lo.convert(model, example_inputs=x, grad_tolerance=None)  # the 2-bit op, not a chosen width
    (act,) = [c for c in report.applied if c.after == "Approx"]
    assert act.gradient_cosine == pytest.approx(_cos([approx], [exact]), abs=1e-6)
    assert act.gradient_cosine < 0.999
    assert "local gradient cosine" in str(report)


class _NegatedGradient(torch.autograd.Function):
    """GELU's forward, the negated gradient: a swap with exact outputs and the worst backward."""

    @staticmethod
    def forward(ctx, x):
        return F.gelu(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _BadGELU(torch.nn.Module):
    def forward(self, x):
        return _NegatedGradient.apply(x)


def test_a_swap_with_a_bad_gradient_shows_a_low_cosine(monkeypatch):
    model, x = mlp()
    good = lo.convert(copy.deepcopy(model), example_inputs=x)
    real = conversion._replacement

    def bad(module, *args, **kwargs):
        return (_BadGELU(), None) if isinstance(module, torch.nn.GELU) else real(module, *args, **kwargs)

    monkeypatch.setattr(conversion, "_replacement", bad)
    report = lo.convert(model, example_inputs=x)
    (act,) = [c for c in report.applied if c.after == "_BadGELU"]  # forward exact: verification passes
    assert act.gradient_cosine < -0.5  # -g against gelu'(x) g
    assert good.gradient_cosine > 0.9 and report.gradient_cosine < good.gradient_cosine - 0.5


def test_concentrated_activation_inputs_agree_less():
    # the 2-bit derivative is poor where the inputs sit near 0 (the random-init hard case)
    wide, x = mlp(spread=4.0)
    narrow, _ = mlp(spread=0.05)
    c_wide = [c.gradient_cosine for c in lo.convert(wide, example_inputs=x, grad_tolerance=None).applied if c.after == "Approx"][0]
    c_narrow = [c.gradient_cosine for c in lo.convert(narrow, example_inputs=x, grad_tolerance=None).applied if c.after == "Approx"][0]
    assert c_narrow < c_wide


def test_gradient_check_leaves_grads_rng_and_buffers_alone_and_is_deterministic():
    model, x = mlp()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    twin = copy.deepcopy(model)
    report = lo.convert(model, example_inputs=x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    torch.manual_seed(999)  # another user RNG state: the same numbers
    again = lo.convert(twin, example_inputs=x)
    assert again.gradient_cosine == report.gradient_cosine
    assert [c.gradient_cosine for c in again.changes] == [c.gradient_cosine for c in report.changes]


def test_a_users_loss_fn_is_the_loss():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act_branch = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
            self.plain = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.act_branch(x), self.plain(x)

    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(16, 8)
    projected = lo.convert(copy.deepcopy(model), example_inputs=x, grad_tolerance=None)  # 2 bits
    assert projected.gradient_cosine < 0.999
    # a loss of the branch without the activation: the approximation cannot change its gradient
    report = lo.convert(model, example_inputs=x, loss_fn=lambda out: out[1].square().sum())
    assert report.gradient_loss == "loss_fn" and report.gradient_cosine == pytest.approx(1.0, abs=1e-12)


def test_no_gradient_check_when_asked_or_impossible():
    model, x = mlp()
    off = lo.convert(copy.deepcopy(model), example_inputs=x, check_gradients=False)
    assert off.gradient_cosine is None and "gradients" not in str(off)
    model.requires_grad_(False)
    frozen = lo.convert(model, example_inputs=x, measure_memory=False)  # frozen: nothing is saved anyway
    assert frozen.gradient_cosine is None and "no parameter requires grad" in frozen.gradient_note
    assert frozen.applied and "not compared (ValueError: no parameter requires grad)" in str(frozen)


class GateUpExpert(torch.nn.Module):
    """An MoE expert in the transformers-5 style: act(gate) * up from two halves of one projection,
    a tensor the product saves anyway, so a 2-bit activation adds its codes and frees nothing. Its
    weights are bare Parameters (as the experts' 3-D ones are), so it is no FusedGatedMLP candidate."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.randn(2 * h, d) / d**0.5)
        self.act = torch.nn.SiLU()
        self.down = torch.nn.Parameter(torch.randn(d, h) / h**0.5)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down)


class MixedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.expert = GateUpExpert()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))

    def forward(self, x):
        return self.mlp(self.expert(x))


def test_a_swap_that_saves_no_memory_is_undone(monkeypatch):
    torch.manual_seed(0)
    model, x = MixedModel(), torch.randn(32, 16)
    kept_all = copy.deepcopy(model)
    report = lo.convert(model, example_inputs=x)
    status = {c.path: c for c in report.changes}
    assert status["mlp.1"].status == "applied"
    assert status["expert.act"].status == "undone"
    assert status["expert.act"].reason.startswith("saves no memory (+") and "bytes)" in status["expert.act"].reason
    assert type(model.expert.act) is torch.nn.SiLU and type(model.mlp[1]) is lo.nn.Approx
    # the report's "after" is the model as left, and it is below what keeping the expert's swap gives
    torch.manual_seed(conversion.RUN_SEED)
    assert lo.memory.measure(model, x).total_bytes == report.memory_after.total_bytes
    monkeypatch.setattr(conversion, "_undo_what_saves_nothing", lambda actions, report, *baselines: False)
    everything = lo.convert(kept_all, example_inputs=x)
    assert all(c.status == "applied" for c in everything.changes)
    assert report.memory_after.total_bytes < everything.memory_after.total_bytes
    # the "+N bytes" is what keeping that swap really costs: the two measurements' difference
    extra = int(status["expert.act"].reason.split("(+")[1].split(" bytes")[0])
    assert extra == everything.memory_after.total_bytes - report.memory_after.total_bytes


class LayerDrop(torch.nn.Module):
    """Wav2Vec2-style LayerDrop: in training, each layer is skipped with probability 1/2 (torch.rand)."""

    def __init__(self, n=6, d=16):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, d))
            for _ in range(n))
        self.embed = torch.nn.Linear(d, d)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            if self.training and torch.rand(()) < 0.5:
                continue
            x = x + layer(x)
        return x


def test_memory_ratio_with_layerdrop_is_deterministic_and_true():
    torch.manual_seed(0)
    model, x = LayerDrop(), torch.randn(32, 16)
    copies = [copy.deepcopy(model) for _ in range(3)]
    reports = []
    for seed, m in zip((1, 2, 3), copies):
        torch.manual_seed(seed)  # the user's RNG state differs between the calls
        reports.append(lo.convert(m, example_inputs=x))
    totals = {(r.memory_before.total_bytes, r.memory_after.total_bytes) for r in reports}
    assert len(totals) == 1, totals
    # by hand: both models measured from the same seed, so the same layers are dropped on both sides
    torch.manual_seed(conversion.RUN_SEED)
    before = lo.memory.measure(model, x).total_bytes
    torch.manual_seed(conversion.RUN_SEED)
    after = lo.memory.measure(copies[0], x).total_bytes
    assert totals == {(before, after)}
    assert after < before


def test_when_no_swap_saves_memory_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model, x = GateUpExpert(), torch.randn(32, 16)
    want = model(x).detach()
    report = lo.convert(model, example_inputs=x)
    assert not report.applied and report.changes[0].reason.startswith("saves no memory (+")
    assert type(model.act) is torch.nn.SiLU and torch.equal(model(x), want)
    assert report.memory_after is report.memory_before and report.max_difference == 0.0


def _deep_silu_mlp(depth=24, gain=1.5, width=32):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = torch.nn.Linear(width, width)
        torch.nn.init.normal_(linear.weight, std=gain / width**0.5)
        layers += [linear, torch.nn.SiLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 4)), torch.randn(64, width)


def test_a_whole_model_miss_raises_the_widths_until_the_model_meets_grad_tolerance(monkeypatch):
    # 24 SiLUs: each width meets the local 0.95, yet their errors compound end to end
    model, x = _deep_silu_mlp()
    expected = _manual_gradients(model, x)
    report = lo.convert(model, example_inputs=x)
    got = _manual_gradients(model, x)
    assert _cos([got[n] for n in expected], [expected[n] for n in expected]) >= 0.95  # independent of the report
    assert report.gradient_cosine >= 0.95
    acts = [c for c in report.applied if c.after == "Approx"]
    assert len(acts) == 24 and all("local target raised to" in c.reason for c in acts), str(report)
    # without the end-to-end step the same per-layer choice misses
    monkeypatch.setattr(conversion, "_tighter", lambda tolerance: iter(()))
    model, x = _deep_silu_mlp()
    per_layer = lo.convert(model, example_inputs=x)
    assert per_layer.gradient_cosine < 0.95
    assert sum(c.bits for c in per_layer.applied if c.bits) < sum(c.bits for c in acts)


# --- LayerDrop: the measured runs skip the same layers before and after conversion ---------------------

class LayerDropStack(torch.nn.Module):
    """Wav2Vec2's encoder in small: in training, each layer is skipped when a draw made between layer
    calls falls under `layerdrop`; inside a layer, a dropout (which convert swaps for one of its own,
    drawing differently from torch's)."""

    def __init__(self, layers=6, width=16, layerdrop=0.5):
        super().__init__()
        self.layerdrop = layerdrop
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(4 * width, width)) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:  # as Hugging Face's
                continue
            x = x + layer(x)
        return x


def layers_run(model, x, runs_alike: bool) -> list[int]:
    ran = []
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, layer in enumerate(model.layers)]
    try:
        if runs_alike:
            with lo.memory.comparable_runs(model, seed=conversion.RUN_SEED):
                model(x)
        else:
            torch.manual_seed(conversion.RUN_SEED)
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def test_layerdrop_skips_the_same_layers_in_the_converted_model():
    """The original and the converted model, run under the same seed, skip the same layers (the
    dropouts convert swapped draw differently from torch's, which without comparable_runs changes
    which layers are skipped), so each swap's saving is measured: every GELU is kept."""
    torch.manual_seed(0)
    model, x = LayerDropStack(), torch.randn(8, 16)
    converted = copy.deepcopy(model)
    report = lo.convert(converted, example_inputs=x)
    assert all(type(layer[2]) is lo.nn.Dropout for layer in converted.layers)  # they draw unlike torch's
    model.train(), converted.train()
    assert layers_run(model, x, runs_alike=False) != layers_run(converted, x, runs_alike=False)
    assert layers_run(model, x, runs_alike=True) == layers_run(converted, x, runs_alike=True)
    ran = {int(p.split(".")[1]) for p in report.memory_before.by_module() if p.startswith("layers.")}
    assert ran == {int(p.split(".")[1]) for p in report.memory_after.by_module() if p.startswith("layers.")}
    assert ran == set(layers_run(model, x, runs_alike=True)) and 0 < len(ran) < 6
    for c in report.changes:  # every GELU and dropout: swapped; measured where its layer ran
        assert c.status == "applied", (c.path, c.reason)
        if int(c.path.split(".")[1]) in ran:
            assert c.bytes_after < c.bytes_before and not c.reason, c
        else:
            assert c.reason == conversion.NOT_MEASURED and c.bytes_before is None, c
    assert len(report.changes) == 12
    with lo.memory.comparable_runs(converted, seed=conversion.RUN_SEED):
        assert lo.memory.measure(converted, x).total_bytes == report.memory_after.total_bytes


def test_comparable_runs_leave_the_rng_and_buffers_as_they_were():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).train()
    torch.manual_seed(123)
    state, stats = torch.get_rng_state(), model[1].running_mean.clone()
    with lo.memory.comparable_runs(model):
        first = model(torch.randn(8, 4))
    with lo.memory.comparable_runs(model):
        second = model(torch.randn(8, 4))
    assert torch.equal(first, second)  # the same seed inside: the same inputs and dropout masks
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(model[1].running_mean, stats)


# --- norms that save one tensor between them are judged together ----------------------------------------

class ParallelResidual(torch.nn.Module):
    """GPT-NeoX's block (use_parallel_residual): two LayerNorms of the same input, one before the attention's
    projection and one before the MLP; torch's two norms both save that input."""

    def __init__(self, width=16):
        super().__init__()
        self.ln_attn, self.ln_mlp = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.ReLU(), torch.nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.attn(self.ln_attn(x)) + self.mlp(self.ln_mlp(x))


def test_two_norms_of_one_input_are_kept_for_what_they_save_together():
    """Swapping one of the two norms saves nothing (the other still saves the input), the two together
    stop it being saved: both are kept, each with a note naming the other, and the block's input is no
    longer among the saved tensors. In bf16 each alone is +0 bytes: torch's norm saves its mean and rstd in
    bf16, the MS norm its rstd in float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), ParallelResidual(), ParallelResidual()).to(torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    report = lo.convert(model, example_inputs=x)
    norms = {c.path: c for c in report.changes if c.path.split(".")[-1].startswith("ln_")}
    assert len(norms) == 4 and all(c.status == "applied" for c in norms.values()), report
    for block in ("1", "2"):
        attn, mlp = norms[f"{block}.ln_attn"], norms[f"{block}.ln_mlp"]
        assert f"together with {block}.ln_mlp" in attn.reason and f"together with {block}.ln_attn" in mlp.reason
    block_input = x.numel() * x.element_size()  # each block's input: (8, 16) bf16, saved by its two norms
    saved_by_norms = [s for s in report.memory_before.storages.values() if s.module.endswith("ln_attn")]
    assert [s.nbytes for s in saved_by_norms if s.shape == (8, 16)] == [block_input] * 2
    assert report.memory_before.total_bytes - report.memory_after.total_bytes >= 2 * block_input
