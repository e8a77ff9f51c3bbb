"""kernelgen build: deterministic, atomic, every variant compiled ahead of time, stale trees caught."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from kernelgen import archs, build, cli, spec, targets
from kernelgen.families import activation

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
    text = (sm80_tree / "sm80" / "regelu2.py").read_text()
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
    src = tree / "sm80" / "resilu2.py"
    src.write_text(src.read_text().replace("1.0403218", "1.0403219"))
    (tree / "sm80" / "old_op.py").write_text("")
    assert cli.main(["build", "--arch", "sm80", "--check", "--out", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "resilu2.py: stale" in err and "old_op.py: not produced by any spec" in err


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
