"""Forward-function expressions: parse a math expression over x, print it as Triton and torch code.

The language is deliberately small: the variable ``x``, numbers, + - * / **, the constants ``pi``
and ``e``, the functions in ``FUNCTIONS``, and comparisons (< <= > >=) as the condition of
``where(cond, a, b)``. Python's ``ast`` checks every token first (so an error names the offending
token), then sympy builds the expression, folds constants and differentiates it (the exact
derivative is the tests' reference and the exact gated-MLP backward).
"""

from __future__ import annotations

import ast
import math
import struct
from dataclasses import dataclass

import sympy

from . import plaintext

X = sympy.Symbol("x", real=True)

# name -> (number of arguments, sympy constructor). sigmoid has no sympy class: it is spelled out.
FUNCTIONS = {
    "exp": (1, sympy.exp),
    "log": (1, sympy.log),
    "log1p": (1, lambda z: sympy.log(1 + z)),
    "tanh": (1, sympy.tanh),
    "sigmoid": (1, lambda z: 1 / (1 + sympy.exp(-z))),
    "erf": (1, sympy.erf),
    "sqrt": (1, sympy.sqrt),
    "abs": (1, sympy.Abs),
    "max": (2, sympy.Max),
    "min": (2, sympy.Min),
    "where": (3, lambda cond, a, b: sympy.Piecewise((a, cond), (b, True))),
}
CONSTANTS = {"pi": sympy.pi, "e": sympy.E}

_ALLOWED_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Load, ast.Compare,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd, ast.Gt, ast.GtE, ast.Lt, ast.LtE,
)
_COMPARE = {ast.Gt: sympy.StrictGreaterThan, ast.GtE: sympy.GreaterThan,
            ast.Lt: sympy.StrictLessThan, ast.LtE: sympy.LessThan}


# Bounds that keep parsing, sympy and the printers well inside Python's recursion limit.
MAX_CHARS = 2000
MAX_DEPTH = 40  # nesting of operators and calls
MAX_NODES = 400


class ExprError(ValueError):
    """An expression uses something outside the supported language."""


