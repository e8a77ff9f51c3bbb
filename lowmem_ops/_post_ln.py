"""The post-LN output block of BERT-family models, `LayerNorm(dropout(dense(h)) + input)`, with the
dropout, the add and the norm as one lowmem_ops.add_ms_layernorm call (lowmem_ops.add_norm).

BertSelfOutput, BertOutput, RobertaSelfOutput, RobertaOutput, ElectraOutput, ... are such blocks. A
module is recognised by its behaviour, not its name: it has exactly three children, one torch
nn.Dropout, one torch nn.LayerNorm over one dimension, and one other module (the projection); it
takes two tensors; and on probe inputs, in training mode, it returns what the fused block returns
with the same dropout mask: the original is run with its dropout replaced by lowmem_ops' Dropout
(the same Philox mask for the same RNG state), both from one seed. A block that adds elsewhere,
drops after the norm or uses its children otherwise fails that probe and is left alone.
"""

from __future__ import annotations

import inspect

import torch

from .add_norm import add_ms_layernorm
from .dropout import Dropout


class DropoutAddNorm(torch.nn.Module):
    """forward(hidden_states, input_tensor) = LayerNorm(dropout(proj(hidden_states)) + input_tensor),
    the dropout, add and norm fused (saving the norm's output, shared with the next layer, and no
    mask). Holds the original block's three children under their own names, so parameters and
    state_dict keys stay as they were."""

    def __init__(self, names: tuple[str, str, str], proj: torch.nn.Module, dropout: torch.nn.Dropout,
                 norm: torch.nn.LayerNorm):
        super().__init__()
        self.names = names
        for name, child in zip(names, (proj, dropout, norm)):
            self.add_module(name, child)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        proj, drop, norm = (getattr(self, n) for n in self.names)
        return add_ms_layernorm(proj(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps, drop.p,
                                self.training)[0]

    def extra_repr(self) -> str:
        return "LayerNorm({} + residual), fused".format(f"{self.names[1]}({self.names[0]}(x))")


def _parts(module: torch.nn.Module):
    """(names, proj, dropout, norm) when the module has the block's shape, else None."""
    children = dict(module.named_children())
    if len(children) != 3:
        return None
    drops = [n for n, c in children.items() if type(c) is torch.nn.Dropout]
    norms = [n for n, c in children.items()
             if isinstance(c, torch.nn.LayerNorm) and type(c).forward is torch.nn.LayerNorm.forward
             and len(c.normalized_shape) == 1]
    if len(drops) != 1 or len(norms) != 1:
        return None
    proj = next(n for n in children if n not in (drops[0], norms[0]))
    return (proj, drops[0], norms[0]), children[proj], children[drops[0]], children[norms[0]]


def takes_tensors(module: torch.nn.Module, n: int) -> bool:
    """Whether module.forward takes exactly n positional arguments, none with a default."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == n and all(p.default is p.empty for p in positional)


def _probe_inputs(proj: torch.nn.Module, norm: torch.nn.LayerNorm):
    width = norm.normalized_shape[0]
    in_features = getattr(proj, "in_features", None)
    weight = norm.weight if norm.weight is not None else next(proj.parameters(), None)
    if in_features is None or weight is None:
        return None
    g = torch.Generator().manual_seed(2024)
    make = lambda n: torch.randn((2, 5, n), generator=g).to(weight.device, weight.dtype)  # noqa: E731
    return make(in_features), 2 * make(width) + 0.5


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


@torch.no_grad()
def same_in_training(module: torch.nn.Module, fused: torch.nn.Module, inputs, drop_name: str | None) -> bool:
    """Whether `module` with lowmem_ops' Dropout in place of its own (its child `drop_name`, if any),
    and `fused`, give the same output in training mode from the same RNG state (so the same mask),
    and the same in eval mode."""
    devices = [inputs[0].device] if inputs[0].device.type == "cuda" else []
    original_drop, mode = getattr(module, drop_name) if drop_name else None, module.training
    results = []
    try:
        if drop_name:
            setattr(module, drop_name, Dropout(original_drop.p))
        for training in (True, False):
            module.train(training)
            fused.train(training)
            outs = []
            for m in (module, fused):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(7)
                    outs.append(m(*inputs))
            results.append(outs)
    finally:
        if drop_name:
            setattr(module, drop_name, original_drop)
        module.train(mode)
        fused.train(mode)
    tol = _tolerance(inputs[0].dtype)
    return all(isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)
               for a, b in results)


def fused_block(module: torch.nn.Module) -> tuple[DropoutAddNorm | None, str | None]:
    """(the fused block, None) for a post-LN output block, (None, why) for one with the block's shape
    that does not compute it, (None, None) for anything else."""
    parts = _parts(module)
    if parts is None or not takes_tensors(module, 2):
        return None, None
    names, proj, drop, norm = parts
    if drop.p == 0 or drop.p >= 1:
        return None, None
    inputs = _probe_inputs(proj, norm)
    if inputs is None:
        return None, None
    fused = DropoutAddNorm(names, proj, drop, norm)
    try:
        same = same_in_training(module, fused, inputs, names[1])
    except Exception:  # a forward that does not take two such tensors: not this block
        return None, None
    if not same:
        return None, (f"has a dropout, a LayerNorm and {names[0]}, but does not compute "
                      f"LayerNorm({names[1]}({names[0]}(x)) + residual) on probe inputs: not fused")
    return fused, None


__all__ = ["DropoutAddNorm", "fused_block"]
