"""The norm family: the memory-sharing LayerNorm / RMSNorm kernels, one file
(templates/norm.py.j2, kernels/ms_norm_<hash>.py) with forward, backward and the looped path's dgamma/dbeta
kernel; launch configs per (row width, row count) bucket (templates/norm.space.toml). Built into
the built-in tree only: a tree of a user's specs holds activations.
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

TEMPLATE = "norm.py.j2"
SPACE_FILE = "norm.space.toml"


# --- the static config -----------------------------------------------------------------------

def static_config(arch: TargetInfo) -> dict:
    """Row-wise norms, the static table: a row that fits takes one pass with at most 16 float32
    values per thread per row tensor; wider rows loop over loop_block chunks. The backward runs a few
    programs per SM, each over many rows, so the dgamma/dbeta partial sums stay few. Pruning drops
    what spills (the 8192-wide backward does at 16 warps: 128 registers per thread at most)."""
    per_warp = 8 * arch.warp_size  # columns: 8 per thread
    warps = {1 << p: min(16, max(1, (1 << p) // per_warp)) for p in range(0, 17)}  # 1 .. 65536 columns
    return {
        "single_warps": warps,
        "loop_block": 4096,
        "loop_warps": 8,
        "backward_programs_per_sm": 4 if arch.max_threads_per_cu >= 2048 else 3,
        "param_grad_block_r": 32,
        "param_grad_block_c": 128,
        "param_grad_warps": 4,
    }


# --- the config space ------------------------------------------------------------------------

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
        return space.bucket_labels("w", self.widths)

    @property
    def row_buckets(self) -> list[str]:
        return space.bucket_labels("r", self.row_bounds)

    @property
    def buckets(self) -> list[str]:
        return [f"{w},{r}" for w in self.width_buckets for r in self.row_buckets]

    def problem_shape(self, width_bucket: int, row_bucket: int) -> tuple[int, int]:
        return space.representative(self.row_bounds, row_bucket, 4), space.representative(self.widths, width_bucket, 2)

    def configs(self, arch: TargetInfo, stage: str, dtype: str, width_bucket: int) -> list[dict]:
        """Candidates of one kernel stage (forward | backward | param_grad) for one width bucket
        (index into widths; len(widths): rows wider than all). The static config comes first; a
        single-pass bucket also offers the looped kernel over narrower chunks."""
        static = static_config(arch)
        full = dtype in self.dtypes
        if stage == "param_grad":
            out = [{"BLOCK_R": static["param_grad_block_r"], "BLOCK_C": static["param_grad_block_c"],
                    "num_warps": static["param_grad_warps"], "num_stages": 3}]  # 3: Triton's default
            if full:
                out += [{"BLOCK_R": r, "BLOCK_C": c, "num_warps": w, "num_stages": s} for r in self.param_block_r
                        for c in self.param_block_c for w in self.param_warps for s in self.param_stages]
            return space.unique(out)
        backward = stage == "backward"
        loop = [{"BLOCK_N": static["loop_block"], "SINGLE_PASS": False, "num_warps": static["loop_warps"]}]
        if full:
            loop += [{"BLOCK_N": b, "SINGLE_PASS": False, "num_warps": w}
                     for b in self.loop_block_n for w in self.loop_warps]
        if width_bucket == len(self.widths):  # wider than any single pass
            return space.unique(loop)
        width = self.widths[width_bucket]
        lo, hi = self.elements_per_thread
        warps = [static["single_warps"][width]]
        if full:
            warps += [w for w in self.single_warps if lo <= width // (arch.warp_size * w) <= hi]
        programs = [static["backward_programs_per_sm"]] + list(self.programs_per_sm if full else ())
        out = []
        for w in warps:
            cfg = {"BLOCK_N": width, "SINGLE_PASS": True, "num_warps": w}
            out += [{**cfg, C.PROGRAMS_PER_SM: p} for p in programs] if backward else [cfg]
        # Looping over narrower chunks is the alternative to one pass (fewer registers per row).
        return space.unique(out + [c for c in loop if c["BLOCK_N"] < width])


def load_space(path: Path) -> NormSpace:
    data = space.read(path)
    single, loop, param = (space.table(data, t, path) for t in ("single", "loop", "param_grad"))
    widths = space.row_widths(single, "widths", path, "single")
    ept = space.min_max(single, "elements_per_thread", path, "single")
    return NormSpace(
        path=path.name, dtypes=space.dtypes(data, path), widths=widths,
        single_warps=space.ints(single, "num_warps", path, "single"), elements_per_thread=ept,
        programs_per_sm=space.ints(single, "backward_programs_per_sm", path, "single", power_of_two=False),
        loop_block_n=space.ints(loop, "block_n", path, "loop"), loop_warps=space.ints(loop, "num_warps", path, "loop"),
        param_block_r=space.ints(param, "block_r", path, "param_grad"),
        param_block_c=space.ints(param, "block_c", path, "param_grad"),
        param_warps=space.ints(param, "num_warps", path, "param_grad"),
        param_stages=space.ints(param, "num_stages", path, "param_grad", power_of_two=False),
        row_bounds=space.bounds(data, "n_rows", path),
    )


def config_space() -> NormSpace:
    return space.load(load_space, SPACE_FILE)


# --- kernels and their compiles --------------------------------------------------------------

def groups(arch: TargetInfo) -> list[TuneGroup]:
    """forward and backward of LayerNorm and RMSNorm, without and with the (inverted) affine, and
    the looped path's dgamma/dbeta kernel, per (row width, row count) bucket."""
    sp = config_space()
    out = []
    for kind in C.NORM_KINDS:
        for affine in (False, True):
            for stage in C.NORM_STAGES:
                if stage == "param_grad" and not affine:
                    continue
                for dtype in DTYPES:
                    for w, wlabel in enumerate(sp.width_buckets):
                        candidates = tuple(sp.configs(arch, stage, dtype, w))
                        out += [TuneGroup(C.NORM_STEM, C.norm_kernel(kind, affine, stage), dtype, f"{wlabel},{rlabel}",
                                          (w, r), candidates, NORM.name) for r, rlabel in enumerate(sp.row_buckets)]
    return out


