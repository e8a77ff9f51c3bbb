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

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

from .aot import _module, divisibility_attrs, one_line  # one loaded copy of each rendered file per process
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


@dataclass(frozen=True)
class AmdCompileJob:
    """One kernel of a rendered file, for one AMD target, with all its constexprs and launch options."""

    path: str  # the rendered .py file
    fn: str  # its @triton.jit function
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int | None  # None: Triton's default
    target: str  # gfx942, gfx90a, gfx1100
    waves_per_eu: int = 0  # the HIP backend's register-budget hint; 0: none

    def key(self, source_sha256: str, triton_version: str) -> str:
        record = {"results": RESULT_FORMAT, "source": source_sha256, **asdict(self), "triton": triton_version}
        record.pop("path")
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


RESULT_FORMAT = 1  # bump when AmdCompileResult changes

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


def compile_kernel(job: AmdCompileJob):
    """triton.compile the job for its AMD target; returns Triton's CompiledKernel (hsaco in .asm)."""
    import triton
    from triton.compiler import ASTSource

    target: AmdTarget = AMD_TARGETS[job.target]
    options = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    if job.waves_per_eu:
        options["waves_per_eu"] = job.waves_per_eu
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is its default
    return triton.compile(
        ASTSource(fn=getattr(_module(job.path), job.fn), signature=job.signature, constexprs=job.constexprs,
                  attrs=divisibility_attrs(job.signature)),
        target=target.gpu_target(), options=options)


def compile_one(job: AmdCompileJob) -> Outcome:
    """Compile in this process; any error comes back as its one-line message."""
    try:
        if job.target not in AMD_TARGETS:
            raise ValueError(f"unknown AMD target {job.target}; choose from {', '.join(AMD_TARGETS)}")
        compiled = compile_kernel(job)
        result = parse_resources(compiled.asm["amdgcn"], compiled.metadata.shared)
        expected = AMD_TARGETS[job.target].warp_size
        if result.wavefront_size != expected:
            raise ValueError(f"{job.target} compiled for wave{result.wavefront_size}; the target says wave{expected}")
        return result
    except Exception as err:
        return one_line(err)


def to_dict(result: AmdCompileResult) -> dict:
    return asdict(result)


def from_dict(data: dict) -> AmdCompileResult:
    return AmdCompileResult(**{k: int(data[k]) for k in AmdCompileResult.__dataclass_fields__})
