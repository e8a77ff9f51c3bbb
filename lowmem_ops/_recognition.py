"""What a leaf module computes, found by running it (used by lowmem_ops.convert).

    match = identify(module, shape, dtype, device)   # -> Match, or raises ProbeError saying why not

The module is called on a few deterministic inputs of the shape it saw in the example run, in its own
dtype and device, under no_grad and in eval mode, with its buffers and the RNG kept
(_snapshot.state_kept) and its training flag restored. Its output is matched against references
computed in float32: the activations with built-in ops (ReLU and LeakyReLU(0.01) with exact 1-bit
ones), every op of a tree the user loaded (lo.load; its forward h(x) is the reference), LeakyReLU at
other common slopes (recognised, not swapped), and LayerNorm / RMSNorm with or
without weight (and bias), with the scale `weight` or `1 + weight`, over the last dimension or over dim 1 (channels first), for the module's own eps attribute or else
a few common values. A second run with the parameters temporarily replaced by other values tells
parameterisations apart that coincide at initialisation (weight = 1 and no weight; bias = 0 and
none); the parameters' own tensors are put back untouched.

Of the references that fit, a built-in op wins, then a user's op, then a match convert cannot swap
(LeakyReLU(0.1) with no op of the user's for it); within each, the best fit, and on a tie the first
listed (a user's ops: the first loaded). A user's op is the same forward as any other op that fits
(within the tolerance), so which one is taken changes no output; the other user ops that fit are named
in the report line (Match.also), and the chosen op's bit width is decided after (lowmem_ops._bits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ._snapshot import state_kept
from ._tree import OpInfo, user_ops

# the activation references: (what the report calls it, the built-in op or None, the function)
ACTIVATIONS = [
    ("erf GELU", "regelu2", F.gelu),
    ("tanh GELU", "tanh_gelu2", lambda x: F.gelu(x, approximate="tanh")),
    ("QuickGELU", "quick_gelu2", lambda x: x * torch.sigmoid(1.702 * x)),
    ("SiLU", "resilu2", F.silu),
    ("Mish", "mish2", F.mish),
    ("ELU", "elu2", F.elu),
    ("Softplus", "softplus2", F.softplus),
    ("ReLU", "relu1", F.relu),
    ("LeakyReLU(0.01)", "leaky_relu1", F.leaky_relu),
    ("LeakyReLU(0.1)", None, lambda x: F.leaky_relu(x, 0.1)),
    ("LeakyReLU(0.2)", None, lambda x: F.leaky_relu(x, 0.2)),
]
# what the report says of a match without a built-in op
NOT_BUILT = {f"LeakyReLU({s})": f"no built-in op for this slope (build one: kernelgen new NAME --expr "
             f"\"where(x > 0, x, {s} * x)\" --bits 1, then lo.nn.Approx(NAME))" for s in (0.1, 0.2)}
EPS_TRIED = (1e-5, 1e-6, 1e-12, 1e-8)
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
# |module - reference| <= ATOL + RTOL |reference|, per the module's output dtype (its rounding, plus a
# computation in that dtype instead of float32)
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-9, 1e-7),
              torch.bfloat16: (2e-2, 3e-2), torch.float16: (2e-3, 5e-3)}
SEED = 0x9A0BE


class ProbeError(Exception):
    """Why a module could not be identified (a report line)."""


@dataclass(frozen=True)
class Match:
    name: str                      # e.g. "tanh GELU", "RMSNorm"
    op: str | None = None          # activations: the built-in op with this forward (None: none is built)
    rms: bool = False              # norms: RMSNorm (else LayerNorm)
    weight: bool = False           # the module's `weight` scales the output
    bias: bool = False             # the module's `bias` is added
    weight_offset: float = 0.0     # the scale is weight + weight_offset
    channels_first: bool = False   # normalised over dim 1
    eps: float | None = None
    tree: Path | None = None       # a user's op (lo.load): the tree it was loaded from
    also: tuple[str, ...] = ()     # a user's op: the other user ops (of other names) that fit as well
    out_dtype: torch.dtype | None = None  # the output's dtype where it is not the input's (T5LayerNorm's
                                          # float32 input, bf16 weight: a bf16 output)

    @property
    def is_norm(self) -> bool:
        return self.op is None and self.name.endswith("Norm")

    def describe(self) -> str:
        if self.tree is not None:
            also = f"; {', '.join(self.also)} fit{'s' if len(self.also) == 1 else ''} too" if self.also else ""
            return f"{self.name}, your op loaded from {self.tree}{also}"
        if not self.is_norm:
            return self.name
        scale = "1 + weight" if self.weight_offset else "weight" if self.weight else "no weight"
        where = "dim 1 (channels first)" if self.channels_first else "the last dim"
        out = f", output in {str(self.out_dtype).removeprefix('torch.')}" if self.out_dtype is not None else ""
        return f"{self.name} over {where}, {scale}{', bias' if self.bias else ''}, eps {self.eps:g}{out}"


def _inputs(shape, dtype, device) -> list[torch.Tensor]:
    """Two inputs: one spread wide (tells the activations apart), one whose rows (along any dim)
    have different means and scales from 1e-3 to 10 (tells LayerNorm from RMSNorm and the eps apart)."""
    g = torch.Generator().manual_seed(SEED)
    wide = 3 * torch.randn(shape, generator=g)
    row = [1] * len(shape)
    if len(shape) > 2:  # constant along dim 1 and the last dim: rows of either layout share them
        row[0], row[2:-1] = shape[0], list(shape[2:-1])
    elif len(shape) == 2:
        row[0] = shape[0]
    scales = 10 ** (4 * torch.rand(row, generator=g) - 3)
    means = 4 * torch.rand(row, generator=g) - 2
    rows = (torch.randn(shape, generator=g) + means) * scales
    return [t.to(dtype=dtype, device=device) for t in (wide, rows)]


def _norm_references(x: torch.Tensor, module, params: dict):
    """(Match, reference output) for every norm parameterisation that fits x's shape, in float32."""
    w, b = params.get("weight"), params.get("bias")
    own = [getattr(module, a) for a in EPS_ATTRIBUTES if isinstance(getattr(module, a, None), (int, float))]
    eps_list = [float(e) for e in own] + [e for e in EPS_TRIED if e not in own]
    for channels_first in (False, True):
        if channels_first and x.dim() < 3:
            continue
        v = x.float().movedim(1, -1) if channels_first else x.float()
        n = v.shape[-1]
        scales = [(False, 0.0, None)]
        if w is not None and w.shape == (n,):
            scales += [(True, 0.0, w.float()), (True, 1.0, 1 + w.float())]
        for rms in (True, False):
            for has_w, offset, gamma in scales:
                for has_b in ((False, True) if not rms and has_w and b is not None and b.shape == (n,) else (False,)):
                    for eps in eps_list:
                        if rms:
                            y = F.rms_norm(v, (n,), gamma, eps)
                        else:
                            y = F.layer_norm(v, (n,), gamma, b.float() if has_b else None, eps)
                        match = Match("RMSNorm" if rms else "LayerNorm", rms=rms, weight=has_w, bias=has_b,
                                      weight_offset=offset, channels_first=channels_first, eps=eps)
                        yield match, (y.movedim(-1, 1) if channels_first else y)


