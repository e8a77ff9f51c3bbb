"""Compile every kernel kind of one activation spec (regelu2, gated) and the norms (ms_norm) for
the AMD targets, on the CPU, and print one JSON line per kernel: its resources and occupancy.
The results in docs/amd.md come from it: `python tune/amd_compile_survey.py [gfx942,gfx90a,gfx1100]`.
It builds kernels the way kernelgen.render does today (its variant helpers); the Family/Target
redesign (issue 13) will replace those calls."""
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from kernelgen.archs import ARCHS
from kernelgen.contract import contract
from kernelgen.families import activation, norm
from kernelgen.aot_amd import AmdCompileJob, compile_one
from kernelgen.targets import AMD_TARGETS

ROOT = Path(__file__).resolve().parent.parent  # kernel sources are arch-independent: any folder serves
targets = sys.argv[1].split(",") if len(sys.argv) > 1 else list(AMD_TARGETS)
variants = []
for dtype in ("float32", "bfloat16"):
    cfg = activation.static_config(ARCHS["sm80"], dtype, 4)
    for kernel in activation.ELEMENTWISE_KERNELS:
        variants.append(activation.variant("regelu2", kernel, dtype, cfg))
    for kind in ("layernorm", "rmsnorm"):
        for affine in (False, True):
            for stage, cfgs in (("forward", [{"BLOCK_N": 1024, "SINGLE_PASS": True, "num_warps": 4},
                                             {"BLOCK_N": 4096, "SINGLE_PASS": False, "num_warps": 8}]),
                                ("backward", [{"BLOCK_N": 1024, "SINGLE_PASS": True, "num_warps": 4},
                                              {"BLOCK_N": 4096, "SINGLE_PASS": False, "num_warps": 8}]),
                                ("param_grad", [{"BLOCK_R": 32, "BLOCK_C": 128, "num_warps": 4}] if affine else [])):
                for c in cfgs:
                    kernel = contract.norm_kernel(kind, affine, stage)
                    variants.append(norm.variant(kernel, dtype, c, norm.weight_dtypes(kernel, dtype)[-1]))
for t in targets:
    scale = AMD_TARGETS[t].warp_size // 32  # same elements per lane as on a 32-wide warp
    for v in variants:
        constexprs = dict(v.constexprs)
        if "BLOCK_BYTES" in constexprs:
            constexprs["BLOCK_BYTES"] *= scale
        job = AmdCompileJob(str(ROOT / "generated" / "sm80" / f"{v.op}.py"), v.fn, v.signature, constexprs, v.num_warps, v.num_stages, t)
        start = time.time()
        out = compile_one(job)
        rec = {"target": t, "kernel": v.key, "config": {k: constexprs[k] for k in constexprs if k.isupper() and k.startswith(("BLOCK", "SINGLE"))},
               "num_warps": v.num_warps, "secs": round(time.time() - start, 1)}
        if isinstance(out, str):
            rec["error"] = out
        else:
            r = asdict(out)
            o = AMD_TARGETS[t].occupancy(v.num_warps, out.total_vgprs, out.sgprs, out.lds_bytes)
            rec.update(r, occupancy=round(o.fraction, 3), limited_by=o.limited_by,
                       model_register_waves=AMD_TARGETS[t].register_waves(out.total_vgprs, out.sgprs))
        print(json.dumps(rec), flush=True)
