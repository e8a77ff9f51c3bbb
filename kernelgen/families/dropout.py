"""The dropout family: one kernel, dropout's forward on x and backward on dy (the mask is drawn again
from a seed and an offset, never stored), one file (templates/dropout.py.j2,
kernels/dropout_<hash>.py); launch configs per element-count bucket (templates/dropout.space.toml). Built
into the built-in tree only: a tree of a user's specs holds activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import space
from ..archs import DTYPE_BYTES, DTYPES, TRITON_DTYPE
from ..contract import contract as C
from ..kernels import Bounds, ConfigTable, KernelVariant, TargetInfo, TuneGroup
from ..spec import Spec
from .one_file import OneFileFamily

TEMPLATE = "dropout.py.j2"
SPACE_FILE = "dropout.space.toml"


# --- the static config -----------------------------------------------------------------------

def static_config(arch: TargetInfo) -> dict:
    """8 elements per thread (two 16-byte float32 vectors, one of 16-bit values) over 4 warps: 1024
    elements per program on 32-wide warps, the launch dropout used before it was generated. Each
    element costs a Philox draw, so more elements per thread buy little latency hiding."""
    return {"BLOCK": 8 * arch.warp_size * 4, "num_warps": 4}


# --- the config space ------------------------------------------------------------------------

@dataclass(frozen=True)
class DropoutSpace(space.ElementSpace):
    elements_per_thread: tuple[int, ...]

    def configs(self, arch: TargetInfo, dtype: str) -> list[dict]:
        """The static config first, then the space's (for dtypes it covers), without repeats."""
        out = [static_config(arch)]
        if dtype in self.dtypes:
            out += [{"BLOCK": e * arch.warp_size * w, "num_warps": w}
                    for e in self.elements_per_thread for w in self.num_warps]
        return space.unique(out)


def load_space(path: Path) -> DropoutSpace:
    return space.load_element_space(DropoutSpace, path, "elements_per_thread")


def config_space() -> DropoutSpace:
    return space.load(load_space, SPACE_FILE)


# --- the kernel and its compiles -------------------------------------------------------------

def groups(arch: TargetInfo) -> list[TuneGroup]:
    sp = config_space()
    return [TuneGroup(C.DROPOUT_STEM, C.DROPOUT_KERNEL, dtype, label, (i,), tuple(sp.configs(arch, dtype)),
                      DROPOUT.name) for dtype in DTYPES for i, label in enumerate(sp.buckets)]


def variant(dtype: str, config: dict) -> KernelVariant:
    """dropout_kernel as lowmem_ops.dropout launches it: the seed an int64 tensor, the offset and the
    size as i32 (Triton types an offset >= 2**31 int64: a compile of its own, the rare case), the
    threshold p and the scale as Python floats (fp32)."""
    t = TRITON_DTYPE[dtype]
    sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "seed_ptr": "*i64", "offset": "i32", "n_elements": "i32",
           "threshold": "fp32", "scale": "fp32", "BLOCK": "constexpr"}
    return KernelVariant(C.DROPOUT_STEM, C.DROPOUT_KERNEL, dtype, "dropout_kernel", sig, {}, dict(config))


class DropoutFamily(OneFileFamily):
    name = "dropout"
    stem = C.DROPOUT_STEM
    template = TEMPLATE
    space_file = SPACE_FILE

    def space(self) -> DropoutSpace:
        return config_space()

    def groups(self, specs: list[Spec], arch: TargetInfo) -> list[TuneGroup]:
        return groups(arch)

    def variants(self, group: TuneGroup, config: dict) -> list[KernelVariant]:
        return [variant(group.dtype, config)]

    def configs_table(self) -> ConfigTable:
        return ConfigTable(C.DROPOUT_TABLE, "Dropout", ("kernel", "dtype"),
                           (Bounds(C.DROPOUT_ELEMENT_BOUNDS, config_space().element_bounds, "element bucket",
                                   "buckets the tensor's n_elements"),))

    def problem(self, group: TuneGroup) -> tuple[int, ...]:
        return (config_space().problem_size(group.index[0]),)

    def bytes_moved(self, group: TuneGroup, problem: tuple[int, ...], specs: list[Spec]) -> int:
        (n,) = problem
        return 2 * DTYPE_BYTES[group.dtype] * n + 8  # x read, y written, the seed

    def measure_inputs(self, group: TuneGroup, shape: tuple[int, ...], device: str, interpret: bool, gen) -> dict:
        import torch

        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(getattr(torch, group.dtype))
        seed = torch.randint(-(2 ** 63), 2 ** 63 - 1, (), generator=gen, device=device, dtype=torch.int64)
        return {"x": x, "seed": seed}

    def launcher(self, group: TuneGroup, a: dict, cfg: dict, interpret: bool, arch: TargetInfo):
        from lowmem_ops.dropout import triton_apply  # (lowmem_ops.dropout, the attribute, is the op)

        return lambda: triton_apply(a["x"], a["seed"], 0, 0.1, interpret, cfg)


DROPOUT = DropoutFamily()
