"""The fitter: quality bars from the reference, determinism, speed, refusals; kernelgen fit/new/plot;
random valid activations through fit -> spec -> build -> kernels."""

import itertools
import time

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_ops as lo
from kernelgen import cli, expr, fit, spec
from lowmem_ops._tree import kernel_path

from . import reference as ref

GELU = "0.5 * x * (1 + erf(x / sqrt(2)))"
SILU = "x * sigmoid(x)"


@pytest.mark.parametrize("text, name, published, optimum", [
    (GELU, "regelu2", 0.0095093, 0.0095069),
    (SILU, "resilu2", 0.0399438, 0.0399413),
])
def test_two_bits_beat_the_published_coefficients(text, name, published, optimum):
    h = expr.parse(text)
    pub = ref.PUBLISHED[name]
    measured = fit.error_of(h, pub["c"], [0.0] + list(np.cumsum(pub["a"])))
    assert measured == pytest.approx(published, abs=1e-7)  # the reference's figure, by our integrator
    f = fit.fit(h, 2)
    assert f.error <= measured
    assert f.error == pytest.approx(optimum, abs=1e-7)


@pytest.mark.parametrize("text, relu_error", [(GELU, 0.0617653), (SILU, 0.3163026)])
def test_error_falls_strictly_with_bits_and_each_fit_is_fast(text, relu_error):
    errors = []
    for bits in (1, 2, 3, 4):
        start = time.process_time()
        f = fit.fit(text, bits)
        assert time.process_time() - start < 10.0, f"{bits}-bit fit took too long"
        assert len(f.thresholds) == 2**bits - 1 and len(f.levels) == 2**bits
        assert list(f.thresholds) == sorted(f.thresholds)
        errors.append(f.error)
    assert errors[0] == pytest.approx(relu_error, abs=1e-6)  # 1 bit is the ReLU
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_deterministic():
    a, b = fit.fit(SILU, 3), fit.fit(SILU, 3)
    assert (a.thresholds, a.levels, a.error) == (b.thresholds, b.levels, b.error)


def test_finite_limit_at_minus_infinity_is_an_offset():
    """ELU tends to -1: g carries the offset, so the fit error is finite and small."""
    f = fit.fit("where(x > 0, x, exp(x) - 1)", 2)
    assert f.error < 0.01 and f.levels[0] == 0.0 and f.levels[-1] == pytest.approx(1.0)
    assert fit.asymptotes(expr.parse("where(x > 0, x, exp(x) - 1)")).offset_left == pytest.approx(-1.0)


@pytest.mark.parametrize("text, why", [
    ("max(x, 0)**2", "does not settle to a constant"),  # ReLU^2: the derivative grows without bound
    ("x**3", "does not settle to a constant"),
])
def test_unbounded_derivatives_are_refused(text, why):
    with pytest.raises(fit.FitError, match=why):
        fit.fit(text, 2)


def test_one_bit_needs_different_end_slopes():
    with pytest.raises(fit.FitError, match="same slope at both ends"):
        fit.fit("tanh(x)", 1)


@pytest.mark.parametrize("path", sorted(p.name for p in spec.builtin_paths()))
def test_builtin_specs_record_their_true_error(path):
    s = spec.load(next(p for p in spec.builtin_paths() if p.name == path))
    assert fit.error_of(s.forward, s.thresholds, s.levels) == pytest.approx(s.fit_error, rel=1e-5)


