"""The memory-sharing norms' C++ CPU kernels (templates/cpu_norm.cpp.j2, compiled with the activations'
in the built-in tree's cpu_kernels.cpp): the dispatch glue norms.py calls, so that file changes by a
few lines only. Semantics: those of _norm_backends.torch_forward / torch_backward (see the template's
header for where the rounding differs: float64 row sums)."""

from __future__ import annotations

from . import _cpp_backend
from ._tree import builtin_tree  # cached: the package's path is resolved once per process


def choose_for_norms(backend: str) -> str:
    """'cpp' only where the kernels can run; else auto warns once and takes the torch path."""
    tree = builtin_tree()
    return _cpp_backend.choose(backend, lambda: _cpp_backend.norm_unavailable(tree), "ms_norm", tree)


def norm_forward(x, n_cols, weight, bias, eps, is_rms, out_dtype, rule=None):
    return _cpp_backend.norm_forward(builtin_tree(), x, n_cols, weight, bias, eps, is_rms, out_dtype, rule)


def norm_backward(dy, y, rstd, n_cols, weight, bias, is_rms, x_dtype):
    return _cpp_backend.norm_backward(builtin_tree(), dy, y, rstd, n_cols, weight, bias, is_rms, x_dtype)


def norm_rule(weight, bias, gamma_min: float, beta_ratio: float) -> bool:
    return _cpp_backend.norm_rule(builtin_tree(), weight, bias, gamma_min, beta_ratio)


def autograd_op():
    """The built-in tree's C++ autograd op of the norms, or None (see _cpp_backend.autograd_op)."""
    return _cpp_backend.autograd_op(builtin_tree(), "ms_norm")
