"""lowmem_ops.convert uses the activations a user built (kernelgen) and loaded (lo.load): a module
computing one of them, whatever its class, is recognised by behaviour and swapped for it, its width
chosen among the user's widths of that function, and lo.export puts the original back.

The trees hold ops.py and cpu_kernels.cpp only (`kernelgen.build.build` with no arch: no Triton
compile, a second per tree); the convert runs take the torch backend, which needs nothing else.
Loading a tree is process-wide: every test here starts from the built-in ops alone (`registry`) and
leaves the registry as it found it, so no other test file sees these ops (nor these tests theirs).
"""

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowmem_ops as lo
from kernelgen import build, cli, spec
from lowmem_ops import _bits, _recognition, _tree, conversion, memory
from lowmem_ops._gradients import PROJECTION_SEED

SOFTSIGN = "x / (1 + abs(x))"


def softsign(x):
    return x / (1 + x.abs())


def _softsign_spec(name: str, thresholds: list[float]) -> str:
    """A softsign spec (`kernelgen new` refuses to fit it: h' decays like 1/x^2, no constant to settle
    to). Its levels are the secant slopes of h between the thresholds, 0 outside, so g is h's linear
    interpolant at the thresholds; fit_error is that g's integral of (h - g)^2 on [-40, 40]."""
    t = np.array(thresholds)
    h = t / (1 + np.abs(t))
    levels = [0.0, *map(float, np.diff(h) / np.diff(t)), 0.0]
    x = np.linspace(-40, 40, 400001)
    error = float(np.trapezoid((x / (1 + np.abs(x)) - np.interp(x, t, h)) ** 2, x))
    return (f'[op]\nname = "{name}"\nforward = "{SOFTSIGN}"\nreplaces = "Softsign"\n\n[approx]\nbits = '
            f'{int(math.log2(len(levels)))}\nboundary = "lower"\nthresholds = {list(map(float, t))}\n'
            f'levels = {levels}\nfit_error = {error!r}\n')


TWO_BITS = [-1.0, 0.0, 1.0]
FOUR_BITS = [-3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """op name -> a tree holding it: softsign at 2 and 4 bits, a softsign named like a GELU width
    (regelu5), and a LeakyReLU(0.1) fitted by `kernelgen new` as its users would."""
    root = tmp_path_factory.mktemp("user_ops")
    specs = {name: root / f"{name}.toml" for name in ("softsign2", "softsign4", "regelu5", "leaky01")}
    specs["softsign2"].write_text(_softsign_spec("softsign2", TWO_BITS))
    specs["softsign4"].write_text(_softsign_spec("softsign4", FOUR_BITS))
    specs["regelu5"].write_text(_softsign_spec("regelu5", TWO_BITS))
    assert cli.main(["new", "leaky01", "--expr", "where(x > 0, x, 0.1 * x)", "--bits", "1", "--dir", str(root),
                     "--no-build"]) == 0
    out = {}
    for name, path in specs.items():
        out[name] = root / f"tree_{name}"
        build.build([spec.load(path)], [], out[name])
    return out


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """The built-in ops alone, for the duration of one test; the torch backend (no C++ build of a tree)."""
    _tree._ensure_builtin()
    builtin = _tree.builtin_tree()
    monkeypatch.setattr(_tree, "_ops", {n: op for n, op in _tree._ops.items() if op.tree == builtin})
    monkeypatch.setattr(_tree, "_loaded_trees", {builtin})
    monkeypatch.setenv("LOWMEM_OPS_BACKEND", "torch")


class HandSoftsign(nn.Module):
    def forward(self, x):
        return x / (1 + torch.abs(x))


class NotSoftsign(nn.Module):
    def forward(self, x):
        return x / (1 + 2 * torch.abs(x))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), HandSoftsign(), nn.Linear(64, 64), nn.Softsign(), nn.Linear(64, 64),
                         NotSoftsign(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)), torch.randn(32, 16)


