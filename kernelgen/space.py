"""Launch-config spaces: which configs each template's kernels may run with, and the shape buckets
a tuned choice is made for. Declared in templates/<template>.space.toml, beside the template; each
family (kernelgen/families) defines its space and its loader from the pieces here.

A config is a flat dict: the template's tunable constexprs (upper case), `num_warps`, `num_stages`
where a loop can be pipelined, and launch-only parameters (LAUNCH_ONLY) that change the grid but
not the compiled code. The family's static config is always a member, for every dtype.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .archs import DTYPES
from .contract import contract
from .templating import template_dir

LAUNCH_ONLY = contract.LAUNCH_ONLY  # grid size only: one compile serves every value


class SpaceError(ValueError):
    """A space file is malformed; the message names the file and the key."""


def config_id(config: dict) -> str:
    """The canonical text of a config: what the manifest, the DB and comparisons use."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def compile_part(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LAUNCH_ONLY}


def bucket_labels(prefix: str, bounds: tuple[int, ...]) -> list[str]:
    return [f"{prefix}<={b}" for b in bounds] + [f"{prefix}>{bounds[-1]}"]


def representative(bounds: tuple[int, ...], index: int, above: int) -> int:
    """The size a bucket is measured at: its upper bound, or `above` x the last bound for the open one."""
    return bounds[index] if index < len(bounds) else bounds[-1] * above


def unique(configs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in configs:
        if config_id(c) not in seen:
            seen.add(config_id(c))
            out.append(c)
    return out


# --- loading -------------------------------------------------------------------------------------

def read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SpaceError(f"{path}: {err}") from err


def ints(data: dict, key: str, path: Path, table: str = "", length: int | None = None,
          power_of_two: bool = True) -> tuple[int, ...]:
    where = f"{path}: [{table}] {key}" if table else f"{path}: {key}"
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                           for v in value):
        raise SpaceError(f"{where} must be a non-empty list of positive integers, got {value!r}")
    if power_of_two and any(v & (v - 1) for v in value):
        raise SpaceError(f"{where} must hold powers of two (Triton block shapes), got {value}")
    if length is not None and len(value) != length:
        raise SpaceError(f"{where} must have {length} entries, got {value}")
    return tuple(value)


def row_widths(data: dict, key: str, path: Path, table: str = "") -> tuple[int, ...]:
    """A row-wise family's widths (BLOCK of each width bucket): powers of two, strictly increasing,
    at most 65536."""
    widths = ints(data, key, path, table)
    if list(widths) != sorted(set(widths)) or widths[-1] > 65536:
        where = f"[{table}] {key}" if table else key
        raise SpaceError(f"{path}: {where} must be strictly increasing and at most 65536, got {list(widths)}")
    return widths


def min_max(data: dict, key: str, path: Path, table: str = "") -> tuple[int, int]:
    """A (min, max) pair of positive integers."""
    low, high = ints(data, key, path, table, length=2, power_of_two=False)
    if low > high:
        where = f"[{table}] {key}" if table else key
        raise SpaceError(f"{path}: {where} is (min, max), got {[low, high]}")
    return low, high


def bounds(data: dict, key: str, path: Path) -> tuple[int, ...]:
    bounds = ints(data.get("buckets", {}), key, path, "buckets", power_of_two=False)
    if list(bounds) != sorted(set(bounds)):
        raise SpaceError(f"{path}: [buckets] {key} must be strictly increasing, got {list(bounds)}")
    return bounds


def dtypes(data: dict, path: Path) -> tuple[str, ...]:
    value = data.get("dtypes")
    if not isinstance(value, list) or not all(v in DTYPES for v in value):
        raise SpaceError(f"{path}: dtypes must be a list drawn from {', '.join(DTYPES)}, got {value!r}")
    return tuple(value)


def table(data: dict, name: str, path: Path) -> dict:
    value = data.get(name)
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: missing table [{name}]")
    return value


@lru_cache(maxsize=None)
def _cached(loader, path: str, mtime_ns: int):
    return loader(Path(path))


def load(loader, name: str):
    """templates/<name> read by `loader`; read again only when the file changes."""
    path = template_dir() / name
    return _cached(loader, str(path), path.stat().st_mtime_ns)


@dataclass(frozen=True)
class ElementSpace:
    """A config space over flat element counts (the elementwise families): per-thread work, warp
    counts, the dtypes the space covers and the element-count bucket bounds. A family subclasses it
    with its per-thread field and its configs()."""

    path: str
    dtypes: tuple[str, ...]
    num_warps: tuple[int, ...]
    element_bounds: tuple[int, ...]

    @property
    def buckets(self) -> list[str]:
        return bucket_labels("n", self.element_bounds)

    def problem_size(self, bucket: int) -> int:
        return representative(self.element_bounds, bucket, 4)


def load_element_space(cls, path: Path, per_thread: str):
    """A space file's [dtypes, `per_thread`, num_warps, buckets.n_elements] as `cls` (an ElementSpace)."""
    data = read(path)
    kinds = dtypes(data, path)  # checked in the file's order, so the first bad key is the one named
    work = ints(data, per_thread, path)
    return cls(path=path.name, dtypes=kinds, num_warps=ints(data, "num_warps", path),
               element_bounds=bounds(data, "n_elements", path), **{per_thread: work})
