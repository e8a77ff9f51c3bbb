"""The torch implementation of the approximate activations: the CPU path, and the float64 path
everywhere. It follows the same rules as the generated kernels (see their headers): h(x) in float32
(float64 for float64 input), codes from comparing x in float32 against the float32 thresholds,
dx = dy * L[code] in float32 (float64 for float64 dy)."""

from __future__ import annotations

import torch

from ._tree import OpInfo


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(op: OpInfo, x: torch.Tensor, save_codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x.to(_compute_dtype(x.dtype))
    y = op.forward(xc).to(x.dtype)
    codes = pack_codes(op, xc) if save_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
    return y, codes


def level_codes(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    """The level index of every element of x, as int64, flattened."""
    x32 = x.reshape(-1).float()
    thresholds = torch.tensor(op.thresholds, dtype=torch.float32, device=x.device)
    # bucketize(right=False) counts thresholds strictly below x; right=True counts those <= x.
    code = torch.bucketize(x32, thresholds, right=op.boundary == "upper")
    return code.masked_fill_(torch.isnan(x32), 0)  # every comparison with NaN is false: code 0


def pack_codes(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    code = level_codes(op, x)
    per_byte = op.codes_per_byte
    padded = torch.nn.functional.pad(code, (0, (-code.numel()) % per_byte))  # padding codes are 0
    shifts = torch.arange(per_byte, device=x.device) * op.bits
    return (padded.view(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(op: OpInfo, codes: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(op.codes_per_byte, device=codes.device) * op.bits
    mask = (1 << op.bits) - 1
    return ((codes.long()[:, None] >> shifts) & mask).reshape(-1)[:numel]


def backward(op: OpInfo, dy: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    compute = _compute_dtype(dy.dtype)
    levels = torch.tensor(op.levels, dtype=torch.float32, device=dy.device).to(compute)
    level = levels[unpack_codes(op, codes, dy.numel())].view(dy.shape)
    return (dy.to(compute) * level).to(dy.dtype)
