"""Launch-config spaces: which configs each template's kernels may run with, and the shape buckets
a tuned choice is made for. Declared in templates/<template>.space.toml, beside the template.

A config is a flat dict: the template's tunable constexprs (upper case), `num_warps`, `num_stages`
where a loop can be pipelined, and launch-only parameters (LAUNCH_ONLY) that change the grid but
not the compiled code. The static config of kernelgen/archs.py is always a member, for every dtype.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .archs import DTYPE_BYTES, DTYPES, VECTOR_BYTES, Arch, elementwise_config, norm_config

ACTIVATION_SPACE = "activation.space.toml"
NORM_SPACE = "norm.space.toml"
LAUNCH_ONLY = frozenset({"PROGRAMS_PER_SM"})  # grid size only: one compile serves every value


class SpaceError(ValueError):
    """A space file is malformed; the message names the file and the key."""


def config_id(config: dict) -> str:
    """The canonical text of a config: what the manifest, the DB and comparisons use."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def compile_part(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LAUNCH_ONLY}


def _bucket_labels(prefix: str, bounds: tuple[int, ...]) -> list[str]:
    return [f"{prefix}<={b}" for b in bounds] + [f"{prefix}>{bounds[-1]}"]


def representative(bounds: tuple[int, ...], index: int, above: int) -> int:
    """The size a bucket is measured at: its upper bound, or `above` x the last bound for the open one."""
    return bounds[index] if index < len(bounds) else bounds[-1] * above


