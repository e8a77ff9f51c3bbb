"""GPU targets as objects: what Triton compiles for (`GPUTarget` arguments) and the limits that
static pruning and the occupancy model need, per vendor.

NVIDIA targets wrap today's arch table (kernelgen/archs.py); AMD targets are new and self-contained
here. Nothing asks a live device, so an AMD build runs on a machine without one.

Sources of the AMD figures (facts, restated):
- ROCm's "AMD GPU specifications" table (rocm.docs.amd.com, reference/gpu-specs): compute units,
  wavefront size, LDS per CU (64 KiB on MI300X and MI250X; 128 KiB per WGP on RX 7900 XTX) and
  the VGPR file (512 KiB per CU on CDNA2/3, i.e. 4 SIMDs x 512 registers x 64 lanes x 4 B; 768 KiB
  per WGP on gfx1100, i.e. 4 SIMDs x 1536 registers x 32 lanes x 4 B).
- The LLVM AMDGPU backend, whose numbers the compiler's own "; Occupancy:" report uses
  (llvm/lib/Target/AMDGPU/Utils/AMDGPUBaseInfo.cpp, namespace IsaInfo, and docs/AMDGPUUsage.rst):
  gfx90a/gfx942 have a 512-entry VGPR file per lane shared by architectural VGPRs and AGPRs
  (AGPRs start at the VGPR count rounded up to 4), allocated in granules of 8, at most 8 waves per
  SIMD; gfx9 SGPRs limit a SIMD to 10/9/8/7 waves at <= 80/88/100/more SGPRs; gfx1100 (1.5x VGPR
  file) has 1536 VGPRs per lane in wave32, granule 24, at most 16 waves per SIMD, and its SGPRs
  never limit occupancy; a CU holds at most 16 multi-wave workgroups (32 per WGP in WGP mode);
  one workgroup addresses at most 64 KiB of LDS.
- Triton 3.9's HIP backend (triton/backends/amd/compiler.py): warp size 64 below gfx10 and 32 from
  gfx10 on (so gfx1100 compiles wave32), WGP mode by default, and LDS allocated dynamically at
  launch (metadata.shared), which LLVM's compile-time occupancy report does not see.
- Peak DRAM bandwidth: the reference GPUs' data sheets (MI300X 5.3 TB/s; MI250X 3.2 TB/s over two
  GCDs, each a torch device; RX 7900 XTX 960 GB/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .archs import ARCHS, Arch, pick
from .contract import contract


@dataclass(frozen=True)
class Target:
    """One GPU target. `backend`, `arch` and `warp_size` are Triton's GPUTarget arguments."""

    vendor: str  # "nvidia" | "amd"
    name: str  # the build folder's name: sm80, gfx942, ...
    backend: str  # "cuda" | "hip"
    arch: int | str  # 80 | "gfx942"
    warp_size: int  # threads of one Triton warp: a CUDA warp or an AMD wavefront
    reference_gpu: str
    compute_units: int  # SMs / CUs of the reference GPU (as one torch device sees it)
    dram_gbps: float  # its peak DRAM bandwidth, GB/s

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    @property
    def explores_space(self) -> bool:
        """True: the build compiles and prunes every candidate of a family's config space (what the
        tuner then measures); False: only the static configs."""
        return True


@dataclass(frozen=True)
class NvidiaTarget(Target):
    """A CUDA arch of archs.ARCHS; its limits and occupancy model are the Arch's."""

    table: Arch

    @property
    def max_threads_per_cu(self) -> int:
        return self.table.max_threads_per_sm

    def occupancy(self, num_warps: int, regs_per_thread: int, smem_bytes: int) -> float:
        return self.table.occupancy(num_warps, regs_per_thread, smem_bytes)


def nvidia(arch: Arch) -> NvidiaTarget:
    return NvidiaTarget(contract.NVIDIA, arch.name, "cuda", arch.capability, arch.warp_size, arch.reference_gpu, arch.sm_count,
                        arch.dram_gbps, arch)


@dataclass(frozen=True)
class Occupancy:
    """How full one CU (WGP on RDNA in WGP mode) is with a kernel's workgroups, and why."""

    waves_per_simd: float  # resident waves per SIMD, averaged over the CU's SIMDs
    workgroups_per_cu: int
    fraction: float  # waves_per_simd / the SIMD's wave slots
    limited_by: str  # "waves" | "vgprs" | "sgprs" | "lds" | "workgroups"


