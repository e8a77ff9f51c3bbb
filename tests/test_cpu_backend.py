"""The C++ CPU backend (lowmem_ops/_cpp_backend.py, kernels rendered from templates/cpu_activation.cpp.j2):
codes and dx bit for bit those of the torch path, for every built-in activation and a user spec with
the "upper" boundary, in float32, bfloat16 and float16, on any size and layout and on the values where
rounding and comparisons go wrong (NaN, infinities, the thresholds themselves and their neighbours,
subnormals, signed zeros); the codes and dx also against the independent reference. And: what
happens when the kernels cannot be compiled, are missing or do not match the tree."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_ops as lo
from kernelgen import cli
from lowmem_ops import _common, _cpp_backend
from lowmem_ops._tree import get_op

from . import reference as ref

BUILTIN = sorted(n for n in ref.EXACT_FORWARD)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
UPPER = "step_upper"  # a user spec: 2 bits, boundary "upper", thresholds exact in every dtype


@pytest.fixture(scope="module")
def upper_op(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upper")
    path = folder / f"{UPPER}.toml"
    path.write_text(f'[op]\nname = "{UPPER}"\nforward = "x * sigmoid(x)"\n\n[approx]\nbits = 2\nboundary = "upper"\n'
                    'thresholds = [-1.0, 0.0, 1.5]\nlevels = [0.0, 0.25, 0.75, 1.0]\nfit_error = 0.1\n')
    ref.EXTRA_SPECS[UPPER] = path
    assert cli.main(["build", "--arch", "sm80", "--spec", str(path), "--out", str(folder / "tree")]) == 0
    lo.load(folder / "tree")
    return UPPER


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile (or load from the extension cache) the built-in tree's kernels once; fail, not skip,
    where that is impossible: the backend is what this file tests."""
    why = _cpp_backend.unavailable(get_op("regelu2"))
    assert why is None, why


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit for bit, except that any NaN equals any NaN (torch's own casts pick different NaN payloads)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    both_nan = got.isnan() & want.isnan()
    same = (bits_of(got) == bits_of(want)) | both_nan
    bad = (~same).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}: " \
                             f"{got[tuple(bad[0])].item()!r} vs {want[tuple(bad[0])].item()!r}"


def exact_forward(name: str, x: torch.Tensor) -> torch.Tensor:
    """h(x) in float64 (the user spec's forward is x * sigmoid(x))."""
    return x.detach().double() * torch.sigmoid(x.detach().double()) if name == UPPER else ref.forward(name, x)


