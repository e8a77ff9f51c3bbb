"""Static table of the NVIDIA archs we build for (each family derives its static launch configs
from it: kernelgen/families), and the dtype names and sizes the kernels use.

Nothing here asks a live device: an arch build must give the same result on a laptop, in CI and on
the GPU itself. The static configs are each tuning group's first candidate, which a measured
winner from the tuning database replaces at build time (docs/tuning.md).
Figures are the data-sheet values of each arch's reference GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .contract import contract


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int  # 80 for sm80
    reference_gpu: str
    sm_count: int
    dram_gbps: float  # peak DRAM bandwidth of the reference GPU, GB/s
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int
    max_regs_per_thread: int
    max_smem_per_block: int  # bytes, with the opt-in carve-out
    warp_size: int = 32  # threads per warp: Triton's GPUTarget and the occupancy rules

    # What a family's static config reads of a target, spelled as every vendor's target spells it
    # (kernels.TargetInfo): an SM is a compute unit.
    @property
    def compute_units(self) -> int:
        return self.sm_count

    @property
    def max_threads_per_cu(self) -> int:
        return self.max_threads_per_sm

    def occupancy(self, num_warps: int, regs_per_thread: int, smem_bytes: int) -> float:
        """Fraction of the SM's thread slots filled, by the usual CUDA occupancy rules."""
        threads = num_warps * self.warp_size
        regs_per_warp = math.ceil(max(regs_per_thread, 1) * self.warp_size / 256) * 256  # allocation unit: 256
        blocks = min(
            self.max_blocks_per_sm,
            self.max_threads_per_sm // threads,
            self.regs_per_sm // (regs_per_warp * num_warps),
            self.max_smem_per_block // smem_bytes if smem_bytes else self.max_blocks_per_sm,
        )
        return blocks * threads / self.max_threads_per_sm


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sm80", 80, "A100-SXM4-80GB", 108, 2039.0, 2048, 32, 65536, 255, 166912),
        Arch("sm86", 86, "RTX A6000", 84, 768.0, 1536, 16, 65536, 255, 101376),
        Arch("sm89", 89, "L40S", 142, 864.0, 1536, 24, 65536, 255, 101376),
        Arch("sm90", 90, "H100-SXM5-80GB", 132, 3352.0, 2048, 32, 65536, 255, 232448),
        Arch("sm100", 100, "B200", 148, 8000.0, 2048, 32, 65536, 255, 232448),
    )
}

# Peak DRAM bandwidth in GB/s of GPUs by torch.cuda.get_device_name (case-insensitive, first match
# wins, so the more specific patterns come first): for the fraction of peak that tuning reports.
GPU_PEAK_GBPS = [
    (r"\bH200", 4800),                  # not GH200, whose memory differs
    (r"\bB200", 8000),
    (r"H100.*PCIe", 2039),
    (r"H100.*(SXM|HBM3)", 3352),        # the SXM part reports itself as "H100 80GB HBM3"
    (r"A100.*SXM.*80GB", 2039),
    (r"A100.*40GB", 1555),
    (r"L40S", 864),
    (r"RTX A6000", 768),
    (r"\bA10G?\b", 600),                # A10 and A10G, not A100
    (r"RTX 4090", 1008),
    (r"RTX 3090(?! Ti)", 936),
]


def gpu_peak_gbps(device_name: str) -> float | None:
    for pattern, gbps in GPU_PEAK_GBPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return float(gbps)
    return None


DTYPES = contract.DTYPES
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

VECTOR_BYTES = 16  # one 128-bit load/store per thread per access
DRAM_LATENCY_NS = 600.0  # order of magnitude for all of these archs; used for Little's law only


def resolve(names: str | list[str]) -> list[Arch]:
    """'sm80' -> [sm80]; 'all' -> every arch; an unknown name raises ValueError naming the choices."""
    return pick(ARCHS, names, "arch")


def pick(table: dict, names: str | list[str], what: str) -> list:
    """The entries of `table` that `names` (a name, a list, or 'all') names, in order; an unknown name
    raises ValueError naming the choices."""
    wanted = list(table) if names == "all" else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(table)} or all")
    return [table[n] for n in wanted]
