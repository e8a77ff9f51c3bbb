"""Spec files: the built-ins load with the published numbers; malformed ones are rejected with
file:line, field and problem."""

import math

import numpy as np
import pytest
import sympy

from kernelgen import expr, spec

from . import reference as ref

GOOD = """\
[op]
name = "myact"
forward = "x * sigmoid(x)"

[approx]
bits = 2
boundary = "lower"
thresholds = [-1.0, 0.0, 1.0]
coefficients = [0.25, 0.5, 0.25]
fit_error = 0.5
"""


def write(tmp_path, text, name="myact.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtins_load_with_published_coefficients():
    specs = {s.name: s for s in spec.load_builtin()}
    assert set(specs) >= {"regelu2", "resilu2"}
    for name, pub in ref.PUBLISHED.items():
        s = specs[name]
        assert s.bits == 2 and s.thresholds == tuple(pub["c"])
        np.testing.assert_allclose(s.levels, pub["levels"], atol=5e-7)
    assert specs["regelu2"].fit_error == pytest.approx(0.0095093)
    assert specs["resilu2"].fit_error == pytest.approx(0.0399438)


def test_good_spec_and_levels_from_coefficients(tmp_path):
    s = spec.load(write(tmp_path, GOOD))
    assert s.levels == (0.0, 0.25, 0.75, 1.0) and s.codes_per_byte == 4


@pytest.mark.parametrize(
    "edit, line, field, problem",
    [
        (("bits = 2", "bits = 5"), 6, "[approx].bits", "5 is not supported"),
        (("bits = 2", 'bits = "2"'), 6, "[approx].bits", "must be int"),
        (("[-1.0, 0.0, 1.0]", "[-1.0, 1.0, 0.0]"), 8, "[approx].thresholds", "strictly ascending"),
        (("[-1.0, 0.0, 1.0]", "[-1.0, 0.0]"), 8, "[approx].thresholds", "needs 3 values for bits = 2, got 2"),
        (("[-1.0, 0.0, 1.0]", "[-1.0, nan, 1.0]"), 8, "[approx].thresholds", "finite number"),
        (('boundary = "lower"', 'boundary = "left"'), 7, "[approx].boundary", "'left' is not one of lower, upper"),
        (('name = "myact"', 'name = "My-Act"'), 2, "[op].name", "lower-case letters"),
        (('"x * sigmoid(x)"', '"x * softsign(x)"'), 3, "[op].forward", "unknown function 'softsign'"),
        (('"x * sigmoid(x)"', '"x * y"'), 3, "[op].forward", "unknown name 'y'"),
        (("fit_error = 0.5", "fit_error = -1.0"), 10, "[approx].fit_error", "finite number >= 0"),
        (("fit_error = 0.5", "fit_eror = 0.5"), 10, "[approx].fit_eror", "unknown field"),
        (("coefficients = [0.25, 0.5, 0.25]", "coefficients = [0.25, 0.5, 0.25]\nlevels = [0, 1, 2, 3]"), 9,
         "[approx].coefficients", "exactly one of"),
    ],
)
def test_malformed_spec_names_file_line_field(tmp_path, edit, line, field, problem):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(spec.SpecError) as err:
        spec.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    assert problem in msg


def test_missing_field_and_table(tmp_path):
    with pytest.raises(spec.SpecError, match=r"myact.toml:\d+: \[approx\].bits: missing required field"):
        spec.load(write(tmp_path, GOOD.replace("bits = 2\n", "")))
    with pytest.raises(spec.SpecError, match=r"myact.toml: \[approx\]: missing table"):
        spec.load(write(tmp_path, GOOD[: GOOD.index("[approx]")]))


def test_not_toml_and_not_there(tmp_path):
    with pytest.raises(spec.SpecError, match="not valid TOML"):
        spec.load(write(tmp_path, "[op\nname="))
    with pytest.raises(spec.SpecError, match="cannot read spec"):
        spec.load(tmp_path / "absent.toml")


def test_duplicate_names_rejected(tmp_path):
    a, b = write(tmp_path, GOOD, "a.toml"), write(tmp_path, GOOD, "b.toml")
    with pytest.raises(spec.SpecError, match="'myact' is already defined by"):
        spec.check_unique([spec.load(a), spec.load(b)])


@pytest.mark.parametrize("text", [
    "0.5 * x * (1 + erf(x / sqrt(2)))",
    "x * sigmoid(x)",
    "x * tanh(log1p(exp(x)))",
    "log(1 + exp(x))",
    "x / (1 + abs(x))",
    "x**3 - 2*x**2 + e*x / pi",
])
def test_printed_torch_code_evaluates_like_sympy(text):
    """The printed torch code against sympy's own arbitrary-precision evaluation."""
    import torch

    e = expr.parse(text)
    fn = eval(f"lambda x: {e.torch()}", {"torch": torch})
    xs = np.linspace(-6, 6, 41)
    got = fn(torch.tensor(xs, dtype=torch.float64)).numpy()
    want = [float(e.sym.subs(expr.X, sympy.Float(v, 30)).evalf(30)) for v in xs]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert "torch." not in e.triton() and "tl." not in e.torch()


def test_expression_language_is_closed():
    for bad, needle in [("__import__('os')", "unknown function '__import__'"), ("x.real", "Attribute"),
                        ("lambda: x", "Lambda"), ("3.0", "does not depend on x"), ("x + True", "unsupported constant")]:
        with pytest.raises(expr.ExprError, match=needle):
            expr.parse(bad)
    assert math.isclose(float(expr.parse("sqrt(2) * x").derivative()), math.sqrt(2))


DEEP = "exp(" * 200 + "x" + ")" * 200


@pytest.mark.parametrize("old, new, field, problem", [
    ('"x * sigmoid(x)"', '"1e400 * x"', "[op].forward", "is not finite"),
    ('"x * sigmoid(x)"', '"exp(1000) * x"', "[op].forward", "exp(1000) is not a finite float32"),
    ('"x * sigmoid(x)"', '"10**400 * x"', "[op].forward", "is not a finite float32"),
    ('"x * sigmoid(x)"', '"x * 1e-50"', "[op].forward", "underflows to 0 in float32"),
    ('"x * sigmoid(x)"', '"x / 0"', "[op].forward", "is not finite"),
    ('"x * sigmoid(x)"', '"x * sqrt(-1)"', "[op].forward", "complex"),
    ('"x * sigmoid(x)"', f'"{DEEP}"', "[op].forward", "nested too deeply"),
    ('"x * sigmoid(x)"', '"' + "-" * 5000 + 'x"', "[op].forward", "at most 2000"),
    ('"x * sigmoid(x)"', '"x' + " + x" * 100 + '"', "[op].forward", "nested too deeply"),
    ("[-1.0, 0.0, 1.0]", "[-1.0, 0.0, 1e39]", "[approx].thresholds", "1e+39 overflows float32"),
    ("coefficients = [0.25, 0.5, 0.25]", "levels = [0.0, 1.0, 2.0, -1e39]", "[approx].levels", "overflows float32"),
    ("coefficients = [0.25, 0.5, 0.25]", "coefficients = [3e38, 3e38, 0.25]", "[approx].coefficients", "overflows float32"),
    ('name = "myact"', 'name = "myact\\n"', "[op].name", "lower-case letters"),
    ('name = "myact"', 'name = "configs"', "[op].name", "'configs' is reserved"),
    ('name = "myact"', 'name = "ops"', "[op].name", "reserved"),
    ('name = "myact"', 'name = "ms_norm"', "[op].name", "reserved"),
    ('name = "myact"', 'name = "manifest"', "[op].name", "reserved"),
    ('name = "myact"', 'name = "lambda"', "[op].name", "reserved"),
    ('name = "myact"', 'name = "myact"\ndescription = "a\\rb"', "[op].description", "U+000D (CARRIAGE RETURN)"),
    ('name = "myact"', 'name = "myact"\nreplaces = "a\\u2029b"', "[op].replaces", "U+2029"),
    ("fit_error = 0.5", 'fit_error = 0.5\nfit_source = "a\\u0085b"', "[approx].fit_source", "U+0085"),
])
def test_values_kernels_cannot_hold_are_refused_in_one_line(tmp_path, old, new, field, problem):
    """Each would otherwise pass validation and fail deep in the Triton compiler, raise a
    RecursionError, or break the generated tree."""
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(spec.SpecError) as err:
        spec.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and f": {field}: " in msg and problem in msg, msg
    assert "\n" not in msg and len(msg) < 400


def test_expressions_are_stored_canonical():
    e = expr.parse("(x *  # a comment\n  sigmoid(x))  # another")
    assert e.text == "x * sigmoid(x)" and e.sym == expr.parse("x*sigmoid(x)").sym
