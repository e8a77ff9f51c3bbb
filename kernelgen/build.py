"""Build a generated tree: render every spec per arch, compile every variant ahead of time, write
a manifest, and swap the result into place only when everything succeeded.

Layout of a tree (default: generated/ in the repository, installed as lowmem_ops._generated):

    __init__.py
    ops.py                 arch-independent: specs as the runtime needs them, torch forward functions
    <arch>/__init__.py
    <arch>/<op>.py         Triton kernels + launch configs for that arch
    <arch>/manifest.json   per variant: registers, spills, shared memory, occupancy; source hashes
"""

from __future__ import annotations

import difflib
import filecmp
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import render
from .archs import Arch
from .render import KernelVariant
from .spec import Spec

TREE_DOC = '"""Kernels rendered by kernelgen. Do not edit: run `kernelgen build`."""\n'


class BuildError(RuntimeError):
    """A build step failed; the message names the kernel, dtype and config where there is one."""


@dataclass
class CompileResult:
    registers: int
    spill_bytes: int  # local memory per thread (register spills and local arrays)
    stack_bytes: int
    shared_bytes: int


# --- compiling -------------------------------------------------------------------------------

_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes, where: str) -> tuple[int, int, int, int]:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True)
    match = _RES_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        raise BuildError(f"{where}: cannot read resource usage with cuobjdump: {out.stderr.strip() or out.stdout}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


def compile_variant(module, variant: KernelVariant, arch: Arch) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    where = f"{variant.key} for {arch.name} with config {variant.config}"
    pointer_args = [i for i, v in enumerate(variant.signature.values()) if v.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}
    try:
        compiled = triton.compile(
            ASTSource(fn=getattr(module, variant.fn), signature=variant.signature, constexprs=variant.constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch.capability, 32),
            options={"num_warps": variant.num_warps},
        )
    except Exception as err:  # Triton raises many types; all mean the same to the user
        raise BuildError(f"compiling {where}: {type(err).__name__}: {err}") from err
    reg, stack, static_shared, local = _resource_usage(compiled.asm["cubin"], where)
    return CompileResult(registers=reg, spill_bytes=local, stack_bytes=stack,
                         shared_bytes=static_shared + int(compiled.metadata.shared))


def _import_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise BuildError(f"importing the rendered {path.name}: {type(err).__name__}: {err}") from err
    return module


# --- one arch --------------------------------------------------------------------------------

def _compile_file(path: Path, variants: list[KernelVariant], arch: Arch, progress) -> list[dict]:
    module = _import_path(path, f"_kernelgen_build_{arch.name}_{path.stem}")
    out = []
    for variant in variants:
        progress(f"{arch.name} {variant.key}")
        res = compile_variant(module, variant, arch)
        if res.registers > arch.max_regs_per_thread:
            raise BuildError(f"{variant.key} for {arch.name}: {res.registers} registers exceed the arch limit")
        out.append({
            "op": variant.op,
            "kernel": variant.kernel,
            "dtype": variant.dtype,
            "config": dict(sorted(variant.config.items())),
            "registers": res.registers,
            "spill_bytes": res.spill_bytes,
            "stack_bytes": res.stack_bytes,
            "shared_bytes": res.shared_bytes,
            "occupancy": round(arch.occupancy(variant.num_warps, res.registers, res.shared_bytes), 4),
        })
    return out


def variant_count(specs: list[Spec], arch: Arch, norms: bool) -> int:
    return sum(len(render.activation_variants(s, arch)) for s in specs) + (len(render.norm_variants(arch)) if norms else 0)


def _build_arch(specs: list[Spec], arch: Arch, dest: Path, progress, norms: bool) -> None:
    import triton

    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text(TREE_DOC)
    variants_out = []
    files = {}
    for spec in specs:
        path = dest / f"{spec.name}.py"
        path.write_text(render.render_activation(spec, arch))
        files[spec.name] = {
            "file": path.name,
            "spec": render.spec_file_label(spec),
            "spec_sha256": spec.sha256,
            "template": render.ACTIVATION_TEMPLATE,
            "template_sha256": render.template_sha256(render.ACTIVATION_TEMPLATE),
        }
        variants_out += _compile_file(path, render.activation_variants(spec, arch), arch, progress)
    if norms:
        path = dest / f"{render.NORM_FILE}.py"
        path.write_text(render.render_norm(arch))
        files[render.NORM_FILE] = {
            "file": path.name,
            "template": render.NORM_TEMPLATE,
            "template_sha256": render.template_sha256(render.NORM_TEMPLATE),
        }
        variants_out += _compile_file(path, render.norm_variants(arch), arch, progress)
    manifest = {
        "arch": arch.name,
        "capability": arch.capability,
        "reference_gpu": arch.reference_gpu,
        "compiled_with": {"triton": triton.__version__, "integer_args": "i32", "pointer_alignment": 16},
        "ops": files,
        "variants": variants_out,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _stage(specs: list[Spec], archs: list[Arch], stage: Path, progress, norms: bool) -> None:
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "__init__.py").write_text(TREE_DOC)
    (stage / "ops.py").write_text(render.render_ops(specs))
    for arch in archs:
        _build_arch(specs, arch, stage / arch.name, progress, norms)


@contextmanager
def _quiet_fp_fusion_warning():
    # Triton 3.9 warns on every compile unless this is set; the default (fusion on) is what we want.
    had = "TRITON_DEFAULT_FP_FUSION" in os.environ
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        yield
    finally:
        if not had:
            os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)


