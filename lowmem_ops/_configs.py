"""The launch config of a kernel launch: read from the configs.py that `kernelgen build` baked for
the arch (static or tuned), by dtype and shape bucket. No tuning and no database at run time."""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from . import _contract as C
from ._tree import configs_module

DTYPE_NAMES = {getattr(torch, name): name for name in C.DTYPES}


@lru_cache(maxsize=None)
def table(tree: Path, arch: str) -> ModuleType:
    path = tree / arch / C.CONFIGS_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: rebuild the tree with `kernelgen build --arch {arch}`")
    return configs_module(tree, arch)


def activation(tree: Path, arch: str, op: str, kernel: str, dtype, n: int) -> dict:
    t = table(tree, arch)
    bounds = getattr(t, C.ELEMENT_BOUNDS)
    return getattr(t, C.ACTIVATION_TABLE)[(op, kernel, DTYPE_NAMES[dtype], bisect_left(bounds, n))]


def norm(tree: Path, arch: str, kernel: str, dtype, rows: int, cols: int) -> dict:
    """Rows of up to NORM_WIDTHS[i] columns use width bucket i (one pass); wider ones the last (looped)."""
    t = table(tree, arch)
    widths, row_bounds = getattr(t, C.NORM_WIDTHS), getattr(t, C.NORM_ROW_BOUNDS)
    return getattr(t, C.NORM_TABLE)[(kernel, DTYPE_NAMES[dtype], bisect_left(widths, cols), bisect_left(row_bounds, rows))]


def dropout(tree: Path, arch: str, dtype, n: int) -> dict:
    t = table(tree, arch)
    bounds = getattr(t, C.DROPOUT_ELEMENT_BOUNDS)
    return getattr(t, C.DROPOUT_TABLE)[(C.DROPOUT_KERNEL, DTYPE_NAMES[dtype], bisect_left(bounds, n))]
