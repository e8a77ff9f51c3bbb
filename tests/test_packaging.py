"""A non-editable install carries the generated kernels, the templates and the specs, not the
manifests; training code needs none of the generator's dependencies (the `kernelgen` extra)."""

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The `kernelgen` extra; training code (import, every op, convert, the meter) must not need them.
GENERATOR_DEPS = {"jinja2", "sympy", "scipy", "threadpoolctl", "matplotlib", "tomli_w"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools builds in the source's build/ folder and packs what an earlier build
    # left there (a wheel of this checkout would carry files its pyproject no longer ships).
    source = tmp_path_factory.mktemp("source") / "lowmem-ops"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".hypothesis", ".pytest_cache"))
    # -v: the build backend's own output (its warnings) comes back too
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)]
    log = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("lowmem_ops-*.whl")
    return whl, log.stdout + log.stderr


def test_wheel_contents(wheel):
    """Every file of generated/ the runtime reads: the top files, each arch folder's configs.py and the
    kernel files of kernels/ (package data by pyproject's globs: a new arch needs no edit there); no
    manifest.json, and no setuptools warning about folders it would ignore."""
    wheel, log = wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = REPO / "generated"
    runtime = {f"lowmem_ops/_generated/{p.relative_to(tree)}" for p in tree.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name not in ("manifest.json", ".kernelgen-tree")}
    assert runtime - names == set()
    arch_dirs = {d.name for d in tree.iterdir() if (d / "configs.py").is_file()}
    assert arch_dirs >= {"sm80", "sm86", "sm89", "sm90", "sm100", "gfx942"}
    assert {f"lowmem_ops/_generated/{a}/configs.py" for a in arch_dirs} <= names
    assert len([n for n in names if n.startswith("lowmem_ops/_generated/kernels/")]) >= 20
    assert not [n for n in names if n.endswith(".json")]  # manifests are build records
    assert "absent from the `packages` configuration" not in log and "would be ignored" not in log.lower()
    assert {"lowmem_ops/_generated/ops.py", "kernelgen/templates/activation.py.j2", "kernelgen/specs/regelu2.toml",
            "kernelgen/templates/activation.space.toml", "kernelgen/templates/norm.space.toml",
            "kernelgen/templates/dropout.py.j2", "kernelgen/templates/dropout.space.toml",
            "kernelgen/templates/configs.py.j2", "lowmem_ops/_generated/cpu_kernels.cpp",
            "kernelgen/templates/cpu_activation.cpp.j2"} <= names


def test_the_generator_dependencies_are_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip().replace("-", "_")
                for r in requirements}

    assert names(project["dependencies"]) >= {"torch", "triton", "numpy", "rich", "ninja"}
    assert not names(project["dependencies"]) & GENERATOR_DEPS
    assert names(project["optional-dependencies"]["kernelgen"]) == GENERATOR_DEPS


# Without the extra: the four torch does not need are absent for everyone (a meta-path finder), and
# lowmem_ops itself (any module named lowmem_ops.*, generated trees included) may import none of the
# six, even sympy and jinja2, which torch depends on and may import itself.
BLOCKER = f"""
import builtins, sys
GENERATOR = {sorted(GENERATOR_DEPS)!r}
ABSENT = {{"scipy", "threadpoolctl", "matplotlib", "tomli_w"}}

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ImportError(f"No module named {{name!r}} (not installed without the kernelgen extra)")

sys.meta_path.insert(0, Absent())
_import = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__") or ""
    if level == 0 and name.partition(".")[0] in GENERATOR and importer.partition(".")[0] == "lowmem_ops":
        raise ImportError(f"{{importer}} imports {{name}}, a dependency of the kernelgen extra")
    return _import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
"""


def test_training_code_runs_without_the_kernelgen_extra(tmp_path):
    code = BLOCKER + textwrap.dedent("""
        import os, pytest, torch
        for name in ("scipy", "matplotlib", "tomli_w"):  # the blocker works
            with pytest.raises(ImportError):
                __import__(name)
        with pytest.raises(ImportError, match="lowmem_ops.x imports sympy"):
            exec("import sympy", {"__name__": "lowmem_ops.x"})

        import lowmem_ops as lo
        torch.manual_seed(0)
        x = torch.randn(64, 96, requires_grad=True)
        # (not the C++ kernels: their first use compiles for a minute; lowmem_ops._cpp_backend's own
        # imports are checked by `import lowmem_ops` above, and the compile is torch's cpp_extension)
        for backend in ("triton-interpret", "torch"):
            os.environ["LOWMEM_OPS_BACKEND"] = backend
            for name in ("regelu2", "resilu2", "tanh_gelu3"):
                lo.approx_activation(x, name).sum().backward()
            lo.ms_layernorm(x, 96).sum().backward()
            lo.ms_rmsnorm(x, 96).sum().backward()
            lo.swiglu(x[:, :48], x[:, 48:]).sum().backward()
        lo.dropout(x, 0.1).sum().backward()
        lo.nn.Dropout(0.1)(x).sum().backward()

        model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                                    torch.nn.LayerNorm(96), torch.nn.Linear(96, 4))
        report = lo.convert(model, example_inputs=(torch.randn(16, 96),))
        assert report.applied, report
        model(torch.randn(16, 96)).sum().backward()
        m = lo.memory.measure(model, torch.randn(16, 96))
        assert m.total_bytes > 0
        plan = lo.memory.plan(model, torch.randn(16, 96))
        assert plan.peak > 0
        with pytest.raises(ImportError, match=r"pip install 'lowmem-ops\\[kernelgen\\]'"):
            m.plot(os.environ["PLOT"])
        with pytest.raises(ImportError, match=r"pip install 'lowmem-ops\\[kernelgen\\]'"):
            plan.plot(os.environ["PLOT"])
        print("ok")
    """)
    env = {**os.environ, "PLOT": str(tmp_path / "p.png")}
    env.pop("LOWMEM_OPS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_installed_copy_runs_outside_the_checkout(wheel, tmp_path):
    wheel, _ = wheel
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
        "d = lo.dropout(torch.randn(100), 0.1)\n"
        "assert _tree.kernel_path(_tree.builtin_tree(), 'sm90', 'regelu2')[0].is_file()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}
    env.pop("LOWMEM_OPS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kernelgen_without_the_extra_says_how_to_get_it(tmp_path):
    code = BLOCKER + textwrap.dedent("""
        import pytest
        with pytest.raises(ImportError, match=r"kernelgen needs scipy, threadpoolctl, matplotlib, tomli_w, not "
                                              r"installed: pip install 'lowmem-ops\\[kernelgen\\]'"):
            import kernelgen.cli
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
