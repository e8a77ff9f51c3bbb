"""Build a generated tree: render every spec, compile every variant ahead of time per arch, write
a manifest, and install the result only when everything succeeded.

Targets are NVIDIA archs and AMD targets alike (kernelgen/targets.py: an `Arch` of the NVIDIA table
is taken as its target); each gets its folder, named as the target.

Layout of a tree (default: generated/ in the repository, installed as lowmem_ops._generated):

    .kernelgen-tree        marks the folder as a kernelgen tree: builds write only into such (or empty) folders
    __init__.py
    ops.py                 arch-independent: specs as the runtime needs them, torch forward functions
    cpu_kernels.cpp        arch-independent: C++ CPU kernels of every activation (compiled by lowmem_ops on first use)
    kernels/<stem>_<hash>.py  Triton kernels of an op (stem: its name) or family (ms_norm, dropout, add_norm),
                           named by the first 12 hex digits of the text's sha256 (contract.kernel_name):
                           the text does not depend on the arch, so the archs share one file
    <arch>/configs.py      the launch config of every kernel, dtype and shape bucket (static or tuned),
                           the GPU it is for, and KERNEL_FILES: which kernels/ file each stem uses
    <arch>/manifest.json   per compiled config: registers, spills, shared memory, occupancy, kept or
                           dropped and why; per bucket: the choice; source hashes

Arch folders hold no kernels and no __init__.py: the runtime loads configs.py and the kernel files by
path, and the wheel takes them as package data (pyproject.toml globs them).
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import difflib
import errno
import filecmp
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import aot, families, prune, prune_amd, render, space, targets, tunedb
from . import spec as spec_mod
from .archs import Arch
from .contract import contract
from .kernels import Family, KernelVariant, TuneGroup
from .spec import Spec

TREE_DOC = '"""Kernels rendered by kernelgen. Do not edit: run `kernelgen build`."""\n'
MARKER = ".kernelgen-tree"
MARKER_TEXT = ("A tree of kernels written by `kernelgen build`. A build into this folder replaces __init__.py,\n"
               "ops.py, cpu_kernels.cpp and the arch folders it builds (sm80, ...), adds the kernel files they use to\n"
               "kernels/ and removes those no arch folder uses; it leaves every other file alone. A build refuses a\n"
               "folder without this file unless the folder is empty.\n")


# The files at the top of a tree that every build writes (the arch folders aside).
TOP_FILES = (MARKER, "__init__.py", contract.OPS_FILE, contract.CPU_FILE)


class BuildError(RuntimeError):
    """A build step failed; the message names the kernel, dtype and config where there is one."""


class BuildWarning(UserWarning):
    pass


def _import_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise BuildError(f"importing the rendered {path.name}: {type(err).__name__}: {err}") from err
    return module


@dataclass
class BuildOptions:
    workers: int = 1  # compile processes; 1 compiles in this process
    recompile: bool = False  # ignore the results an earlier manifest recorded
    db_dir: Path | None = None  # where <arch>.json tuning databases live; None: static configs only


# --- one arch --------------------------------------------------------------------------------

ArchOrTarget = Arch | targets.Target  # what the entry points take; an Arch is its NVIDIA target


def tune_groups(specs: list[Spec], arch: ArchOrTarget, fams: tuple[Family, ...] = families.ALL) -> list[TuneGroup]:
    """Every tuning group the build bakes for `arch`: with the family's whole config space where the
    target explores it, else with the static config alone (targets.Target.explores_space)."""
    groups = families.groups(specs, arch, fams)
    if targets.of(arch).explores_space:
        return groups
    return [dataclasses.replace(g, candidates=g.candidates[:1]) for g in groups]


def config_count(specs: list[Spec], arch: ArchOrTarget, fams: tuple[Family, ...] = families.ALL) -> int:
    return len(families.variants(tune_groups(specs, arch, fams)))


def compile_count(specs: list[Spec], arch: ArchOrTarget, fams: tuple[Family, ...] = families.ALL) -> int:
    """The compiles every config needs (each weight dtype); the chosen configs' unaligned ones aside."""
    return sum(len(vs) for vs in families.variants(tune_groups(specs, arch, fams)))


