"""What a kernel family hands the build and the tuner: tuning groups (TuneGroup), the compiled
units of their configs (KernelVariant), the description of its table in configs.py (ConfigTable), and
the Family protocol every family implements (kernelgen/families/: one module per family, listed in
families.REGISTRY).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol

from .archs import TRITON_DTYPE

if TYPE_CHECKING:
    from .spec import Spec

SIZE_ARGS = ("n_elements", "n_cols")


class TargetInfo(Protocol):
    """What a family reads of the GPU target it renders and configures for: an NVIDIA arch
    (archs.Arch) or any target of targets.TARGETS. Families read nothing else of a target."""

    name: str  # the build folder's name: sm80, gfx942, ...
    warp_size: int  # threads of one Triton warp (a CUDA warp, an AMD wavefront)
    dram_gbps: float  # peak DRAM bandwidth of the reference GPU

    @property
    def compute_units(self) -> int:
        """SMs / CUs of the reference GPU."""

    @property
    def max_threads_per_cu(self) -> int:
        """Threads one SM / CU holds at full occupancy."""


@dataclass(frozen=True)
class KernelVariant:
    """One compiled unit: a kernel function of a generated file, for a dtype, with a config.

    `signature` and the constexprs are what triton.compile gets; they mirror what the runtime
    launches with: pointers 16-byte aligned (torch's allocator guarantees it and Triton's JIT
    specialises on it) and integer sizes as i32, as Triton specialises them below 2**31. Triton's
    JIT also specialises an integer that is a multiple of 16 (it may then vectorise accesses):
    `aligned` compiles the kernel as it runs when its size arguments are (the common case, and
    what pruning and ranking judge), `aligned=False` the fallback for other sizes.
    """

    op: str  # the generated file's stem: regelu2, ms_norm, ...
    kernel: str  # forward | backward | layernorm.affine.forward | ...: what a tuning group names
    dtype: str
    fn: str  # the @triton.jit function in that file
    signature: dict
    flags: dict  # constexprs that select what the kernel does (WRITE_CODES, IS_RMS, ...)
    config: dict  # tunable constexprs + num_warps (+ num_stages): what a compiled config is
    aligned: bool = True  # the size arguments (SIZE_ARGS) are multiples of 16
    # A kernel whose size arguments the JIT does not specialise (do_not_specialize) says their alignment
    # with this constexpr instead: sizes in units of 16 elements (aligned) or 1 (the gated *_rows kernels' UNIT).
    unit: str = ""

    @property
    def key(self) -> str:
        return f"{self.op}.{self.kernel}[{self.dtype}]"

    @property
    def aligned_args(self) -> tuple[str, ...]:
        """The size arguments the aligned specialisation marks as multiples of 16: those that set
        addresses (flat offsets, row starts). A row count only bounds loops and is left unmarked, so
        both specialisations describe any number of rows."""
        if self.unit or not self.aligned:
            return ()
        return tuple(name for name in SIZE_ARGS if name in self.signature)

    @property
    def specialisation(self) -> dict:
        """What the manifest records of which runtime case this compile describes."""
        spec = {"sizes": "multiples of 16" if self.aligned else "any"}
        if self.unit:
            spec["layout"] = "rows of strided views"
        if "w_ptr" in self.signature and self.flags.get("AFFINE", True):
            spec["weight"] = {f"*{t}": name for name, t in TRITON_DTYPE.items()}[self.signature["w_ptr"]]
        return spec

    def unaligned(self) -> "KernelVariant":
        return replace(self, aligned=False)

    @property
    def constexprs(self) -> dict:
        unit = {self.unit: 16 if self.aligned else 1} if self.unit else {}
        return {**self.flags, **unit, **{k: v for k, v in self.config.items() if k not in ("num_warps", "num_stages")}}

    @property
    def num_warps(self) -> int:
        return self.config["num_warps"]

    @property
    def num_stages(self) -> int | None:
        return self.config.get("num_stages")


@dataclass(frozen=True)
class TuneGroup:
    """One choice `kernelgen build` bakes: a kernel of an op, for a dtype and a shape bucket, among
    candidate configs (the static one first). `index` is the bucket's position in configs.py."""

    op: str
    kernel: str
    dtype: str
    bucket: str
    index: tuple[int, ...]
    candidates: tuple[dict, ...]
    family: str = ""  # the Family (kernelgen/families) that made it: its name in families.REGISTRY

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.op, self.kernel, self.dtype, self.bucket)


