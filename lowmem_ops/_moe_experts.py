"""Mixture-of-experts modules of transformers 5 with their gate fused: act(gate) * up no longer keeps act(gate).

transformers 5 holds an MoE layer's experts in one module with 3-D Parameters (MixtralExperts,
Qwen3MoeExperts, Qwen2MoeExperts, OlmoeExperts, ...) whose class is decorated by
transformers.integrations.moe.use_experts_implementation. Its "grouped_mm" forward (the default,
CPU included) and its "batched_mm" one project every (token, expert) pair to `gate_up_out` and call
`self._apply_gate(gate_up_out)`, by default transformers' `_default_apply_gate`: act_fn on the first
half times the second. Autograd then keeps gate_up_out (both halves, one storage) and act(gate).
`fused(module, op, mode)` gives the module whose `_apply_gate` is lowmem_ops.gated on those two
halves: exact mode keeps gate_up_out only and recomputes act(gate) in backward.

What is returned is a shallow clone, not a new class: the same class, with its own `_parameters`,
`_buffers` and `_modules` dicts holding the very same Parameters, buffers and child modules, so
state_dict keys, optimizer state and PEFT adapters on the Parameters (`target_parameters`) carry
over, and a parametrization PEFT registers on the clone while it runs does not reach the original
(which convert keeps for lowmem_ops.export); its hook dicts are the original's (a hook registered
before convert still fires). The override is an instance attribute: a functools.partial of
`fused_gate`, a module-level function, so the model pickles and deep-copies; a class made on the
fly would not pickle by name. `isinstance` and `type(...)` are unchanged. The op is what act_fn
computes at conversion time: an act_fn assigned to the clone later is not what its _apply_gate
uses (lowmem_ops.export first). A buffer the clone holds is the original's object until `.to()`
gives the clone a new one (the transformers experts classes hold none).

The clone's forward is also an instance attribute: `_moe_lora.grouped_forward`, bound to the clone
by a partial. Under PEFT's target_parameters LoRA its grouped matmuls save the adapters' factors, not
the merged expert stacks; without adapters, or under another implementation, it is the class's own
forward. `factored(module)` makes that clone alone, for experts under PEFT whose gate is not fused
(GPT-OSS's own, or an activation with no fused kernel).

Only classes whose `_apply_gate` is transformers' default are fused: GPT-OSS and others define their
own (clamped, interleaved halves) and are left as they are, as are experts without a gate. Under
`config._experts_implementation == "eager"` the class's own loop calls act_fn directly and never
_apply_gate: the clone then saves what the original saves, and convert's memory measurement undoes
it (`unused_because` says why).
"""

from __future__ import annotations

import copy
import functools
import sys

import torch

from ._moe_lora import grouped_forward
from .gated import MODES, gated_halves, gated_op

_MOE = "transformers.integrations.moe"


def candidate(module: torch.nn.Module) -> bool:
    """An experts module of transformers 5 with a gate whose `_apply_gate` is transformers' default
    act_fn(gate) * up and an act_fn module (what that activation computes is the caller's to decide)."""
    moe = sys.modules.get(_MOE)  # a module of such a class exists only once transformers imported it
    default = getattr(moe, "_default_apply_gate", None)
    return (default is not None and getattr(type(module), "_apply_gate", None) is default
            and "_apply_gate" not in vars(module) and getattr(module, "has_gate", False) is True
            and isinstance(getattr(module, "act_fn", None), torch.nn.Module))


def fused_gate(gate_up_out: torch.Tensor, op: str, mode: str) -> torch.Tensor:
    """transformers' default _apply_gate, act(gate) * up for gate, up = gate_up_out.chunk(2, -1), as
    one lowmem_ops.gated op (the halves are views of one storage, saved as they are)."""
    return gated_halves(gate_up_out, op, mode)


def fused(module: torch.nn.Module, op: str, mode: str = "auto") -> torch.nn.Module:
    """A shallow clone of the experts `module` (module doc) whose _apply_gate is fused_gate with the
    gated op `op` (what module.act_fn computes: resilu2, regelu2, tanh_gelu2) in `mode`."""
    if not candidate(module):
        raise ValueError(f"lowmem_ops: {type(module).__name__} is not a transformers experts module with the default "
                         "_apply_gate (act_fn(gate) * up) and an act_fn module")
    gated_op(op)
    if mode not in MODES:
        raise ValueError(f"lowmem_ops: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":  # the halves of one tensor share requires_grad, where exact always stores least
        mode = "exact"
    new = factored(module)
    new.__dict__["_apply_gate"] = functools.partial(fused_gate, op=op, mode=mode)
    return new


def experts(module: torch.nn.Module) -> bool:
    """An experts module of transformers 5 (its class decorated by use_experts_implementation)."""
    return sys.modules.get(_MOE) is not None and all(
        hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "_is_expert_parallel", "config"))


def factored(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow clone of the experts `module` (module doc) whose forward is _moe_lora.grouped_forward:
    under PEFT's target_parameters LoRA its grouped matmuls save the adapters' factors, not the merged
    expert weights; any other call is the class's forward."""
    if not experts(module):
        raise ValueError(f"lowmem_ops: {type(module).__name__} is not a transformers 5 experts module")
    new = copy.copy(module)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    new.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    # bound to the clone by a partial of a module-level function, so it pickles and deep-copies with it
    new.__dict__["forward"] = functools.partial(grouped_forward, new)
    return new


def is_factored(module: torch.nn.Module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func is grouped_forward


def _override(module: torch.nn.Module):
    gate = vars(module).get("_apply_gate")
    return gate if isinstance(gate, functools.partial) and gate.func is fused_gate else None


def is_fused(module: torch.nn.Module) -> bool:
    return _override(module) is not None


def describe(module: torch.nn.Module, param_wrapped: bool) -> str:
    """How the report names an experts module's change (param_wrapped: under PEFT's target_parameters)."""
    gate = _override(module)
    parts = [f"_apply_gate fused: {gate.keywords['op']} on the two halves of gate_up_out, mode {gate.keywords['mode']!r}"
             ] if gate is not None else []
    if param_wrapped:
        parts.append("LoRA delta as two rank-r grouped matmuls: no merged expert stack made or saved")
    return "; ".join(parts)


def unused_because(module: torch.nn.Module) -> str | None:
    """Why an experts clone's overrides are not called, where that is known: the implementation."""
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if is_fused(module) and implementation == "eager":
        return ("config._experts_implementation is 'eager', whose loop calls act_fn directly, never _apply_gate "
                "(grouped_mm and batched_mm call it)")
    if is_factored(module) and not is_fused(module) and implementation != "grouped_mm":
        return (f"config._experts_implementation is {implementation!r}: the factored LoRA matmuls replace "
                "grouped_mm's only")
    return None


__all__ = ["candidate", "experts", "factored", "fused", "fused_gate", "is_factored", "is_fused", "describe", "unused_because"]