@dataclass(frozen=True)
class AmdTarget(Target):
    simds_per_cu: int  # SIMDs that share one workgroup's LDS: a CU on CDNA, a WGP (2 CUs) in WGP mode
    max_waves_per_simd: int
    vgprs_per_lane: int  # VGPR file per SIMD lane, in registers (incl. AGPRs where unified)
    vgpr_granule: int  # registers are allocated per wave in multiples of this
    max_vgprs_per_wave: int  # addressable by one wave (arch VGPRs + AGPRs on CDNA2/3)
    unified_agprs: bool  # CDNA2/3: AGPRs come out of the same per-lane file, after the VGPRs
    sgprs_limit_waves: bool  # gfx9: the SGPR file can cap waves per SIMD; gfx10+: never
    lds_per_cu: int  # bytes shared by the workgroups resident on one CU (WGP)
    max_lds_per_workgroup: int  # bytes
    max_workgroups_per_cu: int  # barrier slots: the cap for workgroups of more than one wave
    cus_per_lds_group: int = 1  # CUs behind simds_per_cu: 1 on CDNA, 2 (a WGP) on RDNA in WGP mode

    @property
    def max_threads_per_cu(self) -> int:
        return self.simds_per_cu * self.max_waves_per_simd * self.warp_size // self.cus_per_lds_group

    @property
    def explores_space(self) -> bool:
        """Static configs only, for now: with no AMD device to tune on, the rest of a space would only
        be ranked by modelled occupancy, at the cost of every space's compiles again per target."""
        return False

    def total_vgprs(self, arch_vgprs: int, agprs: int) -> int:
        """Registers per lane a wave allocates: on CDNA2/3 the AGPRs follow the VGPRs rounded up to 4."""
        if not self.unified_agprs:
            return arch_vgprs
        return (math.ceil(arch_vgprs / 4) * 4 + agprs) if agprs else arch_vgprs

    def waves_by_vgprs(self, total_vgprs: int) -> int:
        if total_vgprs > self.max_vgprs_per_wave:
            return 0
        if total_vgprs < self.vgpr_granule:
            return self.max_waves_per_simd
        allocated = math.ceil(total_vgprs / self.vgpr_granule) * self.vgpr_granule
        return min(self.max_waves_per_simd, self.vgprs_per_lane // allocated)

    def waves_by_sgprs(self, sgprs: int) -> int:
        if not self.sgprs_limit_waves:
            return self.max_waves_per_simd
        waves = 10 if sgprs <= 80 else 9 if sgprs <= 88 else 8 if sgprs <= 100 else 7
        return min(self.max_waves_per_simd, waves)

    def register_waves(self, total_vgprs: int, sgprs: int) -> int:
        """Waves per SIMD the registers allow: what LLVM reports as '; Occupancy:' when neither the
        workgroup size nor LDS binds (Triton's LDS is dynamic, so LLVM never sees it)."""
        return min(self.waves_by_vgprs(total_vgprs), self.waves_by_sgprs(sgprs))

    def occupancy(self, num_warps: int, total_vgprs: int, sgprs: int, lds_bytes: int) -> Occupancy:
        """Workgroups of `num_warps` waves on one CU: the CU's wave slots are its SIMDs' register-
        limited slots; LDS and barrier slots cap the workgroup count."""
        if num_warps < 1:
            raise ValueError(f"num_warps must be >= 1, got {num_warps}")
        by_vgprs, by_sgprs = self.waves_by_vgprs(total_vgprs), self.waves_by_sgprs(sgprs)
        reg_waves = min(by_vgprs, by_sgprs)
        limits = {"waves" if reg_waves == self.max_waves_per_simd else "vgprs" if by_vgprs <= by_sgprs else "sgprs":
                  self.simds_per_cu * reg_waves // num_warps}
        if lds_bytes > self.max_lds_per_workgroup:
            limits["lds"] = 0
        elif lds_bytes:
            limits["lds"] = self.lds_per_cu // lds_bytes
        if num_warps > 1:
            limits["workgroups"] = self.max_workgroups_per_cu
        limited_by = min(limits, key=lambda k: limits[k])  # dicts keep order: registers win ties
        groups = limits[limited_by]
        waves = groups * num_warps / self.simds_per_cu
        return Occupancy(waves, groups, waves / self.max_waves_per_simd, limited_by)


def _cdna(name: str, reference_gpu: str, compute_units: int, dram_gbps: float) -> AmdTarget:
    return AmdTarget(contract.AMD, name, "hip", name, 64, reference_gpu, compute_units, dram_gbps,
                     simds_per_cu=4, max_waves_per_simd=8, vgprs_per_lane=512, vgpr_granule=8,
                     max_vgprs_per_wave=512, unified_agprs=True, sgprs_limit_waves=True,
                     lds_per_cu=64 * 1024, max_lds_per_workgroup=64 * 1024, max_workgroups_per_cu=16)


AMD_TARGETS: dict[str, AmdTarget] = {
    t.name: t
    for t in (
        _cdna("gfx942", "MI300X", 304, 5300.0),
        _cdna("gfx90a", "MI250X (one GCD)", 110, 1600.0),
        # RDNA3 in WGP mode (Triton's default): a workgroup's CU is the WGP, 4 SIMD32s, 128 KiB LDS.
        # compute_units counts CUs as the specs table does; a WGP is two of them.
        AmdTarget(contract.AMD, "gfx1100", "hip", "gfx1100", 32, "Radeon RX 7900 XTX", 96, 960.0,
                  simds_per_cu=4, max_waves_per_simd=16, vgprs_per_lane=1536, vgpr_granule=24,
                  max_vgprs_per_wave=256, unified_agprs=False, sgprs_limit_waves=False,
                  lds_per_cu=128 * 1024, max_lds_per_workgroup=64 * 1024, max_workgroups_per_cu=32,
                  cus_per_lds_group=2),
    )
}

TARGETS: dict[str, Target] = {**{name: nvidia(a) for name, a in ARCHS.items()}, **AMD_TARGETS}


def of(arch: Arch | Target) -> Target:
    """The target of an NVIDIA arch of the table (or of a variant of one a test made); a target as it is."""
    return arch if isinstance(arch, Target) else nvidia(arch)


def resolve(names: str | list[str]) -> list[Target]:
    """'gfx942' -> [gfx942]; 'all' -> every target; an unknown name raises ValueError naming the choices."""
    return pick(TARGETS, names, "target")
