"""Dropout that saves no mask (lowmem_ops.dropout): the torch path's Philox is Triton's tl.rand bit
for bit, both backends draw the same masks and gradients, seeds follow torch's RNG, and autograd
keeps 8 bytes (the seed) where torch keeps a mask of the input's size."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import _philox
from lowmem_ops.dropout import draw_seed, keep_mask

from . import reference as ref

BACKENDS = ("torch", "cpp", "triton-interpret")
SEEDS = [0, 1, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
         -1, -5, -(2 ** 31), -(2 ** 63)]
OFFSETS64 = list(range(70)) + [2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5, 2 ** 63 - 1, -1, -(2 ** 63)]
OFFSETS32 = list(range(70)) + [2 ** 31 - 1, -1, -(2 ** 31)]

# Triton's own tl.rand, under TRITON_INTERPRET=1 set before triton is imported (a fresh process), so the
# reference shares no loading code with lowmem_ops. Seeds are passed both as kernel arguments (Triton
# types them int32, uint32, int64 or uint64 by value) and loaded from an int64 tensor.
_TRITON_RAND = r"""
import json, sys, torch, triton, triton.language as tl

@triton.jit
def by_arg(out_ptr, seed, off_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.rand(seed, tl.load(off_ptr + i, mask=i < n)), mask=i < n)

@triton.jit
def by_pointer(out_ptr, seed_ptr, off_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.rand(tl.load(seed_ptr), tl.load(off_ptr + i, mask=i < n)), mask=i < n)

spec = json.loads(sys.argv[1])
out = {}
for name, dtype in (("i64", torch.int64), ("i32", torch.int32)):
    offs = torch.tensor(spec[name], dtype=dtype)
    for seed in spec["seeds"]:
        r = torch.empty(offs.shape, dtype=torch.float32)
        by_arg[(triton.cdiv(len(offs), 32),)](r, seed, offs, len(offs), BLOCK=32)
        out[f"arg {seed} {name}"] = r.view(torch.int32).tolist()
        if -2 ** 63 <= seed < 2 ** 63:
            by_pointer[(triton.cdiv(len(offs), 32),)](r, torch.tensor([seed]), offs, len(offs), BLOCK=32)
            out[f"ptr {seed} {name}"] = r.view(torch.int32).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_rand():
    pytest.importorskip("triton")
    spec = json.dumps({"seeds": SEEDS, "i64": OFFSETS64, "i32": OFFSETS32})
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _TRITON_RAND, spec], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_rand_is_tritons_bit_for_bit(triton_rand, seed):
    for name, dtype, offsets in (("i64", torch.int64, OFFSETS64), ("i32", torch.int32, OFFSETS32)):
        ours = _philox.rand(seed, torch.tensor(offsets, dtype=dtype)).view(torch.int32).tolist()
        assert ours == triton_rand[f"arg {seed} {name}"], (seed, name)
        if -2 ** 63 <= seed < 2 ** 63:  # the dropout kernel's form: the seed loaded from an int64 tensor
            assert triton_rand[f"ptr {seed} {name}"] == ours
            tensor_seed = _philox.rand(torch.tensor(seed), torch.tensor(offsets, dtype=dtype))
            assert tensor_seed.view(torch.int32).tolist() == ours


def test_philox4x32_known_answers():
    """Random123's published Philox4x32-10 test vectors (counter words, key words -> output words)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        words = _philox.philox4x32(*(torch.tensor([c]) for c in counter), *key)
        assert tuple(int(w) for w in words) == want


def test_philox_seed_errors():
    with pytest.raises(ValueError, match="outside"):
        _philox.rand(2 ** 64, torch.arange(3))
    with pytest.raises(TypeError, match="int32 or int64"):
        _philox.rand(0, torch.arange(3.0))


def _expected(x, seed, offset, p):
    """The rule written out: float32(x) * float32(1 / (1 - p)) where kept, else 0."""
    keep = keep_mask(x.shape, seed, offset, p)
    scale = torch.tensor(0.0 if p == 1 else 1 / (1 - p), dtype=torch.float32)
    return torch.where(keep, x.float() * scale, 0.0).to(x.dtype), keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p, seed, offset", [(0.1, 3, 0), (0.5, 2 ** 62 + 11, 2 ** 32 - 700), (0.9, -7, 5),
                                             (1.0, 9, 0)])
def test_backends_draw_the_same_mask_and_gradient(dtype, p, seed, offset):
    """Forward and backward, torch path and Triton kernel (interpreter), across block edges (1024)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 701, generator=gen).to(dtype)
    dy = torch.randn(3, 701, generator=gen).to(dtype)
    want_y, keep = _expected(x, seed, offset, p)
    want_dx, _ = _expected(dy, seed, offset, p)
    for backend in BACKENDS:
        with ref.backend(backend):
            leaf = x.clone().requires_grad_()
            y = lo.dropout(leaf, p, seed=seed, offset=offset)
            y.backward(dy)
        assert torch.equal(y != 0, keep & (x != 0)) and torch.equal(leaf.grad != 0, keep & (dy != 0)), backend
        if dtype == torch.bfloat16 and backend == "triton-interpret":
            # the interpreter truncates float32 -> bfloat16 (numpy has no bfloat16); compiled kernels
            # round to nearest even, as torch does
            torch.testing.assert_close(y.detach(), want_y, rtol=ref.ulp(dtype), atol=0)
            torch.testing.assert_close(leaf.grad, want_dx, rtol=ref.ulp(dtype), atol=0)
        else:
            assert torch.equal(y, want_y) and torch.equal(leaf.grad, want_dx), backend
    assert p < 1 or not keep.any()