def _judge(target: targets.Target, num_warps: int, outcome: aot.Outcome) -> prune.Verdict:
    """A compiled config's verdict, by its vendor's resource report and occupancy model."""
    if isinstance(target, targets.AmdTarget):
        return prune_amd.judge(target, num_warps, outcome)
    return prune.judge(target.table, num_warps, outcome)


def _previous_results(manifest: Path, triton_version: str) -> dict[str, dict]:
    """compile_key -> recorded result, from the manifest an earlier build left (same Triton only).
    A manifest that is there but damaged is a BuildError: silently compiling every config again
    would take minutes per arch and hide the damage."""
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BuildError(damaged_manifest(manifest, f"not valid JSON ({err})")) from None
    if not isinstance(data, dict) or not isinstance(data.get("compiled_with"), dict) \
            or not isinstance(data.get("variants"), list):
        raise BuildError(damaged_manifest(manifest, 'not a manifest: it needs "compiled_with" (an object) and '
                                                    '"variants" (a list)'))
    if data["compiled_with"].get("triton") != triton_version:
        return {}
    rows = [v for v in data["variants"] if isinstance(v, dict)]
    rows += [a for v in rows if isinstance(v.get("also"), list) for a in v["also"] if isinstance(a, dict)]
    return {v["compile_key"]: v for v in rows if "compile_key" in v}


# --- migration from the per-arch kernel files --------------------------------------------------
# Trees built before kernels/ held each arch's own copy of every kernel file, which named its arch in
# a comment and in an unused `ARCH = "sm80"` line. Their manifests' compile keys hash that text, so
# the shared, arch-free text misses every recorded result: a full recompile (over an hour for
# generated/). The code is the same, so its results are too: where the old file is still in the arch
# folder, its hash is the one the manifest recorded, and it differs from the new text in comments,
# blank lines and the ARCH line only, its recorded results are taken for the new source.

def _code_lines(text: str, arch: str) -> list[str]:
    """What the compile reads of a kernel file: its lines less comments, blank lines and ARCH."""
    return [line for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and line != f'ARCH = "{arch}"']


