"""lowmem_ops: training ops that store less for backward.

    import lowmem_ops as lo
    y = lo.regelu2(x)        # exact GELU forward, 2-bit derivative in backward
    act = lo.nn.ReGELU2()    # drop-in for torch.nn.GELU(); lo.nn.ReSiLU2 for torch.nn.SiLU

Importing this package needs torch only; the CUDA path imports triton when first used.
"""

from . import nn
from ._tree import load_tree as load
from .activations import BACKENDS, approx_activation, available, regelu2, resilu2

__all__ = ["nn", "load", "BACKENDS", "approx_activation", "available", "regelu2", "resilu2"]