@dataclass(frozen=True)
class ElementwiseSpace:
    path: str
    dtypes: tuple[str, ...]
    vectors_per_thread: tuple[int, ...]
    num_warps: tuple[int, ...]
    element_bounds: tuple[int, ...]

    @property
    def buckets(self) -> list[str]:
        return _bucket_labels("n", self.element_bounds)

    def problem_size(self, bucket: int) -> int:
        return representative(self.element_bounds, bucket, 4)

    def configs(self, arch: Arch, dtype: str, codes_per_byte: int) -> list[dict]:
        """The static config first, then the space's (for dtypes it covers), without repeats."""
        out = [elementwise_config(arch, dtype, codes_per_byte)]
        if dtype in self.dtypes:
            per_vector = VECTOR_BYTES // DTYPE_BYTES[dtype]
            for vectors in self.vectors_per_thread:
                for warps in self.num_warps:
                    elems = vectors * per_vector * 32 * warps
                    out.append({"BLOCK_BYTES": elems // codes_per_byte, "num_warps": warps})
        return _unique(out)


@dataclass(frozen=True)
class NormSpace:
    path: str
    dtypes: tuple[str, ...]
    widths: tuple[int, ...]
    single_warps: tuple[int, ...]
    elements_per_thread: tuple[int, int]
    programs_per_sm: tuple[int, ...]
    loop_block_n: tuple[int, ...]
    loop_warps: tuple[int, ...]
    param_block_r: tuple[int, ...]
    param_block_c: tuple[int, ...]
    param_warps: tuple[int, ...]
    param_stages: tuple[int, ...]
    row_bounds: tuple[int, ...]

    @property
    def width_buckets(self) -> list[str]:
        return _bucket_labels("w", self.widths)

    @property
    def row_buckets(self) -> list[str]:
        return _bucket_labels("r", self.row_bounds)

    @property
    def buckets(self) -> list[str]:
        return [f"{w},{r}" for w in self.width_buckets for r in self.row_buckets]

    def problem_shape(self, width_bucket: int, row_bucket: int) -> tuple[int, int]:
        return representative(self.row_bounds, row_bucket, 4), representative(self.widths, width_bucket, 2)

    def configs(self, arch: Arch, stage: str, dtype: str, width_bucket: int) -> list[dict]:
        """Candidates of one kernel stage (forward | backward | param_grad) for one width bucket
        (index into widths; len(widths): rows wider than all). The static config comes first; a
        single-pass bucket also offers the looped kernel over narrower chunks."""
        static = norm_config(arch)
        full = dtype in self.dtypes
        if stage == "param_grad":
            out = [{"BLOCK_R": static["param_grad_block_r"], "BLOCK_C": static["param_grad_block_c"],
                    "num_warps": static["param_grad_warps"], "num_stages": 3}]  # 3: Triton's default
            if full:
                out += [{"BLOCK_R": r, "BLOCK_C": c, "num_warps": w, "num_stages": s} for r in self.param_block_r
                        for c in self.param_block_c for w in self.param_warps for s in self.param_stages]
            return _unique(out)
        backward = stage == "backward"
        loop = [{"BLOCK_N": static["loop_block"], "SINGLE_PASS": False, "num_warps": static["loop_warps"]}]
        if full:
            loop += [{"BLOCK_N": b, "SINGLE_PASS": False, "num_warps": w}
                     for b in self.loop_block_n for w in self.loop_warps]
        if width_bucket == len(self.widths):  # wider than any single pass
            return _unique(loop)
        width = self.widths[width_bucket]
        lo, hi = self.elements_per_thread
        warps = [static["single_warps"][width]]
        if full:
            warps += [w for w in self.single_warps if lo <= width // (32 * w) <= hi]
        programs = [static["backward_programs_per_sm"]] + list(self.programs_per_sm if full else ())
        out = []
        for w in warps:
            cfg = {"BLOCK_N": width, "SINGLE_PASS": True, "num_warps": w}
            out += [{**cfg, "PROGRAMS_PER_SM": p} for p in programs] if backward else [cfg]
        # Looping over narrower chunks is the alternative to one pass (fewer registers per row).
        return _unique(out + [c for c in loop if c["BLOCK_N"] < width])


def _unique(configs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in configs:
        if config_id(c) not in seen:
            seen.add(config_id(c))
            out.append(c)
    return out


# --- loading -------------------------------------------------------------------------------------

def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SpaceError(f"{path}: {err}") from err


def _ints(data: dict, key: str, path: Path, table: str = "", length: int | None = None,
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


def _bounds(data: dict, key: str, path: Path) -> tuple[int, ...]:
    bounds = _ints(data.get("buckets", {}), key, path, "buckets", power_of_two=False)
    if list(bounds) != sorted(set(bounds)):
        raise SpaceError(f"{path}: [buckets] {key} must be strictly increasing, got {list(bounds)}")
    return bounds


def _dtypes(data: dict, path: Path) -> tuple[str, ...]:
    value = data.get("dtypes")
    if not isinstance(value, list) or not all(v in DTYPES for v in value):
        raise SpaceError(f"{path}: dtypes must be a list drawn from {', '.join(DTYPES)}, got {value!r}")
    return tuple(value)


def _table(data: dict, name: str, path: Path) -> dict:
    value = data.get(name)
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: missing table [{name}]")
    return value


def load_elementwise(path: Path) -> ElementwiseSpace:
    data = _read(path)
    return ElementwiseSpace(
        path=path.name, dtypes=_dtypes(data, path),
        vectors_per_thread=_ints(data, "vectors_per_thread", path),
        num_warps=_ints(data, "num_warps", path),
        element_bounds=_bounds(data, "n_elements", path),
    )


def load_norm(path: Path) -> NormSpace:
    data = _read(path)
    single, loop, param = (_table(data, t, path) for t in ("single", "loop", "param_grad"))
    widths = _ints(single, "widths", path, "single")
    if list(widths) != sorted(set(widths)) or widths[-1] > 65536:
        raise SpaceError(f"{path}: [single] widths must be strictly increasing and at most 65536, got {list(widths)}")
    ept = _ints(single, "elements_per_thread", path, "single", length=2, power_of_two=False)
    if ept[0] > ept[1]:
        raise SpaceError(f"{path}: [single] elements_per_thread is (min, max), got {list(ept)}")
    return NormSpace(
        path=path.name, dtypes=_dtypes(data, path), widths=widths,
        single_warps=_ints(single, "num_warps", path, "single"), elements_per_thread=(ept[0], ept[1]),
        programs_per_sm=_ints(single, "backward_programs_per_sm", path, "single", power_of_two=False),
        loop_block_n=_ints(loop, "block_n", path, "loop"), loop_warps=_ints(loop, "num_warps", path, "loop"),
        param_block_r=_ints(param, "block_r", path, "param_grad"),
        param_block_c=_ints(param, "block_c", path, "param_grad"),
        param_warps=_ints(param, "num_warps", path, "param_grad"),
        param_stages=_ints(param, "num_stages", path, "param_grad", power_of_two=False),
        row_bounds=_bounds(data, "n_rows", path),
    )


@lru_cache(maxsize=None)
def _cached(loader, path: str, mtime_ns: int):
    return loader(Path(path))


def activation_space() -> ElementwiseSpace:
    from .render import template_dir

    path = template_dir() / ACTIVATION_SPACE
    return _cached(load_elementwise, str(path), path.stat().st_mtime_ns)


def norm_space() -> NormSpace:
    from .render import template_dir

    path = template_dir() / NORM_SPACE
    return _cached(load_norm, str(path), path.stat().st_mtime_ns)
