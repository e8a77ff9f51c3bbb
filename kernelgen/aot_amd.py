"""Ahead-of-time compiles for AMD targets: triton.compile for GPUTarget("hip", gfx..., wave size) on
a machine without a GPU (Triton's HIP backend brings its own LLVM, lld and ROCm device libraries),
and the resources each kernel uses, read from the compile's own report.

Where the numbers come from: the amdgcn assembly Triton keeps (compiled.asm["amdgcn"]) ends with
the code object metadata LLVM also writes into the hsaco's note (the `.amdgpu_metadata` YAML
block): `.vgpr_count` (registers per lane the wave allocates: VGPRs + AGPRs on CDNA2/3),
`.agpr_count`, `.sgpr_count`, `.vgpr_spill_count`, `.sgpr_spill_count`,
`.private_segment_fixed_size` (scratch bytes per lane: spill slots and private arrays) and
`.group_segment_fixed_size` (static LDS). The architectural VGPR count and LLVM's own occupancy
come from its kernel-info comments (`; NumVgprs:`, `; Occupancy:`). Triton's LDS is dynamic:
metadata.shared bytes are added at launch, so the kernel's LDS is static + metadata.shared.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .aot_common import ast_source, one_line
from .targets import AMD_TARGETS, AmdTarget


@dataclass(frozen=True)
class AmdCompileResult:
    vgprs: int  # architectural VGPRs per lane
    agprs: int  # accumulation VGPRs per lane (CDNA only; 0 elsewhere)
    total_vgprs: int  # what the wave allocates per lane (VGPRs + AGPRs on CDNA2/3)
    sgprs: int  # incl. VCC / flat-scratch / XNACK extras, as the occupancy rules count them
    vgpr_spills: int  # VGPRs LLVM spilled to scratch (on CDNA it first parks them in free AGPRs: no spill)
    sgpr_spills: int  # SGPRs spilled (into VGPR lanes, or scratch)
    scratch_bytes: int  # private segment per lane: spill slots and private arrays
    lds_bytes: int  # per workgroup: static + Triton's dynamic allocation
    llvm_waves_per_simd: int  # LLVM's own occupancy report, blind to Triton's dynamic LDS
    wavefront_size: int

    @property
    def spills(self) -> bool:
        """Spills that cost memory traffic: VGPR spills, or anything in scratch. SGPR spills alone
        land in VGPR lanes (no memory access) and are not counted here."""
        return self.vgpr_spills > 0 or self.scratch_bytes > 0


Outcome = AmdCompileResult | str

_METADATA_RE = re.compile(r"^\s*\.amdgpu_metadata\s*$(.*?)^\s*\.end_amdgpu_metadata", re.M | re.S)
_KERNEL_KEY_RE = re.compile(r"^ {4}\.([a-z_]+):\s+(\S+)\s*$")  # a kernel's own keys; .args entries sit deeper
_REQUIRED = ("vgpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count", "private_segment_fixed_size",
             "group_segment_fixed_size", "wavefront_size", "name")


def _kernel_metadata(asm: str) -> dict[str, str]:
    """The one kernel's keys of the code object metadata at the end of the assembly."""
    block = _METADATA_RE.search(asm)
    if not block:
        raise ValueError("no .amdgpu_metadata block in the amdgcn assembly")
    lines = block.group(1).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("amdhsa.kernels:"))
    except StopIteration:
        raise ValueError("the amdgcn metadata lists no amdhsa.kernels") from None
    kernels: list[dict[str, str]] = []
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):  # the next top-level key: amdhsa.target, ...
            break
        if line.startswith("  - "):
            kernels.append({})
            line = "    " + line[4:]
        match = _KERNEL_KEY_RE.match(line)
        if match and kernels:
            kernels[-1][match.group(1)] = match.group(2)
    if len(kernels) != 1:
        raise ValueError(f"expected one kernel in the amdgcn metadata, found {len(kernels)}")
    missing = [k for k in _REQUIRED if k not in kernels[0]]
    if missing:
        raise ValueError(f"the amdgcn metadata lacks {', '.join('.' + k for k in missing)}")
    return kernels[0]


def _comment_int(asm: str, label: str) -> int:
    found = re.findall(rf"^; {label}: (\d+)\s*$", asm, re.M)
    if len(found) != 1:
        raise ValueError(f"expected one '; {label}:' line in the amdgcn assembly, found {len(found)}")
    return int(found[0])


def parse_resources(asm: str, dynamic_lds: int) -> AmdCompileResult:
    """The resources of the single kernel in `asm` (Triton's amdgcn stage); `dynamic_lds` is the
    compile's metadata.shared. Raises ValueError naming what is missing or ambiguous."""
    meta = _kernel_metadata(asm)
    number = {k: int(v) for k, v in meta.items() if k != "name" and v.isdigit()}
    not_numbers = [k for k in _REQUIRED if k != "name" and k not in number]
    if not_numbers:
        raise ValueError(f"non-numeric {', '.join('.' + k for k in not_numbers)} in the amdgcn metadata")
    return AmdCompileResult(
        vgprs=_comment_int(asm, "NumVgprs"),
        agprs=number.get("agpr_count", 0),
        total_vgprs=number["vgpr_count"],
        sgprs=number["sgpr_count"],
        vgpr_spills=number["vgpr_spill_count"],
        sgpr_spills=number["sgpr_spill_count"],
        scratch_bytes=number["private_segment_fixed_size"],
        lds_bytes=number["group_segment_fixed_size"] + int(dynamic_lds),
        llvm_waves_per_simd=_comment_int(asm, "Occupancy"),
        wavefront_size=number["wavefront_size"],
    )


def compile_kernel(job):
    """triton.compile an aot.CompileJob of backend "hip" (capability: the gfx name) for its AMD
    target; returns Triton's CompiledKernel (the amdgcn assembly and hsaco in .asm)."""
    import triton

    target: AmdTarget = AMD_TARGETS[job.capability]
    options = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    if job.waves_per_eu:
        options["waves_per_eu"] = job.waves_per_eu
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is its default
    return triton.compile(ast_source(job), target=target.gpu_target(), options=options)


def compile_one(job) -> Outcome:
    """Compile an aot.CompileJob of backend "hip" in this process; any error comes back as its
    one-line message."""
    try:
        if job.capability not in AMD_TARGETS:
            raise ValueError(f"unknown AMD target {job.capability}; choose from {', '.join(AMD_TARGETS)}")
        expected = AMD_TARGETS[job.capability].warp_size
        if job.warp_size != expected:
            raise ValueError(f"{job.capability} runs wave{expected}; the job asks for wave{job.warp_size}")
        compiled = compile_kernel(job)
        result = parse_resources(compiled.asm["amdgcn"], compiled.metadata.shared)
        if result.wavefront_size != expected:
            raise ValueError(f"{job.capability} compiled for wave{result.wavefront_size}; the target says wave{expected}")
        return result
    except Exception as err:
        return one_line(err)
