"""nn.Module wrappers: drop-ins for torch.nn.GELU / torch.nn.SiLU, and any built op by name."""

from __future__ import annotations

import torch

from ._tree import get_op
from .activations import approx_activation


class Approx(torch.nn.Module):
    """Any approximate activation built into a loaded kernel tree, by name (lowmem_ops.available())."""

    def __init__(self, name: str):
        super().__init__()
        self.op_name = get_op(name).name  # fails early, naming the ops that exist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_activation(x, self.op_name)

    def extra_repr(self) -> str:
        op = get_op(self.op_name)
        return f"{op.name!r}, bits={op.bits}"


class ReGELU2(Approx):
    """Drop-in for torch.nn.GELU() (erf form): same forward, 2-bit derivative in backward."""

    def __init__(self, approximate: str = "none"):
        if approximate != "none":
            raise ValueError(f"ReGELU2 approximates the erf GELU (approximate='none'), got approximate={approximate!r}")
        super().__init__("regelu2")


class ReSiLU2(Approx):
    """Drop-in for torch.nn.SiLU(): same forward, 2-bit derivative in backward.

    `inplace` is accepted for signature compatibility; the output is always a new tensor. That costs
    nothing in saved memory: only the 2-bit codes are kept, so the input can be freed anyway.
    """

    def __init__(self, inplace: bool = False):
        super().__init__("resilu2")
        self.inplace = inplace


__all__ = ["Approx", "ReGELU2", "ReSiLU2"]
