"""The C++ implementation of the approximate activations on CPU tensors.

`kernelgen build` renders every activation of a tree into one C++ file, <tree>/cpu_kernels.cpp
(templates/cpu_activation.cpp.j2). The first CPU call compiles it with torch.utils.cpp_extension
(-O3, OpenMP; cached across processes by the extension's own build cache) and loads it through
ctypes. The forward value y still comes from torch's own function (_forward_value); the C++
kernels compute the packed codes from x in one pass, and dx = dy * L[code] in one pass. Codes and
dx are bit for bit those of the torch path (lowmem_ops/_torch_backend.py).

Where the file is missing, fails to compile or does not match the tree's ops.py, `unavailable`
says why: LOWMEM_OPS_BACKEND=auto then warns once and takes the torch path, =cpp raises.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import warnings
from pathlib import Path

import torch

from ._tree import OpInfo

CPU_FILE = "cpu_kernels.cpp"  # kernelgen.render.CPU_FILE
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' dtype argument
# Where y of a 16-bit input is computed in float32, it is this many elements at a time, so the
# float32 copies stay in cache: one pass over memory instead of three.
_Y_CHUNK = 1 << 15

_lock = threading.Lock()
_libraries: dict[Path, ctypes.CDLL | str] = {}  # tree -> loaded library, or why there is none
_checked: dict[tuple[Path, str], tuple | str] = {}  # (tree, op) -> its (codes, grad) functions, or why there are none
_warned: set = set()


def _compile(tree: Path) -> ctypes.CDLL | str:
    source = tree / CPU_FILE
    if not source.is_file():
        return (f"{source} is missing (a tree built before the C++ backend existed): rebuild it with "
                "`kernelgen build`")
    from torch.utils import cpp_extension

    # One build per distinct source (the name holds its hash): trees of the same specs share it, and a
    # changed source never loads an old build.
    name = "lowmem_ops_cpu_" + hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    try:
        path = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=["-O3", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return ctypes.CDLL(path)
    except Exception as err:  # noqa: BLE001 - any failure to build or load means: no C++ kernels
        message = " ".join(str(err).split())  # one line; the compiler's own error comes last
        if len(message) > 700:
            message = f"{message[:200]} ... {message[-500:]}"
        return f"compiling {source} failed: {type(err).__name__}: {message}"


def _library(tree: Path) -> ctypes.CDLL | str:
    with _lock:
        if tree not in _libraries:
            _libraries[tree] = _compile(tree)
        return _libraries[tree]


def _check_op(lib: ctypes.CDLL, op: OpInfo) -> tuple | str:
    """The (codes, grad) functions of `op`, if they bake exactly the tree's thresholds, levels and
    boundary; else why not."""
    try:
        spec, codes, grad = (getattr(lib, f"lowmem_{op.name}_{what}") for what in ("spec", "codes", "grad"))
    except AttributeError:
        return f"{op.tree / CPU_FILE} has no kernels for {op.name}: rebuild the tree with `kernelgen build`"
    codes.restype = grad.restype = ctypes.c_int
    codes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
    grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
    bits, lower = ctypes.c_int(), ctypes.c_int()
    thresholds = (ctypes.c_float * len(op.thresholds))()
    levels = (ctypes.c_float * len(op.levels))()
    spec(ctypes.byref(bits), ctypes.byref(lower), thresholds, levels)
    baked = (bits.value, bool(lower.value), tuple(thresholds), tuple(levels))
    if baked != (op.bits, op.boundary == "lower", op.thresholds, op.levels):
        return (f"{op.tree / CPU_FILE} does not match {op.tree / 'ops.py'} for {op.name} (one of them was "
                "changed after the build): rebuild the tree with `kernelgen build`")
    return codes, grad


def _kernels(op: OpInfo) -> tuple | str:
    key = (op.tree, op.name)
    if key not in _checked:
        lib = _library(op.tree)
        _checked[key] = lib if isinstance(lib, str) else _check_op(lib, op)
    return _checked[key]


def unavailable(op: OpInfo) -> str | None:
    """Why the C++ kernels cannot run `op`, or None when they can (compiling them on first use)."""
    found = _kernels(op)
    return found if isinstance(found, str) else None


def _kernel(op: OpInfo, which: int):
    found = _kernels(op)
    if isinstance(found, str):
        raise RuntimeError(f"lowmem_ops.{op.name}: no C++ CPU kernels: {found}")
    return found[which]


def warn_fallback(op: OpInfo, why: str) -> None:
    """Once per tree and reason: the C++ kernels are not used, and why."""
    if (op.tree, why) not in _warned:
        _warned.add((op.tree, why))
        warnings.warn(f"lowmem_ops: no C++ CPU kernels ({why}); CPU tensors take the torch path (same results, "
                      "slower). LOWMEM_OPS_BACKEND=torch chooses that path without this warning.", stacklevel=5)


def _call(fn, op: OpInfo, *args) -> None:
    rc = fn(*args)
    if rc != 0:  # the dtype was checked by the caller; -2: an exception inside the kernel
        raise RuntimeError(f"lowmem_ops.{op.name}: the C++ CPU kernel {fn.__name__} failed (code {rc})")


def _forward_value(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    """y = h(x), from torch. float32: exactly the torch path's call. 16-bit: torch's own function on x
    where that is as accurate as the torch path's float32 computation (_direct_is_as_accurate: GELU,
    SiLU, ...: one pass instead of three), else the torch path's computation chunk by chunk, so its
    float32 copies stay in cache (each element's value is the torch path's: the tests check that
    torch's vectorised and scalar float32 loops round to the same 16-bit results)."""
    if x.dtype == torch.float32:
        return op.forward(x)
    if _direct_is_as_accurate(op, x.dtype):
        return op.forward(x)
    if x.numel() <= _Y_CHUNK:
        return op.forward(x.float()).to(x.dtype)
    y = torch.empty_like(x)
    flat_x, flat_y = x.view(-1), y.view(-1)
    buf = torch.empty(_Y_CHUNK, dtype=torch.float32)
    for start in range(0, x.numel(), _Y_CHUNK):
        stop = min(start + _Y_CHUNK, x.numel())
        chunk = buf[: stop - start]
        chunk.copy_(flat_x[start:stop])
        flat_y[start:stop].copy_(op.forward(chunk))
    return y


_direct: dict[tuple[Path, str, torch.dtype], bool] = {}


def within_one_step(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per element: got is want or a neighbour of it in want's dtype, or both are NaN, or they differ by
    at most the smallest normal number (flushing subnormal results to zero is not an error here)."""
    inf = torch.full_like(want, float("inf"))
    tiny = torch.finfo(want.dtype).tiny
    return ((got == want) | (got == torch.nextafter(want, inf)) | (got == torch.nextafter(want, -inf))
            | (got.isnan() & want.isnan()) | ((got.double() - want.double()).abs() <= tiny))


def _direct_is_as_accurate(op: OpInfo, dtype: torch.dtype) -> bool:
    """Whether op.forward on a 16-bit tensor is within one step of the float64 value on every input
    where the torch path (float32, rounded once) is: checked once per op and dtype over all 65536
    inputs, through torch's vectorised (contiguous) and scalar (strided) loops. True for torch's fused
    activations (they compute in float32 inside); False for a composite expression, whose every
    intermediate would be rounded to 16 bits."""
    key = (op.tree, op.name, dtype)
    if key not in _direct:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        strided = torch.stack([every, every], dim=1)[:, 0]
        exact = op.forward(every.double()).to(dtype)
        torch_path_ok = within_one_step(op.forward(every.float()).to(dtype), exact)
        direct_ok = within_one_step(op.forward(every), exact) & within_one_step(op.forward(strided), exact)
        _direct[key] = bool((direct_ok | ~torch_path_ok).all())
    return _direct[key]


def forward(op: OpInfo, x: torch.Tensor, save_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: contiguous float32/bfloat16/float16 on CPU."""
    y = _forward_value(op, x)
    codes = torch.empty(op.n_code_bytes(x.numel()) if save_codes else 0, dtype=torch.uint8)
    if save_codes and x.numel():
        _call(_kernel(op, 0), op, x.data_ptr(), _DTYPE_CODE[x.dtype], x.numel(),
              codes.data_ptr())
    return y, codes


def backward(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """dy: contiguous float32/bfloat16/float16 on CPU; codes checked by the caller."""
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format)
    if dy.numel():
        codes = codes.contiguous()
        _call(_kernel(op, 1), op, dy.data_ptr(), codes.data_ptr(), _DTYPE_CODE[dy.dtype],
              dy.numel(), dx.data_ptr())
    return dx
