"""kernelgen build never costs a user files: a user's specs never go into the built-in tree, a folder
that is not a kernelgen tree is refused, and an arch folder is swapped in so that a build killed at
any step leaves a complete arch that the runtime uses and the next build finishes."""

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import lowmem_ops  # noqa: F401  (registers the built-in ops)
from kernelgen import archs, build, cli, families, spec
from lowmem_ops import _tree

from . import reference as ref
from .test_build import REPO, snapshot
from .test_spec import GOOD

COMMITTED = REPO / "generated"


def small_copy(dest: Path, arch_names=("sm80",)) -> Path:
    """generated/ with only some archs: builds into it reuse the compile results of its manifests."""
    dest.mkdir(parents=True)
    for name in (build.MARKER, "__init__.py", "ops.py"):
        shutil.copy(COMMITTED / name, dest / name)
    shutil.copytree(COMMITTED / "kernels", dest / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for arch in arch_names:
        shutil.copytree(COMMITTED / arch, dest / arch, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def user_spec(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(GOOD.replace('"myact"', f'"{name}"'))
    return path


# --- 1. a user's specs never go into generated/ -----------------------------------------------------

@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """build.default_out() pointed at a copy of generated/, so the real one is never at risk."""
    tree = small_copy(tmp_path / "checkout" / "generated")
    monkeypatch.setattr(build, "default_out", lambda: tree)
    return tree


def test_spec_without_out_builds_into_kernels_not_the_builtin_tree(fake_builtin, tmp_path, monkeypatch):
    """Where the build goes (test_build's test_users_own_spec_builds_and_runs builds such a tree for real)."""
    chosen = []
    monkeypatch.setattr(build, "build", lambda specs, archs, out, *a, **k: chosen.append(Path(out)) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["build", "--arch", "sm80", "--spec", str(user_spec(tmp_path, "lw_own1"))]) == 0
    assert chosen == [Path("kernels")]  # ./kernels, as `kernelgen new`
    assert cli.main(["build", "--arch", "sm80"]) == 0
    assert chosen[1] == fake_builtin  # the built-in specs still default to generated/


def test_empty_out_is_refused(fake_builtin, tmp_path, monkeypatch, capsys):
    before = snapshot(fake_builtin)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["build", "--arch", "sm80", "--spec", str(user_spec(tmp_path, "lw_own2")), "--out", ""]) == 1
    assert "--out is empty" in capsys.readouterr().err
    assert snapshot(fake_builtin) == before


def test_other_specs_into_the_builtin_tree_are_refused(fake_builtin, tmp_path, capsys):
    """Even with --out naming it: a tree of other specs, or one without the norms, would replace the
    built-in kernels."""
    before = snapshot(fake_builtin)
    argv = ["build", "--arch", "sm80", "--spec", str(user_spec(tmp_path, "lw_own3")), "--out", str(fake_builtin)]
    assert cli.main(argv) == 1
    assert "is the built-in tree of lowmem_ops" in capsys.readouterr().err
    with pytest.raises(build.BuildError, match="built-in tree"):
        build.build(spec.load_builtin(), archs.resolve("sm80"), fake_builtin, fams=families.for_tree(builtin=False))
    assert snapshot(fake_builtin) == before


# --- 2. --out onto a folder of the user's ---------------------------------------------------------

def test_folder_that_is_not_a_kernelgen_tree_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sm80").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sm80" / "results.csv").write_text("1,2,3")
    (mine / "ops.py").write_text("# my own ops.py")
    before = snapshot(mine)
    assert cli.main(["build", "--arch", "sm80", "--out", str(mine)]) == 1
    err = capsys.readouterr().err
    assert f"{mine} is not empty and is not a kernelgen tree" in err and "new or empty folder" in err
    assert snapshot(mine) == before
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(build.BuildError, match="is a file, not a folder"):
        build.build(spec.load_builtin(), archs.resolve("sm80"), a_file)
    assert a_file.read_text() == "x"


def test_empty_folder_and_kernelgen_trees_are_accepted_and_extra_files_kept(tmp_path):
    specs, sm80 = spec.load_builtin(), archs.resolve("sm80")
    tree = small_copy(tmp_path / "tree")
    (tree / "README.txt").write_text("the user's own notes")
    build.build(specs, sm80, tree)
    assert (tree / "README.txt").read_text() == "the user's own notes"  # only what a build writes is replaced
    assert build.check(specs, sm80, tree) == []
    # a tree built before the marker existed is recognised by its __init__.py and ops.py
    legacy = small_copy(tmp_path / "legacy")
    (legacy / build.MARKER).unlink()
    assert build.is_kernelgen_tree(legacy)
    build.build(specs, sm80, legacy)
    assert (legacy / build.MARKER).read_text() == build.MARKER_TEXT
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not build.is_kernelgen_tree(empty)
    build._refuse_foreign_out(empty)  # an empty folder is fine


def test_committed_tree_carries_the_marker():
    assert (COMMITTED / build.MARKER).read_text() == build.MARKER_TEXT


# --- 3. the arch swap survives a kill at any step -----------------------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the build catches it."""


def _exchange_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    (a / "f").mkdir(parents=True)
    b.mkdir()
    return build._exchange(a, b) and (b / "f").is_dir()


def kill_at(monkeypatch, out: Path, step: int) -> list[str]:
    """Make the `step`-th file system change inside `out` or its kernels/ (rename, replace, exchange,
    rmtree, unlink) raise Killed instead of happening; returns the log of changes seen."""
    seen = []

    def wrap(name, fn):
        def step_or_die(*args, **kwargs):
            if any(Path(a).parent in (out, out / "kernels") for a in args[:2] if isinstance(a, (str, os.PathLike))):
                seen.append(name)
                if len(seen) == step:
                    raise Killed(f"killed at {name} {args[:2]}")
            return fn(*args, **kwargs)
        return step_or_die

    monkeypatch.setattr(os, "rename", wrap("rename", os.rename))
    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    monkeypatch.setattr(os, "unlink", wrap("unlink", os.unlink))
    monkeypatch.setattr(build, "_exchange", wrap("exchange", build._exchange))
    return seen


def run_regelu2_on(tree: Path, monkeypatch) -> None:
    """The runtime's view: regelu2's kernels taken from `tree` (through the interpreter) still work."""
    monkeypatch.setitem(_tree._ops, "regelu2", dataclasses.replace(_tree.get_op("regelu2"), tree=tree))
    x = torch.linspace(-4, 4, 64, requires_grad=True)
    with ref.backend("triton-interpret"):
        y = lowmem_ops.regelu2(x)
        y.sum().backward()
    torch.testing.assert_close(y.double(), ref.forward("regelu2", x))
    torch.testing.assert_close(x.grad.double(), ref.grad("regelu2", x, torch.ones_like(x)))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_killed_install_leaves_a_complete_arch_and_a_rerun_finishes(exchange, tmp_path, monkeypatch):
    if exchange and not _exchange_works(tmp_path):
        pytest.skip("no atomic exchange on this OS / file system")
    if not exchange:
        monkeypatch.setattr(build, "_exchange", lambda a, b: False)
    specs, sm80 = spec.load_builtin(), archs.resolve("sm80")
    committed = snapshot(COMMITTED / "sm80")
    # the older build's sm80 used another regelu2 text, a file the new build replaces and then removes
    current = _tree.kernel_path(COMMITTED, "sm80", "regelu2")[0]
    older_text = current.read_bytes() + b"# an older build's text\n"
    older = f"regelu2_{hashlib.sha256(older_text).hexdigest()[:12]}"
    old = dict(committed, **{"configs.py": committed["configs.py"].replace(current.stem.encode(), older.encode())})
    # Render and compile once; every build below installs a copy of that stage (the install is under test).
    staged = tmp_path / "staged"
    build._stage(specs, sm80, staged, lambda msg: None, families.ALL, build.BuildOptions(), small_copy(tmp_path / "seed"))
    monkeypatch.setattr(build, "_stage", lambda specs, archs, stage, *args: shutil.copytree(staged, stage) and 0)
    step = 2  # from the last of the file replaces (marker, __init__.py, ops.py: each one rename) on
    while True:
        step += 1
        out = small_copy(tmp_path / f"kill{step}" / "generated")
        (out / "sm80" / "configs.py").write_bytes(old["configs.py"])
        (out / "kernels" / current.name).unlink()
        (out / "kernels" / f"{older}.py").write_bytes(older_text)
        with monkeypatch.context() as m:
            seen = kill_at(m, out, step)
            try:
                build.build(specs, sm80, out)
                finished = True
            except Killed:
                finished = False
        # the runtime finds a complete arch: the old or the new one, never none or a mixture
        missing = not (out / "sm80").exists()
        with pytest.warns(UserWarning, match="stopped while it swapped") if missing else contextlib.nullcontext():
            used = out / _tree.lowest_arch(out)
        assert snapshot(used) in (old, committed), (step, seen, used)
        # and every kernel file its configs.py names is there
        assert all((out / "kernels" / f"{name}.py").is_file()
                   for name in build._kernel_files_of(used / "configs.py").values()), (step, seen)
        run_regelu2_on(out, monkeypatch)
        build.build(specs, sm80, out)  # the rerun finishes the swap: no sibling left, the new arch in place
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["kernels", "sm80"], (step, seen)
        assert snapshot(out / "sm80") == committed, (step, seen)
        assert snapshot(out / "kernels") == snapshot(COMMITTED / "kernels"), (step, seen)  # the older file is gone
        if finished:
            break
    assert "unlink" in seen and step > 6  # every step, from the kernel file installs to the last removal, killed once
    monkeypatch.undo()  # a real build and check of the last tree
    build.build(specs, sm80, out)
    assert build.check(specs, sm80, out) == []


@pytest.mark.parametrize("siblings, target_left", [
    (("incoming", "outgoing"), False), (("incoming",), False), (("outgoing",), False),
    (("outgoing",), True), (("incoming",), True),
])
def test_each_half_done_swap_is_used_then_recovered(siblings, target_left, tmp_path, recwarn):
    """The states a kill inside _swap_in can leave, made by hand: <arch> missing with the sibling going
    in and/or the one going out (the runtime uses one, preferring the newer, and says so); <arch>
    present with a sibling left over (the runtime ignores it). A rerun's recovery leaves just <arch>."""
    out = small_copy(tmp_path / "tree")
    for role in siblings:
        shutil.copytree(out / "sm80", out / f".sm80.{role}")
        (out / f".sm80.{role}" / "ROLE").write_text(role)
    if not target_left:
        shutil.rmtree(out / "sm80")
    want = "" if target_left else ("incoming" if "incoming" in siblings else "outgoing")
    used = out / _tree.lowest_arch(out)
    assert (used / "configs.py").is_file() and list(_tree.built_archs(out)) == ["sm80"]
    assert ((used / "ROLE").read_text() if (used / "ROLE").exists() else "") == want
    warned = [str(w.message) for w in recwarn if "stopped while it swapped" in str(w.message)]
    assert bool(warned) == (not target_left)
    build.recover_swaps(out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["kernels", "sm80"]
    assert ((out / "sm80" / "ROLE").read_text() if (out / "sm80" / "ROLE").exists() else "") == want


def test_files_of_the_user_inside_an_arch_folder_stop_the_build(tmp_path):
    """A rebuilt arch folder replaces the old one whole: a file no build wrote is not deleted silently.
    A stale kernel of an op the old manifest lists is the build's own and goes."""
    specs, sm80 = spec.load_builtin(), archs.resolve("sm80")
    tree = small_copy(tmp_path / "tree")
    (tree / "sm80" / "my_results.csv").write_text("1,2,3")
    before = snapshot(tree)
    with pytest.raises(build.BuildError, match=r"sm80 holds files no kernelgen build wrote \(my_results.csv\)"):
        build.build(specs, sm80, tree)
    assert snapshot(tree) == before
    (tree / "sm80" / "my_results.csv").unlink()
    build.build(specs[1:], sm80, tree, fams=families.ALL)  # drop an op: its kernel file is the build's to remove
    assert not [p for p in (tree / "kernels").iterdir() if re.fullmatch(rf"{specs[0].name}_[0-9a-f]{{12}}\.py", p.name)]
