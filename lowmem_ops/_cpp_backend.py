"""The C++ implementation of the approximate activations on CPU tensors.

`kernelgen build` renders every activation of a tree into one C++ file, <tree>/cpu_kernels.cpp
(templates/cpu_activation.cpp.j2). The first CPU call compiles it with torch.utils.cpp_extension
(-O3, OpenMP; cached across processes by the extension's own build cache) and loads it through
ctypes. The forward value y still comes from torch's own function (forward_value); the C++
kernels compute the packed codes from x in one pass, and dx = dy * L[code] in one pass. Codes and
dx are bit for bit those of the torch path (lowmem_ops/_torch_backend.py).

Where the file is missing, fails to compile or does not match the tree's ops.py, `unavailable`
says why: LOWMEM_OPS_BACKEND=auto then warns once and takes the torch path, =cpp raises.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from . import _contract
from ._common import row_stride
from ._tree import OpInfo

CPU_FILE = _contract.CPU_FILE
_DTYPE_CODE = {getattr(torch, name): code for code, name in enumerate(_contract.CPU_DTYPE_CODES)}  # the kernels' dtype argument
# Where y of a 16-bit input is computed in float32, it is this many elements at a time, so the
# float32 copies stay in cache: one pass over memory instead of three.
_Y_CHUNK = 1 << 15

_lock = threading.Lock()
_libraries: dict[Path, ctypes.CDLL | str] = {}  # tree -> loaded library, or why there is none
_names: dict[Path, str] = {}  # tree -> its library's name: the namespace of the torch ops it registers
_checked: dict[tuple[Path, str], tuple | str] = {}  # (tree, op) -> its (codes, grad) functions, or why there are none
_warned: set = set()


def _compile(tree: Path) -> ctypes.CDLL | str:
    """The tree's library, compiled (or found in the build cache) and loaded: loading it runs its static
    registrations of torch ops (TORCH_LIBRARY), in the namespace named after the library."""
    source = tree / CPU_FILE
    if not source.is_file():
        return (f"{source} is missing (a tree built before the C++ backend existed): rebuild it with "
                "`kernelgen build`")
    from torch.utils import cpp_extension

    # One build per distinct source, flags and torch (the name holds their hash): trees of the same specs
    # share it, and a changed source never loads an old build.
    flags = _cflags()
    text = source.read_bytes()
    name = "lowmem_ops_cpu_" + hashlib.sha256(text + " ".join(flags + [torch.__version__]).encode()).hexdigest()[:16]
    _check_build_lock(name)
    try:
        path = cpp_extension.load(name=name, sources=[str(_stable_copy(text, name))], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        lib = ctypes.CDLL(path)
        _names[tree] = name
        return lib
    except Exception as err:  # noqa: BLE001 - any failure to build or load means: no C++ kernels
        message = " ".join(str(err).split())  # one line; the compiler's own error comes last
        if len(message) > 700:
            message = f"{message[:200]} ... {message[-500:]}"
        return f"compiling {source} failed: {type(err).__name__}: {message}"


def _stable_copy(text: bytes, name: str) -> Path:
    """The source at a path named by its hash, beside the build: ninja's build file records the source's
    path, so every checkout or venv holding the same kernels reuses one build instead of recompiling
    (about a minute) whenever another one built last."""
    folder = _build_root() / f"{name}-source"
    path = folder / CPU_FILE
    if not path.is_file() or path.read_bytes() != text:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:  # whole, or not at all
            tmp.write(text)
        os.replace(tmp.name, path)
    return path


def _build_root() -> Path:
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())  # as load() picks it


# Up to torch 2.13 the build lock (FileBaton) is an empty file in the build folder whose existence
# blocks, removed when the build ends; one left by a process stopped while compiling (Ctrl-C in the
# first CPU call, a killed job) makes every later load wait for it forever, with no word. A build takes
# a minute or two and writes nothing until it ends. torch 2.14 holds an OS lock (FileLock) on a file
# that stays, which the kernel releases when its holder dies: nothing to do there, and removing that
# file would let two builds run at once.
STALE_LOCK_SECONDS = 900


def _check_build_lock(name: str) -> None:
    """Before torch's load: a lock nothing has written beside for STALE_LOCK_SECONDS is removed (with a
    warning); a younger one is another process building, waited for, with a warning naming it."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "FileBaton") or hasattr(cpp_extension, "FileLock"):
        return  # not an existence lock (above)
    where = getattr(cpp_extension, "_get_build_directory", None)  # the folder load() builds in (a private helper)
    if where is None:
        return
    folder = Path(where(name, False))
    lock = folder / "lock"
    try:
        idle = time.time() - max(p.stat().st_mtime for p in folder.iterdir())
        if not lock.is_file():
            return
        if idle < STALE_LOCK_SECONDS:
            warnings.warn(f"lowmem_ops: waiting for another process compiling the C++ kernels ({lock}); if none "
                          "is, delete that file", stacklevel=3)
            return
        lock.unlink()
    except (FileNotFoundError, ValueError):  # no build folder yet, or the build ended meanwhile
        return
    warnings.warn(f"lowmem_ops: removed {lock}, left {idle / 60:.0f} min ago by a process stopped while it compiled "
                  "the C++ kernels; compiling them again", stacklevel=3)