def _legacy_sources(manifest: Path, texts: dict[str, str], arch: str) -> dict[str, str]:
    """stem -> the source_sha256 `manifest` recorded for an old per-arch file of the same code as
    texts[stem] (none where the manifest is of the shared layout, or the file is gone or changed)."""
    try:
        ops = json.loads(manifest.read_text())["ops"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    found = {}
    for stem, text in texts.items():
        record = ops.get(stem) if isinstance(ops, dict) else None
        if not isinstance(record, dict) or record.get("file") != contract.legacy_kernel_file(stem):
            continue
        old = manifest.parent / record["file"]
        try:
            data = old.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == record.get("source_sha256") \
                and _code_lines(data.decode(errors="replace"), arch) == _code_lines(text, arch):
            found[stem] = record["source_sha256"]
    return found


def damaged_manifest(manifest: Path, problem: str) -> str:
    return (f"{manifest}: {problem}. It records the compile results a build reuses: restore it (`git checkout -- "
            f"{manifest}` where it is committed), or pass --recompile to compile every config of the arch again "
            f"(minutes)")


def _compile(variants: list[KernelVariant], paths: dict[str, Path], arch: targets.Target, shas: dict[str, str],
             opts: BuildOptions, previous: dict[str, dict], progress,
             legacy: dict[str, str]) -> tuple[list[tuple[str, aot.Outcome]], int]:
    """(compile key, outcome) per variant, and how many were compiled (the rest were recorded).
    `paths`: stem -> its kernel file; `legacy`: stem -> the source hash an older layout's manifest
    recorded for the same code (_legacy_sources), whose results count as this source's."""
    import triton

    for op in sorted({v.op for v in variants}):  # a rendered file that does not import fails here, by name
        _import_path(paths[op], f"_kernelgen_check_{arch.name}_{op}")
    jobs = [aot.CompileJob(str(paths[v.op]), v.fn, v.signature, v.constexprs, v.num_warps, v.num_stages,
                           arch.arch, v.aligned_args, arch.warp_size, arch.backend) for v in variants]
    keys = [job.key(shas[v.op], triton.__version__) for job, v in zip(jobs, variants)]
    outcomes: dict[int, aot.Outcome] = {}
    for i, key in enumerate(keys):
        old = previous.get(key)
        if old is None and variants[i].op in legacy:
            old = previous.get(jobs[i].key(legacy[variants[i].op], triton.__version__))
        if not opts.recompile and old is not None:
            try:
                outcomes[i] = str(old["error"]) if "error" in old else aot.from_dict(old)
            except (KeyError, TypeError, ValueError):  # a damaged record: compile it again
                continue
            progress(f"{arch.name} {variants[i].key} (recorded)")
    todo = [i for i in range(len(jobs)) if i not in outcomes]
    fresh = aot.compile_all([jobs[i] for i in todo], opts.workers,
                            lambda k: progress(f"{arch.name} {variants[todo[k]].key} {variants[todo[k]].config}"
                                               f"{'' if variants[todo[k]].aligned else ' (unaligned sizes)'}"))
    outcomes.update(zip(todo, fresh))
    return [(keys[i], outcomes[i]) for i in range(len(jobs))], len(todo)


def _compile_record(v: KernelVariant, key: str, outcome: aot.Outcome) -> dict:
    """One compile of a config: which runtime case it is, and what it uses (or why it failed)."""
    row = {"specialisation": v.specialisation, "compile_key": key}
    row.update({"error": outcome} if isinstance(outcome, str) else aot.to_dict(outcome))
    return row


def _manifest_variant(compiles: list[tuple[KernelVariant, str, aot.Outcome]], verdict: prune.Verdict) -> dict:
    """A config's row: its verdict and its usual compile's resources at the top level (what the
    tuner reads); its other specialisations (weight dtypes, unaligned sizes) under "also"."""
    v, key, outcome = compiles[0]
    row = {"op": v.op, "kernel": v.kernel, "dtype": v.dtype, "config": dict(sorted(v.config.items())),
           "kept": verdict.kept, "reason": verdict.reason, **_compile_record(v, key, outcome)}
    if not isinstance(outcome, str):
        row["occupancy"] = verdict.occupancy
    if len(compiles) > 1:
        row["also"] = [_compile_record(*c) for c in compiles[1:]]
    return row


@dataclass(frozen=True)
class BuildRecord:
    """What an arch's build decided, read back from the manifest _build_arch wrote: the source hash of
    each kernel file and the pruning verdict of each compiled config (what the tuner measures)."""

    manifest: Path
    sources: dict[str, str]  # kernel file stem -> source_sha256
    verdicts: dict[tuple[str, str, str, str], prune.Verdict]  # (op, kernel, dtype, config_id) -> verdict

    def verdict(self, group: TuneGroup, config: dict) -> prune.Verdict | None:
        return self.verdicts.get((group.op, group.kernel, group.dtype, space.config_id(config)))


def build_record(tree: Path, arch: ArchOrTarget) -> BuildRecord | None:
    """The record of `tree`'s build of `arch`; None when it has no manifest."""
    path = tree / arch.name / contract.MANIFEST_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    sources = {op: f["source_sha256"] for op, f in data.get("ops", {}).items()}
    verdicts = {(v["op"], v["kernel"], v["dtype"], space.config_id(v["config"])):
                prune.Verdict(v["kept"], v["reason"], v.get("occupancy", 0.0)) for v in data.get("variants", [])}
    return BuildRecord(path, sources, verdicts)


def _config_ident(v: KernelVariant) -> tuple:
    return (v.op, v.kernel, v.dtype, space.config_id(v.config))


def _unaligned_verdict(verdict: prune.Verdict, outcomes: list[aot.Outcome]) -> prune.Verdict:
    """A chosen config must also compile for sizes that are not multiples of 16 (the JIT's fallback
    specialisation); how well it does there is recorded, not judged: such sizes are the rare case."""
    failed = [o for o in outcomes if isinstance(o, str)]
    if not failed:
        return verdict
    return prune.Verdict(False, f"does not compile for sizes that are not multiples of 16: {failed[0]}", 0.0)


def _choose(groups, verdicts, db, shas, arch: targets.Target) -> tuple[list, list[dict], list[tuple[str, type]]]:
    """Per group: the tuned winner from the DB if there is one, else the static choice. Returns the
    warnings to give as (message, category): the build may choose again before it is done."""
    import triton

    sources = {g.key: shas[g.op] for g in groups}
    stale = tunedb.stale_groups(db, sources)
    notes = []
    if stale:
        notes.append((f"{len(stale)} tuning groups of {arch.name} in the database were measured on other kernel "
                      f"sources (templates or specs changed since), e.g. {'/'.join(stale[0])}: they get static "
                      f"configs until `kernelgen tune --arch {arch.name}` measures them again", tunedb.TuneDBWarning))
    baked, rows, spilling = [], [], []
    for g in groups:
        def verdict_of(c, g=g):
            return verdicts[(g.op, g.kernel, g.dtype, space.config_id(c))]

        ranked = prune.measuring_order(list(g.candidates), verdict_of)
        static = ranked[0] if ranked else None
        if static is None:
            static = prune.least_spilling(list(g.candidates), verdict_of)
            if static is None:
                reasons = sorted({verdict_of(space.compile_part(c)).reason for c in g.candidates})
                raise BuildError(f"{g.op}.{g.kernel}[{g.dtype}] for {arch.name}, bucket {g.bucket}: no config "
                                 f"compiles: {'; '.join(reasons)}")
            spilling.append(f"{g.op}.{g.kernel}[{g.dtype}] {g.bucket}")
        tuned = tunedb.tuned_choice(db, g.key, sources[g.key], ranked, static, triton.__version__)
        row = {"op": g.op, "kernel": g.kernel, "dtype": g.dtype, "bucket": g.bucket, "static": static,
               "kept": len(ranked), "candidates": len(g.candidates)}
        if tuned is None:
            chosen, note = static, "static"
        else:
            chosen = tuned.config
            speedup = f" {tuned.static_ms / tuned.ms:.2f}x" if tuned.static_ms else ""
            note = f"tuned{speedup}"
            row.update(tuned=chosen, ms=tuned.ms, static_ms=tuned.static_ms, gpu=tuned.key.gpu, triton=tuned.key.triton)
        baked.append((g, chosen, note))
        rows.append(row)
    if spilling:
        notes.append((f"{arch.name}: every candidate config spills registers for {len(spilling)} kernel buckets, "
                      f"e.g. {spilling[0]}; built with the least spilling one (widen the space in "
                      f"templates/*.space.toml)", BuildWarning))
    return baked, rows, notes


def _tuned_with(rows: list[dict]) -> str:
    sets = sorted({f"{r['gpu']}, Triton {r['triton']}" for r in rows if "gpu" in r})
    return "measured on " + "; ".join(sets) if sets else ""


def _json_rows(data: dict, row_keys: tuple[str, ...]) -> str:
    """Indented JSON whose long lists (variants, choices) hold one compact object per line: diff-able."""
    head = json.dumps({k: v for k, v in data.items() if k not in row_keys}, indent=2, sort_keys=True)
    parts = []
    for k in sorted(row_keys):
        rows = ",\n".join("    " + json.dumps(r, sort_keys=True) for r in data[k])
        parts.append(f'  "{k}": [\n{rows}\n  ]')
    return head[:-2] + ",\n" + ",\n".join(parts) + "\n}\n"


def _build_arch(specs: list[Spec], arch: targets.Target, dest: Path, progress, fams: tuple[Family, ...], opts: BuildOptions,
                previous_manifest: Path | None) -> int:
    """Build one arch into `dest`; returns how many kernels it compiled (not reused)."""
    import triton

    dest.mkdir(parents=True)
    files, paths, texts = {}, {}, {}
    for family in fams:
        for source in family.sources(specs, arch):
            data = source.text.encode()
            sha = hashlib.sha256(data).hexdigest()
            rel = contract.kernel_file(contract.kernel_name(source.stem, sha))
            paths[source.stem] = path = dest.parent / rel  # the stage's kernels/, shared by its archs
            if not path.is_file():
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
            files[source.stem] = {"file": rel, **source.record, "source_sha256": sha}
            texts[source.stem] = source.text
    shas = {op: f["source_sha256"] for op, f in files.items()}
    groups = tune_groups(specs, arch, fams)
    configs = {_config_ident(vs[0]): vs for vs in families.variants(groups)}
    previous = {} if opts.recompile or previous_manifest is None else _previous_results(previous_manifest,
                                                                                         triton.__version__)
    legacy = {} if not previous else _legacy_sources(previous_manifest, texts, arch.name)
    # Every config, compiled as launched with sizes that are multiples of 16 (each weight dtype):
    # pruning and ranking judge these, the kernels that run in the common case.
    flat = [v for vs in configs.values() for v in vs]
    compiled, n_compiled = _compile(flat, paths, arch, shas, opts, previous, progress, legacy)
    results = iter(zip(flat, compiled))
    compiles = {ident: [(v, key, outcome) for v, (key, outcome) in (next(results) for _ in vs)]
                for ident, vs in configs.items()}
    verdicts = {ident: prune.combine([_judge(arch, v.num_warps, outcome) for v, _, outcome in c])
                for ident, c in compiles.items()}
    db = tunedb.load_or_warn(tunedb.db_path(opts.db_dir, arch.name), arch.name) if opts.db_dir else tunedb.TuneDB(arch.name)
    # The configs chosen must also compile for other sizes (the JIT's unaligned specialisation); one
    # that does not is dropped and its groups choose again.
    unaligned_done: set[tuple] = set()
    while True:
        baked, choices, notes = _choose(groups, verdicts, db, shas, arch)
        todo = sorted({(g.op, g.kernel, g.dtype, space.config_id(space.compile_part(chosen)))
                       for g, chosen, _ in baked} - unaligned_done)
        if not todo:
            break
        extra = [v.unaligned() for ident in todo for v in configs[ident]]
        done, n = _compile(extra, paths, arch, shas, opts, previous, progress, legacy)
        n_compiled += n
        results = iter(zip(extra, done))
        for ident in todo:
            fallback = [(v, key, outcome) for v, (key, outcome) in (next(results) for _ in configs[ident])]
            compiles[ident] += fallback
            verdicts[ident] = _unaligned_verdict(verdicts[ident], [outcome for _, _, outcome in fallback])
        unaligned_done.update(todo)
    for message, category in notes:
        warnings.warn(message, category, stacklevel=3)
    rows = [_manifest_variant(compiles[ident], verdicts[ident]) for ident in configs]
    kernel_files = {stem: contract.kernel_name(stem, sha) for stem, sha in shas.items()}
    (dest / contract.CONFIGS_FILE).write_text(render.render_configs(arch, baked, _tuned_with(choices), kernel_files))
    manifest = {
        "arch": arch.name,
        "vendor": arch.vendor,
        "capability": arch.arch,
        "reference_gpu": arch.reference_gpu,
        "compiled_with": {"triton": triton.__version__, "integer_args": "i32", "pointer_alignment": 16,
                          "candidates": "every config of the spaces" if arch.explores_space else "the static configs only",
                          "specialisations": "each config as launched with sizes that are multiples of 16 (pruned "
                                             "and ranked on those, every weight dtype); chosen ones also for any "
                                             "size (\"also\")"},
        "spaces": {f.name: f.space_file for f in families.ALL},
        "ops": files,
        "pruning": {"compiled": sum(1 + len(r.get("also", ())) for r in rows), "kept": sum(r["kept"] for r in rows),
                    "dropped": sum(not r["kept"] for r in rows)},
        "variants": sorted(rows, key=lambda r: (r["op"], r["kernel"], r["dtype"], space.config_id(r["config"]))),
        "choices": choices,
    }
    (dest / contract.MANIFEST_FILE).write_text(_json_rows(manifest, ("choices", "variants")))
    return n_compiled


def _stage(specs: list[Spec], archs: list[ArchOrTarget], stage: Path, progress, fams: tuple[Family, ...], opts: BuildOptions,
           previous: Path) -> int:
    import triton

    archs = [targets.of(a) for a in archs]  # compiling needs the target (backend, vendor); build/check read .name only
    if not opts.recompile:
        for arch in archs:  # every damaged manifest is reported before the first compile, not minutes later
            manifest = previous / arch.name / contract.MANIFEST_FILE
            _previous_results(manifest, triton.__version__)
            if (previous / arch.name).is_dir() and not manifest.is_file():
                warnings.warn(f"{manifest} is missing: every config of {arch.name} is compiled again (minutes)",
                              BuildWarning, stacklevel=3)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / MARKER).write_text(MARKER_TEXT)
    (stage / "__init__.py").write_text(TREE_DOC)
    (stage / contract.OPS_FILE).write_text(render.render_ops(specs))
    (stage / contract.CPU_FILE).write_text(render.render_cpu(specs))
    (stage / contract.KERNELS_DIR).mkdir()
    return sum(_build_arch(specs, arch, stage / arch.name, progress, fams, opts, previous / arch.name / contract.MANIFEST_FILE)
               for arch in archs)


