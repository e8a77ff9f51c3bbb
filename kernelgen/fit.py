"""Fit a k-bit step-function derivative to an activation: the heart of Approx-BP.

g(x) = b + L_0 x + sum_i a_i relu(x - c_i) approximates h(x); only g' (a step function with
levels L_j = L_0 + a_1 + ... + a_j) is stored, as a k-bit code per element. We minimise

    E(c, a) = integral (h(x) - g(x))^2 dx

subject to g matching h's straight-line asymptotes at both ends (otherwise E is infinite):
L_0 and b from h at -inf, sum a_i = L_m - L_0 and the intercept at +inf. The offset b is free
(only g' is stored), so h may tend to any constant at -inf (ELU tends to -1).

Variable projection: for fixed thresholds c, E is quadratic in a under two linear constraints,
so a is solved exactly (KKT system); the thresholds alone are optimised, as gaps exp(u_j) so they
stay ascending. Every start is fixed: the same input gives the same output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import sympy

from . import expr as expr_mod

RANGE = 40.0  # integrate over [-RANGE, RANGE]; every tail we fit decays well inside it
PANEL = 0.25  # width of one Gauss-Legendre panel
_GL_X, _GL_W = np.polynomial.legendre.leggauss(10)


class FitError(ValueError):
    """The activation cannot be fitted by fixed levels; the message says why."""


@dataclass(frozen=True)
class Asymptotes:
    slope_left: float  # L_0 = h'(-inf)
    offset_left: float  # b = lim h(x) - L_0 x at -inf
    slope_right: float  # L_m = h'(+inf)
    offset_right: float  # lim h(x) - L_m x at +inf


@dataclass(frozen=True)
class Fit:
    bits: int
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]
    error: float
    seconds: float
    evaluations: int


def numeric(e: sympy.Expr):
    """e as a numpy function of x (scipy supplies erf)."""
    return sympy.lambdify(expr_mod.X, e, modules=["scipy", "numpy"])


def asymptotes(h: expr_mod.Expr) -> Asymptotes:
    """h's straight-line asymptotes, evaluated with 50 digits at |x| = 25, 35, 50 and required to have
    settled; an activation whose derivative grows without bound (ReLU^2) or keeps moving is refused."""
    f = sympy.lambdify(expr_mod.X, h.sym, "mpmath")
    df = sympy.lambdify(expr_mod.X, h.derivative(), "mpmath")
    import mpmath

    out = []
    with mpmath.workdps(50):
        for side in (-1, 1):
            probes = [side * r for r in (25, 35, 50)]
            p = probes[0]  # named in the error: the probe being evaluated when it failed
            try:
                slopes = []
                for p in probes:
                    slopes.append(float(df(mpmath.mpf(p))))
                offsets = []
                for p in probes:
                    offsets.append(float(f(mpmath.mpf(p)) - slopes[-1] * p))
            except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:  # TypeError: complex
                raise FitError(f"{h.text!r} is not a finite real number towards {'+' if side > 0 else '-'}inf "
                               f"(at x = {p}: {err}); kernelgen fit needs h defined on the whole real line") from None
            end = "+inf" if side > 0 else "-inf"
            if not all(np.isfinite(slopes)) or max(slopes) - min(slopes) > 1e-6 * max(1.0, abs(slopes[-1])):
                raise FitError(f"the derivative of {h.text!r} does not settle to a constant towards {end} "
                               f"(h'({probes[0]}) = {slopes[0]:.6g}, h'({probes[-1]}) = {slopes[-1]:.6g}): a step "
                               "function with fixed levels cannot follow it")
            if not all(np.isfinite(offsets)) or max(offsets) - min(offsets) > 1e-5 * max(1.0, abs(offsets[-1])):
                raise FitError(f"{h.text!r} does not approach a straight line towards {end}: the fit error would be infinite")
            out += [slopes[-1], offsets[-1]]
    out = [0.0 if abs(v) < 1e-12 else v for v in out]  # e.g. SiLU's slope at -inf is -50 e^-50, i.e. 0
    return Asymptotes(slope_left=out[0], offset_left=out[1], slope_right=out[2], offset_right=out[3])


class _Problem:
    """E(c) with the levels solved exactly, on Gauss-Legendre panels split at every threshold."""

    def __init__(self, h: expr_mod.Expr, bits: int):
        self.h = numeric(h.sym)
        self._check_finite(h)
        self.asym = asymptotes(h)
        self.m = 2**bits - 1
        self.evaluations = 0

    def _check_finite(self, h: expr_mod.Expr) -> None:
        """The fit integrates h over [-RANGE, RANGE]: h must be a finite real number at every node."""
        x, _ = self.nodes(np.array([]))
        with np.errstate(all="ignore"):
            y = np.broadcast_to(np.asarray(self.h(x)), x.shape)
        bad = ~np.isfinite(y) if np.isrealobj(y) else ~(np.isfinite(y) & (y.imag == 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise FitError(f"{h.text!r} is not a finite real number at x = {x[i]:.6g} (h = {y[i]}) and "
                           f"{int(bad.sum()) - 1} more of the {len(x)} points in [-{RANGE:g}, {RANGE:g}]; "
                           "kernelgen fit needs h defined on the whole real line")

    def nodes(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside = c[(c > -RANGE) & (c < RANGE)]
        edges = np.concatenate([[-RANGE], np.sort(inside), [RANGE]])
        xs, ws = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            panels = np.linspace(lo, hi, max(1, int(np.ceil((hi - lo) / PANEL))) + 1)
            half, mid = np.diff(panels)[:, None] / 2, (panels[:-1] + panels[1:])[:, None] / 2
            xs.append((mid + half * _GL_X).ravel())
            ws.append((half * _GL_W).ravel())
        return np.concatenate(xs), np.concatenate(ws)

    def solve(self, c: np.ndarray, with_gradient: bool = False):
        """The coefficients a minimising E for thresholds c, that E, and (optionally) dE/dc."""
        self.evaluations += 1
        x, w = self.nodes(c)
        a_ = self.asym
        target = self.h(x) - a_.offset_left - a_.slope_left * x
        basis = np.maximum(x[:, None] - c[None, :], 0.0)
        gram = basis.T @ (w[:, None] * basis)
        rhs = basis.T @ (w * target)
        # Constraints: the slope at +inf, and the intercept there: b + L_m x - sum a_i c_i = d + L_m x.
        cons = np.vstack([np.ones_like(c), c])
        cons_rhs = np.array([a_.slope_right - a_.slope_left, a_.offset_left - a_.offset_right])
        kkt = np.block([[gram, cons.T], [cons, np.zeros((2, 2))]])
        try:
            sol = np.linalg.solve(kkt, np.concatenate([rhs, cons_rhs]))
        except np.linalg.LinAlgError:
            return np.zeros_like(c), np.inf, np.zeros_like(c)
        a, mu = sol[: len(c)], sol[len(c):]
        resid = basis @ a - target
        err = float(np.sum(w * resid * resid))
        if not with_gradient:
            return a, err, None
        # Envelope theorem on the Lagrangian of E (multipliers 2 mu): moving c_i shifts relu(x - c_i)
        # (d g / d c_i = -a_i [x > c_i]) and enters the intercept constraint sum a c.
        tail = np.array([np.sum((w * resid)[x > ci]) for ci in c])
        return a, err, -2.0 * a * tail + 2.0 * mu[1] * a


def _thresholds(u: np.ndarray) -> np.ndarray:
    """Unconstrained u -> ascending thresholds: c_1 = u_0, c_{j+1} = c_j + exp(u_j)."""
    return u[0] + np.concatenate([[0.0], np.cumsum(np.exp(u[1:]))])


def _thresholds_jacobian(u: np.ndarray) -> np.ndarray:
    m = len(u)
    jac = np.zeros((m, m))
    jac[:, 0] = 1.0
    for j in range(1, m):
        jac[j:, j] = np.exp(u[j])
    return jac


def _params(c: np.ndarray) -> np.ndarray:
    return np.concatenate([[c[0]], np.log(np.diff(c))])


def error_of(h: expr_mod.Expr, thresholds, levels) -> float:
    """E for given thresholds and levels (e.g. the published ones), by the same integrator."""
    prob = _Problem(h, 1)
    c = np.asarray(thresholds, dtype=np.float64)
    a = np.diff(np.asarray(levels, dtype=np.float64))
    x, w = prob.nodes(c)
    g = levels[0] * x + np.maximum(x[:, None] - c[None, :], 0.0) @ a
    # The offset is pinned by h's asymptote at -inf: any other b makes the integral diverge.
    resid = prob.h(x) - prob.asym.offset_left - g
    return float(np.sum(w * resid * resid))


def fit(h: expr_mod.Expr | str, bits: int) -> Fit:
    """Fit `bits`-bit levels and thresholds to h. Deterministic; a few seconds at most."""
    from threadpoolctl import threadpool_limits

    # The matrices are tiny (thousands x 15): a multi-threaded BLAS only spins (10x slower seen).
    with threadpool_limits(limits=1):
        return _fit(h, bits)


def _fit(h: expr_mod.Expr | str, bits: int) -> Fit:
    from scipy.optimize import minimize

    if isinstance(h, str):
        h = expr_mod.parse(h)
    if bits not in (1, 2, 3, 4):
        raise FitError(f"bits must be 1, 2, 3 or 4, got {bits}")
    start = time.perf_counter()
    prob = _Problem(h, bits)
    m, asym = prob.m, prob.asym
    rise = asym.slope_right - asym.slope_left
    if m == 1:
        # One threshold, both levels pinned by the slopes and the threshold by the intercept.
        if rise == 0:
            raise FitError(f"{h.text!r} has the same slope at both ends: 1 bit cannot fit it, use 2 or more")
        c = np.array([(asym.offset_left - asym.offset_right) / rise + 0.0])  # + 0.0: no -0.0
    else:
        def objective(u):
            _, err, grad = prob.solve(_thresholds(u), with_gradient=True)
            return err, _thresholds_jacobian(u).T @ grad

        best = None
        for spread in (2.0, 4.0, 7.0):  # fixed starts: thresholds evenly over [-spread, spread]
            res = minimize(objective, _params(np.linspace(-spread, spread, m)), jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-11})
            if best is None or res.fun < best.fun:
                best = res
        c = _thresholds(best.x)
    if m == 1:
        levels = np.array([asym.slope_left, asym.slope_right])
        err = error_of(h, c, levels)
    else:
        a, err, _ = prob.solve(c)
        levels = asym.slope_left + np.concatenate([[0.0], np.cumsum(a)])
    if not np.isfinite(err):
        raise FitError(f"no {bits}-bit step function matches the asymptotes of {h.text!r}")
    return Fit(bits=bits, thresholds=tuple(float(v) for v in c), levels=tuple(float(v) for v in levels),
               error=err, seconds=time.perf_counter() - start, evaluations=prob.evaluations)
