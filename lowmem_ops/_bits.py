"""The bit width of each approximate activation, chosen from what the exact model saw (used by
lowmem_ops.convert).

An approximate activation's backward is grad_x = L[code(x)] * g, with L the spec's levels and code(x)
the level index of x (the same codes the kernels save). With the exact model's input x and output
gradient g recorded at every call of the activation (lowmem_ops._gradients.Probe), the local
gradient cosine a k-bit op would give is

    cos(h'(x) * g, L_k[code_k(x)] * g)

over all calls as one vector: no backward per candidate, only the codes and the exact derivative.
It is the same quantity as the measured local cosine (lowmem_ops._gradients), for an x and g from the
exact model instead of the converted one (whose g is already changed by the layers after it).
"""

from __future__ import annotations

import torch

from ._gradients import cosine
from ._torch_backend import pack_codes, unpack_codes
from ._tree import OpInfo, available, get_op

WIDTHS = (1, 2, 3, 4)
# An op whose fit error E = integral (h - g)^2 is below this has h's own derivative (ReLU, LeakyReLU):
# E is then 0 up to quadrature rounding (~1e-29); the smallest inexact built-in's is 9.9e-6 (regelu4).
EXACT_FIT_ERROR = 1e-20


def is_exact(op: OpInfo) -> bool:
    """Its levels are h' itself (a step derivative): its gradient is the exact one for any input."""
    return op.fit_error <= EXACT_FIT_ERROR


# where two ops' forwards are compared (a family shares its h(x)): a float64 grid over the range of
# activations' inputs, past where the usual ones saturate
_SAME_FORWARD_GRID = (-30.0, 30.0, 6001)


def family(op_name: str) -> list[OpInfo]:
    """op_name's op and the other widths of the same activation, fewest bits first: the loaded ops
    named <stem><k> for k in WIDTHS (regelu2 -> regelu1..4; a user's softsign2 -> softsign1..4 of any
    tree) that have k bits and the same forward h(x) as op_name's (a user's regelu5 computing something
    else has no built-in GELU in its family). The op itself is always in it, whatever its name says
    (softsign with 2 bits: a family of one); where another member has its width, it is the one kept."""
    op = get_op(op_name)
    stem, names = op_name.rstrip("0123456789"), set(available())
    widths = {}
    for k in WIDTHS:
        other = get_op(f"{stem}{k}") if f"{stem}{k}" in names else None
        if other is not None and other.name != op.name and other.bits == k and _same_forward(op, other):
            widths[k] = other
    widths[op.bits] = op
    return [widths[k] for k in sorted(widths)]


def _same_forward(a: OpInfo, b: OpInfo) -> bool:
    """a and b compute the same h(x) (to float64 rounding, on _SAME_FORWARD_GRID)."""
    x = torch.linspace(*_SAME_FORWARD_GRID, dtype=torch.float64)
    try:
        return bool(torch.allclose(a.forward(x), b.forward(x), rtol=1e-9, atol=1e-12))
    except Exception:  # a forward that cannot take the grid is not known to be the same
        return False


def exact_derivative(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    """h'(x) in float64: the spec's derivative where it has one (gated specs), else autograd through
    its forward."""
    x64 = x.detach().double()
    if op.derivative is not None:
        return op.derivative(x64)
    leaf = x64.requires_grad_()
    with torch.enable_grad():
        (d,) = torch.autograd.grad(op.forward(leaf).sum(), leaf)
    return d


def approximate_derivative(op: OpInfo, x: torch.Tensor) -> torch.Tensor:
    """L[code(x)], x's shape, float64: what the op's backward multiplies g by."""
    codes = unpack_codes(op, pack_codes(op, x), x.numel())
    levels = torch.tensor(op.levels, dtype=torch.float64, device=x.device)
    return levels[codes].reshape(x.shape)


def estimated_cosine(op: OpInfo, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """cos(h'(x) * g, L[code(x)] * g) over every recorded call (x, g); None when all g are 0."""
    exact, ours = [], []
    for x, g in calls:
        g64 = g.double()
        exact.append(exact_derivative(op, x) * g64)
        ours.append(approximate_derivative(op, x) * g64)
    return cosine(ours, exact)


def choose(op_name: str, calls: list, tolerance: float) -> tuple[OpInfo | None, dict[int, float | None]]:
    """(the family member with the fewest bits whose estimated cosine is >= tolerance, or None when
    none is; {bits: estimated cosine} of the members tried). Stops at the first that meets it; an
    exact member meets any tolerance (cosine 1: no estimate, which autograd through a where() forward
    would get wrong at the kink, e.g. 1 for ReLU at x == 0 where torch's derivative is 0)."""
    estimates: dict[int, float | None] = {}
    for op in family(op_name):
        if is_exact(op):
            estimates[op.bits] = 1.0
            return op, estimates
        value = estimates[op.bits] = estimated_cosine(op, calls)
        if value is None or value >= tolerance:  # g all zero: any width gives the same (zero) gradient
            return op, estimates
    return None, estimates
