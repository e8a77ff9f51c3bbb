"""Loading a generated tree: the runtime picks an arch by what its configs.py records and skips a
damaged one with a warning naming the file (it never reads a manifest); a damaged manifest is named
with its fix by kernelgen build / --check, at once instead of minutes of recompiling; and lo.load
checks every op spec of a tree's ops.py before it registers any."""

import dataclasses
import json
import re
import warnings

import pytest
import torch

import lowmem_ops as lo
from kernelgen import archs, build, cli, spec
from lowmem_ops import _tree

from . import reference as ref
from .test_build import snapshot
from .test_lost_work import small_copy

# --- what the runtime reads of an arch: configs.py ------------------------------------------------------


def _set(name: str, value: str):
    """configs.py with the assignment `name = ...` replaced by `name = value`."""
    def damage(configs):
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", configs.read_text(), count=1, flags=re.M)
        assert n == 1
        configs.write_text(text)
    return damage


DAMAGE = {
    "corrupt": lambda c: c.write_text(c.read_text().partition("ACTIVATION = {")[0] + "ACTIVATION = {\n    ('re"),
    "missing": lambda c: c.unlink(),
    "no capability": lambda c: c.write_text(re.sub(r"^CAPABILITY = .*$", "", c.read_text(), flags=re.M)),
    "capability of the wrong type": _set("CAPABILITY", "'86'"),
    "unknown vendor": _set("VENDOR", "'intel'"),
    "AMD vendor, not its gfx name": _set("VENDOR", "'amd'"),
}


def run_regelu2_on(tree, monkeypatch):
    monkeypatch.setitem(_tree._ops, "regelu2", dataclasses.replace(_tree.get_op("regelu2"), tree=tree))
    x = torch.linspace(-4, 4, 32, requires_grad=True)
    with ref.backend("triton-interpret"):
        lo.regelu2(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref.grad("regelu2", x, torch.ones_like(x)))


def test_the_committed_archs_are_read_from_their_configs_not_their_manifests(tmp_path, monkeypatch):
    """Every committed arch is found with the vendor and capability of its kernelgen target, and a tree
    without any manifest.json (as installed from the wheel) picks the same folders."""
    from kernelgen import targets

    tree = small_copy(tmp_path / "tree", tuple(archs.ARCHS))
    for manifest in tree.glob("*/manifest.json"):
        manifest.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = _tree.built_archs(tree)
        assert {name: (a.vendor, a.capability) for name, a in found.items()} == \
            {name: (targets.TARGETS[name].vendor, targets.TARGETS[name].arch) for name in archs.ARCHS}
        assert _tree.pick_arch(tree, 90) == "sm90" and _tree.lowest_arch(tree) == "sm80"
    run_regelu2_on(tree, monkeypatch)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_broken_arch_is_skipped_with_a_warning_naming_the_file(damage, tmp_path, monkeypatch):
    """sm86's configs.py broken: ops keep working on sm80 (what the interpreter and an sm80 GPU use),
    an sm86 GPU falls back to sm80; one warning names the file and the command that fixes it."""
    tree = small_copy(tmp_path / "tree", ("sm80", "sm86"))
    configs = tree / "sm86" / "configs.py"
    DAMAGE[damage](configs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_regelu2_on(tree, monkeypatch)
        run_regelu2_on(tree, monkeypatch)
        assert list(_tree.built_archs(tree)) == ["sm80"]
        assert _tree.pick_arch(tree, 86) == "sm80"
    about = [str(w.message) for w in caught if str(configs) in str(w.message)]
    assert len(about) == 1, [str(w.message) for w in caught]  # once, not per launch
    assert f"kernelgen build --arch sm86 --out {tree}" in about[0] and "git checkout generated/" in about[0]


@pytest.mark.parametrize("damage", DAMAGE)
def test_no_sound_arch_is_an_error_naming_each_file(damage, tmp_path, monkeypatch):
    tree = small_copy(tmp_path / "tree", ("sm80", "sm86"))
    for arch in ("sm80", "sm86"):
        DAMAGE[damage](tree / arch / "configs.py")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError) as err:
            run_regelu2_on(tree, monkeypatch)
    msg = str(err.value)
    assert f"{tree} holds no built arch" in msg
    for arch in ("sm80", "sm86"):
        assert f"{tree / arch / 'configs.py'}: " in msg and f"kernelgen build --arch {arch}" in msg


