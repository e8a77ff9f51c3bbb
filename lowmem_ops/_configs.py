"""The launch config of a kernel launch: read from the configs.py that `kernelgen build` baked for
the arch (static or tuned), by dtype and shape bucket. No tuning and no database at run time.

Every family's table is read alike (`lookup`): configs.py lists each table's bounds in TABLE_BOUNDS,
so a new family's launcher needs no code here."""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import _contract as C
from ._tree import configs_module

DTYPE_NAMES = {getattr(torch, name): name for name in C.DTYPES}  # torch dtype -> its name in a table's keys


@lru_cache(maxsize=None)
def table(tree: Path, arch: str) -> ModuleType:
    path = tree / arch / C.CONFIGS_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: rebuild the tree with `kernelgen build --arch {arch}`")
    return configs_module(tree, arch)


def lookup(tree: Path, arch: str, name: str, prefix: tuple, sizes: tuple[int, ...]) -> dict:
    """The config of table `name` (a contract name: C.NORM_TABLE, ...) for the key that starts with
    `prefix` (its fields as configs.py spells them, a dtype by DTYPE_NAMES) and ends with the bucket of
    each of `sizes`, in the order of the table's bounds. On every launch: two calls, the bisects and
    a dict lookup."""
    return _finder(tree, arch, name)(prefix, sizes)


@lru_cache(maxsize=None)
def _finder(tree: Path, arch: str, name: str) -> Callable[[tuple, tuple], dict]:
    """lookup's work for one table of an arch: a function of (prefix, sizes), with the table and its
    bounds bound in (a key of one or two bucket indices, every table's today, built without a loop)."""
    t = table(tree, arch)
    path = tree / arch / C.CONFIGS_FILE
    every = getattr(t, C.TABLE_BOUNDS, None)
    if every is None:
        raise RuntimeError(f"{path} has no {C.TABLE_BOUNDS} (a configs.py of an older kernelgen): rebuild the "
                           f"tree with `kernelgen build --arch {arch}`")
    if name not in every:
        raise RuntimeError(f"{path} has no table {name} (it has {', '.join(every)}): a tree built without that "
                           f"family; rebuild it with `kernelgen build --arch {arch}`")
    rows, bounds = getattr(t, name), every[name]

    def missing(prefix, sizes):
        if not isinstance(sizes, tuple) or len(sizes) != len(bounds):
            return ValueError(f"{name} buckets {len(bounds)} sizes (a tuple), got {sizes!r}")
        return LookupError(f"{path}: {name} has no config for {prefix} at sizes {sizes}: a kernel or dtype "
                           "the build did not bake")

    if len(bounds) == 1:
        (b0,) = bounds

        def find(prefix, sizes):
            try:
                (s0,) = sizes
                return rows[(*prefix, bisect_left(b0, s0))]
            except (KeyError, TypeError, ValueError):
                raise missing(prefix, sizes) from None
    elif len(bounds) == 2:
        b0, b1 = bounds

        def find(prefix, sizes):
            try:
                s0, s1 = sizes
                return rows[(*prefix, bisect_left(b0, s0), bisect_left(b1, s1))]
            except (KeyError, TypeError, ValueError):
                raise missing(prefix, sizes) from None
    else:
        def find(prefix, sizes):
            if len(sizes) != len(bounds):  # map() would stop at the shorter: a wrong key, not an error
                raise missing(prefix, sizes)
            try:
                return rows[(*prefix, *map(bisect_left, bounds, sizes))]
            except (KeyError, TypeError):
                raise missing(prefix, sizes) from None
    return find