def to_f32(value: float) -> float:
    """The float32 nearest to value (round to nearest even), as a Python float (inf beyond float32's range)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class Expr:
    text: str  # canonical: printed back from the checked syntax tree (no comments, one line)
    sym: sympy.Expr

    def derivative(self) -> sympy.Expr:
        return sympy.diff(self.sym, X)

    def triton(self) -> str:
        return _Printer(_TRITON).print(self.sym)

    def triton_derivative(self) -> str:
        return _Printer(_TRITON).print(self.derivative())

    def torch_derivative(self) -> str:
        return _Printer(_TORCH).print(self.derivative())

    def cpp_vec(self) -> str:
        """C++ over at::vec::Vectorized<float> (the CPU template's V, with its lm:: helpers)."""
        return _Printer(_CPP_VEC).print(self.sym)

    def cpp_vec_program(self, derivative: bool) -> tuple[list[tuple[str, str]], list[str]]:
        """h (and h') as C++ over Vectorized<float>, sharing common subexpressions: the statements
        (name, value) that define temporaries t0, t1, ... in order, then the result expressions. The
        vector functions are opaque calls to the compiler, so without this SiLU's h' computes exp(-x)
        three times."""
        exprs = [self.sym] + ([self.derivative()] if derivative else [])
        temps, results = sympy.cse(exprs, symbols=sympy.numbered_symbols("t", real=True), optimizations=None)
        printer = _Printer(_CPP_VEC)
        return [(name.name, printer.print(value)) for name, value in temps], [printer.print(r) for r in results]

    def check_printable(self, derivative: bool) -> None:
        """ExprError unless h (and h' if `derivative`) print as code whose every constant is a
        finite float32: a constant beyond float32 would otherwise fail deep in the Triton compiler."""
        what = [("", self.sym)] + ([("its derivative ", self.derivative())] if derivative else [])
        for label, sym in what:
            try:
                for target in (_TRITON, _TORCH):
                    _Printer(target).print(sym)
            except ExprError as err:
                raise ExprError(f"{self.text!r}: {label}{err}") from None

    def torch(self) -> str:
        """Torch code for h; a single native call where the expression is one torch has fused."""
        for text, code in TORCH_NATIVE.items():
            if self.sym == _NATIVE_SYMS.setdefault(text, parse(text).sym):  # structural: same expression
                return code
        return _Printer(_TORCH).print(self.sym)


# Expressions torch computes in one fused kernel: the CPU path calls those instead of composing
# several elementwise ops (5-10x faster there). Matching compares sympy trees, so the expression must
# be the same one (up to sympy's canonical ordering), not merely equivalent.
TORCH_NATIVE = {
    "0.5 * x * (1 + erf(x / sqrt(2)))": "torch.nn.functional.gelu(x)",
    "0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x**3)))": "torch.nn.functional.gelu(x, approximate='tanh')",
    "x * sigmoid(x)": "torch.nn.functional.silu(x)",
    "x * tanh(max(x, 0) + log1p(exp(-abs(x))))": "torch.nn.functional.mish(x)",
    "where(x > 0, x, exp(x) - 1)": "torch.nn.functional.elu(x)",
}
_NATIVE_SYMS: dict[str, sympy.Expr] = {}


def parse(text: str) -> Expr:
    """Check `text` against the language and build it. The Expr's text is the canonical spelling
    of what was checked (comments and line breaks gone), so what is stored is what was validated."""
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression of {len(text)} characters; at most {MAX_CHARS}")
    bad = plaintext.problem(text, allow="\t\n\r")  # an expression may be laid out over lines
    if bad:
        raise ExprError(f"{_quote(text)} {bad}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ExprError(f"cannot parse {_quote(text)}: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ExprError(f"{_quote(text)} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    _check_size(tree, text)
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ExprError(f"unsupported syntax {type(node).__name__!r} in {_quote(text)}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise ExprError(f"unknown function {name!r} in {_quote(text)}; supported: {', '.join(sorted(FUNCTIONS))}")
            arity = FUNCTIONS[node.func.id][0]
            if len(node.args) != arity or node.keywords:
                raise ExprError(f"function {node.func.id!r} takes {arity} argument(s) in {_quote(text)}")
        elif isinstance(node, ast.Compare) and len(node.ops) != 1:
            raise ExprError(f"chained comparison in {_quote(text)}: write one comparison per where()")
        elif isinstance(node, ast.Name):
            if node.id != "x" and node.id not in CONSTANTS and node.id not in FUNCTIONS:
                raise ExprError(f"unknown name {node.id!r} in {_quote(text)}; the variable is 'x', constants: pi, e")
        elif isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise ExprError(f"unsupported constant {node.value!r} in {_quote(text)}")
    _check_conditions(tree.body, text, in_condition=False)
    sym = _build(tree.body)
    if sym.free_symbols - {X}:
        raise ExprError(f"{_quote(text)} depends on something other than x")
    if X not in sym.free_symbols:
        raise ExprError(f"{_quote(text)} does not depend on x")
    if sym.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        raise ExprError(f"{_quote(text)} is not finite (an infinite constant, a division by zero or a log of zero?)")
    if sym.has(sympy.I):
        raise ExprError(f"{_quote(text)} has a complex constant (a square root or log of a negative number?)")
    e = Expr(text=ast.unparse(tree.body), sym=sym)
    e.check_printable(derivative=False)  # every constant the kernels would hold fits float32
    return e


def _quote(text: str) -> str:
    """text for a message: quoted (one line), and shortened if long."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _check_size(tree: ast.AST, text: str) -> None:
    """Depth and node count, without recursion (a deep tree is what is being refused)."""
    count, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ExprError(f"{_quote(text)} is nested too deeply (at most {MAX_DEPTH} levels)")
        if count > MAX_NODES:
            raise ExprError(f"{_quote(text)} is too large (at most {MAX_NODES} syntax nodes)")
        stack += [(child, depth + 1) for child in ast.iter_child_nodes(node)]


def _check_conditions(node: ast.AST, text: str, in_condition: bool) -> None:
    """Comparisons only as where()'s condition, and where()'s condition only a comparison."""
    if isinstance(node, ast.Compare) and not in_condition:
        raise ExprError(f"a comparison can only be the first argument of where() in {_quote(text)}")
    if isinstance(node, ast.Call) and node.func.id == "where":
        if not isinstance(node.args[0], ast.Compare):
            raise ExprError(f"where()'s first argument must be a comparison such as x > 0 in {_quote(text)}")
        _check_conditions(node.args[0].left, text, False)
        _check_conditions(node.args[0].comparators[0], text, False)
        for arg in node.args[1:]:
            _check_conditions(arg, text, False)
        return
    for child in ast.iter_child_nodes(node):
        _check_conditions(child, text, False)


def _build(node: ast.AST):
    if isinstance(node, ast.Constant):
        return sympy.Rational(node.value) if isinstance(node.value, int) else sympy.Float(node.value, 17)
    if isinstance(node, ast.Name):
        return X if node.id == "x" else CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        inner = _build(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Compare):
        return _COMPARE[type(node.ops[0])](_build(node.left), _build(node.comparators[0]))
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id][1](*[_build(a) for a in node.args])
    left, right = _build(node.left), _build(node.right)
    return {ast.Add: lambda: left + right, ast.Sub: lambda: left - right, ast.Mult: lambda: left * right,
            ast.Div: lambda: left / right, ast.Pow: lambda: left ** right}[type(node.op)]()


@dataclass(frozen=True)
class _Target:
    """How one language spells the functions. Triton code uses builtins only: the @jit helpers of
    triton.language.standard (tl.sigmoid, ...) break the interpreter when triton was imported first
    without TRITON_INTERPRET. tanh has no builtin common to Triton 3.x releases: generated files
    define _tanh (TRITON_HELPERS) from exp, with a series near 0 where the exp form cancels."""

    funcs: dict
    sqrt: str
    where: str
    number: object = None  # how a constant is spelled; None: Python's repr (Triton, torch)


_TRITON = _Target(
    funcs={sympy.exp: "tl.exp({})", sympy.log: "tl.log({})", sympy.erf: "tl.math.erf({})", sympy.Abs: "tl.abs({})",
           # tanh(z) = 2 / (1 + e^-2z) - 1 cancels near 0: there, its odd series (error < 1e-14)
           sympy.tanh: "_tanh({})"},
    sqrt="tl.sqrt_rn({})",  # tl.sqrt is approximate
    where="tl.where({}, {}, {})",
)
_TORCH = _Target(
    funcs={sympy.exp: "torch.exp({})", sympy.log: "torch.log({})", sympy.erf: "torch.special.erf({})",
           sympy.Abs: "torch.abs({})", sympy.tanh: "torch.tanh({})"},
    sqrt="torch.sqrt({})",
    where="torch.where({}, {}, {})",
)
# C++ CPU kernels: every value is a Vectorized<float>; constants are float32 hex literals (exact, as
# the float32 kernels round them), functions the vector library's (Sleef inside torch), where() a blend.
_CPP_VEC = _Target(
    funcs={sympy.exp: "lm::exp({})", sympy.log: "lm::log({})", sympy.erf: "lm::erf({})", sympy.Abs: "lm::abs({})",
           sympy.tanh: "lm::tanh({})"},
    sqrt="lm::sqrt({})",
    where="lm::where({}, {}, {})",
    number=lambda v: f"V({float.hex(to_f32(v))}f)",
)
TRITON_HELPERS = '''
@triton.jit
def _tanh(z):
    big = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
    z2 = z * z
    return tl.where(tl.abs(z) < 0.01, z * (1.0 - z2 * (0.3333333333333333 - z2 * (0.13333333333333333 - z2 * 0.05396825396825397))), big)
'''
_RELATIONS = {sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=", sympy.StrictLessThan: "<", sympy.LessThan: "<="}


class _Printer:
    """Prints a sympy expression in x as code over a float32 tensor named x."""

    def __init__(self, target: _Target):
        self.t = target

    def num(self, value: float) -> str:
        if self.t.number is not None:
            return self.t.number(value)
        return repr(value) if value >= 0 else f"({value!r})"

    def print(self, e) -> str:
        if not e.free_symbols:
            return self.num(_constant(e))
        if e == X:
            return "x"
        if isinstance(e, sympy.Symbol):  # a temporary of cpp_vec_program
            return e.name
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self.print(a) for a in _ordered(e.args)) + ")"
        if isinstance(e, sympy.Mul):
            # Fold every constant factor into one float, so sqrt(2)/2 prints as 0.7071067811865476.
            coeff = _constant(sympy.Mul(*[a for a in e.args if not a.free_symbols]))
            rest = _ordered(a for a in e.args if a.free_symbols)
            nums = [a for a in rest if not (isinstance(a, sympy.Pow) and a.exp.is_negative)]
            dens = [1 / a for a in rest if isinstance(a, sympy.Pow) and a.exp.is_negative]
            sign, coeff = ("-", -coeff) if coeff < 0 else ("", coeff)
            factors = ([] if coeff == 1.0 else [self.num(coeff)]) + [self.print(a) for a in nums]
            top = sign + (" * ".join(factors) if factors else self.num(1.0))
            if not dens:
                return "(" + top + ")"
            return "(" + top + " / (" + " * ".join(self.print(d) for d in dens) + "))"
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return self.t.sqrt.format(self.print(base))
            if exp == sympy.Rational(-1, 2):
                return "(" + self.num(1.0) + " / " + self.t.sqrt.format(self.print(base)) + ")"
            if exp.is_Integer and 0 < int(exp) <= 4:
                b = self.print(base)
                return "(" + " * ".join([b] * int(exp)) + ")"
            if exp.is_Integer and -4 <= int(exp) < 0:
                return "(" + self.num(1.0) + " / " + self.print(base ** -exp) + ")"
            raise ExprError(f"unsupported power {e}: only integer powers up to 4 and square roots")
        if isinstance(e, sympy.Piecewise):
            (value, cond), rest = e.args[0], e.args[1:]
            other = self.print(sympy.Piecewise(*rest)) if len(rest) > 1 or rest[0][1] is not sympy.true else self.print(rest[0][0])
            return self.t.where.format(self.print(cond), self.print(value), other)
        if isinstance(e, (sympy.Max, sympy.Min)):
            a, *others = _ordered(e.args)
            b = self.print(type(e)(*others)) if len(others) > 1 else self.print(others[0])
            op = ">" if isinstance(e, sympy.Max) else "<"
            pa = self.print(a)
            return self.t.where.format(f"({pa} {op} {b})", pa, b)
        if isinstance(e, sympy.Heaviside):  # from d/dx max(x, 0): 0 below, 1 above, 1/2 at 0
            z = self.print(e.args[0])
            one, zero, half = self.num(1.0), self.num(0.0), self.num(0.5)
            return self.t.where.format(f"({z} > {zero})", one, self.t.where.format(f"({z} < {zero})", zero, half))
        if isinstance(e, sympy.sign):
            z = self.print(e.args[0])
            one, zero = self.num(1.0), self.num(0.0)
            return self.t.where.format(f"({z} > {zero})", one, self.t.where.format(f"({z} < {zero})", self.num(-1.0), zero))
        if type(e) in _RELATIONS:
            return f"({self.print(e.lhs)} {_RELATIONS[type(e)]} {self.print(e.rhs)})"
        for cls, fmt in self.t.funcs.items():
            if isinstance(e, cls):
                return fmt.format(self.print(e.args[0]))
        raise ExprError(f"cannot print {e} ({type(e).__name__})")


def _constant(e) -> float:
    """A constant of the printed code: a real number that float32 holds (kernels compute in it)."""
    try:
        value = float(e)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not (math.isfinite(value) and math.isfinite(to_f32(value))):
        raise ExprError(f"the constant {sympy.sstr(e)[:60]} is not a finite float32 (|c| <= 3.4e38)")
    if value != 0 and to_f32(value) == 0:
        raise ExprError(f"the constant {sympy.sstr(e)[:60]} underflows to 0 in float32 (|c| >= 1.4e-45)")
    return value


def _ordered(args):
    # sympy's own ordering is canonical; sorting keeps printed code stable across runs.
    return sorted(args, key=sympy.default_sort_key)
