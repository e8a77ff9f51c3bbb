"""torch.compile(fullgraph=True) traces through the custom ops: no graph break, same numbers."""

import os
import subprocess
import sys

import pytest
import torch

import lowmem_ops as lo


def _mlp(act):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), act, torch.nn.Linear(64, 16), lo.nn.ReSiLU2(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_mlp_matches_eager(backend):
    torch._dynamo.reset()
    eager = _mlp(lo.nn.ReGELU2())
    compiled_model = _mlp(lo.nn.ReGELU2())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)  # fullgraph: a break raises
    x = torch.randn(8, 16)
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for p_e, p_c in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad)


def test_compiled_graph_saves_codes_not_activations():
    """After AOTAutograd partitions the graph, the GELU input is not among the saved tensors."""
    torch._dynamo.reset()
    model = _mlp(lo.nn.ReGELU2())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled(x).sum().backward()
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    assert ((8 * 64 // 4,), torch.uint8) in shapes  # the 2-bit codes of the (8, 64) hidden layer
    # Nothing of the hidden layer's float size except the GELU output (the next linear's input).
    assert sum(1 for s, d in shapes if s == (8, 64) and d.is_floating_point) == 1


def test_first_calls_inside_fullgraph_compile_in_a_fresh_process():
    """The built-in tree is loaded at import: a fresh interpreter whose first lowmem_ops calls are
    inside torch.compile(fullgraph=True) traces no loading code (importlib.resources broke that)."""
    script = (
        "import sys, torch\n"
        "import lowmem_ops as lo\n"
        "assert 'triton' not in sys.modules  # importing stays torch-only\n"
        "def f(x, gate, up):\n"
        "    return lo.regelu2(x) + lo.ms_layernorm(x, 8) + lo.swiglu(gate, up)\n"
        "x, g, u = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)\n"
        "got = torch.compile(f, fullgraph=True, backend='eager')(x, g, u)\n"
        "torch.testing.assert_close(got, f(x, g, u))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_OPS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_model_with_a_folded_norm_compiles_fullgraph():
    """convert folds a norm's affine into the next linear and the folded norm checks its consumers each
    forward (lowmem_ops._folding.ConsumersInPlace): torch.compile(fullgraph=True) traces that check."""
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.norm(x))))

    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 16)
    report = lo.convert(model, example_inputs=x)
    assert any("folded" in c.after for c in report.applied), str(report)
    assert model.norm._fold_guard is not None
    eager = model(x)
    eager.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
