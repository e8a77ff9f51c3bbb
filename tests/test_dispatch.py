"""Which arch build a GPU gets."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from lowmem_ops import _common, _tree, _triton_backend
from lowmem_ops._tree import pick_arch

from . import reference as ref


def fake_tree(tmp_path, caps, gfx=()):
    """Arch folders as the runtime sees them: a configs.py that records the vendor and capability."""
    for name, vendor, cap in [(f"sm{c}", "nvidia", c) for c in caps] + [(g, "amd", g) for g in gfx]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "configs.py").write_text(f"VENDOR = {vendor!r}\nCAPABILITY = {cap!r}\n")
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


@pytest.fixture
def rocm(monkeypatch):
    """A ROCm torch (which calls AMD GPUs "cuda") whose device 0 is an MI300X; resolutions start afresh."""
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-", name="AMD Instinct MI300X"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 4))  # what ROCm torch reports
    monkeypatch.setattr(_tree, "_gpus", {})
    monkeypatch.setattr(_tree, "_archs", {})
    monkeypatch.setattr(_common, "_warned_rocm", set())


def fake_tensor(dtype, device: torch.device):
    """What _common.backend reads of a tensor, for a device this machine lacks."""
    return SimpleNamespace(dtype=dtype, device=device, is_cuda=device.type == "cuda", is_cpu=device.type == "cpu")


def amd_tensor():
    return fake_tensor(torch.bfloat16, torch.device("cuda", 0))


def test_an_amd_gpu_is_known_by_its_gfx_name_without_feature_flags(rocm):
    assert _tree.gpu_arch(torch.device("cuda")) == "gfx942"


def test_an_amd_gpu_gets_the_folder_of_its_gfx_arch(tmp_path, rocm):
    tree = fake_tree(tmp_path, [80, 90], gfx=["gfx90a", "gfx942", "gfx1100"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_arch(tree, "gfx942") == "gfx942"
        assert _tree.arch_for(torch.device("cuda", 0), tree, interpret=False) == "gfx942"
        assert _common.backend(amd_tensor(), tree=tree) == "triton"
        assert pick_arch(tree, 90) == "sm90"  # an NVIDIA capability never gets a gfx folder
        assert _tree.lowest_arch(tree) == "sm80"  # the interpreter's, as before


def test_an_amd_gpu_never_gets_an_sm_folder(tmp_path, rocm):
    """Without a folder of its gfx arch (here: sm90, whose number ROCm's capability 9.4 would have been
    mapped onto, and another AMD arch) the ops take the torch path as before AMD builds existed: auto
    warns once naming the build command, LOWMEM_OPS_BACKEND=triton is an error saying why."""
    tree = fake_tree(tmp_path, [80, 90], gfx=["gfx90a"])
    assert pick_arch(tree, "gfx942") is None
    with ref.backend("auto"), pytest.warns(UserWarning, match=f"no kernels are built for this gfx942 GPU in {tree}.*"
                                                               f"kernelgen build --arch gfx942 --out {tree}"):
        assert _common.backend(amd_tensor(), tree=tree) == "torch"
    with ref.backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _common.backend(amd_tensor(), tree=tree) == "torch"  # once
    with ref.backend("triton"), pytest.raises(RuntimeError, match="ROCm build.*no kernels built for this gfx942"):
        _common.backend(amd_tensor(), tree=tree)
    with pytest.raises(RuntimeError, match="has no kernels built for this gfx942 GPU"):
        _tree.arch_for(torch.device("cuda", 0), tree, interpret=False)  # a launcher asked anyway: said, not mapped
    with ref.backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _common.backend(fake_tensor(torch.float32, torch.device("cpu")), tree=tree) == "torch"


def test_the_builtin_tree_decides_for_ops_that_name_none(tmp_path, rocm, monkeypatch):
    monkeypatch.setattr(_tree, "builtin_tree", lambda: fake_tree(tmp_path, [80], gfx=["gfx942"]))
    with ref.backend("auto"):
        assert _common.backend(amd_tensor()) == "triton"


def test_cuda_torch_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    tree = fake_tree(tmp_path, [80])
    with ref.backend("auto"):
        assert _common.backend(amd_tensor(), tree=tree) == "triton"


def test_the_arch_is_resolved_once_per_tree_and_gpu(tmp_path, monkeypatch):
    """The launch path scans a tree's folders and configs once, not per kernel launch."""
    tree = fake_tree(tmp_path, [80, 90])
    scans = []
    real = _tree.built_archs
    monkeypatch.setattr(_tree, "built_archs", lambda t: scans.append(t) or real(t))
    monkeypatch.setattr(_tree, "_gpus", {0: 90})
    for _ in range(3):
        assert _triton_backend.arch_for(torch.device("cuda", 0), tree, interpret=False) == "sm90"
        assert _triton_backend.arch_for(torch.device("cpu"), tree, interpret=True) == "sm80"
    assert len(scans) == 2