def weight_dtypes(kernel: str, dtype: str) -> tuple[str, ...]:
    """The gamma/beta dtypes the runtime launches a norm kernel with, the usual one first: a model's
    own dtype (a bf16 model has bf16 norm weights), and float32 beside 16-bit activations (float32
    master weights under autocast). Kernels without the affine read no weights: float32 placeholders."""
    return param_dtypes(dtype) if ".affine." in kernel else ("float32",)


def param_dtypes(dtype: str) -> tuple[str, ...]:
    """gamma/beta dtypes beside activations of `dtype`, the usual first: the model's own, and float32
    beside 16-bit activations (also the add_norm family's)."""
    return ("float32",) if dtype == "float32" else (dtype, "float32")


def variant(kernel: str, dtype: str, config: dict, weight_dtype: str) -> KernelVariant:
    kind, *rest = kernel.split(".")
    affine, stage = rest[0] == "affine", rest[-1]
    t, wt = TRITON_DTYPE[dtype], TRITON_DTYPE[weight_dtype]
    if stage == "param_grad":
        sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}", "dw_ptr": "*fp32",
               "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
               "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        return KernelVariant(C.NORM_STEM, kernel, dtype, "param_grad_kernel", sig,
                             {"HAS_BIAS": kind == "layernorm"}, dict(config))
    flags = {"IS_RMS": kind == "rmsnorm", "AFFINE": affine, "HAS_BIAS": affine and kind == "layernorm"}
    if stage == "forward":
        sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}",
               "ok_ptr": "*i32", "n_cols": "i32", "eps": "fp32", "gamma_min": "fp32", "beta_ratio": "fp32"}
    else:
        sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "w_ptr": f"*{wt}", "b_ptr": f"*{wt}",
               "dx_ptr": f"*{t}", "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32"}
    sig.update({k: "constexpr" for k in (*flags, "BLOCK_N", "SINGLE_PASS")})
    return KernelVariant(C.NORM_STEM, kernel, dtype, f"{stage}_kernel", sig, flags, dict(config))