def test_float64_masks_match_float32():
    x = torch.randn(2000, dtype=torch.float64)
    y = lo.dropout(x, 0.3, seed=5)
    assert torch.equal(y != 0, lo.dropout(x.float(), 0.3, seed=5) != 0)
    assert torch.equal(y, torch.where(keep_mask(x.shape, 5, 0, 0.3), x * (1 / 0.7), 0.0))


def test_seeds_follow_torch_manual_seed():
    """Each call draws its seed with one torch.randint on the default generator: reproducible under
    manual_seed, fresh per call, and the generator advances exactly as that draw would."""
    x = torch.randn(4, 50)
    torch.manual_seed(123)
    a, b = lo.dropout(x, 0.5), lo.dropout(x, 0.5)
    after = torch.rand(4)
    torch.manual_seed(123)
    seed_a, seed_b = draw_seed("cpu"), torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64)
    assert torch.equal(torch.rand(4), after)
    assert torch.equal(a, lo.dropout(x, 0.5, seed=seed_a)) and torch.equal(b, lo.dropout(x, 0.5, seed=int(seed_b)))
    assert not torch.equal(a != 0, b != 0)
    torch.manual_seed(123)
    assert torch.equal(lo.dropout(x, 0.5), a)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_is_p_and_draws_are_independent(p):
    n = 1 << 17
    keep = keep_mask((n,), 2024, 0, p)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs((~keep).float().mean().item() - p) < 5 * sigma
    # neighbours (the Triton kernel's lanes) and far-apart counters kept together at rate (1 - p)^2
    for shift in (1, 1024):
        both = (keep[:-shift] & keep[shift:]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n - shift))
    # another seed, or the next block of counters, is a different mask
    assert (keep != keep_mask((n,), 2025, 0, p)).float().mean() > p * (1 - p)
    assert (keep != keep_mask((n,), 2024, n, p)).float().mean() > p * (1 - p)


def test_saves_only_the_seed_where_torch_saves_a_mask():
    x = torch.randn(64, 1024, requires_grad=True)
    ours = lo.memory.measure(torch.nn.Sequential(lo.nn.Dropout(0.1)), x)
    torchs = lo.memory.measure(torch.nn.Sequential(torch.nn.Dropout(0.1)), x)
    assert [s.nbytes for s in ours.storages.values()] == [8]  # the int64 seed
    assert all(math.prod(s.shape) < x.numel() for s in ours.storages.values())
    assert torchs.total_bytes >= x.numel()  # a mask: 1 byte per element on CUDA, 4 (float) on CPU
    with ref.backend("triton-interpret"):
        assert lo.memory.measure(torch.nn.Sequential(lo.nn.Dropout(0.1)), x).total_bytes == 8


