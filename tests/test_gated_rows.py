"""The C++ and Triton gated kernels read gate and up in place by rows (lowmem_ops._common.row_stride,
and its twin in templates/cpu_autograd.cpp.j2): the halves of one projection, proj(x).chunk(2, -1), as
fused gated MLPs and MoE experts pass them, are no longer copied contiguous in forward and again in
backward; gated_halves writes gate_up's gradient whole instead of concatenating two.

The row kernels compute each element as the flat kernels do, so a view must give the very bits its
contiguous copy gives: through the plain eager C++ autograd op and through the custom ops (the route
torch.compile, torch.func and fake tensors take), and on the Triton path through the interpreter, for
every view a hypothesis draws. test_layouts.py checks the same layouts against float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_ops as lo
from lowmem_ops._common import row_stride

from . import reference as ref

GATED = {"resilu2": lambda g, u, mode: lo.swiglu(g, u, mode), "regelu2": lambda g, u, mode: lo.geglu(g, u, mode=mode),
         "tanh_gelu2": lambda g, u, mode: lo.geglu(g, u, "tanh", mode)}


@st.composite
def views(draw):
    """A 3-D view of a random leaf: a half of the last dim, a slice of rows, a slice of the middle dim,
    a permutation of the leading dims or a transposed last dim (the last two read as a copy)."""
    a, b, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 37))
    kind = draw(st.sampled_from(["half", "rows", "middle", "leading_permuted", "last_transposed", "dense"]))
    half = draw(st.integers(0, 1))
    shape = {"half": (a, b, 2 * cols), "rows": (a + 1, b, cols + 3), "middle": (a, b + 2, cols),
             "leading_permuted": (b, a, cols), "last_transposed": (a, cols, b), "dense": (a, b, cols)}[kind]

    def take(leaf):
        return {"half": lambda: leaf.chunk(2, -1)[half], "rows": lambda: leaf[1:, :, 3:],
                "middle": lambda: leaf[:, 1:b + 1], "leading_permuted": lambda: leaf.transpose(0, 1),
                "last_transposed": lambda: leaf.transpose(1, 2), "dense": lambda: leaf}[kind]()

    return shape, take


def test_row_stride_reads_the_rows_the_view_holds():
    """Where row_stride gives a stride, as_strided with it is the view itself; elsewhere -1."""
    leaf = torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10)
    cases = {"dense": leaf, "half": leaf.chunk(2, -1)[1], "rows": leaf[1:], "columns": leaf[..., 2:],
             "one row": leaf[0, 0], "middle": leaf[:, :2], "permuted": leaf.transpose(0, 1), "transposed": leaf.transpose(1, 2),
             "expanded": leaf[:1, :1].expand(2, 3, 10), "scalar": leaf[0, 0, 0]}
    want_copy = {"middle", "permuted", "transposed", "expanded", "scalar"}
    for name, t in cases.items():
        ld = row_stride(t)
        assert (ld < 0) == (name in want_copy), name
        if ld >= 0:
            cols = t.shape[-1]
            rows = t.as_strided((t.numel() // cols, cols), (ld, 1), t.storage_offset())
            assert torch.equal(rows, t.reshape(-1, cols)), name


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(GATED)), g_view=views(), u_view=views(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       needs=st.sampled_from([(True, True), (True, False), (False, True)]), seed=st.integers(0, 2**16))
def test_views_give_the_bits_of_their_contiguous_copies(name, g_view, u_view, dtype, needs, seed):
    gen = torch.Generator().manual_seed(seed)
    (g_shape, g_take), (u_shape, u_take) = g_view, u_view
    g_leaf = (torch.randn(g_shape, generator=gen) * 3).to(dtype)
    u_leaf = torch.randn(u_shape, generator=gen).to(dtype)
    g, u = g_take(g_leaf), u_take(u_leaf)
    if g.shape != u.shape:  # the two draws must agree on a shape: take u from g's leaf layout instead
        u = g_take(torch.randn(g_shape, generator=gen).to(dtype))
    dy = torch.randn(g.shape, generator=gen).to(dtype)
    need_gate, need_up = needs

    def run(gate, up):
        gate = gate.detach().requires_grad_(need_gate)
        up = up.detach().requires_grad_(need_up)
        out = GATED[name](gate, up, "exact")
        out.backward(dy)
        return out, gate.grad, up.grad

    with ref.backend("cpp"):
        want = run(g.contiguous(), u.contiguous())
        got = run(g, u)  # plain eager: the C++ autograd op
        for w, x, what in zip(want, got, ("out", "dgate", "dup")):
            assert (w is None) == (x is None) and (w is None or torch.equal(w, x)), f"{name} {what}"
        # the custom ops, as compiled code and torch.func call them
        out, _, _ = torch.ops.lowmem_ops.gated_fwd(g, u, name, False, need_gate, need_up)
        assert torch.equal(out, want[0])
        dgate, dup = torch.ops.lowmem_ops.gated_bwd(dy, g, u if need_gate else None, None, None, name, False, need_gate,
                                                    need_up)
        if need_gate:
            assert torch.equal(dgate, want[1])
        if need_up:
            assert torch.equal(dup, want[2])


def test_the_halves_of_one_projection_are_not_copied():
    """Forward and backward of swiglu on proj(x).chunk(2, -1) run no copy (before: 2 copies each way);
    what is left is the concatenation of the two gradients, autograd's chunk backward."""
    proj = torch.randn(6, 2 * 32, requires_grad=True)
    gate, up = proj.chunk(2, -1)
    with ref.backend("cpp"):
        lo.swiglu(gate, up).sum().backward()  # compile and warm up outside the profile
        with torch.profiler.profile() as prof:
            lo.swiglu(gate, up, "exact").backward(torch.ones(6, 32))
    names = [e.name for e in prof.events()]
    assert any("gated" in n.lower() for n in names), names
    assert "aten::copy_" not in names and "aten::clone" not in names, sorted(set(names))
    assert names.count("aten::cat") == 1, sorted(set(names))


