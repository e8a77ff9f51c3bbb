"""Gated MLPs with one projection for both halves, `down(dropout(act(a) * b))` for
`a, b = proj(x).chunk(2, -1)` (or the activation on the second half), recognised by behaviour.

Phi-3 (and Phi-3.5 / Phi-4), GLM, Dia: gate_up_proj / activation_fn / down_proj, activation first;
ModernBERT: Wi / act / drop / Wo; Granite-MoE's shared MLP: input_linear / activation / output_linear;
Moonshine's decoder: fc1 / activation_fn / fc2, the activation on the second half. A module is a
candidate when its children are exactly two projections (in_features / out_features) where one
projects to twice the features the other reads, one activation with a fused gated kernel and at most
one torch nn.Dropout, and its forward takes one tensor. On probe inputs it must return what
FusedGatedMLP returns, in eval mode and in training mode from the same RNG state (the original run
with lowmem_ops' Dropout, which draws the same mask); the half that goes through the activation is
the one that matches. Anything else is left to the other swaps.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._post_ln import same_in_training, takes_tensors
from .dropout import Dropout
from .nn import FusedGatedMLP


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (n_in, n_out) if isinstance(n_in, int) and isinstance(n_out, int) else None


def _parts(module: torch.nn.Module, op_of: Callable[[torch.nn.Module], str | None]):
    """(proj name, down name, dropout name or None, activation name, op) for a candidate, else None."""
    children = dict(module.named_children())
    drops = [n for n, c in children.items() if type(c) is torch.nn.Dropout]
    acts = [(n, op) for n, c in children.items() if n not in drops and (op := op_of(c)) is not None]
    linears = [n for n, c in children.items() if _features(c) is not None]
    if len(drops) > 1 or len(acts) != 1 or len(linears) != 2 or len(children) != 3 + len(drops):
        return None
    for proj, down in (linears, linears[::-1]):
        if _features(children[proj])[1] == 2 * _features(children[down])[0]:
            return proj, down, (drops[0] if drops else None), acts[0][0], acts[0][1]
    return None


def _probe_input(proj: torch.nn.Module) -> torch.Tensor | None:
    weight = next((p for p in proj.parameters() if p.is_floating_point()), None)
    if weight is None:
        return None
    g = torch.Generator().manual_seed(2024)
    return torch.randn((2, 5, _features(proj)[0]), generator=g).to(weight.device, weight.dtype)


def fused_gated_mlp(module: torch.nn.Module, op_of: Callable[[torch.nn.Module], str | None], mode: str,
                    swap_dropout: bool) -> tuple[FusedGatedMLP | None, str | None]:
    """(the FusedGatedMLP, None) for a gated MLP with one projection, (None, why) for a candidate that
    computes something else, (None, None) for anything else. op_of(child): the gated op an activation
    module computes, else None. swap_dropout: its nn.Dropout (p > 0) becomes lowmem_ops' Dropout."""
    parts = _parts(module, op_of)
    if parts is None or not takes_tensors(module, 1):
        return None, None
    proj, down, drop, act, op = parts
    x = _probe_input(getattr(module, proj))
    if x is None:
        return None, None
    d = getattr(module, drop) if drop else None
    for half in (0, 1):
        # probed with lowmem_ops' Dropout on both sides (same_in_training runs the original so)
        probe = FusedGatedMLP((proj, down, drop), getattr(module, proj), getattr(module, down),
                              Dropout(d.p) if d is not None else None, op, mode, act_half=half)
        try:
            same = same_in_training(module, probe, (x,), drop)
        except Exception:  # a forward that does not take such a tensor: not this MLP
            return None, None
        if same:
            keep = Dropout(d.p, d.inplace) if d is not None and swap_dropout and d.p > 0 else d
            return FusedGatedMLP((proj, down, drop), getattr(module, proj), getattr(module, down), keep, op, mode,
                                 act_half=half), None
    inner = f"{drop}({act}(a) * b)" if drop else f"{act}(a) * b"
    return None, (f"has {proj}, {act} and {down}, but does not compute {down}({inner}) for a, b = {proj}(x).chunk(2) "
                  "(either half as a) on probe inputs: not fused")


__all__ = ["fused_gated_mlp"]
