"""AMD targets: the occupancy model against hand-computed figures, the resource parser's errors, and
real ahead-of-time compiles for gfx942 / gfx90a / gfx1100 on a machine without a GPU (Triton's HIP
backend compiles on the CPU), checked against LLVM's own occupancy report."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelgen.families import activation, norm
from kernelgen.aot import CompileJob
from kernelgen.aot_amd import AmdCompileResult, compile_kernel, compile_one, parse_resources
from kernelgen.prune_amd import judge
from kernelgen.targets import AMD_TARGETS, TARGETS, resolve
from lowmem_ops._tree import kernel_path

ROOT = Path(__file__).resolve().parent.parent
ACTIVATION = str(kernel_path(ROOT / "generated", "sm80", "regelu2")[0])  # kernel sources are arch-independent
NORM = str(kernel_path(ROOT / "generated", "sm80", "ms_norm")[0])

# the signatures the NVIDIA build compiles (kernelgen.families), so these stay in step with the templates
FORWARD_SIG = activation.variant("regelu2", "forward", "float32", {"BLOCK_BYTES": 128, "num_warps": 4}).signature
NORM_FORWARD_SIG = norm.variant("layernorm.affine.forward", "float32", {"BLOCK_N": 1024, "num_warps": 4},
                                         "float32").signature
NORM_BACKWARD_SIG = norm.variant("layernorm.affine.backward", "bfloat16", {"BLOCK_N": 1024, "num_warps": 4},
                                          "float32").signature


def hip_job(path, fn, signature, constexprs, num_warps, num_stages, target, waves_per_eu=0) -> CompileJob:
    """A HIP compile job for `target` at its wave size."""
    wave = AMD_TARGETS[target].warp_size if target in AMD_TARGETS else 64
    return CompileJob(path, fn, signature, constexprs, num_warps, num_stages, target, (), wave, "hip", waves_per_eu)


# ---- occupancy model: figures worked out by hand from the per-target rules in kernelgen/targets.py


@pytest.mark.parametrize("name, vgprs, sgprs, waves", [
    ("gfx942", 42, 33, 8),     # 512 // 48 = 10, capped at 8 waves per SIMD
    ("gfx942", 64, 33, 8),     # 512 // 64 = 8
    ("gfx942", 65, 33, 7),     # allocated 72: 512 // 72 = 7
    ("gfx942", 128, 33, 4),
    ("gfx942", 129, 33, 3),    # allocated 136: 3.76 -> 3
    ("gfx942", 257, 33, 1),    # allocated 264: 1.9 -> 1
    ("gfx942", 513, 33, 0),    # beyond the 512 a wave can address: does not fit
    ("gfx942", 40, 101, 7),    # more than 100 SGPRs: 7 waves on gfx9
    ("gfx90a", 96, 90, 5),     # 512 // 96 = 5.3 -> 5; 90 SGPRs allow 8
    ("gfx1100", 78, 106, 16),  # allocated 96 of 1536: 16; SGPRs never limit on gfx11
    ("gfx1100", 100, 20, 12),  # allocated 120: 12.8 -> 12
    ("gfx1100", 256, 20, 5),   # allocated 264: 5.8 -> 5
    ("gfx1100", 257, 20, 0),   # beyond 256 addressable VGPRs
])
def test_register_waves_hand_computed(name, vgprs, sgprs, waves):
    assert AMD_TARGETS[name].register_waves(vgprs, sgprs) == waves


def test_agprs_follow_the_vgprs_rounded_to_four_on_cdna():
    # 9 VGPRs + 32 AGPRs: the AGPRs start at 12, so 44 registers per lane (as LLVM's tests state)
    assert AMD_TARGETS["gfx90a"].total_vgprs(9, 32) == 44
    assert AMD_TARGETS["gfx942"].total_vgprs(42, 0) == 42
    assert AMD_TARGETS["gfx1100"].total_vgprs(42, 0) == 42


@pytest.mark.parametrize("name, num_warps, vgprs, lds, fraction, limited_by", [
    # 4 SIMDs x 8 slots; 4-wave workgroups: 8 fit, 32 waves = full
    ("gfx942", 4, 42, 0, 1.0, "waves"),
    # 128 VGPRs: 4 slots per SIMD, 16 per CU -> 4 workgroups of 4 waves -> 4 of 8 per SIMD
    ("gfx942", 4, 128, 0, 0.5, "vgprs"),
    # 129 VGPRs: 3 slots per SIMD, 12 per CU -> one 8-wave workgroup -> 2 of 8 per SIMD
    ("gfx942", 8, 129, 0, 0.25, "vgprs"),
    # 16 KiB LDS of 64 KiB: 4 workgroups x 4 waves over 4 SIMDs = 4 of 8
    ("gfx942", 4, 42, 16384, 0.5, "lds"),
    # more LDS than one workgroup may address: nothing fits
    ("gfx942", 4, 42, 65537, 0.0, "lds"),
    # gfx1100 in WGP mode: 128 KiB over 4 SIMD32s; 16 KiB -> 8 workgroups x 4 waves = 8 of 16 per SIMD
    ("gfx1100", 4, 78, 16384, 0.5, "lds"),
    # 100 VGPRs: 12 slots per SIMD, 48 per WGP -> 12 workgroups of 4 -> 12 of 16
    ("gfx1100", 4, 100, 0, 0.75, "vgprs"),
])
def test_occupancy_hand_computed(name, num_warps, vgprs, lds, fraction, limited_by):
    occ = AMD_TARGETS[name].occupancy(num_warps, vgprs, 30, lds)
    assert occ.fraction == pytest.approx(fraction)
    assert occ.limited_by == limited_by


def test_targets_table_and_resolve():
    assert [t.warp_size for t in resolve(["gfx942", "gfx90a", "gfx1100"])] == [64, 64, 32]
    assert TARGETS["sm80"].vendor == "nvidia" and TARGETS["gfx942"].vendor == "amd"
    assert {t.name for t in resolve("all")} >= {"sm80", "sm90", "gfx942", "gfx90a", "gfx1100"}
    with pytest.raises(ValueError, match="unknown target gfx999"):
        resolve("gfx999")


# ---- the parser: what it reads, and clear errors on what it cannot


_ASM = """\
; NumVgprs: 9
; Occupancy: 8
\t.amdgpu_metadata
---
amdhsa.kernels:
  - .agpr_count:     32
    .args:
      - .offset:         0
        .size:           8
    .group_segment_fixed_size: 256
    .name:           k
    .private_segment_fixed_size: 16
    .sgpr_count:     20
    .sgpr_spill_count: 1
    .vgpr_count:     44
    .vgpr_spill_count: 3
    .wavefront_size: 64