# --- public entry points -----------------------------------------------------------------------

def build(specs: list[Spec], archs: list[ArchOrTarget], out: Path, progress=lambda msg: None,
          fams: tuple[Family, ...] = families.ALL, opts: BuildOptions | None = None) -> int:
    """Build into `out`. Nothing in `out` changes unless every render and compile succeeded; then
    each arch folder is swapped in so that a kill at any point leaves a complete arch (_swap_in).
    `out` must be new, empty or a kernelgen tree (it holds MARKER). `fams`: the kernel families to
    build (families.for_tree(builtin=False) for a user's tree of their own activations). Compile
    results `out`'s manifests recorded for the same source, config and Triton are reused; returns
    how many kernels were compiled afresh."""
    opts = opts or BuildOptions()
    if not specs:
        raise BuildError("no specs to build")
    out = Path(out)
    _refuse_foreign_out(out)
    _refuse_builtin_out(specs, out, fams)
    _refuse_foreign_files_in_archs(out, archs, specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_stages(out)
    if out.is_dir():
        recover_swaps(out)  # an earlier build killed mid-swap: its manifests are the ones to reuse
    prefix = f".{out.name}-stage-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=out.parent) as tmp:
        stage = Path(tmp) / "tree"
        n_compiled = _stage(specs, archs, stage, progress, fams, opts, out)
        _install(stage, out, [a.name for a in archs])
    return n_compiled


def is_kernelgen_tree(folder: Path) -> bool:
    """Holds MARKER, or is a tree built before the marker existed (its __init__.py is TREE_DOC, and it
    has the ops.py kernelgen writes)."""
    if (folder / MARKER).is_file():
        return True
    try:
        return (folder / "__init__.py").read_text() == TREE_DOC and \
            (folder / contract.OPS_FILE).read_text().startswith("# Generated by kernelgen")
    except (OSError, UnicodeDecodeError):
        return False


def _refuse_foreign_out(out: Path) -> None:
    """A build replaces files of `out`: only a kernelgen tree's, never a folder of the user's."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} is a file, not a folder: choose another --out for the generated tree")
    if out.is_dir() and any(out.iterdir()) and not is_kernelgen_tree(out):
        raise BuildError(f"{out} is not empty and is not a kernelgen tree (it has no {MARKER}): a build would "
                         f"replace files there. Choose a new or empty folder for --out, or move {out} away first")


def _refuse_builtin_out(specs: list[Spec], out: Path, fams: tuple[Family, ...]) -> None:
    """generated/ of the checkout is the tree lowmem_ops ships: a build of other specs (or without
    every family, e.g. the norms) would delete its kernels."""
    builtin = default_out()
    if builtin is None or out.resolve() != builtin.resolve():
        return
    ours = sorted((s.name, s.sha256) for s in spec_mod.load_builtin())
    if set(fams) != set(families.ALL) or sorted((s.name, s.sha256) for s in specs) != ours:
        raise BuildError(f"{out} is the built-in tree of lowmem_ops: a tree of other specs would replace its "
                         "kernels. Build into a folder of your own (--out kernels) and load it with lo.load")


def _refuse_foreign_files_in_archs(out: Path, archs: list[ArchOrTarget], specs: list[Spec]) -> None:
    """A rebuilt arch folder replaces the old one whole: files in it that no build wrote (what its
    manifest lists, or what this build writes) would be deleted, so they stop the build first."""
    for arch in archs:
        folder = out / arch.name
        if not folder.is_dir():
            continue
        ours = {"__init__.py", contract.CONFIGS_FILE, contract.MANIFEST_FILE, "__pycache__"}
        # what an older build kept in arch folders: its __init__.py and kernel files
        ours |= {contract.legacy_kernel_file(stem) for f in families.ALL for stem in f.stems(specs)}
        try:
            ours |= {str(f.get("file")) for f in json.loads((folder / contract.MANIFEST_FILE).read_text())["ops"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged manifest is reported on its own (_previous_results)
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
        if foreign:
            raise BuildError(f"{folder} holds files no kernelgen build wrote ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}): a build replaces that folder whole. Move "
                             "them out of it, then build again")


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


def _install(stage: Path, out: Path, arch_names: list[str]) -> None:
    """Move the staged files into `out` so that a kill at any point leaves every arch folder's
    configs.py naming kernel files that exist: first the kernel files (each by atomic rename; an
    existing file of the same content name stays), then each arch folder by _swap_in, and only then
    are the kernel files no arch folder uses any more removed (collect_kernels)."""
    out.mkdir(exist_ok=True)
    for name in TOP_FILES:
        os.replace(stage / name, out / name)
    kernels = out / contract.KERNELS_DIR
    kernels.mkdir(exist_ok=True)
    for staged in sorted((stage / contract.KERNELS_DIR).iterdir()):
        target = kernels / staged.name
        if not (target.is_file() and filecmp.cmp(staged, target, shallow=False)):  # edited by hand: replaced
            os.replace(staged, target)
    for arch in arch_names:
        _swap_in(stage / arch, out, arch)
    collect_kernels(out)


def _kernel_files_of(configs: Path) -> dict[str, str]:
    """configs.py's KERNEL_FILES, read without running the file ({} for a tree built before it)."""
    tree = ast.parse(configs.read_bytes(), str(configs))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [contract.KERNEL_FILES]:
            files = ast.literal_eval(node.value)
            if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
                raise ValueError(f"{configs}: {contract.KERNEL_FILES} is not a dict of names")
            return files
    return {}


def used_kernels(out: Path, skip: tuple[str, ...] = ()) -> set[str] | None:
    """The kernel names the configs.py of `out`'s arch folders (swap siblings included) name, less
    those of the folders in `skip`; None if one of them cannot be read (then no file is unused)."""
    used = set()
    for folder in sorted(out.iterdir()):
        configs = folder / contract.CONFIGS_FILE
        if folder.name in skip or folder.name == contract.KERNELS_DIR or not configs.is_file():
            continue
        try:
            used |= set(_kernel_files_of(configs).values())
        except (OSError, ValueError, SyntaxError):
            return None
    return used


def unused_kernels(out: Path, used: set[str] | None) -> list[Path]:
    """The content-named files of out/kernels/ (their compiled copies aside) whose names are not in `used`."""
    folder = out / contract.KERNELS_DIR
    if used is None or not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.suffix == ".py" and _KERNEL_NAME.fullmatch(p.stem)
            and p.stem not in used]