# --- timing ----------------------------------------------------------------------------------

_TRAFFIC = {"forward": 2, "backward": 3, "param_grad": 2}  # row tensors read + written


def _stage(kernel: str) -> str:
    return kernel.rsplit(".", 1)[1]


class NormFamily(OneFileFamily):
    name = "norm"
    stem = C.NORM_STEM
    template = TEMPLATE
    space_file = SPACE_FILE

    def space(self) -> NormSpace:
        return config_space()

    def groups(self, specs: list[Spec], arch: TargetInfo) -> list[TuneGroup]:
        return groups(arch)

    def variants(self, group: TuneGroup, config: dict) -> list[KernelVariant]:
        return [variant(group.kernel, group.dtype, config, w) for w in weight_dtypes(group.kernel, group.dtype)]

    def configs_table(self) -> ConfigTable:
        sp = config_space()
        widths = f"buckets the row width: bucket i runs one pass with BLOCK_N = {C.NORM_WIDTHS}[i]; the last, wider rows, loops"
        return ConfigTable(C.NORM_TABLE, "Memory-sharing LayerNorm / RMSNorm", ("kernel", "dtype"),
                           (Bounds(C.NORM_WIDTHS, sp.widths, "width bucket", widths),
                            Bounds(C.NORM_ROW_BOUNDS, sp.row_bounds, "row bucket", "buckets the row count")))

    def problem(self, group: TuneGroup) -> tuple[int, ...]:
        return config_space().problem_shape(*group.index)

    def bytes_moved(self, group: TuneGroup, problem: tuple[int, ...], specs: list[Spec]) -> int:
        rows, cols = problem
        return _TRAFFIC[_stage(group.kernel)] * DTYPE_BYTES[group.dtype] * rows * cols + 4 * rows

    def measure_inputs(self, group: TuneGroup, shape: tuple[int, ...], device: str, interpret: bool, gen) -> dict:
        import torch

        from lowmem_ops import _norm_backends as nb

        dtype = getattr(torch, group.dtype)
        kind, *rest = group.kernel.split(".")
        affine = rest[0] == "affine"
        rows, cols = shape
        w = (1.0 + 0.1 * torch.rand(cols, generator=gen, device=device)) if affine else None
        b = 0.1 * torch.randn(cols, generator=gen, device=device) if affine and kind == "layernorm" else None
        x = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32).to(dtype)
        y, rstd, _ = nb.triton_forward(x, w, b, 1e-5, kind == "rmsnorm", dtype, interpret)
        dy = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return {"x": x, "w": w, "b": b, "y": y, "rstd": rstd, "dy": dy, "is_rms": kind == "rmsnorm", "dtype": dtype}

    def launcher(self, group: TuneGroup, a: dict, cfg: dict, interpret: bool, arch: TargetInfo):
        from lowmem_ops import _norm_backends as nb

        stage, it = _stage(group.kernel), interpret
        if stage == "forward":
            return lambda: nb.triton_forward(a["x"], a["w"], a["b"], 1e-5, a["is_rms"], a["dtype"], it, cfg)
        if stage == "backward":
            return lambda: nb.triton_backward(a["dy"], a["y"], a["rstd"], a["w"], a["b"], a["is_rms"], a["dtype"], it, cfg)
        # dgamma/dbeta runs after the looped backward: time both, the backward at its static config
        sp = config_space()
        loop = sp.configs(arch, "backward", group.dtype, len(sp.widths))[0]
        return lambda: nb.triton_backward(a["dy"], a["y"], a["rstd"], a["w"], a["b"], a["is_rms"], a["dtype"], it,
                                          loop, param_cfg=cfg)


NORM = NormFamily()