@pytest.mark.parametrize("kind", ["transposed", "strided", "expanded", "offset"])
def test_views_drop_by_logical_index(kind):
    """A view gives the mask and gradient its contiguous copy gets, and the gradient reaches the leaf."""
    base = torch.randn(6, 10)
    make = {"transposed": lambda t: t.t(), "strided": lambda t: t[:, ::3], "expanded": lambda t: t[:1].expand(6, 10),
            "offset": lambda t: t[2:, 3:]}[kind]
    for backend in BACKENDS:
        with ref.backend(backend):
            leaf = base.clone().requires_grad_()
            v = make(leaf)
            y = lo.dropout(v, 0.4, seed=77)
            want, keep = _expected(v.detach().contiguous(), 77, 0, 0.4)
            assert torch.equal(y, want), (kind, backend)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
            y.backward(dy)
            # the leaf's gradient from torch's own autograd through the rule written out
            twin = base.clone().requires_grad_()
            torch.where(keep, make(twin) * torch.tensor(1 / 0.6, dtype=torch.float32), 0.0).backward(dy)
            torch.testing.assert_close(leaf.grad, twin.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_op_passes_opcheck(backend):
    seed = torch.tensor(42)
    with ref.backend(backend):
        for x in (torch.randn(5, 7, requires_grad=True), torch.randn(7, 5).t().requires_grad_(), torch.randn(0, 3)):
            torch.library.opcheck(torch.ops.lowmem_ops.dropout_apply.default, (x, seed, 3, 0.25))


def test_gradcheck_and_second_derivative():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    f = lambda t: lo.dropout(t, 0.3, seed=11)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(f, (x.detach(),), (tangent,))
    assert torch.equal(jvp, f(tangent))


def test_checkpoint_regenerates_the_same_masks():
    x = torch.randn(8, 32, requires_grad=True)
    layer = lambda t: lo.dropout(t * 2, 0.5) * 3  # noqa: E731
    torch.manual_seed(5)
    layer(x).sum().backward()
    plain, x.grad = x.grad, None
    torch.manual_seed(5)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain)


def test_compiled_call_matches_eager():
    x = torch.randn(4, 9)
    compiled = torch.compile(lambda t: lo.dropout(t, 0.2, seed=123), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), lo.dropout(x, 0.2, seed=123))