@pytest.mark.parametrize("damage", ["file missing", "not in KERNEL_FILES"])
def test_a_missing_kernel_file_is_an_error_saying_how_to_rebuild(damage, tmp_path, monkeypatch):
    tree = small_copy(tmp_path / "tree", ("sm80",))
    # (read without importing configs.py: the runtime imports it once, below)
    path = tree / "kernels" / f"{build._kernel_files_of(tree / 'sm80' / 'configs.py')['regelu2']}.py"
    if damage == "file missing":
        path.unlink()
        want = f"{path} is missing: rebuild the tree with `kernelgen build --arch sm80 --out {tree}`"
    else:
        configs = tree / "sm80" / "configs.py"
        configs.write_text(re.sub(r"^    'regelu2': .*\n", "", configs.read_text(), flags=re.M))
        want = f"{configs} names no kernel file for 'regelu2': rebuild the tree with `kernelgen build --arch sm80"
    with pytest.raises(RuntimeError) as err:
        run_regelu2_on(tree, monkeypatch)
    assert want in str(err.value)


# --- kernelgen build and --check name a damaged manifest ------------------------------------------

class Compiled(Exception):
    """Raised instead of compiling: the tests below must stop (or go on to compile) at a known point."""


@pytest.fixture
def no_compiling(monkeypatch):
    def refuse(jobs, *args, **kwargs):
        raise Compiled(f"{len(jobs)} configs")

    monkeypatch.setattr(build.aot, "compile_all", refuse)


BUILD_DAMAGE = {
    "corrupt JSON": lambda m: m.write_text(m.read_text()[:200]),
    "not an object": lambda m: m.write_text("[]"),
    "variants not a list": lambda m: m.write_text(json.dumps({"compiled_with": {"triton": "3"}, "variants": {}})),
    "missing": lambda m: m.unlink(),
}


@pytest.mark.parametrize("damage", BUILD_DAMAGE)
def test_check_reports_a_damaged_manifest_at_once(damage, tmp_path, no_compiling, capsys):
    tree = small_copy(tmp_path / "tree")
    manifest = tree / "sm80" / "manifest.json"
    BUILD_DAMAGE[damage](manifest)
    assert cli.main(["build", "--arch", "sm80", "--check", "--out", str(tree)]) == 1  # nothing compiled
    err = capsys.readouterr().err
    assert f"{manifest}: " in err and "restore it" in err and "--recompile" in err


@pytest.mark.parametrize("damage", [d for d in BUILD_DAMAGE if d != "missing"])
def test_build_stops_at_a_damaged_manifest_unless_told_to_recompile(damage, tmp_path, no_compiling):
    tree = small_copy(tmp_path / "tree")
    manifest = tree / "sm80" / "manifest.json"
    BUILD_DAMAGE[damage](manifest)
    before = snapshot(tree)
    specs, sm80 = spec.load_builtin(), archs.resolve("sm80")
    with pytest.raises(build.BuildError, match="--recompile") as err:
        build.build(specs, sm80, tree)
    assert str(err.value).startswith(f"{manifest}: ")
    assert snapshot(tree) == before
    if damage == "corrupt JSON":
        with pytest.raises(Compiled):  # asked to: it compiles every config again
            build.build(specs, sm80, tree, opts=build.BuildOptions(recompile=True))


def test_build_says_when_a_missing_manifest_means_compiling_everything(tmp_path, no_compiling):
    tree = small_copy(tmp_path / "tree")
    (tree / "sm80" / "manifest.json").unlink()
    with pytest.warns(build.BuildWarning, match="manifest.json is missing: every config of sm80 is compiled again"):
        with pytest.raises(Compiled):
            build.build(spec.load_builtin(), archs.resolve("sm80"), tree)


# --- lo.load checks the specs of a tree ---------------------------------------------------------------

GOOD_SPEC = {"description": "'a test op'", "forward": "'x'", "replaces": "''", "gated": "False", "bits": "2",
             "boundary": "'lower'", "thresholds": "(-1.0, 0.0, 1.0)", "levels": "(0.0, 0.25, 0.75, 1.0)",
             "fit_error": "0.0"}