def test_modules_computing_a_users_op_are_swapped_for_it_and_exported_back(trees):
    assert lo.load(trees["softsign2"]) == ["softsign2"]
    model, x = _model()
    originals = {i: model[i] for i in (1, 3, 5, 7)}
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
    report = lo.convert(model, example_inputs=x, grad_tolerance=None)  # the op as matched: 2 bits
    changes = {c.path: c for c in report.applied}
    assert set(changes) == {"1", "3"}, str(report)
    for i in (1, 3):
        assert type(model[i]) is lo.nn.Approx and model[i].op_name == "softsign2"
        c = changes[str(i)]
        assert c.after == f"Approx (probed: softsign2, your op loaded from {trees['softsign2']})", str(report)
        # torch's softsign saves its input and more; the op saves 2-bit codes: 32 x 64 / 4 bytes
        assert c.bits == 2 and c.bytes_after == 32 * 64 // 4 < c.bytes_before, str(report)
        assert c.gradient_cosine is not None and 0.5 < c.gradient_cosine < 1, str(report)
    nothing = "probed: its output matches none of the known activations and norms"
    assert dict(report.skipped) == {"5": f"NotSoftsign {nothing}", "7": f"Tanh {nothing}"}
    assert model[5] is originals[5] and model[7] is originals[7]
    assert report.memory_after.total_bytes < report.memory_before.total_bytes
    assert report.gradient_cosine is not None and report.gradient_cosine > 0.5, str(report)
    assert f"softsign2, your op loaded from {trees['softsign2']}" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    # and the measured saving is the codes': the converted model saves less for each swapped module
    saved = memory.measure(model, x)
    assert saved.exclusive_bytes("1") == saved.exclusive_bytes("3") == 32 * 64 // 4

    lo.export(model)
    assert all(model[i] is originals[i] for i in originals)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    fresh, _ = _model()
    fresh.load_state_dict(model.state_dict())


def test_a_user_op_is_not_matched_once_it_is_not_loaded(trees):
    """The control: without lo.load the same model keeps its softsigns (a report line each)."""
    model, x = _model()
    report = lo.convert(model, example_inputs=x, grad_tolerance=None)
    assert report.applied == [] and {p for p, _ in report.skipped} == {"1", "3", "5", "7"}, str(report)


def _recorded_calls(model, x, index):
    """(input, output gradient) of model[index] in the unconverted model under convert's loss (a fixed
    random projection of the outputs), recorded by hand."""
    model = copy.deepcopy(model).eval()
    seen = []

    def record(module, args, out):
        seen.append([args[0].detach()])
        out.register_hook(lambda g: seen[0].append(g))

    model[index].register_forward_hook(record)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(PROJECTION_SEED))).sum().backward()
    return seen[0]


def _local_cosine(op_name, h, g):
    """cos(the op's own backward, softsign's exact one) for input h and output gradient g."""
    leaf = h.clone().requires_grad_()
    (ours,) = torch.autograd.grad(lo.nn.Approx(op_name)(leaf), leaf, g)
    (exact,) = torch.autograd.grad(softsign(leaf), leaf, g)
    return float(F.cosine_similarity(ours.double().flatten(), exact.double().flatten(), dim=0))


def _softsign_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), HandSoftsign(), nn.Linear(64, 4)), torch.randn(32, 16)


def test_the_width_is_chosen_among_the_users_widths_of_the_function(trees):
    lo.load(trees["softsign2"])
    lo.load(trees["softsign4"])
    assert [op.name for op in _bits.family("softsign2")] == [op.name for op in _bits.family("softsign4")] \
        == ["softsign2", "softsign4"]
    model, x = _softsign_mlp()
    h, g = _recorded_calls(model, x, 1)
    two, four = _local_cosine("softsign2", h, g), _local_cosine("softsign4", h, g)
    assert two < four < 1, (two, four)
    for tolerance, chosen in ((two - 1e-3, "softsign2"), ((two + four) / 2, "softsign4")):
        model, x = _softsign_mlp()
        report = lo.convert(model, example_inputs=x, grad_tolerance=tolerance)
        (change,) = report.applied
        assert model[1].op_name == chosen and change.bits == _tree.get_op(chosen).bits, str(report)
        assert change.estimated_cosine == pytest.approx(_local_cosine(chosen, h, g), abs=1e-6)
    model, x = _softsign_mlp()
    report = lo.convert(model, example_inputs=x, grad_tolerance=(four + 1) / 2)  # no width reaches it
    assert report.applied == [] and type(model[1]) is HandSoftsign, str(report)
    assert report.skipped[0][1].startswith(f"kept exact: no width reaches grad_tolerance {(four + 1) / 2:g}")


