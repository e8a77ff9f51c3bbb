"""lowmem_ops.memory: what autograd saves, per module, deduplicated, shared and cast copies flagged."""

import pytest
import torch

import lowmem_ops as lo


def mlp(act):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), act, torch.nn.Linear(64, 16))


def test_attribution_and_totals():
    x = torch.randn(8, 16, requires_grad=True)
    m = lo.memory.measure(mlp(torch.nn.GELU()), x)
    # Linear 0 saves its input x; GELU saves its input; Linear 2 saves GELU's output. Weights excluded.
    assert m.by_module() == {"0": 8 * 16 * 4, "1": 8 * 64 * 4, "2": 8 * 64 * 4}
    assert m.total_bytes == (8 * 16 + 2 * 8 * 64) * 4
    ours = lo.memory.measure(mlp(lo.nn.ReGELU2()), x, label="ReGELU2")
    assert ours.by_module()["1"] == 8 * 64 // 4  # 2-bit codes
    text = str(ours)
    assert "ReGELU2" in text
    assert "saved for backward" in text and "(before" not in text


def test_shared_storage_counted_once_and_flagged():
    torch.manual_seed(0)
    block = torch.nn.Sequential(lo.nn.MSLayerNorm(32, affine="none"), torch.nn.Linear(32, 32))
    m = lo.memory.measure(block, torch.randn(4, 32, requires_grad=True))
    assert m.total_bytes == 4 * 32 * 4 + 4 * 4  # y once, rstd per row
    (shared,) = m.shared
    assert shared.module == "0" and shared.also_saved_by == ["1"]
    assert "shared with 1" in str(m)


def test_dtype_cast_copies_are_flagged():
    class Adapters(torch.nn.Module):  # three fp32 adapters that each cast the same bf16 input, as PEFT does
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList(torch.nn.Linear(16, 4) for _ in range(3))

        def forward(self, x):
            return sum(lin(x.to(torch.float32)) for lin in self.a)

    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    m = lo.memory.measure(torch.nn.Sequential(torch.nn.Linear(16, 16).bfloat16(), Adapters()), x)
    groups = list(m.cast_copies().values())
    assert len(groups) == 1 and len(groups[0]) == 3  # three copies of one source
    assert "dtype-cast copy (3 from one source)" in str(m)


def test_compare_and_plot(tmp_path):
    x = torch.randn(8, 16, requires_grad=True)
    before = lo.memory.measure(mlp(torch.nn.GELU()), x, label="torch")
    after = lo.memory.measure(mlp(lo.nn.ReGELU2()), x, label="lowmem")
    from rich.console import Console

    console = Console(width=140, record=True)
    console.print(after.table(before=before))
    assert f"{after.total_bytes / before.total_bytes:.3f}x" in console.export_text()
    png = after.plot(tmp_path / "m.png", before=before)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_parameters_and_buffers_excluded():
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(8))
    m = lo.memory.measure(bn, torch.randn(4, 8, requires_grad=True))
    ptrs = {t.untyped_storage().data_ptr() for t in list(bn.parameters()) + list(bn.buffers())}
    assert not set(m.storages) & ptrs


def test_works_without_grad_inputs_and_leaves_no_hooks():
    model = mlp(torch.nn.SiLU())
    lo.memory.measure(model, torch.randn(2, 16))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    with pytest.raises(RuntimeError):
        lo.memory.measure(model, torch.randn(2, 3))  # a shape error propagates, hooks still removed
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


def test_a_graph_dropped_inside_the_forward_saves_nothing():
    """DoRA computes its weight norm through its adapters on an identity matrix and detaches the
    result: autograd saved that matrix for a graph freed before the forward returned. It was
    counted (a 4096-wide layer: 64 MiB of phantom float32 identity per adapter); only what the
    graph still holds at the end of the forward counts."""

    class Detaching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 8, bias=False)

        def forward(self, x):
            norm = self.proj(torch.eye(256)).detach().norm()  # a graph built and dropped here
            kept = torch.exp(x)  # saves its output: held at backward
            return (kept * norm).sum()

    x = torch.randn(16, requires_grad=True)
    m = lo.memory.measure(Detaching(), x)
    # exp's output and the 0-d norm the product keeps for kept's gradient, not the 256 x 256 identity
    assert m.total_bytes == 16 * 4 + 4
    assert m.by_module() == {"": 16 * 4 + 4}