# --- public entry points -----------------------------------------------------------------------

def build(specs: list[Spec], archs: list[Arch], out: Path, progress=lambda msg: None, norms: bool = True) -> None:
    """Build into `out`. Nothing in `out` changes unless every render and compile succeeded.
    norms=False leaves out the norm kernels (a user's tree of their own activations)."""
    if not specs:
        raise BuildError("no specs to build")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_stages(out)
    prefix = f".{out.name}-stage-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=out.parent) as tmp, _quiet_fp_fusion_warning():
        stage = Path(tmp) / "tree"
        _stage(specs, archs, stage, progress, norms)
        _install(stage, out, [a.name for a in archs], Path(tmp))


def _sweep_dead_stages(out: Path) -> None:
    """Remove staging folders left by builds that died without cleaning up (a compiler crash kills
    the process before its `finally`). Folders of a build that is still running are left alone."""
    for stage in out.parent.glob(f".{out.name}-stage-*-*"):
        pid = stage.name.split("-stage-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(stage: Path, out: Path, arch_names: list[str], scratch: Path) -> None:
    """Move the staged files into `out`: each file by atomic rename, each arch folder by a swap."""
    out.mkdir(exist_ok=True)
    for name in ("__init__.py", "ops.py"):
        os.replace(stage / name, out / name)
    for arch in arch_names:
        target = out / arch
        if target.exists():
            os.replace(target, scratch / f"old-{arch}")
        os.replace(stage / arch, target)


def check(specs: list[Spec], archs: list[Arch], out: Path, progress=lambda msg: None, norms: bool = True) -> list[str]:
    """Rebuild into a scratch folder and compare with `out`. Returns the problems (empty: fresh)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="kernelgen-check-") as tmp, _quiet_fp_fusion_warning():
        stage = Path(tmp) / "tree"
        _stage(specs, archs, stage, progress, norms)
        problems = []
        wanted = ["__init__.py", "ops.py"] + [
            str(p.relative_to(stage)) for a in archs for p in sorted((stage / a.name).iterdir())
        ]
        for rel in wanted:
            fresh, have = stage / rel, out / rel
            if not have.exists():
                problems.append(f"{out / rel}: missing")
            elif not filecmp.cmp(fresh, have, shallow=False):
                diff = difflib.unified_diff(have.read_text().splitlines(), fresh.read_text().splitlines(),
                                            f"{out / rel} (committed)", f"{out / rel} (fresh build)", lineterm="", n=1)
                problems.append(f"{out / rel}: stale\n" + "\n".join(list(diff)[:40]))
        for a in archs:
            extra = sorted(p.name for p in (out / a.name).glob("*") if p.name != "__pycache__"
                           and not (stage / a.name / p.name).exists()) if (out / a.name).exists() else []
            problems += [f"{out / a.name / name}: not produced by any spec (stale leftover)" for name in extra]
        return problems


def default_out() -> Path | None:
    """generated/ beside kernelgen/ in a checkout (what lowmem_ops loads there), else None."""
    candidate = Path(__file__).resolve().parent.parent / "generated"
    return candidate if (candidate.parent / "pyproject.toml").exists() else None