amdhsa.target:   amdgcn-amd-amdhsa--gfx90a
...
\t.end_amdgpu_metadata
"""


def test_parse_resources_reads_every_field():
    r = parse_resources(_ASM, dynamic_lds=1024)
    assert (r.vgprs, r.agprs, r.total_vgprs, r.sgprs) == (9, 32, 44, 20)
    assert (r.vgpr_spills, r.sgpr_spills, r.scratch_bytes, r.lds_bytes) == (3, 1, 16, 256 + 1024)
    assert (r.llvm_waves_per_simd, r.wavefront_size) == (8, 64)
    assert r.spills


@pytest.mark.parametrize("asm, message", [
    ("; NumVgprs: 9\n", "no .amdgpu_metadata block"),
    (_ASM.replace("    .vgpr_count:     44\n", ""), "lacks .vgpr_count"),
    (_ASM.replace("amdhsa.target", "  - .name: second\namdhsa.target"), "expected one kernel.*found 2"),
    (_ASM.replace("; Occupancy: 8\n", ""), "'; Occupancy:'"),
])
def test_parse_resources_errors_name_what_is_missing(asm, message):
    with pytest.raises(ValueError, match=message):
        parse_resources(asm, 0)


def test_unknown_target_is_a_clear_outcome():
    job = hip_job(ACTIVATION, "forward_kernel", FORWARD_SIG, {"WRITE_CODES": True, "BLOCK_BYTES": 128}, 4, None,
                        "gfx000")
    assert "unknown AMD target gfx000" in compile_one(job)


# ---- real compiles, no GPU needed


@pytest.fixture(autouse=True)
def fresh_triton_cache(monkeypatch, tmp_path):
    """Compile for real every time: a kernel Triton cached earlier would skip the compiler."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gfx942", "gfx90a", "gfx1100"])
def test_activation_forward_compiles_for_each_target(name):
    target = AMD_TARGETS[name]
    # 8 fp32 elements per lane on either wave size
    job = hip_job(ACTIVATION, "forward_kernel", FORWARD_SIG,
                        {"WRITE_CODES": True, "BLOCK_BYTES": 2 * target.warp_size * 4}, 4, None, name)
    compiled = compile_kernel(job)
    hsaco = compiled.asm["hsaco"]
    assert hsaco[:4] == b"\x7fELF" and name.encode() in hsaco  # a code object for this gfx
    r = parse_resources(compiled.asm["amdgcn"], compiled.metadata.shared)
    assert r.wavefront_size == target.warp_size
    assert 8 <= r.vgprs <= 256 and r.agprs == 0 and r.total_vgprs == r.vgprs and 0 < r.sgprs <= 106
    assert not r.spills and r.scratch_bytes == 0 and r.sgpr_spills == 0
    assert 0 <= r.lds_bytes <= target.max_lds_per_workgroup
    # LLVM's own occupancy: registers only (Triton's LDS is dynamic, and a 4-wave group never binds)
    assert target.register_waves(r.total_vgprs, r.sgprs) == r.llvm_waves_per_simd


