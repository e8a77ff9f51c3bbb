"""Launching the generated Triton kernels (CUDA tensors, or CPU tensors through the interpreter)."""

from __future__ import annotations

import contextlib

import torch

from . import _configs
from . import _contract as C
from ._common import row_stride
from ._tree import OpInfo, arch_for, kernel_module

_placeholders: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _grid(n: int, op: OpInfo, block_bytes: int) -> tuple[int]:
    n_bytes = -(-n // op.codes_per_byte)
    return (-(-n_bytes // block_bytes),)


def _module_and_config(op: OpInfo, kernel: str, t: torch.Tensor, interpret: bool, cfg: dict | None):
    """The kernel module and the launch config: `cfg` if given (the tuner's), else the baked one."""
    arch = arch_for(t.device, op.tree, interpret)
    module = kernel_module(op.name, arch, interpret)
    return module, cfg or _configs.lookup(op.tree, arch, C.ACTIVATION_TABLE, (op.name, kernel, _configs.DTYPE_NAMES[t.dtype]),
                                          (t.numel(),))


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the generated kernels read it: one flat row-major block. Every launcher passes its input
    tensors through this; it copies only views (slices, chunks, transposes, expands)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def launch(kernel, grid, *args, rows: bool = False, **meta) -> None:
    """Launch a generated kernel. They index every tensor as a flat row-major array, so a strided view
    would silently read or write the wrong elements: one here is a launcher bug, and it stops here.
    The gated *_rows kernels (rows=True) also take views whose rows are evenly spaced (row_stride),
    given their row strides by the launcher."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and not a.is_contiguous() and not (rows and row_stride(a) >= 0):
            names = getattr(kernel, "arg_names", None)
            what = names[i] if names and i < len(names) else f"argument {i}"
            raise RuntimeError(f"lowmem_ops: {what} of {getattr(kernel, '__name__', 'a kernel')} is a strided view "
                               f"(shape {tuple(a.shape)}, strides {a.stride()}); kernels need dense tensors")
    with device_guard(next(a for a in args if isinstance(a, torch.Tensor))):
        kernel[grid](*args, **meta)  # Triton launches on the current device and its current stream


def forward(op: OpInfo, x: torch.Tensor, save_codes: bool, interpret: bool,
            cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = dense(x)
    n = x.numel()
    y = torch.empty_like(x)
    codes = torch.empty(op.n_code_bytes(n) if save_codes else 0, dtype=torch.uint8, device=x.device)
    if n == 0:
        return y, codes
    module, cfg = _module_and_config(op, C.FORWARD if save_codes else C.FORWARD_NOGRAD, x, interpret, cfg)
    codes_arg = codes if save_codes else placeholder(x.device)
    launch(module.forward_kernel, _grid(n, op, cfg["BLOCK_BYTES"]),
           x, y, codes_arg, n, WRITE_CODES=save_codes, BLOCK_BYTES=cfg["BLOCK_BYTES"], num_warps=cfg["num_warps"])
    return y, codes


def backward(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor, interpret: bool, cfg: dict | None = None) -> torch.Tensor:
    dy, codes = dense(dy), dense(codes)
    n = dy.numel()
    dx = torch.empty_like(dy)
    if n == 0:
        return dx
    module, cfg = _module_and_config(op, C.BACKWARD, dy, interpret, cfg)
    launch(module.backward_kernel, _grid(n, op, cfg["BLOCK_BYTES"]),
           dy, codes, dx, n, BLOCK_BYTES=cfg["BLOCK_BYTES"], num_warps=cfg["num_warps"])
    return dx


def placeholder(device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A small tensor per device and dtype for pointer arguments whose contents nobody reads: codes a
    kernel is told not to touch (Triton wants a real pointer), or a flag the caller did not ask for."""
    key = (device, dtype)
    dummy = _placeholders.get(key)
    if dummy is None:
        dummy = _placeholders[key] = torch.zeros(16, dtype=dtype, device=device)
    return dummy


_no_guard = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one for the launch; a no-op (no device switch) when it already is."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _no_guard


def has_rows_kernels(op: OpInfo, device: torch.device, interpret: bool) -> bool:
    """Whether op's kernel module has the gated rows kernels (a tree rendered before them has not)."""
    module = kernel_module(op.name, arch_for(device, op.tree, interpret), interpret)
    return hasattr(module, "gated_backward_rows_kernel")


def _rows_launch(module, kernel: str, read: tuple, written: tuple = ()) -> tuple[object, tuple[int, ...]] | None:
    """(the kernel `kernel` of module, the row strides of `read` + `written`) where it should run: some
    of those tensors are views that are not dense (the halves of one projection, a gradient written
    into one) and every one's rows are evenly spaced (row_stride). None: the flat kernel on dense
    copies (also for a tree rendered before the rows kernels)."""
    if all(t.is_contiguous() for t in read + written) or (fn := getattr(module, kernel, None)) is None:
        return None
    lds = tuple(row_stride(t) for t in read + written)
    return None if min(lds) < 0 else (fn, lds)


def _in_units(n: int, cols: int, lds: tuple[int, ...]) -> tuple[int, list[int]]:
    """(UNIT, [n, cols, *lds] in units of UNIT elements): 16 where every size is a multiple of 16 (the
    rows kernels then tell the compiler so, and it vectorises), else 1. See templates/activation.py.j2."""
    unit = 16 if all(v % 16 == 0 for v in (n, cols, *lds)) else 1
    return unit, [v // unit for v in (n, cols, *lds)]


def gated_forward(op: OpInfo, gate, up, write_h: bool, write_codes: bool, interpret: bool, cfg: dict | None = None):
    n = gate.numel()
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    h = torch.empty_like(out) if write_h else torch.empty(0, dtype=gate.dtype, device=gate.device)
    codes = torch.empty(op.n_code_bytes(n) if write_codes else 0, dtype=torch.uint8, device=gate.device)
    if n == 0:
        return out, h, codes
    kind = C.GATED_FORWARD_APPROX if write_codes or write_h else C.GATED_FORWARD
    module, cfg = _module_and_config(op, kind, gate, interpret, cfg)
    pointers = (h if write_h else out, codes if write_codes else placeholder(gate.device))
    meta = dict(WRITE_H=write_h, WRITE_CODES=write_codes, BLOCK_BYTES=cfg["BLOCK_BYTES"], num_warps=cfg["num_warps"])
    grid = _grid(n, op, cfg["BLOCK_BYTES"])
    if (by_rows := _rows_launch(module, "gated_forward_rows_kernel", (gate, up))) is not None:
        kernel, lds = by_rows
        unit, sizes = _in_units(n, gate.shape[-1], lds)
        launch(kernel, grid, gate, up, out, *pointers, *sizes, rows=True, UNIT=unit, **meta)
    else:
        launch(module.gated_forward_kernel, grid, dense(gate), dense(up), out, *pointers, n, **meta)
    return out, h, codes


def gated_backward(op: OpInfo, dy, gate, up, h, codes, approx: bool, need_gate: bool, need_up: bool, interpret: bool,
                   cfg: dict | None = None, grads: tuple | None = None):
    """(d_gate, d_up), each empty where not needed; into `grads` (two tensors of dy's shape, such as
    the halves of one gradient) where given. gate and up are what autograd saved: the caller's own
    tensors, often views of a fused projection, read in place where their rows allow."""
    dy, h, codes = dense(dy), dense(h), dense(codes)
    n = dy.numel()

    def grad(needed: bool, i: int) -> torch.Tensor:
        if grads is not None:
            return grads[i]
        return torch.empty_like(dy) if needed else torch.empty(0, dtype=dy.dtype, device=dy.device)

    dgate, dup = grad(need_gate, 0), grad(need_up, 1)
    if n == 0:
        return dgate, dup
    module, cfg = _module_and_config(op, C.GATED_BACKWARD_APPROX if approx else C.GATED_BACKWARD, dy, interpret, cfg)
    # Tensors a variant does not read still need a pointer of the right type: dy stands in.
    gate = gate if gate is not None and not approx else dy
    up = up if up is not None and need_gate else dy
    dgate_arg, dup_arg = (dgate if need_gate else dy), (dup if need_up else dy)
    meta = dict(APPROX=approx, NEED_GATE=need_gate, NEED_UP=need_up, BLOCK_BYTES=cfg["BLOCK_BYTES"],
                num_warps=cfg["num_warps"])
    grid = _grid(n, op, cfg["BLOCK_BYTES"])
    codes_arg = codes if codes is not None else placeholder(dy.device)
    h_arg = h if h is not None else dy
    if (by_rows := _rows_launch(module, "gated_backward_rows_kernel", (gate, up), (dgate_arg, dup_arg))) is not None:
        kernel, lds = by_rows
        unit, sizes = _in_units(n, dy.shape[-1], lds)
        launch(kernel, grid, dy, gate, up, h_arg, codes_arg, dgate_arg, dup_arg, *sizes, rows=True, UNIT=unit, **meta)
    elif grads is not None and not all(t.is_contiguous() for t in grads):
        raise RuntimeError("lowmem_ops: gated_backward was given gradient views its kernels cannot write "
                           "(a tree without the rows kernels, or rows that are not evenly spaced)")
    else:
        launch(module.gated_backward_kernel, grid, dy, dense(gate), dense(up), h_arg, codes_arg, dgate_arg, dup_arg, n,
               **meta)
    return dgate, dup