_KERNEL_NAME = re.compile(rf"[a-z][a-z0-9_]*_[0-9a-f]{{{contract.KERNEL_HASH_CHARS}}}")


def collect_kernels(out: Path) -> None:
    """Remove the kernel files (and their __pycache__ copies) no arch folder of `out` uses; every
    other file of kernels/ stays. Nothing is removed when a configs.py cannot be read."""
    for path in unused_kernels(out, used_kernels(out)):
        path.unlink()
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            pyc.unlink()


def _incoming(out: Path, arch: str) -> Path:
    return out / f".{arch}.incoming"


def _outgoing(out: Path, arch: str) -> Path:
    return out / f".{arch}.outgoing"


def _swap_in(staged: Path, out: Path, arch: str) -> None:
    """Replace out/<arch> with the complete folder `staged` so that a kill at any point leaves a
    complete arch: the new folder first becomes the sibling .<arch>.incoming (one rename), then
    trades places with <arch> in one atomic exchange where the OS has one (Linux renameat2). Else
    <arch> moves aside to .<arch>.outgoing and .incoming takes its name: a kill between those two
    renames leaves <arch> missing and both siblings complete. The runtime then uses a sibling
    (lowmem_ops/_tree.py, arch_folders), and the next build finishes the swap (recover_swaps)."""
    target, incoming, outgoing = out / arch, _incoming(out, arch), _outgoing(out, arch)
    os.rename(staged, incoming)
    if not target.exists():
        os.rename(incoming, target)
    elif _exchange(incoming, target):
        shutil.rmtree(incoming)  # the old arch now
    else:
        os.rename(target, outgoing)
        os.rename(incoming, target)
        shutil.rmtree(outgoing)


