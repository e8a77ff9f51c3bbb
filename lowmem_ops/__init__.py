"""lowmem_ops: training ops that store less for backward.

    import lowmem_ops as lo
    y = lo.regelu2(x)        # exact GELU forward, 2-bit derivative in backward
    act = lo.nn.ReGELU2()    # drop-in for torch.nn.GELU(); lo.nn.ReSiLU2 for torch.nn.SiLU
    y = lo.ms_layernorm(x, d)   # saves its output, shared with the next linear; lo.ms_rmsnorm
    norm = lo.nn.MSLayerNorm(d) # drop-in for nn.LayerNorm; lo.nn.MSRMSNorm for nn.RMSNorm
    y, res = lo.add_ms_layernorm(h, res, w, b, p=0.1)  # LN(dropout(h) + res), saving y only; lo.add_ms_rmsnorm
    out = lo.swiglu(gate, up)   # fused silu(gate) * up; lo.geglu; lo.nn.GatedMLP for LLaMA-style MLPs

Importing this package needs torch only; the CUDA path imports triton when first used.
"""

from . import _tree, memory, nn
from .conversion import convert, export
from ._tree import load_tree as load
from .dropout import dropout
from .activations import BACKENDS, approx_activation, available, regelu2, resilu2
from .gated import geglu, gated, swiglu
from .norms import ms_layernorm, ms_rmsnorm
from .add_norm import add_ms_layernorm, add_ms_rmsnorm

# The built-in ops are registered now, not on first use: a first call inside torch.compile(fullgraph=True)
# cannot trace the loading (importlib.resources). It imports generated/ops.py, which needs torch only.
_tree._ensure_builtin()

__all__ = ["convert", "export", "memory", "nn", "load", "BACKENDS", "approx_activation", "available", "regelu2", "resilu2", "ms_layernorm", "ms_rmsnorm", "gated", "swiglu", "geglu", "dropout", "add_ms_layernorm", "add_ms_rmsnorm"]
