"""Static pruning for AMD targets, valid with no GPU: prune.py's verdicts, judged from what the HIP
compile reports (kernelgen/aot_amd.py) and ranked by the target's occupancy model."""

from __future__ import annotations

from .aot_amd import AmdCompileResult, Outcome
from .prune import Verdict
from .targets import AmdTarget


def judge(target: AmdTarget, num_warps: int, outcome: Outcome) -> Verdict:
    if not isinstance(outcome, AmdCompileResult):
        return Verdict(False, f"does not compile: {outcome}", 0.0)
    if outcome.wavefront_size != target.warp_size:
        return Verdict(False, f"compiled for wave{outcome.wavefront_size}; {target.name} runs wave{target.warp_size}", 0.0)
    if outcome.spills:
        return Verdict(False, f"spills registers: {outcome.vgpr_spills} VGPRs, {outcome.scratch_bytes} B of scratch "
                              f"per lane at {outcome.total_vgprs} VGPRs", 0.0, outcome.scratch_bytes)
    if outcome.lds_bytes > target.max_lds_per_workgroup:
        return Verdict(False, f"needs {outcome.lds_bytes} B of LDS per workgroup; {target.name} allows "
                              f"{target.max_lds_per_workgroup}", 0.0)
    occ = target.occupancy(num_warps, outcome.total_vgprs, outcome.sgprs, outcome.lds_bytes)
    if occ.fraction <= 0:
        return Verdict(False, f"no workgroup of it fits on a CU (limited by {occ.limited_by})", 0.0)
    return Verdict(True, f"kept: occupancy {occ.fraction:.0%} ({outcome.total_vgprs} VGPRs, {outcome.sgprs} SGPRs, "
                         f"limited by {occ.limited_by})", round(occ.fraction, 4), 0)
