"""kernelgen build for AMD targets (gfx942, gfx90a, gfx1100), with no GPU: the committed gfx folders
hold static configs judged by real HIP compiles, a user's spec builds for an AMD target from scratch,
and the runtime's launchers run every kernel with a gfx folder's configs (under the interpreter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lowmem_ops as lo
from kernelgen import build, cli, spec, targets
from lowmem_ops import _tree

from . import reference as ref
from .test_spec import GOOD

REPO = Path(__file__).resolve().parent.parent
AMD = list(targets.AMD_TARGETS)


def _rows(manifest: dict) -> list[dict]:
    return manifest["variants"] + [a for v in manifest["variants"] for a in v.get("also", ())]


@pytest.mark.parametrize("name", AMD)
def test_committed_amd_folder_holds_static_configs_judged_by_hip_compiles(name):
    target = targets.AMD_TARGETS[name]
    folder = REPO / "generated" / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["vendor"], manifest["capability"]) == ("amd", name)
    assert manifest["compiled_with"]["candidates"] == "the static configs only"
    assert all(c["candidates"] == 1 for c in manifest["choices"])  # no space explored: nothing to tune on
    nvidia = json.loads((REPO / "generated" / "sm80" / "manifest.json").read_text())
    # the same kernels in the same buckets as an NVIDIA arch
    assert sorted((c["op"], c["kernel"], c["dtype"], c["bucket"]) for c in manifest["choices"]) == \
        sorted((c["op"], c["kernel"], c["dtype"], c["bucket"]) for c in nvidia["choices"])
    for row in _rows(manifest):
        assert "error" not in row, row
        # what a HIP compile reports, at the target's wave size
        assert row["wavefront_size"] == target.warp_size and 0 < row["total_vgprs"] <= target.max_vgprs_per_wave, row
        assert row["scratch_bytes"] == 0 and row["vgpr_spills"] == 0, row
    for row in manifest["variants"]:
        # judged on the compiles of the common case (sizes multiples of 16; each weight dtype): the lowest
        judged = [r for r in [row] + row.get("also", []) if r["specialisation"]["sizes"] == "multiples of 16"]
        occupancy = min(target.occupancy(row["config"]["num_warps"], r["total_vgprs"], r["sgprs"], r["lds_bytes"]).fraction
                        for r in judged)
        assert row["kept"] and row["occupancy"] == round(occupancy, 4) > 0, row
    # the wave size sets the static block: as many elements per lane as on a 32-wide warp
    regelu2 = next(c for c in manifest["choices"] if (c["op"], c["kernel"], c["dtype"]) == ("regelu2", "forward", "float32"))
    sm80 = next(c for c in nvidia["choices"] if (c["op"], c["kernel"], c["dtype"]) == ("regelu2", "forward", "float32"))
    assert regelu2["static"]["BLOCK_BYTES"] * 32 == sm80["static"]["BLOCK_BYTES"] * target.warp_size
    configs = (folder / "configs.py").read_text()
    assert "VENDOR = 'amd'" in configs and f"CAPABILITY = '{name}'" in configs


@pytest.mark.slow
def test_users_spec_builds_for_an_amd_target_from_scratch(tmp_path):
    path = tmp_path / "softsign2.toml"
    path.write_text(GOOD.replace('"myact"', '"softsign2"').replace('"x * sigmoid(x)"', '"x / (1 + abs(x))"'))
    out = tmp_path / "kernels"
    specs = [spec.load(path)]
    first = build.build(specs, targets.resolve("gfx1100"), out)
    assert first == len(_rows(json.loads((out / "gfx1100" / "manifest.json").read_text()))) > 0
    manifest = json.loads((out / "gfx1100" / "manifest.json").read_text())
    assert {r["wavefront_size"] for r in _rows(manifest)} == {32}  # RDNA3 compiles wave32
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert build.build(specs, targets.resolve("gfx1100"), out) == 0  # every result recorded
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert build.check(specs, targets.resolve("gfx1100"), out) == []


def test_cli_builds_an_amd_target_into_a_tree_of_its_own(tmp_path, capsys):
    """`kernelgen build --arch gfx942` takes the AMD target by name; into a copy of generated/ every
    compile result is already recorded, so nothing compiles and nothing changes."""
    out = tmp_path / "generated"
    shutil.copytree(REPO / "generated", out, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(["build", "--arch", "gfx942", "--out", str(out)]) == 0
    assert "(0 compiles run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts} == before
    assert cli.main(["build", "--arch", "gfx942", "--check", "--out", str(out)]) == 0
    assert "fresh for gfx942" in capsys.readouterr().err


@pytest.fixture
def interpreter_uses(monkeypatch):
    """Make the interpreter launch with the configs of one arch folder of the built-in tree."""
    def use(folder: str) -> None:
        monkeypatch.setattr(_tree, "_archs", {(_tree.builtin_tree(), None): folder})
    return use


def _run_every_family(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 96, generator=gen, requires_grad=True)
    w = (torch.rand(96, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(96, generator=gen).requires_grad_()
    with ref.backend("triton-interpret"):
        act = lo.approx_activation(x, "regelu2")
        norm = lo.ms_layernorm(act, (96,), w, b)
        torch.manual_seed(seed)
        dropped = lo.dropout(norm, 0.25, training=True)
        out, residual = lo.add_ms_layernorm(dropped, act, w, b, p=0.25)
        (out + residual).backward(torch.randn(out.shape, generator=gen))
    return {"act": act.detach(), "norm": norm.detach(), "dropped": dropped.detach(), "out": out.detach(),
            "residual": residual.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


@pytest.mark.slow
@pytest.mark.parametrize("name", AMD)
def test_launchers_run_with_an_amd_folders_configs(name, interpreter_uses):
    """Every family's launcher finds its kernel and config in a gfx folder; the configs change only
    how the work is split, so the results equal those with sm80's configs."""
    interpreter_uses("sm80")
    want = _run_every_family(0)
    interpreter_uses(name)
    got = _run_every_family(0)
    for key in ("act", "norm", "dropped", "out", "residual", "dx"):
        assert torch.equal(got[key], want[key]), key
    for key in ("dw", "db"):  # sums over rows: another split may round differently
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