# --- gated_halves: one C++ autograd op for gated(*gate_up.chunk(2, -1)) ------------------------------

from lowmem_ops.gated import NO_DOUBLE_BACKWARD, gated, gated_halves  # noqa: E402


def node(t: torch.Tensor) -> str:
    """The name of t's autograd node (type(...).name: a Python node's ctx may hold a `name` of its own)."""
    return type(t.grad_fn).name(t.grad_fn)


@st.composite
def gate_ups(draw):
    """A gate_up tensor (last dim even) in a layout: dense, a slice of rows and columns of a wider leaf,
    or a transposed leaf (read through a copy)."""
    a, b, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 37))
    kind = draw(st.sampled_from(["dense", "sliced", "transposed"]))
    shape = {"dense": (a, b, 2 * cols), "sliced": (a + 1, b, 2 * cols + 5), "transposed": (a, 2 * cols, b)}[kind]
    take = {"dense": lambda t: t, "sliced": lambda t: t[1:, :, 5:], "transposed": lambda t: t.transpose(1, 2)}[kind]
    return shape, take


# gated_halves' one op per backend: the C++ autograd op (any layout, copying where it must) and, on
# the Triton path, _GatedHalvesTriton (layouts the rows kernels read; the chunk path elsewhere)
HALVES_OP = {"cpp": ("GatedHalves", lambda gate_up: True),
             "triton-interpret": ("GatedHalvesTriton", lambda gate_up: row_stride(gate_up) >= 0)}


