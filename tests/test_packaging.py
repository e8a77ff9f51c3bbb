"""A non-editable install carries the generated kernels, the templates and the specs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("lowmem_ops-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for arch in ("sm80", "sm86", "sm89", "sm90", "sm100"):
        assert f"lowmem_ops/_generated/{arch}/manifest.json" in names
        assert f"lowmem_ops/_generated/{arch}/regelu2.py" in names
        assert f"lowmem_ops/_generated/{arch}/configs.py" in names
    assert {"lowmem_ops/_generated/ops.py", "kernelgen/templates/activation.py.j2", "kernelgen/specs/regelu2.toml",
            "kernelgen/templates/activation.space.toml", "kernelgen/templates/norm.space.toml",
            "kernelgen/templates/configs.py.j2", "lowmem_ops/_generated/cpu_kernels.cpp",
            "kernelgen/templates/cpu_activation.cpp.j2"} <= names


def test_installed_copy_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import os, torch, lowmem_ops as lo, kernelgen.spec as s, kernelgen.build as b\n"
        "assert lo.__file__.startswith(os.environ['TARGET']), lo.__file__\n"
        "assert len(s.load_builtin()) >= 2 and b.default_out() is None and b.default_db_dir() is None\n"
        "from kernelgen.families import activation, norm\n"
        "assert activation.config_space().dtypes and norm.config_space().widths\n"
        "x = torch.randn(3000, requires_grad=True)\n"
        "lo.regelu2(x).sum().backward()\n"
        "from lowmem_ops import _cpp_backend, _tree\n"
        "assert _cpp_backend.unavailable(_tree.get_op('regelu2')) is None  # the installed C++ kernels ran\n"
        "os.environ['LOWMEM_OPS_BACKEND'] = 'triton-interpret'\n"
        "y = lo.resilu2(x)\n"
        "z = lo.ms_rmsnorm(torch.randn(4, 96), 96)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}
    env.pop("LOWMEM_OPS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
