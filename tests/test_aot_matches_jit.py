"""kernelgen compiles, ahead of time, the kernels Triton's JIT compiles at run time.

Pruning and ranking judge the registers, spills and shared memory of the AOT compiles; they are
only right if those compiles are the ones that run. Every launch a real op call makes (activations,
gated, the gated rows kernels on the halves of one projection, norms with float32 and 16-bit
weights, dropout, dropout + add + norm, sizes that are multiples of 16 and sizes that are not) is
captured here and handed to Triton's own JIT binder for an sm90 target: the signature, constexprs
and divisibility attributes it would compile must be those of one of the variants the build compiles."""

import importlib
import importlib.util

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops import _norm_backends, _triton_backend
from lowmem_ops.gated import gated_halves
from lowmem_ops._tree import kernel_path

from . import reference as ref

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernelgen import archs, build, families, kernels, spec  # noqa: E402

ARCH = archs.ARCHS["sm90"]
REPO_GENERATED = build.default_out()


def _capture(monkeypatch) -> list:
    launches = []
    real = _triton_backend.launch

    def recording(kernel, grid, *args, rows=False, **meta):  # rows: the launcher's own flag, not the kernel's
        launches.append((kernel, args, meta))
        return real(kernel, grid, *args, rows=rows, **meta)

    monkeypatch.setattr(_triton_backend, "launch", recording)
    monkeypatch.setattr(_norm_backends, "launch", recording)
    monkeypatch.setattr(importlib.import_module("lowmem_ops.add_norm"), "launch", recording)  # (lo.add_norm: no op)
    return launches


_jit_modules: dict = {}


def _jit_function(interpreted_kernel):
    """The same kernel of the sm90 file, as the JIT (not the interpreter) creates it."""
    name = interpreted_kernel.fn.__module__.rsplit(".", 1)[-1].removesuffix("_interpret")
    stem = name.rsplit("_", 1)[0]  # the module of kernels/<stem>_<hash>.py
    if stem not in _jit_modules:
        path, _ = kernel_path(REPO_GENERATED, ARCH.name, stem)
        module_spec = importlib.util.spec_from_file_location(f"_aot_vs_jit_{stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _jit_modules[stem] = module
    return stem, getattr(_jit_modules[stem], interpreted_kernel.fn.__name__)


def _jit_view(fn, args, meta):
    """(signature, constexprs by name, names marked divisible by 16) as Triton's JIT would compile
    this launch for sm90."""
    backend = make_backend(GPUTarget("cuda", ARCH.capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **meta)
    _, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    names = list(signature)
    constants = {names[path[0]]: value for path, value in constexprs.items()}
    marked = {names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr}
    return signature, constants, marked


def _aot_variants():
    specs = spec.load_builtin()
    out = []
    for config in families.variants(families.groups(specs, ARCH)):
        for v in config:
            out += [v, v.unaligned()]
    return out


AOT = None


def _matches(stem, fn_name, jit_sig, jit_constants, jit_marked):
    global AOT
    AOT = AOT or _aot_variants()
    found = []
    for v in AOT:
        if v.op != stem or v.fn != fn_name:
            continue
        if v.signature != dict(jit_sig) or v.constexprs != jit_constants:
            continue
        pointers = {k for k, t in v.signature.items() if t.startswith("*")}
        found.append((v, pointers | set(v.aligned_args) == jit_marked - {"n_rows"}))
    return found


def _op_calls(rows: int, cols: int, dtype, wdtype):
    """Forward and backward of a public op of each kind, on a (rows, cols) input."""
    x = torch.randn(rows, cols).to(dtype).requires_grad_(True)
    g = torch.randn(rows, cols).to(dtype).requires_grad_(True)
    w = (torch.rand(cols) + 0.5).to(wdtype).requires_grad_(True)
    b = (torch.randn(cols) * 0.1).to(wdtype).requires_grad_(True)
    lo.regelu2(x).sum().backward()
    lo.swiglu(g, x).sum().backward()
    # the halves of one projection: the rows kernels, through gated() and through gated_halves
    gate_up = torch.randn(rows, 2 * cols).to(dtype).requires_grad_(True)
    lo.swiglu(*gate_up.chunk(2, -1)).sum().backward()
    gated_halves(gate_up, "resilu2").sum().backward()
    lo.ms_layernorm(x, cols, w, b).float().sum().backward()
    lo.ms_rmsnorm(x, cols, w).float().sum().backward()
    lo.ms_layernorm(x, cols).float().sum().backward()
    lo.dropout(x, 0.1).float().sum().backward()
    # the post-LN block (LayerNorm, dropout) and the pre-LN residual stream (RMSNorm, no dropout)
    y, h = lo.add_ms_layernorm(x, g, w, b, p=0.1)
    (y.float().sum() + h.float().sum()).backward()
    y, h = lo.add_ms_rmsnorm(x, g, w)
    (y.float().sum() + h.float().sum()).backward()


@pytest.mark.parametrize("rows, cols", [(3, 64), (5, 40), (2, 9000)], ids=["sizes-x16", "sizes-odd", "wide-rows"])
@pytest.mark.parametrize("dtype, wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-weights"])
def test_every_launch_is_a_kernel_the_build_compiled(monkeypatch, rows, cols, dtype, wdtype):
    launches = _capture(monkeypatch)
    with ref.backend("triton-interpret"):
        _op_calls(rows, cols, dtype, wdtype)
    assert len(launches) >= 12
    stems = [_jit_function(k)[0] for k, _, _ in launches]
    assert stems.count("dropout") == 3  # lo.dropout's forward and backward, add_ms_layernorm's dx
    assert stems.count("add_norm") == 2  # the fused forward (or dropout + add of wide rows), twice
    for kernel, args, meta in launches:
        stem, fn = _jit_function(kernel)
        sig, constants, marked = _jit_view(fn, args, meta)
        found = _matches(stem, fn.__name__, sig, constants, marked)
        assert found, f"{stem}.{fn.__name__}: no compiled variant has the JIT's signature {sig} / constexprs {constants}"
        assert any(same for _, same in found), (
            f"{stem}.{fn.__name__}: the JIT marks {sorted(marked)} as multiples of 16; the build's compiles mark "
            f"{[sorted({k for k, t in v.signature.items() if t.startswith('*')} | set(v.aligned_args)) for v, _ in found]}")
        sizes = [args[i] for i, name in enumerate(fn.arg_names) if name in kernels.SIZE_ARGS]
        aligned = [v for v, same in found if same]
        # (a rows kernel's sizes come in units of its UNIT, which the constexprs matched above)
        assert all(v.aligned == all(s % 16 == 0 for s in sizes) for v in aligned if not v.unit)
    rows_kernels = [fn for k, _, _ in launches if "rows" in (fn := _jit_function(k)[1].__name__)]
    assert sorted(rows_kernels) == ["gated_backward_rows_kernel"] * 2 + ["gated_forward_rows_kernel"] * 2