@pytest.mark.parametrize("backend", sorted(HALVES_OP))
@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(GATED)), layout=gate_ups(), act_half=st.integers(0, 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_gated_halves_gives_the_bits_of_the_chunk_path(backend, name, layout, act_half, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape, take = layout
    values = (torch.randn(shape, generator=gen) * 3).to(dtype)
    leaf = values.clone().requires_grad_()
    gate_up = take(leaf)
    dy = torch.randn(*gate_up.shape[:-1], gate_up.shape[-1] // 2, generator=gen).to(dtype)
    op_name, takes = HALVES_OP[backend]
    with ref.backend(backend):
        out = gated_halves(gate_up, name, "auto", act_half)
        assert (op_name in node(out)) == takes(gate_up), node(out)  # the one op ran
        out.backward(dy)
        want_leaf = values.clone().requires_grad_()
        halves = take(want_leaf).contiguous().chunk(2, -1)  # the flat kernels on dense halves
        want = gated(halves[act_half].contiguous(), halves[1 - act_half].contiguous(), name, "exact")
        want.backward(dy)
    assert torch.equal(out, want)
    assert torch.equal(leaf.grad, want_leaf.grad)


@pytest.mark.parametrize("backend", sorted(HALVES_OP))
def test_gated_halves_saves_gate_up_only_and_refuses_a_second_derivative(backend):
    gate_up = torch.randn(4, 2 * 16, requires_grad=True)
    with ref.backend(backend):
        x = gate_up * 1  # not a leaf: its storage is what the op saves
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = gated_halves(x, "resilu2")
        assert HALVES_OP[backend][0] in node(out)
        assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]
        (g,) = torch.autograd.grad(out.sum(), gate_up, create_graph=True)
        with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD):
            g.sum().backward()


def test_gated_halves_elsewhere_takes_the_chunk_path():
    """approx mode, no gradient, an odd last dim (gated's error), the torch backend: gated() itself."""
    gate_up = torch.randn(3, 2 * 8, requires_grad=True)
    with ref.backend("cpp"):
        assert "GatedHalves" not in node(gated_halves(gate_up, "resilu2", "approx"))
        with torch.no_grad():
            a, b = gate_up.chunk(2, -1)
            assert torch.equal(gated_halves(gate_up, "resilu2"), gated(a, b, "resilu2"))
        with pytest.raises(ValueError, match="gate and up must have one shape"):
            gated_halves(torch.randn(3, 7, requires_grad=True), "resilu2")
    with ref.backend("torch"):
        assert "GatedHalves" not in node(gated_halves(gate_up, "resilu2"))
    with pytest.raises(ValueError, match="act_half must be 0 or 1"):
        gated_halves(gate_up, "resilu2", act_half=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        gated_halves(gate_up, "resilu2", "fast")


def test_a_fused_gated_mlp_copies_nothing():
    """FusedGatedMLP forward + backward: no copy of the halves and no concatenation of their gradients
    (before: 4 copies and a cat of gate_up's size)."""
    proj, down = torch.nn.Linear(16, 2 * 32, bias=False), torch.nn.Linear(32, 16, bias=False)
    mlp = lo.nn.FusedGatedMLP(("proj", "down", None), proj, down)
    x, dy = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)  # (sum()'s expanded grad is copied)
    with ref.backend("cpp"):
        mlp(x).backward(dy)  # compile and warm up outside the profile
        with torch.profiler.profile() as prof:
            mlp(x).backward(dy)
    names = [e.name for e in prof.events()]
    assert any("gated_halves" in n for n in names), sorted(set(names))
    assert not {"aten::copy_", "aten::clone", "aten::cat"} & set(names), sorted(set(names))


# --- the Triton rows kernels (through the interpreter) ------------------------------------------------

from lowmem_ops import _triton_backend  # noqa: E402


def _launched(monkeypatch) -> list[str]:
    """The names of the Triton kernels launched from here on."""
    names, real = [], _triton_backend.launch

    def recording(kernel, grid, *args, **meta):
        names.append(kernel.fn.__name__)
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_triton_backend, "launch", recording)
    return names


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(GATED)), g_view=views(), mode=st.sampled_from(["exact", "approx"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       needs=st.sampled_from([(True, True), (True, False), (False, True)]), seed=st.integers(0, 2**16))
def test_triton_rows_kernels_give_the_bits_of_the_flat_kernels(name, g_view, mode, dtype, needs, seed):
    """gate and up as views (up: the other half, or a view of the same kind), forward and backward on
    the Triton path: the rows kernels read them in place where their rows are evenly spaced and give
    the bits the flat kernels give on contiguous copies; other views are copied for the flat kernels."""
    gen = torch.Generator().manual_seed(seed)
    shape, take = g_view
    g = take((torch.randn(shape, generator=gen) * 3).to(dtype))
    u = take(torch.randn(shape, generator=gen).to(dtype))
    dy = torch.randn(g.shape, generator=gen).to(dtype)
    need_gate, need_up = needs

    def run(gate, up):
        gate = gate.detach().requires_grad_(need_gate)
        up = up.detach().requires_grad_(need_up)
        out = GATED[name](gate, up, mode)
        out.backward(dy)
        return out, gate.grad, up.grad

    with pytest.MonkeyPatch.context() as mp, ref.backend("triton-interpret"):
        launched = _launched(mp)
        got = run(g, u)
        by_rows = [n for n in launched if "rows" in n]
        launched.clear()
        want = run(g.contiguous(), u.contiguous())
        assert not any("rows" in n for n in launched)
    for w, x, what in zip(want, got, ("out", "dgate", "dup")):
        assert (w is None) == (x is None) and (w is None or torch.equal(w, x)), f"{name} {mode} {what}"
    # forward reads gate and up; backward reads the saved views in exact mode, and up (for d_gate) in approx
    in_place = not g.is_contiguous() and row_stride(g) >= 0
    want_rows = ["gated_forward_rows_kernel"] + (["gated_backward_rows_kernel"] if mode == "exact" or need_gate else [])
    assert by_rows == (want_rows if in_place else []), (g.shape, g.stride())


def test_a_tree_without_the_rows_kernels_copies_the_views(monkeypatch):
    """A tree rendered before the rows kernels (its kernel files lack them): views are copied for the
    flat kernels, and gated_halves takes the chunk path; results as before."""
    real = _triton_backend.kernel_module

    class Old:
        def __init__(self, module):
            self._module = module

        def __getattr__(self, attr):
            if "rows" in attr:
                raise AttributeError(attr)
            return getattr(self._module, attr)

    gate_up = (torch.randn(3, 2 * 24) * 3).requires_grad_()
    dy = torch.randn(3, 24)
    launched = _launched(monkeypatch)
    with ref.backend("triton-interpret"):
        new_out = gated_halves(gate_up, "resilu2")
        (new_grad,) = torch.autograd.grad(new_out, gate_up, dy)
        assert launched == ["gated_forward_rows_kernel", "gated_backward_rows_kernel"]  # (nor any cat: grad written whole)
        launched.clear()
        monkeypatch.setattr(_triton_backend, "kernel_module", lambda *a: Old(real(*a)))
        old_out = gated_halves(gate_up, "resilu2")
        assert "GatedHalvesTriton" not in node(old_out)
        (old_grad,) = torch.autograd.grad(old_out, gate_up, dy)
    assert launched == ["gated_forward_kernel", "gated_backward_kernel"]
    assert torch.equal(new_out, old_out) and torch.equal(new_grad, old_grad)