def test_a_family_of_one_is_its_op_alone(trees):
    lo.load(trees["softsign2"])
    assert [op.name for op in _bits.family("softsign2")] == ["softsign2"]
    for tolerance in (0.0, 0.999999):  # met at once; met by no width: kept exact, nothing raises
        model, x = _softsign_mlp()
        report = lo.convert(model, example_inputs=x, grad_tolerance=tolerance)
        if tolerance == 0.0:
            assert model[1].op_name == "softsign2" and report.applied[0].bits == 2, str(report)
        else:
            assert report.applied == [] and "kept exact" in report.skipped[0][1], str(report)


def test_a_user_op_named_like_a_built_in_width_is_itself(trees):
    """A user's regelu5 computes softsign: its family is itself (not regelu1..4, the GELUs), it is what
    a softsign is converted to, and a hand-built Approx of it is no torch GELU after export."""
    lo.load(trees["regelu5"])
    assert [op.name for op in _bits.family("regelu5")] == ["regelu5"]
    assert [op.name for op in _bits.family("regelu2")] == ["regelu1", "regelu2", "regelu3", "regelu4"]
    model, x = _softsign_mlp()
    report = lo.convert(model, example_inputs=x, grad_tolerance=0.0)
    assert [c.path for c in report.applied] == ["1"] and model[1].op_name == "regelu5", str(report)
    hand = nn.Sequential(lo.nn.Approx("regelu5"), lo.nn.Approx("regelu2"))
    lo.export(hand)
    assert type(hand[0]) is lo.nn.Approx and hand[0].op_name == "regelu5"
    assert type(hand[1]) is nn.GELU and hand[1].approximate == "none"


@pytest.mark.parametrize("order", [("softsign2", "regelu5"), ("regelu5", "softsign2")])
def test_two_user_ops_of_one_function_the_first_loaded_is_taken_and_the_other_named(trees, order):
    for name in order:
        lo.load(trees[name])
    model, x = _softsign_mlp()
    report = lo.convert(model, example_inputs=x, grad_tolerance=0.0)
    first, other = order
    assert model[1].op_name == first, str(report)
    assert report.applied[0].after == f"Approx (probed: {first}, your op loaded from {trees[first]}; {other} fits too)"


def test_a_built_in_match_wins_over_a_users_op_of_the_same_function(trees, tmp_path):
    """A user's erf GELU: a GELU module is still regelu's (built-in first), while a user's LeakyReLU(0.1)
    wins over the recognised-only LeakyReLU(0.1) reference, torch's class included."""
    path = tmp_path / "mygelu2.toml"
    path.write_text(trees["softsign2"].parent.joinpath("softsign2.toml").read_text()
                    .replace("softsign2", "mygelu2").replace(SOFTSIGN, "0.5 * x * (1 + erf(x / sqrt(2)))"))
    build.build([spec.load(path)], [], tmp_path / "tree")
    lo.load(tmp_path / "tree")
    lo.load(trees["leaky01"])

    class HandGelu(nn.Module):
        def forward(self, x):
            return F.gelu(x)

    class HandLeaky(nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x, 0.1 * x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), HandGelu(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Dropout(0.1),
                          nn.Linear(8, 8), HandLeaky(), nn.Dropout(0.1), nn.Linear(8, 2))
    report = lo.convert(model, example_inputs=torch.randn(4, 8), grad_tolerance=0.0, dropout=False)
    assert model[1].op_name == "regelu1", str(report)
    assert model[3].op_name == model[6].op_name == "leaky01", str(report)
    assert {c.path: c.bits for c in report.applied} == {"1": 1, "3": 1, "6": 1}, str(report)
    lo.export(model)
    assert type(model[3]) is nn.LeakyReLU and model[3].negative_slope == 0.1 and type(model[6]) is HandLeaky


def test_probing_evaluates_each_reference_once_per_probe_input(trees, monkeypatch):
    lo.load(trees["softsign2"])
    calls = []
    op = _tree.get_op("softsign2")
    counted = dataclasses.replace(op, forward=lambda x: (calls.append(1), softsign(x))[1])
    monkeypatch.setitem(_tree._ops, "softsign2", counted)
    match = _recognition.identify(HandSoftsign(), (4, 8), torch.float32, torch.device("cpu"))
    assert match.op == "softsign2" and len(calls) == len(_recognition._inputs((4, 8), torch.float32, "cpu"))