def _cflags() -> list[str]:
    """-O3 and OpenMP (its simd reductions), no contraction into FMAs (every product and sum rounds as in
    the torch path). at::vec's Vectorized<float> (Sleef's functions from libtorch) for AVX2 where
    this CPU and this torch build have it (AVX-512: 16 lanes, as torch's own kernels there); else its
    portable version (same formulas, element by element)."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _library(tree: Path) -> ctypes.CDLL | str:
    with _lock:
        if tree not in _libraries:
            _libraries[tree] = _compile(tree)
        return _libraries[tree]


_bound: dict[tuple[Path, str], tuple | str] = {}  # (tree, what) -> the typed functions, or why there are none
_P, _I32, _I64, _F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


def _entry_points(tree: Path, what: str, signatures: dict[str, list]) -> tuple | str:
    """The functions of the tree's library that `signatures` names (name -> argtypes; each returns
    int), typed, in that order, once per tree; or why there are none (no library, or an older tree
    without them: `what` names them in that message)."""
    key = (tree, what)
    if key not in _bound:
        lib = _library(tree)
        if isinstance(lib, str):
            _bound[key] = lib
        elif not all(hasattr(lib, name) for name in signatures):
            _bound[key] = f"{tree / CPU_FILE} has no {what}: rebuild the tree with `kernelgen build`"
        else:
            fns = []
            for name, argtypes in signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, _I32
                fns.append(fn)
            _bound[key] = tuple(fns)
    return _bound[key]


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


def forward_value(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
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
    y = forward_value(op, x)
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


# --- gated activations --------------------------------------------------------------------------

_gated: dict[tuple[Path, str], tuple | str] = {}  # (tree, op) -> _gated_kernels' answer


def _gated_kernels(op: OpInfo) -> tuple | str:
    key = (op.tree, op.name)
    if key not in _gated:  # once per op: every call asks (the signatures' dict costs microseconds)
        found = _kernels(op)  # the codes kernel and the baked-spec check come with the activation's
        if isinstance(found, str):
            _gated[key] = found
        else:
            gated = _entry_points(op.tree, f"gated kernels for {op.name}", {
                f"lowmem_{op.name}_gated_forward": [_P, _P, _I32, _I64, _P, _P],
                f"lowmem_{op.name}_gated_exact": [_P, _P, _P, _I32, _I64, _P, _P],
                f"lowmem_{op.name}_gated_approx": [_P, _P, _P, _P, _I32, _I64, _P, _P]})
            _gated[key] = gated if isinstance(gated, str) else (found[0], *gated)
    return _gated[key]


def gated_unavailable(op: OpInfo) -> str | None:
    """Why the C++ kernels cannot run the gated `op`, or None when they can."""
    found = _gated_kernels(op)
    return found if isinstance(found, str) else None


def _gated_kernel(op: OpInfo, which: int):
    found = _gated_kernels(op)
    if isinstance(found, str):
        raise RuntimeError(f"lowmem_ops.{op.name}: no C++ CPU gated kernels: {found}")
    return found[which]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


_gated_by_rows: dict[tuple[Path, str], tuple | None] = {}  # (tree, op) -> _gated_rows' answer


def _gated_rows(op: OpInfo) -> tuple | None:
    """The gated kernels reading gate and up in place by rows (forward, exact backward), or None for a
    tree built before them (then the contiguous copies and the flat kernels)."""
    key = (op.tree, op.name)
    if key not in _gated_by_rows:  # once per op, as _gated_kernels
        found = _entry_points(op.tree, f"gated row kernels for {op.name}", {
            f"lowmem_{op.name}_gated_forward_rows": [_P, _I64, _P, _I64, _I32, _I64, _I64, _P],
            f"lowmem_{op.name}_gated_exact_rows": [_P, _P, _I64, _P, _I64, _I32, _I64, _I64, _P, _P, _I64]})
        _gated_by_rows[key] = None if isinstance(found, str) else found
    return _gated_by_rows[key]


def gated_forward(op: OpInfo, gate: torch.Tensor, up: torch.Tensor, write_h: bool, write_codes: bool):
    """out = h(gate) * up, h(gate) with write_h, the codes of gate with write_codes; gate and up
    float32/bfloat16/float16 CPU tensors of one shape and dtype (checked by the caller), read in place
    where only out is wanted and their rows allow (row_stride), else copied contiguous. Codes bit for
    bit the torch path's; out and h from the spec's expression (kernelgen.expr, at::vec)."""
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n, dtype = gate.numel(), _DTYPE_CODE[gate.dtype]
    if not (write_h or write_codes) and (rows := _gated_rows(op)) is not None:
        ld_gate, ld_up = row_stride(gate), row_stride(up)
        if ld_gate >= 0 and ld_up >= 0:
            if n:
                cols = gate.shape[-1]
                _call(rows[0], op, gate.data_ptr(), ld_gate, up.data_ptr(), ld_up, dtype, n // cols, cols, out.data_ptr())
            return out, gate.new_empty(0), torch.empty(0, dtype=torch.uint8)
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(out) if write_h else gate.new_empty(0)
    codes = torch.empty(op.n_code_bytes(gate.numel()) if write_codes else 0, dtype=torch.uint8)
    if n:
        _call(_gated_kernel(op, 1), op, gate.data_ptr(), up.data_ptr(), dtype, n, out.data_ptr(),
              h.data_ptr() if write_h else None)
        if write_codes:
            _call(_gated_kernel(op, 0), op, gate.data_ptr(), dtype, n, codes.data_ptr())
    return out, h, codes


def gated_backward(op: OpInfo, dy, gate, up, h, codes, approx: bool, need_gate: bool, need_up: bool):
    """(d_gate, d_up), each empty where not needed. dy contiguous; the saved tensors as the forward
    made them. Approximate: the torch path's results bit for bit."""
    def grad(needed: bool) -> torch.Tensor:
        return torch.empty_like(dy, memory_format=torch.contiguous_format) if needed else dy.new_empty(0)

    dgate, dup = grad(need_gate), grad(need_up)
    n, dtype = dy.numel(), _DTYPE_CODE[dy.dtype]
    if n == 0 or not (need_gate or need_up):
        return dgate, dup
    out_gate, out_up = (dgate.data_ptr() if need_gate else None), (dup.data_ptr() if need_up else None)
    if approx:
        up = _same_layout(up, dy) if need_gate else None
        h = _same_layout(h, dy) if need_up else None
        codes = codes.contiguous() if need_gate else None
        _call(_gated_kernel(op, 3), op, dy.data_ptr(), _ptr(up), _ptr(h), _ptr(codes), dtype, n, out_gate, out_up)
    else:
        _matches(gate, dy)
        if need_gate:
            _matches(up, dy)
        else:
            up = None
        ld_gate, ld_up = row_stride(gate), (row_stride(up) if need_gate else 0)
        if ld_gate >= 0 and ld_up >= 0 and (rows := _gated_rows(op)) is not None:  # read in place
            cols = dy.shape[-1]
            _call(rows[1], op, dy.data_ptr(), gate.data_ptr(), ld_gate, _ptr(up), ld_up, dtype, n // cols, cols, out_gate,
                  out_up, cols)
            return dgate, dup
        gate, up = gate.contiguous(), (up.contiguous() if need_gate else None)  # held here: see _same_layout
        _call(_gated_kernel(op, 2), op, dy.data_ptr(), gate.data_ptr(), _ptr(up), dtype, n, out_gate, out_up)
    return dgate, dup


