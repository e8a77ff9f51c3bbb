"""The launch config of a kernel launch: read from the configs.py that `kernelgen build` baked for
the arch (static or tuned), by dtype and shape bucket. No tuning and no database at run time.

Every family's table is read alike (`lookup`): configs.py lists each table's bounds in TABLE_BOUNDS,
so a new family's launcher needs no code here."""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from pathlib import Path
from types import ModuleType

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


@lru_cache(maxsize=None)
def _bucketed(tree: Path, arch: str, name: str) -> tuple[dict, tuple[tuple[int, ...], ...]]:
    """A table of the arch's configs.py and the bounds its keys' bucket indices were taken over."""
    t = table(tree, arch)
    every = getattr(t, C.TABLE_BOUNDS, None)
    if every is None:
        raise RuntimeError(f"{tree / arch / C.CONFIGS_FILE} has no {C.TABLE_BOUNDS} (a configs.py of an older "
                           f"kernelgen): rebuild the tree with `kernelgen build --arch {arch}`")
    if name not in every:
        raise RuntimeError(f"{tree / arch / C.CONFIGS_FILE} has no table {name} (it has {', '.join(every)}): "
                           f"a tree built without that family; rebuild it with `kernelgen build --arch {arch}`")
    return getattr(t, name), every[name]


def lookup(tree: Path, arch: str, name: str, prefix: tuple, sizes: tuple[int, ...]) -> dict:
    """The config of table `name` (a contract name: C.NORM_TABLE, ...) for the key that starts with
    `prefix` (its fields as configs.py spells them, a dtype by DTYPE_NAMES) and ends with the bucket of
    each of `sizes`, in the order of the table's bounds. On every launch: one cached call, the bisects
    and a dict lookup."""
    rows, bounds = _bucketed(tree, arch, name)
    if len(sizes) != len(bounds):  # map() would stop at the shorter one: a wrong key, not an error
        raise ValueError(f"{name} buckets {len(bounds)} sizes, got {len(sizes)}: {sizes}")
    try:
        return rows[(*prefix, *map(bisect_left, bounds, sizes))]
    except KeyError:
        raise LookupError(f"{tree / arch / C.CONFIGS_FILE}: {name} has no config for {prefix} at sizes "
                          f"{sizes}: a kernel or dtype the build did not bake") from None
