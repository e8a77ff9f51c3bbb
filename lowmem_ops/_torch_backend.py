"""The torch implementation of the approximate activations: the CPU path, and the float64 path
everywhere. It follows the same rules as the generated kernels (see their headers): h(x) in float32
(float64 for float64 input), codes from comparing x in float32 against the float32 thresholds,
dx = dy * L[code] in float32 (float64 for float64 dy)."""

from __future__ import annotations

import torch

from ._common import compute_dtype
from ._tree import OpInfo


def forward(op: OpInfo, x: torch.Tensor, save_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x.to(compute_dtype(x.dtype))
    y = op.forward(xc).to(x.dtype)
    codes = pack_codes(op, xc) if save_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
    return y, codes


def pack_codes(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    """Packed codes of x in the kernels' layout; uint8 throughout (a few n-byte passes)."""
    x32 = x.reshape(-1).float()
    n, per_byte = x32.numel(), op.codes_per_byte
    code = torch.zeros(n + (-n) % per_byte, dtype=torch.uint8, device=x.device)  # padding codes are 0
    counted = code[:n]
    for c in op.thresholds:
        # Comparisons with NaN are false, so NaN gets code 0, as in the kernels.
        counted += (x32 > c) if op.boundary == "lower" else (x32 >= c)
    if op.planes == 1:
        return _pack_fields(code, per_byte, op.bits)
    return torch.cat([_pack_fields((code >> p) & 1, per_byte, 1) for p in range(op.planes)])


def _pack_fields(code: torch.Tensor, per_byte: int, width: int) -> torch.Tensor:
    fields = code.view(-1, per_byte)
    packed = fields[:, 0].clone()
    for j in range(1, per_byte):
        packed |= fields[:, j] << (width * j)
    return packed


def unpack_codes(op: OpInfo, codes: torch.Tensor, numel: int) -> torch.Tensor:
    """The level index of every element, as int64."""
    shifts = torch.arange(op.codes_per_byte, device=codes.device)
    if op.planes == 1:
        return ((codes.long()[:, None] >> shifts * op.bits) & ((1 << op.bits) - 1)).reshape(-1)[:numel]
    planes = codes.long().view(op.planes, -1)
    bits = (planes[:, :, None] >> shifts) & 1  # (plane, byte, bit)
    weights = (1 << torch.arange(op.planes, device=codes.device))[:, None, None]
    return (bits * weights).sum(dim=0).reshape(-1)[:numel]


_byte_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(op: OpInfo, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """levels of all codes in each possible byte: a (256, codes_per_byte) table, so unpacking is one gather."""
    key = (op.name, device, dtype)
    if key not in _byte_tables:
        byte = torch.arange(256)
        shifts = torch.arange(op.codes_per_byte) * op.bits
        codes = (byte[:, None] >> shifts) & ((1 << op.bits) - 1)
        levels = torch.tensor(op.levels, dtype=torch.float32).to(dtype)
        _byte_tables[key] = levels[codes].to(device)
    return _byte_tables[key]


def backward(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    compute = compute_dtype(dy.dtype)
    if op.planes == 1:
        level = _byte_table(op, dy.device, compute)[codes.long()].reshape(-1)[: dy.numel()]
    else:
        levels = torch.tensor(op.levels, dtype=torch.float32, device=dy.device).to(compute)
        level = levels[unpack_codes(op, codes, dy.numel())]
    return (dy.to(compute) * level.view(dy.shape)).to(dy.dtype)


def gated_forward(op: OpInfo, gate, up, write_h: bool, write_codes: bool):
    """out = h(gate) * up; with write_h also h(gate), with write_codes the codes of gate."""
    compute = compute_dtype(gate.dtype)
    h = op.forward(gate.to(compute))
    out = (h * up.to(compute)).to(gate.dtype)
    empty = torch.empty(0, dtype=gate.dtype, device=gate.device)
    codes = pack_codes(op, gate) if write_codes else torch.empty(0, dtype=torch.uint8, device=gate.device)
    return out, h.to(gate.dtype) if write_h else empty, codes


def gated_backward(op: OpInfo, dy, gate, up, h, codes, approx: bool, need_gate: bool, need_up: bool):
    compute = compute_dtype(dy.dtype)
    dyc = dy.to(compute)
    dgate = dup = torch.empty(0, dtype=dy.dtype, device=dy.device)
    if approx:
        if need_up:
            dup = (dyc * h.to(compute)).to(dy.dtype)
        if need_gate:
            levels = torch.tensor(op.levels, dtype=torch.float32, device=dy.device).to(compute)
            level = levels[unpack_codes(op, codes, dy.numel())].view(dy.shape)
            dgate = (dyc * up.to(compute) * level).to(dy.dtype)
        return dgate, dup
    # exact: recompute h(gate) and its exact derivative (generated from the spec by sympy)
    g = gate.to(compute)
    if need_gate:
        dgate = (dyc * up.to(compute) * op.derivative(g)).to(dy.dtype)
    if need_up:
        dup = (dyc * op.forward(g)).to(dy.dtype)
    return dgate, dup