@pytest.mark.slow
def test_norm_backward_reports_its_lds():
    # one row per program across 4 waves: the row sums go through LDS, which Triton allocates at launch
    job = hip_job(NORM, "backward_kernel", NORM_BACKWARD_SIG,
                        {"IS_RMS": False, "AFFINE": True, "HAS_BIAS": True, "BLOCK_N": 1024, "SINGLE_PASS": True},
                        4, None, "gfx942")
    r = compile_one(job)
    assert not isinstance(r, str), r
    assert 0 < r.lds_bytes <= 64 * 1024 and not r.spills
    assert AMD_TARGETS["gfx942"].register_waves(r.total_vgprs, r.sgprs) == r.llvm_waves_per_simd


@pytest.mark.slow
def test_spilling_kernel_is_detected_by_its_scratch():
    # A 4096-wide row on one wave is 64 floats per lane per tensor; waves_per_eu=8 caps the wave at
    # 512 / 8 = 64 registers, so LLVM must spill to scratch (a huge BLOCK alone takes minutes to compile).
    job = hip_job(NORM, "forward_kernel", NORM_FORWARD_SIG,
                        {"IS_RMS": False, "AFFINE": True, "HAS_BIAS": True, "BLOCK_N": 4096, "SINGLE_PASS": True},
                        1, None, "gfx942", waves_per_eu=8)
    r = compile_one(job)
    assert not isinstance(r, str), r
    assert r.total_vgprs <= 64
    assert r.scratch_bytes > 0 and r.vgpr_spills > 0 and r.spills


# ---- pruning verdicts from a compile's resources (no compile needed)


def _result(**changes) -> AmdCompileResult:
    base = dict(vgprs=42, agprs=0, total_vgprs=42, sgprs=33, vgpr_spills=0, sgpr_spills=0, scratch_bytes=0,
                lds_bytes=0, llvm_waves_per_simd=8, wavefront_size=64)
    return AmdCompileResult(**{**base, **changes})


def test_judge_keeps_ranks_and_drops():
    gfx942 = AMD_TARGETS["gfx942"]
    kept = judge(gfx942, 4, _result())
    assert kept.kept and kept.occupancy == 1.0
    half = judge(gfx942, 4, _result(vgprs=128, total_vgprs=128))
    assert half.kept and half.occupancy == 0.5  # 4 of 8 waves per SIMD, as worked out above
    spilled = judge(gfx942, 4, _result(vgpr_spills=10, scratch_bytes=44))
    assert not spilled.kept and spilled.spilled_bytes == 44 and "spills" in spilled.reason
    # SGPR spills alone land in VGPR lanes: no memory traffic, so the config stays
    assert judge(gfx942, 4, _result(sgpr_spills=3)).kept
    assert not judge(gfx942, 4, _result(lds_bytes=65537)).kept
    assert not judge(gfx942, 4, _result(vgprs=256, agprs=258, total_vgprs=516)).kept
    assert not judge(AMD_TARGETS["gfx1100"], 4, _result()).kept  # a wave64 binary is not a gfx1100 wave32 one
    assert "does not compile" in judge(gfx942, 4, "CompilationError: boom").reason


@pytest.mark.slow
def test_hip_jobs_compile_in_worker_processes_and_keep_their_own_keys():
    """The build's worker processes take HIP jobs like CUDA ones: the result comes back over the pipe
    as an AmdCompileResult, an unknown target as its error; a HIP job's key differs from the CUDA job
    with the same fields (a recorded result is never taken for the other vendor's)."""
    from kernelgen import aot

    good = hip_job(ACTIVATION, "forward_kernel", FORWARD_SIG, {"WRITE_CODES": True, "BLOCK_BYTES": 512}, 4, None,
                         "gfx942")
    bad = hip_job(ACTIVATION, "forward_kernel", FORWARD_SIG, {"WRITE_CODES": True, "BLOCK_BYTES": 512}, 4, None,
                        "gfx000")
    result, error = aot.compile_all([good, bad], workers=2)
    assert isinstance(result, AmdCompileResult) and result.wavefront_size == 64
    assert aot.from_dict(aot.to_dict(result)) == result
    assert "unknown AMD target gfx000" in error
    cuda = CompileJob(*[getattr(good, f) for f in ("path", "fn", "signature", "constexprs", "num_warps", "num_stages")],
                      "gfx942", (), 64)
    assert good.key("sha", "3.9.0") != cuda.key("sha", "3.9.0")