def test_identities_and_edges():
    x = torch.randn(3, 4, requires_grad=True)
    assert lo.dropout(x, 0.0) is x and lo.dropout(x, 0.7, training=False) is x
    module = lo.nn.Dropout(0.3).eval()
    assert module(x) is x and repr(module) == "Dropout(p=0.3, inplace=False)"
    y = lo.dropout(x, 1.0)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(3, 4)) and torch.equal(x.grad, torch.zeros(3, 4))
    assert lo.dropout(torch.randn(0, 5), 0.5).shape == (0, 5)
    assert lo.dropout(torch.randn(2, 3, device="meta"), 0.5).device.type == "meta"


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_0_1_is_torchs_error(p):
    with pytest.raises(ValueError, match=f"dropout probability has to be between 0 and 1, but got {p}"):
        lo.dropout(torch.randn(3), p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        lo.nn.Dropout(p)  # at construction, NaN included (torch.nn.Dropout takes NaN and fails when called)
    with pytest.raises((ValueError, RuntimeError), match="dropout probability has to be between 0 and 1"):
        F.dropout(torch.randn(3), p)  # torch's words


def test_bad_arguments_say_what():
    with pytest.raises(TypeError, match="p must be a float"):
        lo.dropout(torch.randn(3), "0.1")
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        lo.dropout(torch.arange(3), 0.1)
    with pytest.raises(ValueError, match="offset"):
        lo.dropout(torch.randn(3), 0.1, offset=-1)
    with pytest.raises(TypeError, match="seed"):
        lo.dropout(torch.randn(3), 0.1, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed"):
        torch.ops.lowmem_ops.dropout_apply(torch.randn(3), torch.tensor(1, device="meta"), 0, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_kernel_matches_torch_path_on_cuda(dtype):
    """The compiled Triton kernel, the torch path on the GPU and the torch path on CPU: one result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3001, generator=gen).to(dtype)
    dy = torch.randn(5, 3001, generator=gen).to(dtype)
    want_y, _ = _expected(x, 2 ** 40 + 1, 12, 0.3)
    want_dx, _ = _expected(dy, 2 ** 40 + 1, 12, 0.3)
    for backend in ("auto", "torch"):
        with ref.backend(backend):
            leaf = x.cuda().requires_grad_()
            y = lo.dropout(leaf, 0.3, seed=2 ** 40 + 1, offset=12)
            y.backward(dy.cuda())
        assert torch.equal(y.cpu(), want_y) and torch.equal(leaf.grad.cpu(), want_dx), backend
    torch.manual_seed(9)
    a = lo.dropout(x.cuda(), 0.5)
    torch.manual_seed(9)
    assert torch.equal(a, lo.dropout(x.cuda(), 0.5, seed=draw_seed("cuda")))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("offset_type", ["i32", "i64"])
def test_cuda_kernel_compiles_ahead_of_time(dtype, offset_type):
    """The generated kernel CUDA tensors run (sm90's, not the interpreter's copy), with the launch config
    sm90's configs.py bakes, compiles without a GPU: 10 Philox rounds of two multiply-highs each, and
    int32 -> float32 rounded to nearest as torch does. Offsets below 2**31 come as i32, others as i64."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lowmem_ops import _configs, _tree
    from lowmem_ops import _contract as C

    # an interpreted run first: Triton's interpreter must leave triton.language as it found it
    with ref.backend("triton-interpret"):
        lo.dropout(torch.randn(5), 0.5, seed=1)
    tree = _tree.builtin_tree()
    module = _tree.kernel_module_file(tree, "sm90", "dropout", False)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cfg = _configs.lookup(tree, "sm90", C.DROPOUT_TABLE, (C.DROPOUT_KERNEL, _configs.DTYPE_NAMES[torch_dtype]), (1 << 20,))
    signature = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "seed_ptr": "*i64", "offset": offset_type,
                 "n_elements": "i32", "threshold": "fp32", "scale": "fp32", "BLOCK": "constexpr"}
    compiled = triton.compile(ASTSource(fn=module.dropout_kernel, signature=signature, constexprs={"BLOCK": cfg["BLOCK"]}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    ptx = compiled.asm["ptx"]
    assert ptx.count("mul.hi.u32") >= 2 * _philox.ROUNDS and "cvt.rn.f32.s32" in ptx


@pytest.mark.parametrize("block, warps", [(64, 1), (4096, 8)])
def test_the_kernel_launches_with_the_baked_config_and_its_mask_ignores_it(monkeypatch, block, warps):
    """The Triton path reads its launch config from the arch's configs.py (lowmem_ops._configs.lookup);
    whatever BLOCK it gets, the mask is the rule's (it depends on seed and offset + i only)."""
    import lowmem_ops._triton_backend as tb
    from lowmem_ops import _configs

    asked, launched = [], []
    real_launch = tb.launch
    monkeypatch.setattr(_configs, "lookup", lambda tree, arch, table, prefix, sizes: asked.append((arch, table, prefix, sizes))
                        or {"BLOCK": block, "num_warps": warps})
    monkeypatch.setattr(tb, "launch", lambda kernel, grid, *a, **meta: launched.append((grid, meta)) or
                        real_launch(kernel, grid, *a, **meta))
    x = torch.randn(5, 301, generator=torch.Generator().manual_seed(3))
    with ref.backend("triton-interpret"):
        y = lo.dropout(x, 0.4, seed=11, offset=70)
    # the interpreter reads the lowest arch's table
    assert asked == [("sm80", "DROPOUT", ("apply", "float32"), (x.numel(),))]
    assert launched == [((-(-x.numel() // block),), {"BLOCK": block, "num_warps": warps})]
    assert torch.equal(y, _expected(x, 11, 70, 0.4)[0])


def test_the_baked_configs_are_a_table_per_dtype_and_size():
    """configs.py of every built arch has a DROPOUT row for each dtype and element bucket."""
    from lowmem_ops import _configs, _tree
    from lowmem_ops import _contract as C

    tree = _tree.builtin_tree()
    for arch in _tree.built_archs(tree):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n in (1, 65536, 65537, 1 << 30):
                cfg = _configs.lookup(tree, arch, C.DROPOUT_TABLE, (C.DROPOUT_KERNEL, _configs.DTYPE_NAMES[dtype]), (n,))
                assert set(cfg) == {"BLOCK", "num_warps"} and cfg["BLOCK"] % (32 * cfg["num_warps"]) == 0, (arch, cfg)


def test_cpu_tensors_take_the_cpp_kernel(monkeypatch):
    """auto on CPU: float32/bf16/fp16 run the C++ kernel (the torch path's int64 Philox is ~100x slower),
    float64 the torch path; both give the rule's output."""
    from lowmem_ops import _cpp_backend
    calls = []
    real = _cpp_backend.dropout_apply
    monkeypatch.setattr(_cpp_backend, "dropout_apply", lambda *a: calls.append(a[1].dtype) or real(*a))
    with ref.backend("auto"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.randn(2, 300).to(dtype)
            want, keep = _expected(x, -3, 9, 0.25)
            if dtype == torch.float64:  # scaled in float64
                want = torch.where(keep, x * (1 / 0.75), 0.0)
            assert torch.equal(lo.dropout(x, 0.25, seed=-3, offset=9), want), dtype
    assert calls == [torch.float32, torch.bfloat16]