def write_tree(path, ops: dict, forward: dict | None = None, derivative: str = "{}"):
    """A tree whose ops.py holds `ops` (name -> {field: Python source of its value}); every op's
    forward is the identity unless `forward` (Python source of FORWARD) says otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    specs = ",\n".join(f"    {name!r}: " + ("{" + ", ".join(f"{k!r}: {v}" for k, v in fields.items()) + "}"
                                            if isinstance(fields, dict) else fields)
                       for name, fields in ops.items())
    forward = forward or "{" + ", ".join(f"{name!r}: identity" for name in ops) + "}"
    (path / "ops.py").write_text(f"import math\n\nSPECS = {{\n{specs}\n}}\n\n\ndef identity(x):\n    return x.clone()\n\n\n"
                                 f"FORWARD = {forward}\nDERIVATIVE = {derivative}\n")
    return path


def test_a_sound_tree_loads_and_a_repaired_one_loads_after_a_failure(tmp_path):
    tree = write_tree(tmp_path / "t", {"tl_good": dict(GOOD_SPEC, bits="3", thresholds="(-1.0,)")})
    with pytest.raises(ValueError, match="'thresholds'"):
        lo.load(tree)
    write_tree(tree, {"tl_good": GOOD_SPEC})  # fixed in place: imported afresh, not the cached module
    assert lo.load(tree) == ["tl_good"]
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    with ref.backend("torch"):
        lo.approx_activation(x, "tl_good").sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.25, 0.75, 1.0]))


BAD_FIELDS = [  # field, Python source of the bad value, words of the error
    ("bits", "5", "must be one of (1, 2, 3, 4)"),
    ("bits", "True", "must be one of"),
    ("bits", "'2'", "must be one of"),
    ("boundary", "'middle'", "must be one of 'lower', 'upper'"),
    ("thresholds", "(0.0, -1.0, 1.0)", "strictly ascending"),
    ("thresholds", "(-1.0, 0.0)", "needs 3 values for bits = 2"),
    ("thresholds", "[-1.0, math.nan, 1.0]", "finite float32 number"),
    ("thresholds", "(-1.0, 0.0, 1e39)", "finite float32 number"),
    ("thresholds", "(-1.0, 1.0, 1.00000001)", "same float32 value"),
    ("thresholds", "'-1, 0, 1'", "must be a tuple of numbers"),
    ("levels", "(0.0, 1.0)", "needs 4 values for bits = 2"),
    ("levels", "(0.0, math.inf, 1.0, 1.0)", "finite float32 number"),
    ("levels", "(0.0, 'a', 1.0, 1.0)", "finite float32 number"),
    ("fit_error", "-1.0", "finite number >= 0"),
    ("fit_error", "math.nan", "finite number >= 0"),
    ("description", "3", "must be a str"),
    ("replaces", "None", "must be a str"),
    ("gated", "'yes'", "must be True or False"),
    ("levels", None, "missing"),
]


@pytest.mark.parametrize("field, value, words", BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_each_bad_field_is_named_and_nothing_is_registered(field, value, words, tmp_path):
    name = f"tl_bad_{BAD_FIELDS.index((field, value, words))}"
    fields = dict(GOOD_SPEC, **{field: value}) if value is not None else \
        {k: v for k, v in GOOD_SPEC.items() if k != field}
    tree = write_tree(tmp_path / "t", {"tl_first": GOOD_SPEC, name: fields})
    with pytest.raises(ValueError) as err:
        lo.load(tree)
    assert str(err.value).startswith(f"{tree / 'ops.py'}: SPECS[{name!r}][{field!r}]: "), str(err.value)
    assert words in str(err.value) and "kernelgen build" in str(err.value)
    assert "tl_first" not in lo.available() and name not in lo.available()  # all or nothing


@pytest.mark.parametrize("ops, forward, derivative, where", [
    ({"Bad_Name": GOOD_SPEC}, None, "{}", "SPECS['Bad_Name']: an op name"),
    ({"tl_nl\n": GOOD_SPEC}, None, "{}", "SPECS['tl_nl\\n']: an op name"),  # `$` would let the newline by
    ({"configs": GOOD_SPEC}, None, "{}", "SPECS['configs']: 'configs' is the name of another file"),
    ({"tl_notdict": "[1, 2]"}, None, "{}", "SPECS['tl_notdict']: must be a dict"),
    ({"tl_nofwd": GOOD_SPEC}, "{}", "{}", "FORWARD['tl_nofwd']: missing or not a function"),
    ({"tl_gated": dict(GOOD_SPEC, gated="True")}, None, "{}", "DERIVATIVE['tl_gated']: missing"),
])
def test_bad_names_and_functions_are_named(ops, forward, derivative, where, tmp_path):
    tree = write_tree(tmp_path / "t", ops, forward, derivative)
    with pytest.raises(ValueError) as err:
        lo.load(tree)
    assert str(err.value).startswith(f"{tree / 'ops.py'}: {where}"), str(err.value)
    assert not set(ops) & set(lo.available())


def test_specs_must_be_a_dict(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "ops.py").write_text("SPECS = [('tl_x', {})]\nFORWARD = {}\n")
    with pytest.raises(ValueError, match=r"ops.py: SPECS: must be a dict, got list"):
        lo.load(tree)


def test_a_name_taken_by_another_tree_registers_none_of_the_tree(tmp_path):
    tree = write_tree(tmp_path / "t", {"tl_before_clash": GOOD_SPEC, "regelu2": GOOD_SPEC})
    with pytest.raises(ValueError, match="op 'regelu2' from .* is already defined by"):
        lo.load(tree)
    assert "tl_before_clash" not in lo.available()