def _references(x, module, params, users: list[OpInfo]):
    if not params:  # an activation has no parameters of its own
        for name, op, fn in ACTIVATIONS:
            yield Match(name, op=op), fn(x.float())
        for op in users:
            try:
                ref = op.forward(x.float())
            except Exception:  # a forward that cannot take this input matches nothing
                continue
            yield Match(op.name, op=op.name, tree=op.tree), ref
    yield from _norm_references(x, module, params)


def _rank(match: Match) -> int:
    """Which fitting references come first: the built-in ops (and the norms), a user's ops, then
    what convert cannot swap (a user's op for it wins: `kernelgen new` is what its report line says)."""
    return 1 if match.tree is not None else 2 if match.op is None and not match.is_norm else 0


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / (atol + rtol |ref|): at most 1 within the output dtype's tolerance."""
    atol, rtol = TOLERANCES.get(y.dtype, TOLERANCES[torch.float32])
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return float("inf")
    return float(((y.float() - ref).abs() / (atol + rtol * ref.abs())).max())


def _other_values(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (p.detach().float() + 0.5 + torch.rand(p.shape, generator=g).to(p.device)).to(p.dtype)


def identify(module: torch.nn.Module, shape, dtype, device) -> Match:
    """The one reference the module computes on every probe input (the best fitting, when rounding
    lets several fit), or ProbeError."""
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    unnamed = [n for n in params if n not in ("weight", "bias")]
    if unnamed or any(p.dim() != 1 for p in params.values()):
        raise ProbeError(f"its parameters ({', '.join(f'{n}{list(p.shape)}' for n, p in params.items())}) are "
                         "not a norm's weight/bias")
    users = user_ops()
    inputs = _inputs(shape, dtype, device)
    runs = [(x, _call(module, x), params) for x in inputs]
    if params:  # other parameter values, put back after: weight = 1 and no weight look alike at init
        g = torch.Generator().manual_seed(SEED + 1)
        others = {n: _other_values(p, g) for n, p in params.items()}
        runs.append((inputs[1], _call(module, inputs[1], others), others))
    scores: dict[Match, float] = {}
    with torch.no_grad():
        for x, y, values in runs:
            for match, ref in _references(x, module, values, users):
                scores[match] = max(scores.get(match, 0.0), _error(y, ref))
    fits = sorted((_rank(m), s, i, m) for i, (m, s) in enumerate(scores.items()) if s <= 1.0)
    if not fits:
        raise ProbeError("its output matches none of the known activations and norms")
    best = fits[0][3]
    out_dtypes = {y.dtype for _, y, _ in runs}
    if out_dtypes != {dtype}:
        if len(out_dtypes) > 1:
            raise ProbeError(f"its output's dtype varies between calls ({', '.join(sorted(str(d) for d in out_dtypes))})")
        best = replace(best, out_dtype=out_dtypes.pop())
    if best.tree is not None:  # other names of the user's that compute the same (their widths are _bits')
        stem = best.name.rstrip("0123456789")
        also = tuple(m.name for _, _, _, m in fits[1:] if m.tree is not None and m.name.rstrip("0123456789") != stem)
        best = replace(best, also=also)
    return best


def _call(module, x: torch.Tensor, values: dict | None = None) -> torch.Tensor:
    """module(x) with nothing left changed; the parameters temporarily hold `values` when given.
    Raises ProbeError when it raises, writes its input or parameters, returns something else than
    one tensor of x's shape, or differs between two calls."""
    params = dict(module.named_parameters(recurse=False))
    kept = {n: (p.data, p._version) for n, p in params.items()}
    training = module.training
    probe = x.clone()
    try:
        module.eval()
        with torch.no_grad(), state_kept(module, seed=SEED):
            if values:
                for n, v in values.items():
                    params[n].data = v
            try:
                first, second = module(probe), module(x.clone())
            except Exception as e:
                raise ProbeError(f"raised on a probe input of shape {list(x.shape)}: {type(e).__name__}: "
                                 f"{str(e).strip()[:120]}") from None
    finally:
        module.train(training)
        for n, (data, _) in kept.items():
            params[n].data = data
    if any(params[n]._version != version for n, (_, version) in kept.items()):
        raise ProbeError("it writes its parameters when called")
    if first is not probe and not torch.equal(probe, x):  # an in-place activation returns its input, written
        raise ProbeError("it modifies its input in place")
    if not isinstance(first, torch.Tensor) or first.shape != x.shape:
        raise ProbeError("it does not return one tensor of its input's shape")
    if not torch.equal(first, second):
        raise ProbeError("it gives different outputs for the same input")
    return first