def recover_swaps(out: Path) -> None:
    """Finish what a build killed inside _swap_in left: where <arch> is missing, the sibling that was
    coming in takes its name (else the one going out comes back); every other sibling is removed."""
    for sibling in sorted(out.glob(".*.incoming")) + sorted(out.glob(".*.outgoing")):
        arch = sibling.name[1:].rsplit(".", 1)[0]
        target = out / arch
        if sibling.is_dir() and not target.exists():
            os.rename(sibling, target)
        elif sibling.is_dir():
            shutil.rmtree(sibling)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS, the C library
    or the file system has no such call, and the caller swaps by two renames."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def check(specs: list[Spec], archs: list[ArchOrTarget], out: Path, progress=lambda msg: None,
          fams: tuple[Family, ...] = families.ALL, opts: BuildOptions | None = None) -> list[str]:
    """Rebuild into a scratch folder and compare with `out`. Returns the problems (empty: fresh).
    With opts.recompile the compile results are redone, not taken from `out`'s manifests."""
    opts = opts or BuildOptions()
    out = Path(out)
    problems = _missing_or_damaged(archs, out)
    if problems:  # at once: a rebuild to compare with would take minutes and cannot come out fresh
        return problems
    with tempfile.TemporaryDirectory(prefix="kernelgen-check-") as tmp:
        stage = Path(tmp) / "tree"
        _stage(specs, archs, stage, progress, fams, opts, out)
        wanted = list(TOP_FILES) + [
            str(p.relative_to(stage)) for a in archs for p in sorted((stage / a.name).iterdir())
        ] + [str(p.relative_to(stage)) for p in sorted((stage / contract.KERNELS_DIR).iterdir())]
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
        # what the build would remove: the kernel files neither the checked archs nor the others use
        others = used_kernels(out, skip=tuple(a.name for a in archs))
        used = None if others is None else others | {p.stem for p in (stage / contract.KERNELS_DIR).iterdir()}
        problems += [f"{path}: used by no arch folder (stale leftover: a build removes it)"
                     for path in unused_kernels(out, used)]
        return problems


