"""Which arch build a GPU gets."""

import json
import warnings

import pytest
import torch

from lowmem_ops import _tree
from lowmem_ops._tree import pick_arch

from . import reference as ref


def fake_tree(tmp_path, caps):
    for cap in caps:
        (tmp_path / f"sm{cap}").mkdir()
        (tmp_path / f"sm{cap}" / "manifest.json").write_text(json.dumps({"capability": cap}))
    return tmp_path


def test_exact_arch_without_warning(tmp_path):
    tree = fake_tree(tmp_path, [80, 90])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_arch(tree, 90) == "sm90"


def test_nearest_lower_arch_warns_once(tmp_path):
    tree = fake_tree(tmp_path, [80, 90, 100])
    with pytest.warns(UserWarning, match="no kernels built for sm89 .* using the sm80 build"):
        assert pick_arch(tree, 89) == "sm80"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: silent
        assert pick_arch(tree, 89) == "sm80"
    with pytest.warns(UserWarning, match="sm120"):
        assert pick_arch(tree, 120) == "sm100"


def test_older_gpu_gets_lowest_build_and_empty_tree_fails(tmp_path):
    (tmp_path / "a").mkdir()
    tree = fake_tree(tmp_path / "a", [80])
    with pytest.warns(UserWarning, match="sm75"):
        assert pick_arch(tree, 75) == "sm80"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="holds no built arch: run `kernelgen build --arch sm80`"):
        pick_arch(tmp_path / "empty", 80)


def test_user_tree_loaded_first_keeps_builtins(tmp_path):
    """In a fresh process: lo.load() before any built-in use must not hide the built-ins."""
    import subprocess
    import sys

    from .test_spec import GOOD

    spec = tmp_path / "mine.toml"
    spec.write_text(GOOD)
    code = (
        "import sys, lowmem_ops as lo\n"
        "from kernelgen import cli\n"
        f"assert cli.main(['build', '--arch', 'sm80', '--spec', {str(spec)!r}, '--out', {str(tmp_path / 't')!r}]) == 0\n"
        f"lo.load({str(tmp_path / 't')!r})\n"
        "print(lo.available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    builtins = {s.name for s in __import__("kernelgen.spec").spec.load_builtin()}
    assert set(eval(out.stdout)) == builtins | {"myact"}


def test_rocm_gpus_never_run_kernels_built_for_nvidia(monkeypatch):
    """A ROCm torch calls AMD GPUs 'cuda': auto takes the torch path there (warning once), and an explicit
    LOWMEM_OPS_BACKEND=triton is an error that says why, instead of mapping a gfx GPU onto an sm build."""
    from types import SimpleNamespace

    from lowmem_ops import _common

    amd = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda", 0))
    monkeypatch.setattr(_common, "ROCM", True)
    monkeypatch.setattr(_common, "_warned_rocm", False)
    with ref.backend("auto"), pytest.warns(UserWarning, match="no kernels are built for AMD GPUs"):
        assert _common.backend(amd) == "torch"
    with ref.backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _common.backend(amd) == "torch"  # once
    with ref.backend("triton"), pytest.raises(RuntimeError, match="ROCm build"):
        _common.backend(amd)
    monkeypatch.setattr(_common, "ROCM", False)
    with ref.backend("auto"):
        assert _common.backend(amd) == "triton"


def test_the_arch_is_resolved_once_per_tree_and_gpu(tmp_path, monkeypatch):
    """The launch path scans a tree's folders and manifests once, not per kernel launch."""
    from lowmem_ops import _triton_backend

    tree = fake_tree(tmp_path, [80, 90])
    scans = []
    real = _tree.built_archs
    monkeypatch.setattr(_tree, "built_archs", lambda t: scans.append(t) or real(t))
    monkeypatch.setattr(_triton_backend, "_capabilities", {0: 90})
    for _ in range(3):
        assert _triton_backend.arch_for(torch.device("cuda", 0), tree, interpret=False) == "sm90"
        assert _triton_backend.arch_for(torch.device("cpu"), tree, interpret=True) == "sm80"
    assert len(scans) == 2