def one_step(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per element: got equals want or its neighbour in want's dtype, both are NaN, or they differ by
    at most the smallest normal number (a subnormal result flushed to zero)."""
    inf = torch.full_like(want, math.inf)
    close = (got == want) | (got == torch.nextafter(want, inf)) | (got == torch.nextafter(want, -inf))
    return close | (got.isnan() & want.isnan()) | ((got.double() - want.double()).abs() <= torch.finfo(want.dtype).tiny)


def check_forward(name: str, x: torch.Tensor, y_cpp: torch.Tensor, y_torch: torch.Tensor, what: str) -> None:
    """float32, and 16-bit ops whose torch function is not used directly: the torch path's y exactly.
    16-bit ops computed by torch's own function on x: within one step of the float64 value wherever
    the torch path is."""
    op = get_op(name)
    if x.dtype == torch.float32 or not _cpp_backend._direct_is_as_accurate(op, x.dtype):
        assert_identical(y_cpp, y_torch, what)
        return
    truth = exact_forward(name, x).to(x.dtype)
    worse = ~one_step(y_cpp, truth) & one_step(y_torch, truth)
    assert not worse.any(), f"{what}: {x[worse][:4].tolist()} -> {y_cpp[worse][:4].tolist()}, torch path {y_torch[worse][:4].tolist()}"


def special_values(name: str, dtype: torch.dtype) -> list[float]:
    """The thresholds (as float32 and as the dtype rounds them) and their neighbours in the dtype,
    NaN, infinities, signed zeros, the smallest subnormal and the largest finite value."""
    finfo = torch.finfo(dtype)
    t32 = torch.tensor(ref.thresholds_f32(name), dtype=torch.float32)
    td = t32.to(dtype)
    inf = torch.full_like(td, math.inf)
    near = torch.cat([td, torch.nextafter(td, inf), torch.nextafter(td, -inf)]).float()
    return [*t32.tolist(), *near.tolist(), math.nan, math.inf, -math.inf, 0.0, -0.0, finfo.tiny * finfo.eps,
            -finfo.tiny * finfo.eps, finfo.tiny, finfo.max, -finfo.max]


def run(backend: str, name: str, x: torch.Tensor, dy: torch.Tensor):
    """y, the saved codes and dx of `name` on x, on `backend`. x is taken as the same view of a fresh
    leaf, so a strided x reaches the op strided."""
    base = x._base if x._base is not None else x
    leaf = base.detach().clone().requires_grad_(True)
    view = leaf.as_strided(x.shape, x.stride(), x.storage_offset())
    with ref.backend(backend):
        y, codes = torch.ops.lowmem_ops.approx_act_fwd(view, name, True)
        (dx,) = torch.autograd.grad(lo.approx_activation(view, name), view, dy)
    return y.detach(), codes, dx


@st.composite
def cases(draw, names):
    name = draw(st.sampled_from(names))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 15, 17, 33, 64, 127, 130, 257]))
    specials = special_values(name, dtype)
    values = draw(st.lists(st.one_of(st.sampled_from(specials), st.floats(-12, 12, width=32)), min_size=n, max_size=n))
    layout = draw(st.sampled_from(["contiguous", "stride2", "transposed"]))
    seed = draw(st.integers(0, 2**16))
    return name, dtype, values, layout, seed


def laid_out(values: list[float], dtype: torch.dtype, layout: str) -> torch.Tensor:
    """The values as a tensor in the layout: contiguous, every other element of a wider buffer, or
    the transpose of a (cols, rows) tensor (whose flattened order is not the values' order)."""
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    if layout == "stride2":
        return torch.stack([x, torch.full_like(x, 123.0)], dim=1)[:, 0]
    if layout == "transposed" and x.numel() % 2 == 0 and x.numel():
        return x.view(2, -1).t()
    return x


def check_case(name, dtype, values, layout, seed):
    x = laid_out(values, dtype, layout)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    dy[..., :1] = math.inf if x.numel() > 4 else dy[..., :1]  # inf * level 0 is NaN on both paths
    y_t, codes_t, dx_t = run("torch", name, x, dy)
    y_c, codes_c, dx_c = run("cpp", name, x, dy)
    what = f"{name} {dtype} n={x.numel()} {layout}"
    assert torch.equal(codes_c, codes_t), f"{what}: codes"
    assert_identical(dx_c, dx_t, f"{what}: dx")
    check_forward(name, x.detach(), y_c, y_t, f"{what}: y")
    # the independent reference: codes from the spec's thresholds, dx from its float64 levels
    flat = x.detach().contiguous().reshape(-1)
    np.testing.assert_array_equal(ref.unpack(codes_c, ref.bits(name), flat.numel()), ref.codes(name, flat))
    want = ref.grad(name, x.detach(), dy)
    # one rounding to dtype: half an ulp relative, or half the subnormal spacing where dx is subnormal
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(dx_c.double(), want, rtol=ref.ulp(dtype), atol=subnormal_step / 2, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@settings(max_examples=120)
@given(case=cases(BUILTIN))
def test_builtin_codes_and_dx_match_torch_path_and_reference(case):
    check_case(*case)


@settings(max_examples=20)
@given(case=cases([UPPER]))
def test_user_spec_with_upper_boundary(upper_op, case):
    check_case(*case)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_every_dtype_across_code_bytes(name):
    """Deterministic: each op and dtype at sizes around a code byte's edge, thresholds included."""
    for dtype in DTYPES:
        values = special_values(name, dtype)
        for n in (1, 5, 8, 9, 23):
            check_case(name, dtype, (values * 3)[:n], "contiguous", n)


def test_parallel_chunks_and_16bit_forward_chunks(monkeypatch):
    """Sizes that at::parallel_for splits over two threads, and y of a 16-bit input computed in
    float32 chunks (made small here) that do not divide the size: still the torch path's results."""
    monkeypatch.setattr(_cpp_backend, "_Y_CHUNK", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cases = (("regelu2", torch.bfloat16), ("resilu3", torch.float16), ("regelu4", torch.float32),
                 ("quick_gelu2", torch.bfloat16), ("softplus2", torch.float16))  # the last two: chunked y
        for name, dtype in cases:
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(2**16 + 203, generator=gen) * 4).to(dtype)
            y_t, codes_t, dx_t = run("torch", name, x, x.flip(0))
            y_c, codes_c, dx_c = run("cpp", name, x, x.flip(0))
            assert torch.equal(codes_c, codes_t), name
            assert_identical(dx_c, dx_t, f"{name} dx")
            check_forward(name, x, y_c, y_t, f"{name} y")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_forward_does_not_depend_on_torch_loop_kind(dtype):
    """What lets y of a 16-bit input be computed chunk by chunk: over every 16-bit value, torch's
    vectorised float32 loop (contiguous input) and its scalar loop (strided input) round to the same
    16-bit result for every built-in forward, so where a chunk (or thread) boundary falls cannot
    change y."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    strided = torch.stack([every, every], dim=1)[:, 0]
    assert not strided.is_contiguous()
    for name in BUILTIN:
        op = get_op(name)
        assert_identical(op.forward(strided.float()).to(dtype), op.forward(every.float()).to(dtype), name)


def test_16bit_forward_uses_torch_functions_only_where_as_accurate():
    """torch's fused activations compute in float32 inside: used on 16-bit tensors directly. A composite
    expression (QuickGELU and softplus here) would round every intermediate: the float32 path."""
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("regelu2", "resilu3", "mish2", "elu2", "tanh_gelu2"):
            assert _cpp_backend._direct_is_as_accurate(get_op(name), dtype), (name, dtype)
        for name in ("quick_gelu2", "softplus2"):
            assert not _cpp_backend._direct_is_as_accurate(get_op(name), dtype), (name, dtype)


def test_auto_takes_the_cpp_kernels_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the torch path ran")

    monkeypatch.setattr(lo.activations._torch_backend, "forward", refuse)
    monkeypatch.setattr(lo.activations._torch_backend, "backward", refuse)
    x = torch.randn(10, requires_grad=True)
    with ref.backend("auto"):
        lo.regelu2(x).sum().backward()
    assert x.grad is not None
    with ref.backend("auto"), pytest.raises(AssertionError, match="the torch path ran"):
        lo.regelu2(x.detach().double())  # float64 always takes the torch path


def test_backend_choice():
    cpu = torch.empty(1)
    with ref.backend("auto"):
        assert _common.backend(cpu, has_cpp=True) == "cpp"
        assert _common.backend(cpu) == "torch"  # ops without C++ kernels (gated, norms)
        assert _common.backend(cpu.double(), has_cpp=True) == "torch"
    with ref.backend("torch"):
        assert _common.backend(cpu, has_cpp=True) == "torch"
    with ref.backend("cpp"):
        assert _common.backend(cpu, has_cpp=True) == "cpp"
        assert _common.backend(cpu) == "torch"


@pytest.fixture
def fresh_backend(monkeypatch):
    """_cpp_backend with nothing compiled, checked or warned yet (restored afterwards)."""
    for attr in ("_libraries", "_checked", "_bound", "_gated", "_names", "_autograd_ops"):
        monkeypatch.setattr(_cpp_backend, attr, {})
    monkeypatch.setattr(_cpp_backend, "_warned", set())


def test_failed_compile_warns_once_and_takes_the_torch_path(monkeypatch, fresh_backend):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("simulated: no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x = torch.randn(37, requires_grad=True)
    dy = torch.randn(37)
    with ref.backend("auto"):
        with pytest.warns(UserWarning, match="simulated: no C\\+\\+ compiler found") as record:
            y = lo.regelu2(x)
        y.backward(dy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            lo.resilu2(x)
    assert len(record) == 1 and "torch path" in str(record[0].message)
    with ref.backend("torch"):
        y_t, codes_t, dx_t = run("torch", "regelu2", x.detach(), dy)
    assert torch.equal(y, y_t) and torch.equal(x.grad, dx_t)
    with ref.backend("cpp"), pytest.raises(RuntimeError, match="LOWMEM_OPS_BACKEND=cpp, but compiling .*simulated"):
        lo.regelu2(x)


def test_missing_source_and_stale_kernels_are_refused(tmp_path):
    op = get_op("regelu2")
    missing = _cpp_backend.unavailable(dataclasses.replace(op, tree=tmp_path))
    assert missing is not None and "cpu_kernels.cpp is missing" in missing and "kernelgen build" in missing
    lib = _cpp_backend._library(op.tree)
    moved = dataclasses.replace(op, thresholds=(op.thresholds[0], 0.0, op.thresholds[2]))
    stale = _cpp_backend._check_op(lib, moved)
    assert isinstance(stale, str) and "does not match" in stale and "regelu2" in stale
    upper = dataclasses.replace(op, boundary="upper")
    assert isinstance(_cpp_backend._check_op(lib, upper), str)
    assert not isinstance(_cpp_backend._check_op(lib, op), str)


def test_checkouts_with_the_same_kernels_share_one_build(tmp_path, monkeypatch):
    """The C++ source is compiled from a copy named by its hash, so ninja (which records the source's
    path) sees one source for every tree holding those kernels and does not rebuild when two checkouts
    alternate; the copy is rewritten only when its text differs."""
    from lowmem_ops import _cpp_backend

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = _cpp_backend._stable_copy(b"int f() { return 1; }\n", "lowmem_ops_cpu_0123")
    stamp = first.stat().st_mtime_ns
    again = _cpp_backend._stable_copy(b"int f() { return 1; }\n", "lowmem_ops_cpu_0123")
    assert again == first and again.stat().st_mtime_ns == stamp and first.parent.parent == tmp_path
    first.write_bytes(b"damaged")
    assert _cpp_backend._stable_copy(b"int f() { return 1; }\n", "lowmem_ops_cpu_0123").read_bytes() == \
        b"int f() { return 1; }\n"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
