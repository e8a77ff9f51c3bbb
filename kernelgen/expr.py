"""Forward-function expressions: parse a math expression over x, print it as Triton and torch code.

The language is deliberately small: the variable ``x``, numbers, + - * / **, and the functions in
``FUNCTIONS``. Python's ``ast`` checks every token first (so an error names the offending token),
then sympy builds the expression, simplifies constant sub-expressions and differentiates it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import sympy

X = sympy.Symbol("x", real=True)

# name -> sympy constructor. sigmoid has no sympy class, so it is spelled out.
FUNCTIONS = {
    "exp": sympy.exp,
    "log": sympy.log,
    "log1p": lambda z: sympy.log(1 + z),
    "tanh": sympy.tanh,
    "sigmoid": lambda z: 1 / (1 + sympy.exp(-z)),
    "erf": sympy.erf,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
}
CONSTANTS = {"pi": sympy.pi, "e": sympy.E}

_ALLOWED_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd,
)


class ExprError(ValueError):
    """An expression uses something outside the supported language."""


@dataclass(frozen=True)
class Expr:
    text: str
    sym: sympy.Expr

    def derivative(self) -> sympy.Expr:
        return sympy.diff(self.sym, X)

    def triton(self) -> str:
        return _Printer(_TRITON_FUNCS).print(self.sym)

    def torch(self) -> str:
        """Torch code for h; a single native call where the expression is one torch has fused."""
        for text, code in TORCH_NATIVE.items():
            if sympy.simplify(self.sym - _NATIVE_SYMS.setdefault(text, parse(text).sym)) == 0:
                return code
        return _Printer(_TORCH_FUNCS).print(self.sym)


# Expressions torch computes in one fused kernel: the CPU path calls those instead of composing
# several elementwise ops (5-10x faster there). Matching is symbolic, so only exact equals qualify.
TORCH_NATIVE = {
    "0.5 * x * (1 + erf(x / sqrt(2)))": "torch.nn.functional.gelu(x)",
    "x * sigmoid(x)": "torch.nn.functional.silu(x)",
}
_NATIVE_SYMS: dict[str, sympy.Expr] = {}


def parse(text: str) -> Expr:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ExprError(f"cannot parse {text!r}: {err.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ExprError(f"unsupported syntax {type(node).__name__!r} in {text!r}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise ExprError(f"unknown function {name!r} in {text!r}; supported: {', '.join(sorted(FUNCTIONS))}")
            if len(node.args) != 1 or node.keywords:
                raise ExprError(f"function {node.func.id!r} takes exactly one argument in {text!r}")
        elif isinstance(node, ast.Name):
            if node.id != "x" and node.id not in CONSTANTS and node.id not in FUNCTIONS:
                raise ExprError(f"unknown name {node.id!r} in {text!r}; the variable is 'x', constants: pi, e")
        elif isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise ExprError(f"unsupported constant {node.value!r} in {text!r}")
    sym = _build(tree.body)
    if sym.free_symbols - {X}:
        raise ExprError(f"{text!r} depends on something other than x")
    if X not in sym.free_symbols:
        raise ExprError(f"{text!r} does not depend on x")
    return Expr(text=text, sym=sym)


def _build(node: ast.AST) -> sympy.Expr:
    if isinstance(node, ast.Constant):
        return sympy.Rational(node.value) if isinstance(node.value, int) else sympy.Float(node.value, 17)
    if isinstance(node, ast.Name):
        return X if node.id == "x" else CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        inner = _build(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](_build(node.args[0]))
    left, right = _build(node.left), _build(node.right)
    op = type(node.op)
    return {ast.Add: lambda: left + right, ast.Sub: lambda: left - right, ast.Mult: lambda: left * right,
            ast.Div: lambda: left / right, ast.Pow: lambda: left ** right}[op]()


# Function tables for the two targets. Triton code uses builtins only: the @jit helpers of
# triton.language.standard (tl.sigmoid, ...) break the interpreter when triton was imported first
# without TRITON_INTERPRET, and tanh has no builtin common to Triton 3.x releases.
_TRITON_FUNCS = {
    sympy.exp: "tl.exp({})",
    sympy.log: "tl.log({})",
    sympy.erf: "tl.math.erf({})",
    sympy.Abs: "tl.abs({})",
    sympy.tanh: "(2.0 / (1.0 + tl.exp(-2.0 * ({}))) - 1.0)",
}
_TORCH_FUNCS = {
    sympy.exp: "torch.exp({})",
    sympy.log: "torch.log({})",
    sympy.erf: "torch.special.erf({})",
    sympy.Abs: "torch.abs({})",
    sympy.tanh: "torch.tanh({})",
}
_SQRT = {"triton": "tl.sqrt_rn({})", "torch": "torch.sqrt({})"}  # tl.sqrt is approximate


class _Printer:
    """Prints a sympy expression in x as code over a float32 tensor named x."""

    def __init__(self, funcs: dict):
        self.funcs = funcs
        self.sqrt = _SQRT["triton" if funcs is _TRITON_FUNCS else "torch"]

    def print(self, e: sympy.Expr) -> str:
        if not e.free_symbols:
            value = float(e)
            return repr(value) if value >= 0 else f"({value!r})"
        if e == X:
            return "x"
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self.print(a) for a in _ordered(e.args)) + ")"
        if isinstance(e, sympy.Mul):
            # Fold every constant factor into one float, so sqrt(2)/2 prints as 0.7071067811865476.
            coeff = float(sympy.Mul(*[a for a in e.args if not a.free_symbols]))
            rest = _ordered(a for a in e.args if a.free_symbols)
            nums = [a for a in rest if not (isinstance(a, sympy.Pow) and a.exp.is_negative)]
            dens = [1 / a for a in rest if isinstance(a, sympy.Pow) and a.exp.is_negative]
            sign, coeff = ("-", -coeff) if coeff < 0 else ("", coeff)
            factors = ([] if coeff == 1.0 else [repr(coeff)]) + [self.print(a) for a in nums]
            top = sign + (" * ".join(factors) if factors else "1.0")
            if not dens:
                return "(" + top + ")"
            return "(" + top + " / (" + " * ".join(self.print(d) for d in dens) + "))"
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return self.sqrt.format(self.print(base))
            if exp.is_Integer and 0 < int(exp) <= 4:
                b = self.print(base)
                return "(" + " * ".join([b] * int(exp)) + ")"
            if exp.is_Integer and -4 <= int(exp) < 0:
                return "(1.0 / " + self.print(base ** -exp) + ")"
            raise ExprError(f"unsupported power {e}: only integer powers up to 4 and square roots")
        for cls, fmt in self.funcs.items():
            if isinstance(e, cls):
                return fmt.format(self.print(e.args[0]))
        raise ExprError(f"cannot print {e} ({type(e).__name__})")


def _ordered(args):
    # sympy's own ordering is canonical; sorting by str keeps printed code stable across runs.
    return sorted(args, key=sympy.default_sort_key)
