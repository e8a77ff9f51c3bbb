"""What static pruning found, read from the manifests `kernelgen build` wrote (docs/tuning.md's tables).

    python tune/pruning_report.py                  # generated/, every arch (NVIDIA, then AMD)
    python tune/pruning_report.py --ptx sm90       # also: the vector width of a few kernels' accesses

Per arch: configs, compiles (each config as launched with sizes that are multiples of 16, once per
weight dtype for the norms' affine kernels, and the chosen ones again for any size), what was
dropped and why. Then, for each chosen config, its registers with aligned sizes against any size.
--ptx compiles a few static configs again and counts their global loads and stores by width (no
GPU needed): what the aligned specialisation buys.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _kind(row: dict) -> str:
    if row["op"] != "ms_norm":
        return "activations"
    stage = row["kernel"].rsplit(".", 1)[-1]
    return {"forward": "norm forward", "backward": "norm backward", "param_grad": "dgamma kernel"}[stage]


def summary(tree: Path) -> list[str]:
    lines = ["| arch | configs | compiles | dropped | norm backward | dgamma kernel | norm forward | activations |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for manifest in sorted(tree.glob("sm*/manifest.json"), key=lambda p: int(p.parent.name[2:])):
        m = json.loads(manifest.read_text())
        rows = m["variants"]
        dropped = Counter(_kind(r) for r in rows if not r["kept"])
        lines.append(f"| {m['arch']} | {len(rows)} | {m['pruning']['compiled']} | {m['pruning']['dropped']} | "
                     + " | ".join(str(dropped[k]) for k in ("norm backward", "dgamma kernel", "norm forward", "activations"))
                     + " |")
    return lines


def amd_summary(tree: Path) -> list[str]:
    """The AMD targets' builds (static configs only): what the HIP compiles report of them."""
    lines = ["| target | wave | configs | compiles | dropped | VGPRs, max | LDS bytes, max | scratch | occupancy, min / median |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for manifest in sorted(tree.glob("gfx*/manifest.json")):
        m = json.loads(manifest.read_text())
        rows = m["variants"]
        compiles = rows + [a for r in rows for a in r.get("also", ())]
        ok = [c for c in compiles if "error" not in c]
        occupancy = sorted(r["occupancy"] for r in rows if r["kept"])
        lines.append(f"| {m['arch']} | {ok[0]['wavefront_size']} | {len(rows)} | {m['pruning']['compiled']} | "
                     f"{m['pruning']['dropped']} | {max(c['total_vgprs'] for c in ok)} | {max(c['lds_bytes'] for c in ok)} | "
                     f"{sum(c['scratch_bytes'] > 0 for c in ok)} | {occupancy[0]:.0%} / {occupancy[len(occupancy) // 2]:.0%} |")
    return lines


def aligned_vs_any(tree: Path, arch: str) -> list[str]:
    """Registers of the chosen configs: sizes that are multiples of 16 against any size."""
    m = json.loads((tree / arch / "manifest.json").read_text())
    from kernelgen.space import compile_part

    chosen = {(c["op"], c["kernel"], c["dtype"], json.dumps(compile_part(c.get("tuned") or c["static"]), sort_keys=True))
              for c in m["choices"]}
    lines = ["| kernel | dtype | config | registers, aligned | registers, any size | spills, any size |",
             "|---|---|---|---:|---:|---|"]
    seen = set()
    for r in m["variants"]:
        ident = (r["op"], r["kernel"], r["dtype"], json.dumps(r["config"], sort_keys=True))
        if ident not in chosen or ident in seen:
            continue
        seen.add(ident)
        anyway = [a for a in r.get("also", ()) if a["specialisation"]["sizes"] == "any"
                  and a["specialisation"].get("weight") == r["specialisation"].get("weight")]
        if not anyway or "registers" not in anyway[0] or "registers" not in r:
            continue
        a = anyway[0]
        if r["op"] in ("regelu2", "ms_norm") and r["dtype"] == "bfloat16":
            spill = f"{a['spill_stores']} / {a['spill_loads']} B" if a["spill_stores"] or a["spill_loads"] else "none"
            lines.append(f"| {r['op']}.{r['kernel']} | {r['dtype']} | {ident[3]} | {r['registers']} | {a['registers']} | {spill} |")
    return lines


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(\.v[248])?\.(b|u|f|s)(8|16|32|64)\b")


def access_widths(ptx: str) -> Counter:
    """Global loads and stores by bits per instruction (vector count x element width)."""
    out = Counter()
    for kind, vec, _, bits in _ACCESS.findall(ptx):
        out[(kind, int(bits) * (int(vec[2:]) if vec else 1))] += 1
    return out


def ptx_widths(tree: Path, arch_name: str) -> list[str]:
    from kernelgen import archs, aot
    from kernelgen.families import activation, norm
    from lowmem_ops._tree import kernel_path
    arch = archs.ARCHS[arch_name]
    variants = [  # the examples: regelu2 at its static config, LayerNorm's 8192-wide affine backward
        activation.variant("regelu2", "forward", "bfloat16", {"BLOCK_BYTES": 1024, "num_warps": 4}),
        activation.variant("regelu2", "backward", "bfloat16", {"BLOCK_BYTES": 1024, "num_warps": 4}),
        norm.variant("layernorm.affine.backward", "bfloat16", {"BLOCK_N": 8192, "SINGLE_PASS": True,
                                                                       "num_warps": 16}, "bfloat16"),
    ]
    lines = ["| kernel (bf16) | config | sizes | registers | spills (B stored / loaded) | loads (bits: count) | stores |",
             "|---|---|---|---:|---|---|---|"]
    for v in variants:
        for variant in (v, v.unaligned()):
            job = aot.CompileJob(str(kernel_path(tree, arch_name, variant.op)[0]), variant.fn, variant.signature,
                                 variant.constexprs, variant.num_warps, variant.num_stages, arch.capability,
                                 variant.aligned_args)
            compiled, log = aot.compile_kernel(job)  # the build's own compile, kept for its PTX
            used = aot.resources(compiled, log)
            widths = access_widths(compiled.asm["ptx"])
            loads = ", ".join(f"{b}: {n}" for (k, b), n in sorted(widths.items()) if k == "ld")
            stores = ", ".join(f"{b}: {n}" for (k, b), n in sorted(widths.items()) if k == "st")
            lines.append(f"| {variant.op}.{variant.kernel} | {variant.config} | {variant.specialisation['sizes']} | "
                         f"{used.registers} | {used.spill_stores} / {used.spill_loads} | {loads} | {stores} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=ROOT / "generated")
    ap.add_argument("--arch", default="sm90", help="the arch of the aligned-vs-any table")
    ap.add_argument("--ptx", metavar="ARCH", help="also compile a few kernels for ARCH and count access widths")
    args = ap.parse_args(argv)
    print("\n".join(summary(args.tree)))
    print()
    print("\n".join(amd_summary(args.tree)))
    print()
    print("\n".join(aligned_vs_any(args.tree, args.arch)))
    if args.ptx:
        print()
        print("\n".join(ptx_widths(args.tree, args.ptx)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
