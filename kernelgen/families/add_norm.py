"""The add_norm family: dropout + residual add + memory-sharing norm in one pass over a row
(templates/add_norm.py.j2, kernels/add_norm_<hash>.py): the fused forward kernel per row-width bucket, and
the dropout + add kernel of rows wider than it holds (the open width bucket; the MS norm's own kernel
then normalises them). Launch configs per width (templates/add_norm.space.toml). Built into the
built-in tree only: a tree of a user's specs holds activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import space
from ..archs import DTYPE_BYTES, DTYPES, TRITON_DTYPE
from ..contract import contract as C
from ..kernels import Bounds, ConfigTable, KernelVariant, TargetInfo, TuneGroup
from ..spec import Spec
from .norm import param_dtypes
from .one_file import OneFileFamily

TEMPLATE = "add_norm.py.j2"
SPACE_FILE = "add_norm.space.toml"


# --- the static config -----------------------------------------------------------------------

def static_config(arch: TargetInfo) -> dict:
    """The launch lowmem_ops.add_norm used before it was generated: the fused kernel with about 8
    float32 values per thread (width / 256 warps on 32-wide warps, 1 to 16); dropout + add over 8
    elements per thread, 4 warps (1024 elements per program on 32-wide warps)."""
    per_warp = 8 * arch.warp_size
    return {"forward_warps": {w: max(1, min(16, w // per_warp)) for w in config_space().widths},
            "dropout_add": {"BLOCK": 8 * arch.warp_size * 4, "num_warps": 4}}


# --- the config space ------------------------------------------------------------------------

@dataclass(frozen=True)
class AddNormSpace:
    path: str
    dtypes: tuple[str, ...]
    widths: tuple[int, ...]  # BLOCK_C of each width bucket (powers of two); the last is the widest row fused
    num_warps: tuple[int, ...]
    elements_per_thread: tuple[int, int]

    @property
    def max_cols(self) -> int:
        return self.widths[-1]

    @property
    def buckets(self) -> list[str]:
        return space.bucket_labels("w", self.widths)

    def configs(self, arch: TargetInfo, kernel: str, dtype: str, width_bucket: int) -> list[dict]:
        """The static config first, then the space's warps for the fused kernel (dtypes it covers,
        warps that give each thread elements_per_thread columns), without repeats."""
        static = static_config(arch)
        if kernel == C.ADD_NORM_DROPOUT_ADD:
            return [dict(static["dropout_add"])]
        width = self.widths[width_bucket]
        out = [{"BLOCK_C": width, "num_warps": static["forward_warps"][width]}]
        if dtype in self.dtypes:
            low, high = self.elements_per_thread
            out += [{"BLOCK_C": width, "num_warps": w} for w in self.num_warps
                    if low <= width // (w * arch.warp_size) <= high]
        return space.unique(out)


def load_space(path: Path) -> AddNormSpace:
    data = space.read(path)
    kinds = space.dtypes(data, path)
    widths = space.row_widths(data, "widths", path)
    ept = space.min_max(data, "elements_per_thread", path)
    return AddNormSpace(path=path.name, dtypes=kinds, widths=widths, num_warps=space.ints(data, "num_warps", path),
                        elements_per_thread=ept)


def config_space() -> AddNormSpace:
    return space.load(load_space, SPACE_FILE)


# --- the kernels and their compiles ----------------------------------------------------------

def groups(arch: TargetInfo) -> list[TuneGroup]:
    """The fused forward per (dtype, width bucket) and dropout + add in the open bucket (wider rows)."""
    sp = config_space()
    out = []
    for dtype in DTYPES:
        for w, label in enumerate(sp.buckets):
            kernel = C.ADD_NORM_FORWARD if w < len(sp.widths) else C.ADD_NORM_DROPOUT_ADD
            out.append(TuneGroup(C.ADD_NORM_STEM, kernel, dtype, label, (w,), tuple(sp.configs(arch, kernel, dtype, w)),
                                 ADD_NORM.name))
    return out


# The flags of the fused kernel's two uses, the usual first: the post-LN block (BERT, ViT: LayerNorm
# with bias after dropout) and the pre-LN residual stream (LLaMA: RMSNorm, no dropout). Other flag sets
# (no affine, RMSNorm with dropout) compile at run time, unjudged: each is lighter than one of these.
_FORWARD_FLAGS = (
    {"DROPOUT": True, "IS_RMS": False, "AFFINE": True, "HAS_BIAS": True},
    {"DROPOUT": False, "IS_RMS": True, "AFFINE": True, "HAS_BIAS": False},
)


def variants(group: TuneGroup, config: dict) -> list[KernelVariant]:
    """The kernels as lowmem_ops.add_norm launches them (x, residual, h and y of one dtype): the seed an
    int64 tensor (a placeholder without dropout), offset and sizes i32, floats fp32."""
    t = TRITON_DTYPE[group.dtype]
    if group.kernel == C.ADD_NORM_DROPOUT_ADD:
        sig = {"x_ptr": f"*{t}", "r_ptr": f"*{t}", "h_ptr": f"*{t}", "seed_ptr": "*i64", "offset": "i32",
               "n_elements": "i32", "threshold": "fp32", "scale": "fp32", "DROPOUT": "constexpr", "BLOCK": "constexpr"}
        return [KernelVariant(C.ADD_NORM_STEM, group.kernel, group.dtype, "dropout_add_kernel", sig, {"DROPOUT": d},
                              dict(config)) for d in (True, False)]
    out = []
    for flags in _FORWARD_FLAGS:
        for wdtype in param_dtypes(group.dtype):
            wt = TRITON_DTYPE[wdtype]
            sig = {"x_ptr": f"*{t}", "r_ptr": f"*{t}", "h_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32",
                   "w_ptr": f"*{wt}", "b_ptr": f"*{wt}", "ok_ptr": "*i32", "seed_ptr": "*i64", "offset": "i32",
                   "n_cols": "i32", "eps": "fp32", "threshold": "fp32", "scale": "fp32", "gamma_min": "fp32",
                   "beta_ratio": "fp32", **{k: "constexpr" for k in (*flags, "BLOCK_C")}}
            out.append(KernelVariant(C.ADD_NORM_STEM, group.kernel, group.dtype, "add_norm_forward_kernel", sig,
                                     dict(flags), dict(config)))
    return out


class AddNormFamily(OneFileFamily):
    name = "add_norm"
    stem = C.ADD_NORM_STEM
    template = TEMPLATE
    space_file = SPACE_FILE

    def template_vars(self, arch: TargetInfo) -> dict:
        return {"max_cols": config_space().max_cols}  # the widest row the fused kernel takes

    def space(self) -> AddNormSpace:
        return config_space()

    def groups(self, specs: list[Spec], arch: TargetInfo) -> list[TuneGroup]:
        return groups(arch)

    def variants(self, group: TuneGroup, config: dict) -> list[KernelVariant]:
        return variants(group, config)

    def configs_table(self) -> ConfigTable:
        return ConfigTable(C.ADD_NORM_TABLE, "Dropout + residual add + MS norm", ("kernel", "dtype"),
                           (Bounds(C.ADD_NORM_WIDTHS, config_space().widths, "width bucket",
                                   "buckets the row width: bucket i runs the fused kernel with BLOCK_C = "
                                   f"{C.ADD_NORM_WIDTHS}[i]; the last, wider rows, dropout_add then the MS norm"),))

    def problem(self, group: TuneGroup) -> tuple[int, ...]:
        widths = config_space().widths
        (w,) = group.index
        return (4096, widths[w] if w < len(widths) else 4 * widths[-1])  # rows, columns

    def bytes_moved(self, group: TuneGroup, problem: tuple[int, ...], specs: list[Spec]) -> int:
        rows, cols = problem
        tensors = 3 if group.kernel == C.ADD_NORM_DROPOUT_ADD else 4  # x, residual read; h (and y) written
        return tensors * DTYPE_BYTES[group.dtype] * rows * cols + 8 + (0 if tensors == 3 else 4 * rows)

    def measure_inputs(self, group: TuneGroup, shape: tuple[int, ...], device: str, interpret: bool, gen) -> dict:
        import torch

        dtype = getattr(torch, group.dtype)
        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        r = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        w = torch.rand(shape[-1], generator=gen, device=device, dtype=torch.float32).add_(0.5).to(dtype)
        seed = torch.randint(-(2 ** 63), 2 ** 63 - 1, (), generator=gen, device=device, dtype=torch.int64)
        return {"x": x, "r": r, "w": w, "b": torch.zeros_like(w), "seed": seed}

    def launcher(self, group: TuneGroup, a: dict, cfg: dict, interpret: bool, arch: TargetInfo):
        from lowmem_ops.add_norm import triton_forward

        return lambda: triton_forward(a["x"], a["r"], a["w"], a["b"], a["seed"], 0, 0.1, 1e-5, False, a["x"].dtype,
                                      a["x"].dtype, None, interpret, cfg)


ADD_NORM = AddNormFamily()
