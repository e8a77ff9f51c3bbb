"""The launch config of a kernel launch: read from the configs.py that `kernelgen build` baked for
the arch (static or tuned), by dtype and shape bucket. No tuning and no database at run time."""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from ._tree import configs_module

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@lru_cache(maxsize=None)
def table(tree: Path, arch: str) -> ModuleType:
    path = tree / arch / "configs.py"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: rebuild the tree with `kernelgen build --arch {arch}`")
    return configs_module(tree, arch)


def activation(tree: Path, arch: str, op: str, kernel: str, dtype, n: int) -> dict:
    t = table(tree, arch)
    return t.ACTIVATION[(op, kernel, DTYPE_NAMES[dtype], bisect_left(t.ELEMENT_BOUNDS, n))]


def norm(tree: Path, arch: str, kernel: str, dtype, rows: int, cols: int) -> dict:
    """Rows of up to NORM_WIDTHS[i] columns use width bucket i (one pass); wider ones the last (looped)."""
    t = table(tree, arch)
    return t.NORM[(kernel, DTYPE_NAMES[dtype], bisect_left(t.NORM_WIDTHS, cols), bisect_left(t.NORM_ROW_BOUNDS, rows))]
