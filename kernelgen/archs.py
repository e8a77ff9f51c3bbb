"""Static table of the NVIDIA archs we build for, and the launch configs chosen from it.

Nothing here asks a live device: an arch build must give the same result on a laptop, in CI and on
the GPU itself. These configs are the static choice of each tuning group (kernelgen/space.py), which
a measured winner from the tuning database replaces at build time (docs/tuning.md).
Figures are the data-sheet values of each arch's reference GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


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

    def occupancy(self, num_warps: int, regs_per_thread: int, smem_bytes: int) -> float:
        """Fraction of the SM's thread slots filled, by the usual CUDA occupancy rules."""
        threads = num_warps * 32
        regs_per_warp = math.ceil(max(regs_per_thread, 1) * 32 / 256) * 256  # allocation unit: 256
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


DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

VECTOR_BYTES = 16  # one 128-bit load/store per thread per access
DRAM_LATENCY_NS = 600.0  # order of magnitude for all of these archs; used for Little's law only
NUM_WARPS = 4


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


def elementwise_config(arch: Arch, dtype: str, codes_per_byte: int) -> dict[str, int]:
    """Launch config for a streaming kernel that handles BLOCK_BYTES code bytes per program.

    By Little's law an SM must keep bandwidth x latency / SMs bytes in flight. Each thread gets
    enough 16-byte vectors for that at full occupancy, and never fewer than two (so loads overlap).
    """
    in_flight_per_thread = arch.dram_gbps * DRAM_LATENCY_NS / arch.sm_count / arch.max_threads_per_sm
    vectors = max(2, 2 ** math.ceil(math.log2(max(1.0, in_flight_per_thread / VECTOR_BYTES))))
    elems_per_thread = vectors * VECTOR_BYTES // DTYPE_BYTES[dtype]
    elems_per_program = elems_per_thread * 32 * NUM_WARPS
    return {"BLOCK_BYTES": elems_per_program // codes_per_byte, "num_warps": NUM_WARPS}


def norm_config(arch: Arch) -> dict:
    """Row-wise norms, the static table: a row that fits takes one pass with at most 16 float32
    values per thread per row tensor; wider rows loop over loop_block chunks. The backward runs a few
    programs per SM, each over many rows, so the dgamma/dbeta partial sums stay few. Pruning drops
    what spills (the 8192-wide backward does at 16 warps: 128 registers per thread at most)."""
    warps = {1 << p: min(16, max(1, (1 << p) // 256)) for p in range(0, 17)}  # 1 .. 65536 columns
    return {
        "single_warps": warps,
        "loop_block": 4096,
        "loop_warps": 8,
        "backward_programs_per_sm": 4 if arch.max_threads_per_sm >= 2048 else 3,
        "param_grad_block_r": 32,
        "param_grad_block_c": 128,
        "param_grad_warps": 4,
    }