def _missing_or_damaged(archs: list[ArchOrTarget], out: Path) -> list[str]:
    """The arch folders and manifests of `out` that are missing or unreadable."""
    import triton

    problems = [f"{sibling}: left by a build that was stopped while it swapped an arch folder in: run the build "
                "again to finish it" for sibling in sorted(out.glob(".*.incoming")) + sorted(out.glob(".*.outgoing"))]
    for a in archs:
        manifest = out / a.name / contract.MANIFEST_FILE
        if not (out / a.name).is_dir():
            problems.append(f"{out / a.name}: missing (not built: run `kernelgen build --arch {a.name}`)")
        elif not manifest.is_file():
            problems.append(f"{manifest}: missing: restore it (`git checkout -- {manifest}` where it is committed), "
                            f"or rebuild with `kernelgen build --arch {a.name} --recompile`")
        else:
            try:
                _previous_results(manifest, triton.__version__)
            except BuildError as err:
                problems.append(str(err))
    return problems


def _checkout() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else None


def default_out() -> Path | None:
    """generated/ beside kernelgen/ in a checkout (what lowmem_ops loads there), else None."""
    return _checkout() / "generated" if _checkout() else None


def default_db_dir() -> Path | None:
    """tune/db/ of a checkout, else None."""
    return _checkout() / "tune" / "db" if _checkout() else None
