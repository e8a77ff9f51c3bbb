"""Gated MLPs recognised by behaviour: `down(dropout(act(gate(x)) * up(x)))` with two input projections
(T5 v1.1 / FLAN-T5's wi_0 / wi_1 / wo) -> GatedMLP, and `down(dropout(act(a) * b))` for
`a, b = proj(x).chunk(2, -1)` with one (or the activation on the second half) -> FusedGatedMLP.

One projection: Phi-3 (and Phi-3.5 / Phi-4), GLM, Dia: gate_up_proj / activation_fn / down_proj;
ModernBERT: Wi / act / drop / Wo; Granite-MoE's shared MLP: input_linear / activation / output_linear;
Moonshine's decoder: fc1 / activation_fn / fc2, the activation on the second half.

A module is a candidate when its children are exactly its projections (modules with in_features /
out_features), one activation with a fused gated kernel and at most one torch nn.Dropout, its forward
takes one tensor, and the projections' shapes fit one of the forms: two, the first projecting to
twice the features the second reads; or three, two reading the same features and projecting to
what the third reads. On probe inputs it must return what the fused module returns, in eval mode
and in training mode from the same RNG state (the original run with lowmem_ops' Dropout, which
draws the same mask); which projection (or half) is the gate is the one that matches. Anything else
is left to the other swaps. (LLaMA-style gate_proj / up_proj / down_proj / act_fn modules are taken
by their names before this, in lowmem_ops.conversion.)
"""

from __future__ import annotations

from typing import Callable

import torch

from ._post_ln import same_in_training, takes_tensors
from .dropout import Dropout
from .nn import FusedGatedMLP, GatedMLP


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (n_in, n_out) if isinstance(n_in, int) and isinstance(n_out, int) else None


def _parts(module: torch.nn.Module, op_of: Callable[[torch.nn.Module], str | None]):
    """(projection names, dropout name or None, activation name, op) for a candidate, else None."""
    children = dict(module.named_children())
    drops = [n for n, c in children.items() if type(c) is torch.nn.Dropout]
    acts = [(n, op) for n, c in children.items() if n not in drops and (op := op_of(c)) is not None]
    projs = [n for n, c in children.items() if _features(c) is not None]
    if len(drops) > 1 or len(acts) != 1 or len(projs) not in (2, 3) or len(children) != 1 + len(projs) + len(drops):
        return None
    return projs, (drops[0] if drops else None), acts[0][0], acts[0][1]


def _layouts(module: torch.nn.Module, projs: list[str], drop: str | None, act: str, op: str, mode: str):
    """Every way the projections' shapes allow the module to be a gated MLP: (what it then computes,
    the projection reading x, make(dropout) -> the fused module)."""
    feats = {n: _features(getattr(module, n)) for n in projs}
    get = lambda n: getattr(module, n)  # noqa: E731
    wrap = lambda t: f"{drop}({t})" if drop else t  # noqa: E731
    layouts = []
    if len(projs) == 2:
        for proj, down in (projs, projs[::-1]):
            if feats[proj][1] == 2 * feats[down][0]:
                for half, product in ((0, f"{act}(a) * b"), (1, f"a * {act}(b)")):
                    layouts.append((f"{down}({wrap(product)}) for a, b = {proj}(x).chunk(2)", proj,
                                    lambda d, p=proj, o=down, h=half: FusedGatedMLP((p, o, drop), get(p), get(o), d, op,
                                                                                    mode, act_half=h)))
    else:
        for down in projs:
            a, b = (n for n in projs if n != down)
            if feats[a] == feats[b] and feats[a][1] == feats[down][0]:
                for g, u in ((a, b), (b, a)):
                    layouts.append((f"{down}({wrap(f'{act}({g}(x)) * {u}(x)')})", g,
                                    lambda d, g=g, u=u, o=down: GatedMLP(get(g), get(u), get(o), op, mode, dropout=d,
                                                                         names=(g, u, o, drop))))
    return layouts


def _probe_input(proj: torch.nn.Module) -> torch.Tensor | None:
    weight = next((p for p in proj.parameters() if p.is_floating_point()), None)
    if weight is None:
        return None
    g = torch.Generator().manual_seed(2024)
    return torch.randn((2, 5, _features(proj)[0]), generator=g).to(weight.device, weight.dtype)


def gated_mlp(module: torch.nn.Module, op_of: Callable[[torch.nn.Module], str | None], mode: str,
              swap_dropout: bool) -> tuple[torch.nn.Module | None, str | None]:
    """(the GatedMLP or FusedGatedMLP, None) for a gated MLP, (None, why) for a candidate that computes
    something else, (None, None) for anything else. op_of(child): the gated op an activation module
    computes, else None. swap_dropout: its nn.Dropout (p > 0) becomes lowmem_ops' Dropout."""
    parts = _parts(module, op_of)
    if parts is None or not takes_tensors(module, 1):
        return None, None
    projs, drop, act, op = parts
    d = getattr(module, drop) if drop else None
    ran = False
    layouts = _layouts(module, projs, drop, act, op, mode)
    for _, reads_x, make in layouts:
        x = _probe_input(getattr(module, reads_x))
        if x is None:
            continue
        try:  # probed with lowmem_ops' Dropout on both sides (same_in_training runs the original so)
            same = same_in_training(module, make(Dropout(d.p) if d is not None else None), (x,), drop)
        except Exception:  # a forward that does not take such a tensor: not this layout
            continue
        if same:
            return make(Dropout(d.p, d.inplace) if d is not None and swap_dropout and d.p > 0 else d), None
        ran = True
    if not ran:
        return None, None
    return None, (f"a gated MLP by its children, but computes none of {'; '.join(t for t, _, _ in layouts)} on "
                  "probe inputs: not fused")


__all__ = ["gated_mlp"]