def _matches(t: torch.Tensor, dy: torch.Tensor) -> None:
    if t.shape != dy.shape or t.dtype != dy.dtype:
        raise ValueError(f"lowmem_ops: a saved gated input of shape {tuple(t.shape)} {t.dtype} does not match the "
                         f"gradient's {tuple(dy.shape)} {dy.dtype}")


def _same_layout(t: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """A saved tensor as the kernels read it: contiguous, dy's shape and dtype (held by the caller: a
    pointer into a temporary would dangle during the call)."""
    _matches(t, dy)
    return t.contiguous()


# --- memory-sharing norms -------------------------------------------------------------------------

_NORM_FORWARD, _NORM_BACKWARD, _NORM_RULE = range(3)  # _norm_kernels' order


_NORM_SIGNATURES = {  # built once: every call looks the kernels up
    "lowmem_norm_forward": [_P, _I32, _I64, _I64, _P, _P, _I32, _F32, _I32, _P, _I32, _P, _F32, _F32, _P],
    "lowmem_norm_backward": [_P, _P, _I32, _P, _I64, _I64, _P, _P, _I32, _I32, _P, _I32, _P, _P],
    "lowmem_norm_rule": [_P, _P, _I32, _I64, _F32, _F32]}


def _norm_kernels(tree: Path) -> tuple | str:
    return _entry_points(tree, "norm kernels", _NORM_SIGNATURES)


_autograd_ops: dict[tuple[Path, str], object] = {}  # (tree, op name) -> the op, or None


def autograd_op(tree: Path, name: str):
    """torch.ops.<library>.<name> of the tree's C++ library (templates/cpu_autograd.cpp.j2: ms_norm,
    approx_activation, gated and gated_halves, each one C++ autograd op); None where the library has
    none (an older tree) or there is no library."""
    key = (tree, name)
    if key not in _autograd_ops:
        lib = _library(tree)
        op = None
        if not isinstance(lib, str):
            try:
                op = getattr(getattr(torch.ops, _names[tree]), name)
            except (AttributeError, RuntimeError):
                op = None
        _autograd_ops[key] = op
    return _autograd_ops[key]


def norm_unavailable(tree: Path) -> str | None:
    found = _norm_kernels(tree)
    return found if isinstance(found, str) else None


def _norm_call(tree: Path, which: int, *args) -> int:
    found = _norm_kernels(tree)
    if isinstance(found, str):
        raise RuntimeError(f"lowmem_ops.ms_norm: no C++ CPU kernels: {found}")
    rc = found[which](*args)
    if rc < 0 or (rc != 0 and which != _NORM_RULE):  # the rule answers 1 (holds) or 0
        raise RuntimeError(f"lowmem_ops.ms_norm: the C++ CPU kernel {found[which].__name__} failed (code {rc})")
    return rc


def _params(weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
    """gamma and beta as the kernels read them: contiguous, of one dtype the kernels convert to float32
    themselves (the model's bf16/fp16 parameters need no torch conversion per call); held by the
    caller for the call's duration."""
    dtype = weight.dtype if weight is not None else torch.float32
    if dtype not in _DTYPE_CODE or (bias is not None and bias.dtype != dtype):
        dtype = torch.float32
    return _as_read(weight, dtype), _as_read(bias, dtype), _DTYPE_CODE[dtype]


def _as_read(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # the usual case (a model's contiguous parameter in the kernels' dtype) creates no tensor
    if p is None or (p.dtype == dtype and p.is_contiguous()):
        return p
    return p.detach().to(dtype).contiguous()


def norm_rule(tree: Path, weight: torch.Tensor, bias: torch.Tensor | None, gamma_min: float, beta_ratio: float) -> bool:
    """Inverse mode's rule on CPU parameters (what _norm_backends.inverse_rule_holds computes with torch
    ops, in one pass)."""
    w, b, code = _params(weight, bias)
    return _norm_call(tree, _NORM_RULE, w.data_ptr(), _ptr(b), code, w.numel(), gamma_min, beta_ratio) == 1


def norm_forward(tree: Path, x, cols: int, weight, bias, eps: float, is_rms: bool, out_dtype,
                 rule: tuple[float, float] | None = None):
    """(y, rstd, flag) of the CPU tensor x (float32/bfloat16/float16, out_dtype one of them), normalised
    over its last `cols` elements (rows of x's memory order): y has x's shape.
    rule = (gamma_min, beta_ratio): flag (0-dim int32) says whether gamma / beta pass inverse mode's rule,
    checked in the same call; else flag is empty."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype)
    rows = x.numel() // cols
    rstd = torch.empty(rows, dtype=torch.float32)
    flag = torch.empty(() if rule else 0, dtype=torch.int32)
    w, b, param_dtype = _params(weight, bias)
    if rows:
        gamma_min, beta_ratio = rule or (0.0, 0.0)
        _norm_call(tree, _NORM_FORWARD, x.data_ptr(), _DTYPE_CODE[x.dtype], rows, cols, _ptr(w), _ptr(b), param_dtype,
                   eps, int(is_rms), y.data_ptr(), _DTYPE_CODE[out_dtype], rstd.data_ptr(), gamma_min, beta_ratio,
                   flag.data_ptr() if rule else None)
    elif rule:  # no row ran the kernel: the rule alone
        flag.fill_(norm_rule(tree, weight, bias, *rule))
    return y, rstd, flag


def norm_backward(tree: Path, dy, y, rstd, cols: int, weight, bias, is_rms: bool, x_dtype):
    """(dx, dweight, dbias): dx of y's shape; the parameter gradients of the parameters' shape, in their
    dtype where the kernels read it (else float32), None if absent."""
    y = y.contiguous()
    dy = dy.to(y.dtype).contiguous()
    rows = y.numel() // cols
    dx = torch.empty(y.shape, dtype=x_dtype)
    w, b, param_dtype = _params(weight, bias)
    grad_dtype = w.dtype if w is not None else torch.float32

    def param_grad(p):
        if p is None:
            return None
        return torch.empty(p.shape, dtype=grad_dtype) if rows else torch.zeros(p.shape, dtype=grad_dtype)

    dw, db = param_grad(weight), param_grad(bias)
    if rows:
        rstd = rstd.float().contiguous()  # held: its pointer must outlive the call
        _norm_call(tree, _NORM_BACKWARD, dy.data_ptr(), y.data_ptr(), _DTYPE_CODE[y.dtype], rstd.data_ptr(),
                   rows, cols, _ptr(w), _ptr(b), param_dtype, int(is_rms), dx.data_ptr(), _DTYPE_CODE[x_dtype], _ptr(dw), _ptr(db))
    return dx, dw, db


def choose(backend: str, why_not, what: str, tree: Path) -> str:
    """`backend`, except that 'cpp' becomes 'torch' where the C++ kernels cannot run (`why_not()` says
    why): auto warns once, a forced LOWMEM_OPS_BACKEND=cpp raises."""
    if backend != "cpp":
        return backend
    why = why_not()
    if why is None:
        return "cpp"
    if os.environ.get("LOWMEM_OPS_BACKEND") == "cpp":
        raise RuntimeError(f"lowmem_ops.{what}: LOWMEM_OPS_BACKEND=cpp, but {why}")
    if (tree, why) not in _warned:
        _warned.add((tree, why))
        warnings.warn(f"lowmem_ops: no C++ CPU kernels ({why}); CPU tensors take the torch path (same results, "
                      "slower). LOWMEM_OPS_BACKEND=torch chooses that path without this warning.", stacklevel=5)
    return "torch"


# --- dropout --------------------------------------------------------------------------------------

_DROPOUT_SIGNATURES = {"lowmem_dropout": [_P, _I32, _I64, ctypes.c_uint64, ctypes.c_uint64, _F32, _F32, _P]}


def _dropout_kernel(tree: Path) -> tuple | str:
    return _entry_points(tree, "dropout kernel", _DROPOUT_SIGNATURES)


def dropout_unavailable(tree: Path) -> str | None:
    found = _dropout_kernel(tree)
    return found if isinstance(found, str) else None


def dropout_apply(tree: Path, x: torch.Tensor, seed: int, offset: int, threshold: float, scale: float) -> torch.Tensor:
    """y = x * scale where tl.rand(seed, offset + i) >= threshold, else 0, for a contiguous float32 /
    bfloat16 / float16 CPU tensor x and a seed taken modulo 2**64 (what Triton does to it)."""
    found = _dropout_kernel(tree)
    if isinstance(found, str):
        raise RuntimeError(f"lowmem_ops.dropout: no C++ CPU kernels: {found}")
    (fn,) = found
    y = torch.empty_like(x)
    rc = fn(x.data_ptr(), _DTYPE_CODE[x.dtype], x.numel(), seed % 2 ** 64, offset, threshold, scale, y.data_ptr())
    if rc != 0:
        raise RuntimeError(f"lowmem_ops.dropout: the C++ CPU kernel failed (code {rc})")
    return y
