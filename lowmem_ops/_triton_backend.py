"""Launching the generated Triton kernels (CUDA tensors, or CPU tensors through the interpreter)."""

from __future__ import annotations

import contextlib

import torch

from ._tree import OpInfo, kernel_module, lowest_arch, pick_arch

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_dummy_codes: dict[torch.device, torch.Tensor] = {}


def arch_for(device: torch.device, tree, interpret: bool) -> str:
    if device.type == "cuda" and not interpret:
        major, minor = torch.cuda.get_device_capability(device)
        return pick_arch(tree, 10 * major + minor)
    return lowest_arch(tree)  # the interpreter ignores launch configs tuned for an arch


def _grid(n: int, op: OpInfo, block_bytes: int) -> tuple[int]:
    n_bytes = -(-n // op.codes_per_byte)
    return (-(-n_bytes // block_bytes),)


def forward(op: OpInfo, x: torch.Tensor, save_codes: bool, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    y = torch.empty_like(x)
    codes = torch.empty(op.n_code_bytes(n) if save_codes else 0, dtype=torch.uint8, device=x.device)
    if n == 0:
        return y, codes
    module = kernel_module(op.name, arch_for(x.device, op.tree, interpret), interpret)
    cfg = module.CONFIGS[("forward" if save_codes else "forward_nograd", _DTYPE_NAMES[x.dtype])]
    if not save_codes:  # the kernel never touches it, but Triton wants a real pointer
        codes_arg = _dummy_codes.setdefault(x.device, torch.zeros(16, dtype=torch.uint8, device=x.device))
    else:
        codes_arg = codes
    with device_guard(x):
        module.forward_kernel[_grid(n, op, cfg["BLOCK_BYTES"])](
            x, y, codes_arg, n, WRITE_CODES=save_codes, BLOCK_BYTES=cfg["BLOCK_BYTES"], num_warps=cfg["num_warps"]
        )
    return y, codes


def backward(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor, interpret: bool) -> torch.Tensor:
    n = dy.numel()
    dx = torch.empty_like(dy)
    if n == 0:
        return dx
    module = kernel_module(op.name, arch_for(dy.device, op.tree, interpret), interpret)
    cfg = module.CONFIGS[("backward", _DTYPE_NAMES[dy.dtype])]
    with device_guard(dy):
        module.backward_kernel[_grid(n, op, cfg["BLOCK_BYTES"])](
            dy, codes, dx, n, BLOCK_BYTES=cfg["BLOCK_BYTES"], num_warps=cfg["num_warps"]
        )
    return dx


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
