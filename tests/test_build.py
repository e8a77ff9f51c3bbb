"""kernelgen build: deterministic, atomic, every variant compiled ahead of time, stale trees caught."""

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from kernelgen import archs, build, cli, spec, targets
from kernelgen.families import activation
from lowmem_ops import _tree

from . import reference as ref
from .test_spec import GOOD

REPO = Path(__file__).resolve().parent.parent


def snapshot(tree: Path) -> dict:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _copy_of_committed(dest: Path) -> Path:
    """A copy of generated/: builds into it reuse the compile results its manifests recorded."""
    shutil.copytree(REPO / "generated", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def sm80_tree(tmp_path_factory):
    out = _copy_of_committed(tmp_path_factory.mktemp("tree") / "generated")
    build.build(spec.load_builtin(), archs.resolve("sm80"), out)
    return out


def test_build_is_deterministic_and_complete(sm80_tree, tmp_path):
    again = _copy_of_committed(tmp_path / "generated")
    build.build(spec.load_builtin(), archs.resolve("sm80"), again)
    assert snapshot(again) == snapshot(sm80_tree)  # byte-identical
    manifest = json.loads((sm80_tree / "sm80" / "manifest.json").read_text())
    specs = spec.load_builtin()
    names = {s.name for s in specs}
    assert set(manifest["ops"]) == names | {"ms_norm", "dropout", "add_norm"}
    acts = [v for v in manifest["variants"] if v["op"] in names]
    kernels = sum(len(activation.kernels_of(s)) for s in specs)
    # per kernel and dtype: the 3 vectors x 2 warps of the space, which holds the static config
    assert len(acts) == kernels * 3 * 6
    assert len({(v["op"], v["kernel"], v["dtype"], json.dumps(v["config"], sort_keys=True)) for v in manifest["variants"]}) \
        == len(manifest["variants"])
    for v in manifest["variants"]:
        assert 0 < v["registers"] <= 255 and v["reason"], v
        assert (0 < v["occupancy"] <= 1) if v["kept"] else v["reason"].startswith(("spills", "needs", "does not")), v
    # every bucket of every kernel got a config, and it is one that survived pruning
    kept = {(v["op"], v["kernel"], v["dtype"], json.dumps(v["config"], sort_keys=True)) for v in manifest["variants"] if v["kept"]}
    for c in manifest["choices"]:
        compiled = {k: v for k, v in c["static"].items() if k != "PROGRAMS_PER_SM"}
        assert (c["op"], c["kernel"], c["dtype"], json.dumps(compiled, sort_keys=True)) in kept, c
    text = (sm80_tree / manifest["ops"]["regelu2"]["file"]).read_text()
    assert "/work/" not in text and str(REPO) not in text  # no absolute paths


def test_failed_build_leaves_previous_tree_intact(sm80_tree, monkeypatch):
    import triton

    before = snapshot(sm80_tree)

    def broken(src, *args, **kwargs):
        raise RuntimeError("out of resources (simulated)")

    monkeypatch.setattr(triton, "compile", broken)
    with pytest.raises(build.BuildError) as err:  # compiled in this process, so the patch applies
        build.build(spec.load_builtin(), archs.resolve("sm80"), sm80_tree, opts=build.BuildOptions(recompile=True))
    msg = str(err.value)
    first = spec.load_builtin()[0].name
    assert f"{first}.forward[float32] for sm80, bucket n<=65536: no config compiles" in msg
    assert "does not compile: RuntimeError: out of resources (simulated)" in msg
    assert snapshot(sm80_tree) == before
    assert not [p for p in sm80_tree.parent.iterdir() if "stage" in p.name]  # no scratch left behind


def test_check_detects_stale_and_leftover_files(sm80_tree, tmp_path, capsys):
    tree = tmp_path / "copy"
    for rel, data in snapshot(sm80_tree).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    assert cli.main(["build", "--arch", "sm80", "--check", "--out", str(tree)]) == 0
    src = _tree.kernel_path(tree, "sm80", "resilu2")[0]
    src.write_text(src.read_text().replace("1.0403218", "1.0403219"))
    (tree / "sm80" / "old_op.py").write_text("")
    unused = tree / "kernels" / "old_op_0123456789ab.py"
    unused.write_text("")
    (tree / "kernels" / "notes.txt").write_text("not a kernel file: left alone by builds and checks")
    assert cli.main(["build", "--arch", "sm80", "--check", "--out", str(tree)]) == 1
    err = capsys.readouterr().err
    assert f"{src}: stale" in err and "old_op.py: not produced by any spec" in err
    assert f"{unused}: used by no arch folder" in err and "notes.txt" not in err
    (tree / "kernels" / _tree.kernel_path(tree, "sm80", "regelu2")[0].name).unlink()
    assert cli.main(["build", "--arch", "sm80", "--check", "--out", str(tree)]) == 1
    assert f"regelu2_{_hash_of(tree, 'sm80', 'regelu2')}.py: missing" in capsys.readouterr().err


def _hash_of(tree: Path, arch: str, stem: str) -> str:
    """The content hash in the name of the kernel file `arch` of `tree` uses for `stem`."""
    return _tree.kernel_path(tree, arch, stem)[0].stem.rsplit("_", 1)[1]


def test_committed_tree_is_fresh_for_every_arch():
    """What CI checks too: generated/ equals a fresh build for every shipped arch, NVIDIA and AMD:
    every file rendered again, pruning and choices redone from the compile results the manifests
    recorded (test_tuning compiles a sample of those again to check them)."""
    problems = build.check(spec.load_builtin(), targets.resolve("all"), REPO / "generated")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("argv, needle", [
    (["build", "--arch", "sm75"], "unknown target sm75; choose from sm80, sm86, sm89, sm90, sm100, gfx942, gfx90a, "
                                  "gfx1100 or all"),
    (["build", "--arch", "sm80", "--spec", "/nonexistent/x.toml"], "/nonexistent/x.toml: cannot read spec"),
])
def test_cli_errors_exit_nonzero(argv, needle, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path / "t")]) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_cli_list_shows_ops(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "regelu2" in out and "resilu2" in out and "0.0095093" in out


def test_users_own_spec_builds_and_runs(tmp_path):
    """A user's spec, built into a tree of their own, loads and trains through the interpreter."""
    import lowmem_ops as lo

    path = tmp_path / "softsign2.toml"
    path.write_text(GOOD.replace('"myact"', '"softsign2"').replace('"x * sigmoid(x)"', '"x / (1 + abs(x))"'))
    out = tmp_path / "my_kernels"
    assert cli.main(["build", "--arch", "sm90", "--spec", str(path), "--out", str(out)]) == 0
    assert lo.load(out) == ["softsign2"]
    x = torch.linspace(-3, 3, 50, requires_grad=True)
    with ref.backend("triton-interpret"):
        y = lo.approx_activation(x, "softsign2")
        y.sum().backward()
    torch.testing.assert_close(y, x.detach() / (1 + x.detach().abs()))
    want = torch.tensor([0.0, 0.25, 0.75, 1.0])[(x.detach()[:, None] > torch.tensor([-1.0, 0.0, 1.0])).sum(1)]
    assert torch.equal(x.grad, want)


def test_leftovers_of_crashed_builds_are_swept(tmp_path):
    out = tmp_path / "generated"
    dead = tmp_path / ".generated-stage-999999999-abc"  # no such process
    mine = tmp_path / f".generated-stage-{__import__('os').getpid()}-live"  # a running build's
    for d in (dead, mine):
        (d / "tree").mkdir(parents=True)
    build._sweep_dead_stages(out)
    assert not dead.exists() and mine.exists()


# --- the shared kernels/ folder -----------------------------------------------------------------------

def _arch_dirs(tree: Path) -> list[Path]:
    return sorted(p for p in tree.iterdir() if (p / "configs.py").is_file())


def test_arch_folders_share_one_arch_free_file_per_kernel():
    """Each kernel's text is rendered once: one content-named file that every arch folder's configs.py
    names; an arch folder holds its configs and build record only."""
    tree = REPO / "generated"
    dirs = _arch_dirs(tree)
    assert {d.name for d in dirs} == set(targets.TARGETS)
    stems = {s.name for s in spec.load_builtin()} | {"ms_norm", "dropout", "add_norm"}
    for d in dirs:
        assert sorted(p.name for p in d.iterdir() if p.name != "__pycache__") == ["configs.py", "manifest.json"]
        assert set(build._kernel_files_of(d / "configs.py")) == stems
    used = {_tree.kernel_path(tree, d.name, stem)[0] for d in dirs for stem in stems}
    assert len(used) == len(stems)  # one file per stem, whatever the arch
    assert used == set((tree / "kernels").glob("*.py"))
    for path in used:
        data = path.read_bytes()
        assert path.stem.endswith("_" + hashlib.sha256(data).hexdigest()[:12])
        assert not re.search(rb"^ARCH = |^# Generated by kernelgen .*\bfor ", data, re.M), path  # no arch named


def _two_arch_copy(dest: Path) -> Path:
    """generated/ with sm80 and sm90 only, sm90 using an older regelu2 text (a file of its own)."""
    src = REPO / "generated"
    dest.mkdir(parents=True)
    for name in (build.MARKER, "__init__.py", "ops.py", "cpu_kernels.cpp"):
        shutil.copy(src / name, dest / name)
    for name in ("kernels", "sm80", "sm90"):
        shutil.copytree(src / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    current = _tree.kernel_path(src, "sm90", "regelu2")[0]
    older = current.read_text() + "# an older build's text\n"
    older_name = "regelu2_" + hashlib.sha256(older.encode()).hexdigest()[:12]
    (dest / "kernels" / f"{older_name}.py").write_text(older)
    configs = dest / "sm90" / "configs.py"
    configs.write_text(configs.read_text().replace(f"'{current.stem}'", f"'{older_name}'"))
    return dest


def test_building_some_archs_keeps_the_files_the_others_use(tmp_path):
    """kernels/ loses a file only when no arch folder names it: a build of sm80 leaves the file sm90
    still uses; the build of sm90 then removes it."""
    tree = _two_arch_copy(tmp_path / "generated")
    older = _tree.kernel_path(tree, "sm90", "regelu2")[0]
    assert older != _tree.kernel_path(tree, "sm80", "regelu2")[0]
    specs = spec.load_builtin()
    assert build.build(specs, archs.resolve("sm80"), tree) == 0
    assert older.is_file()
    assert build.check(specs, archs.resolve("sm80"), tree) == []  # what sm90 uses is no leftover
    assert build.build(specs, archs.resolve("sm90"), tree) == 0
    assert not older.exists()
    assert sorted(p.name for p in (tree / "kernels").glob("*.py")) == \
        sorted(p.name for p in (REPO / "generated" / "kernels").glob("*.py"))
    assert build.check(specs, [archs.ARCHS["sm80"], archs.ARCHS["sm90"]], tree) == []


def _legacy(tree: Path, arch: str, keys: dict) -> None:
    """Turn `tree`'s `arch` into what kernelgen built before kernels/ existed: a package holding its own
    copy of each kernel file, naming the arch in its header and in `ARCH = "<arch>"`, no KERNEL_FILES,
    and a manifest whose compile keys hash those copies. `keys`: compile key -> (job, source hash)."""
    folder = tree / arch
    manifest = json.loads((folder / "manifest.json").read_text())
    old_sha = {}
    for stem, name in build._kernel_files_of(folder / "configs.py").items():
        lines = (tree / "kernels" / f"{name}.py").read_text().splitlines(keepends=True)
        lines[0] = lines[0].replace(" -- do not edit", f" for {arch} -- do not edit")
        at = next(i for i, line in enumerate(lines) if line.startswith("import triton.language as tl")) + 1
        text = "".join(lines[:at] + [f'\nARCH = "{arch}"\n'] + lines[at:])
        (folder / f"{stem}.py").write_text(text)
        new_sha = manifest["ops"][stem]["source_sha256"]
        old_sha[new_sha] = hashlib.sha256(text.encode()).hexdigest()
        manifest["ops"][stem].update(file=f"{stem}.py", source_sha256=old_sha[new_sha])
    for row in manifest["variants"] + [a for v in manifest["variants"] for a in v.get("also", ())]:
        job, sha = keys[row["compile_key"]]
        row["compile_key"] = job.key(old_sha[sha], manifest["compiled_with"]["triton"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    configs = folder / "configs.py"
    configs.write_text(re.sub(r"\n# The Triton kernel file.*?\n}\n", "", configs.read_text(), flags=re.S))
    (folder / "__init__.py").write_text(build.TREE_DOC)


def test_tree_of_an_older_kernelgen_runs_and_rebuilds_without_compiling(tmp_path, monkeypatch):
    """A tree built before kernels/ (each arch folder its own kernel files) still loads; a rebuild moves it
    to the shared layout reusing every recorded result: the old files differ in comments and ARCH only."""
    import lowmem_ops as lo
    from kernelgen import aot

    tree = _copy_of_committed(tmp_path / "generated")
    keys, key = {}, aot.CompileJob.key

    def recording(job, sha, triton):  # which compile each recorded key stands for
        keys[key(job, sha, triton)] = (job, sha)
        return key(job, sha, triton)

    specs, sm80 = spec.load_builtin(), archs.resolve("sm80")
    with monkeypatch.context() as m:
        m.setattr(aot.CompileJob, "key", recording)
        build.build(specs, sm80, tree)
    for d in _arch_dirs(tree):
        if d.name != "sm80":
            shutil.rmtree(d)
    _legacy(tree, "sm80", keys)
    shutil.rmtree(tree / "kernels")
    assert _tree.kernel_path(tree, "sm80", "regelu2")[0] == tree / "sm80" / "regelu2.py"
    monkeypatch.setitem(_tree._ops, "regelu2", dataclasses.replace(_tree.get_op("regelu2"), tree=tree))
    x = torch.linspace(-4, 4, 64, requires_grad=True)
    with ref.backend("triton-interpret"):
        y = lo.regelu2(x)
        y.sum().backward()
    torch.testing.assert_close(y.double(), ref.forward("regelu2", x))
    torch.testing.assert_close(x.grad.double(), ref.grad("regelu2", x, torch.ones_like(x)))

    assert build.build(specs, sm80, tree) == 0  # every result recorded for the old copies is reused
    assert sorted(p.name for p in (tree / "sm80").iterdir()) == ["configs.py", "manifest.json"]
    assert build.check(specs, sm80, tree) == []
    for name in ("sm80/configs.py", "sm80/manifest.json"):
        assert (tree / name).read_bytes() == (REPO / "generated" / name).read_bytes(), name


def test_old_kernel_copies_count_as_the_same_source_only_for_the_same_code(tmp_path):
    """_legacy_sources: the recorded results of an old per-arch file are taken for the new text when it
    is the file the manifest recorded and its code lines are the new text's; not when code differs."""
    new = "# Generated by kernelgen -- do not edit\nimport triton\n\nX = 1\n"
    cases = {"same": '# Generated by kernelgen for sm80 -- do not edit\nimport triton\nARCH = "sm80"\n\nX = 1\n',
             "code": '# Generated by kernelgen for sm80 -- do not edit\nimport triton\nARCH = "sm80"\n\nX = 2\n',
             "arch": '# Generated by kernelgen for sm80 -- do not edit\nimport triton\nARCH = "sm90"\n\nX = 1\n',
             "edited": '# Generated by kernelgen for sm80 -- do not edit\nimport triton\n\nX = 1\n'}
    ops = {}
    for stem, text in cases.items():
        (tmp_path / f"{stem}.py").write_text(text)
        ops[stem] = {"file": f"{stem}.py", "source_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (tmp_path / "edited.py").write_text(cases["edited"] + "# edited after the build\n")  # not what was recorded
    ops["shared"] = {"file": "kernels/shared_0123456789ab.py", "source_sha256": "0" * 64}  # already the new layout
    (tmp_path / "manifest.json").write_text(json.dumps({"ops": ops}))
    found = build._legacy_sources(tmp_path / "manifest.json", {stem: new for stem in [*cases, "shared"]}, "sm80")
    assert found == {"same": ops["same"]["source_sha256"]}