def test_cli_fit_new_and_plot(tmp_path, capsys):
    assert cli.main(["fit", "--expr", "x * tanh(log(1 + exp(x)))", "--bits", "2", "--plot", str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    assert "0.0192637" in out and (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["new", "mish_two", "--expr", "x * tanh(log(1 + exp(x)))", "--bits", "2", "--dir", str(tmp_path),
                     "--arch", "sm80", "--out", str(tmp_path / "kernels")]) == 0
    s = spec.load(tmp_path / "mish_two.toml")
    assert s.bits == 2 and s.fit_error == pytest.approx(0.0192637, abs=1e-6)
    assert kernel_path(tmp_path / "kernels", "sm80", "mish_two")[0].exists()
    assert cli.main(["plot", "regelu2", "--out", str(tmp_path / "regelu2.png")]) == 0
    assert (tmp_path / "regelu2.png").stat().st_size > 10_000
    assert cli.main(["fit", "--expr", "x**2", "--bits", "2"]) == 1
    assert "does not settle" in capsys.readouterr().err


# Families of activations with straight-line asymptotes, with random parameters; a is a slope at
# -inf (leaky), b an ELU-like offset, s a sharpness.
_names = itertools.count()
FAMILIES = [
    "x * sigmoid({s} * x)",
    "0.5 * x * (1 + erf({s} * x))",
    "{a} * x + (1 - {a}) * x * sigmoid({s} * x)",
    "where(x > 0, x, {b} * (exp({s} * x) - 1))",
    "max(x, 0) + log1p(exp(-abs({s} * x))) / {s}",
]


@settings(max_examples=6, deadline=None)
@given(family=st.sampled_from(FAMILIES), a=st.sampled_from([0.05, 0.2]), b=st.sampled_from([0.5, 1.5]),
       s=st.sampled_from([0.7, 1.0, 1.7]), bits=st.sampled_from([1, 2, 3, 4]))
def test_random_activations_end_to_end(tmp_path_factory, family, a, b, s, bits):
    text = family.format(a=a, b=b, s=s)
    try:
        f = fit.fit(text, bits)
    except fit.FitError as err:
        assert bits == 1 and "same slope" in str(err)
        return
    folder = tmp_path_factory.mktemp("random")
    name = f"rand{next(_names)}"  # ops register process-wide: a fresh name per example
    from kernelgen import specfile

    path = folder / f"{name}.toml"
    specfile.write(path, specfile.render(name, text, f))
    ref.EXTRA_SPECS[name] = path
    assert cli.main(["build", "--arch", "sm80", "--spec", str(path), "--out", str(folder / "tree")]) == 0
    lo.load(folder / "tree")
    x = torch.linspace(-8, 8, 301, dtype=torch.float32).requires_grad_(True)
    dy = torch.randn(301, generator=torch.Generator().manual_seed(bits))
    want = torch.tensor([float(expr.parse(text).sym.subs(expr.X, sympy.Float(v, 30)).evalf(20)) for v in x.tolist()])
    for backend in ("torch", "triton-interpret"):
        x.grad = None
        with ref.backend(backend):
            y = lo.approx_activation(x, name)
            y.backward(dy)
        torch.testing.assert_close(y.detach().double(), want.double(), rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(x.grad.double(), ref.grad(name, x, dy), rtol=1e-6, atol=0)


@pytest.mark.parametrize("text, problem", [
    ("x/0", "'x/0' is not finite"),
    ("log(x)", "'log(x)' is not a finite real number at x = -"),
    ("sqrt(x)", "'sqrt(x)' is not a finite real number at x = -"),
    ("x * log(x - 50)", "is not a finite real number at x = "),
    ("exp(1000) * x", "is not a finite float32"),
    # finite on the fitted range, undefined where the asymptotes are probed
    ("x * sigmoid(x) + 1 / (x + 35)", "is not a finite real number towards -inf (at x = -35"),
])
def test_cli_fit_refuses_functions_undefined_on_the_real_line(text, problem, capsys):
    """Domain errors are one line naming the expression and where it is not finite, never a traceback."""
    assert cli.main(["fit", "--expr", text, "--bits", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kernelgen fit: error: ") and problem in err and "\n" not in err, err


def test_cli_new_refuses_to_overwrite_and_checks_arguments_first(tmp_path, capsys):
    path = tmp_path / "myact.toml"
    path.write_text("# my hand-edited spec\n")
    argv = ["new", "myact", "--expr", "x * sigmoid(x)", "--bits", "1", "--dir", str(tmp_path), "--no-build"]
    assert cli.main(argv) == 1
    assert "myact.toml already exists; pass --force to overwrite it" in capsys.readouterr().err
    assert path.read_text() == "# my hand-edited spec\n"
    assert cli.main(argv + ["--force"]) == 0
    assert spec.load(path).name == "myact"
    for bad, needle in [(["configs"], "name: 'configs' is reserved"), (["ab\n"], "name: 'ab\\n' must be"),
                        (["other", "--description", "a\nb"], "--description: contains U+000A")]:
        assert cli.main(["new", *bad, "--expr", "x * sigmoid(x)", "--dir", str(tmp_path), "--no-build"]) == 1
        assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myact.toml"]


@pytest.mark.parametrize("description", ['it\'s "quoted" \\ \\n \\u0041 \'\'\' """', "GELU 😀 é ∫ \u00a0 \U0010fffd",
                                         "[op]\\nname = 'x'"])
def test_cli_new_writes_toml_that_reads_back(tmp_path, description):
    import tomllib

    assert cli.main(["new", "myact", "--expr", "x * sigmoid(x)", "--bits", "1", "--dir", str(tmp_path), "--no-build",
                     "--description", description, "--replaces", description[::-1]]) == 0
    data = tomllib.loads((tmp_path / "myact.toml").read_text(encoding="utf-8"))
    assert data["op"]["description"] == description and data["op"]["replaces"] == description[::-1]
    assert spec.load(tmp_path / "myact.toml").description == description