@dataclass(frozen=True)
class Bounds:
    """One bucketing of a table's key: a size s falls in bucket bisect_left(values, s), the first i with
    s <= values[i], or len(values) above them all (lowmem_ops._configs.lookup does the same)."""

    name: str  # configs.py's variable: a name of lowmem_ops/_contract.py
    values: tuple[int, ...]  # strictly increasing
    field: str  # the key's field of the bucket index, for configs.py's comment: "row bucket"
    meaning: str  # one line for configs.py's comment: the size bucketed and what a bucket means


@dataclass(frozen=True)
class ConfigTable:
    """A family's table in configs.py, as data: templates/configs.py.j2 renders every family's alike
    and lowmem_ops._configs.lookup reads every one alike, so a new family edits neither."""

    name: str  # configs.py's variable: a name of lowmem_ops/_contract.py
    title: str  # one line for configs.py's comment: what the table holds
    prefix: tuple[str, ...]  # the key's leading fields (what a launcher passes lookup as its prefix)
    bounds: tuple[Bounds, ...]  # the key's trailing fields: one bucket index per bounds, in order

    @property
    def key(self) -> tuple[str, ...]:
        """The fields of a key (config_key's tuples): the prefix, then the bucket indices."""
        return (*self.prefix, *(b.field for b in self.bounds))


@dataclass(frozen=True)
class Source:
    """One kernel file a family renders for an arch (kernels/<stem>_<hash>.py, shared by the archs
    that render the same text), and what the manifest's "ops"
    records of where it came from (the build adds the file name and the source's hash)."""

    stem: str
    text: str
    record: dict


class Family(Protocol):
    """One kind of kernel (activations, norms, ...): its template and config space, the static
    config, the tuning groups and their compiled variants, what configs.py holds of it, and what
    the tuner needs to time it. The build, the tuner and the CLI see families only through this."""

    name: str  # the registry's key; also the manifest's "spaces" key
    space_file: str  # templates/<...>.space.toml
    builtin_only: bool  # True: its kernels live in the built-in tree only (not in a tree of a user's specs)

    def stems(self, specs: list[Spec]) -> list[str]:
        """The stems of the kernel files this family writes for `specs`."""

    def sources(self, specs: list[Spec], arch: TargetInfo) -> list[Source]:
        """The rendered kernel files for `arch`."""

    def space(self):
        """The loaded config space (it has .buckets and .dtypes)."""

    def groups(self, specs: list[Spec], arch: TargetInfo) -> list[TuneGroup]:
        """Every tuning group of `arch`, the static config first among each group's candidates."""

    def variants(self, group: TuneGroup, config: dict) -> list[KernelVariant]:
        """The compiles one config of `group` needs (the usual runtime case first)."""

    def config_key(self, group: TuneGroup) -> tuple:
        """The key of the group's row in configs.py: what the runtime looks up (the fields of
        configs_table().key; the bucket indices last, one per bounds tuple)."""

    def configs_table(self) -> ConfigTable:
        """Its table in configs.py: name, key fields and bucket bounds (the keys are config_key's)."""

    def problem(self, group: TuneGroup) -> tuple[int, ...]:
        """The problem size a group is timed at."""

    def bytes_moved(self, group: TuneGroup, problem: tuple[int, ...], specs: list[Spec]) -> int:
        """The DRAM traffic one launch cannot avoid (for the bandwidth the tuner reports)."""

    def measure_inputs(self, group: TuneGroup, shape: tuple[int, ...], device: str, interpret: bool, gen) -> dict:
        """Tensors to time a group's kernel on (torch, on `device`)."""

    def launcher(self, group: TuneGroup, inputs: dict, config: dict, interpret: bool, arch: TargetInfo) -> Callable[[], object]:
        """A call that runs the group's kernel once with `config`, through lowmem_ops' own launchers."""
