"""Hooks a user (or a library) put on a module convert replaces: they must run on the replacement, or
the module stays.

torch keeps a module's hooks in OrderedDicts on the instance; a module put in its place starts with
empty ones, so a swap would silently drop a logging hook, a gradient hook or DeepSpeed's parameter
gathering. `carry` gives the new module the very dicts of the old one: the hooks run on it, and the
handles their owners hold still remove them. What cannot be carried stops the swap (`why_not`):
- a forward replaced on the instance (accelerate's `add_hook_to_module` for device_map / offload, or
  a patch): it is bound to the old module;
- tensors torch.nn.utils.parametrize computes (`module.weight` read through a parametrization): a new
  module would hold a plain Parameter, and the one the optimizer holds would get no gradient;
- hooks on a part of the module that the replacement never calls (the activation inside a fused
  gated MLP, the norm inside a fused dropout-add-norm block).
A norm whose affine is folded into its consumers returns other values; `observed` tells convert
not to fold a norm (or into a layer) whose hooks would see them."""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

# the instance attributes torch.nn.Module keeps its hooks in (state_dict ones included: a norm keeps
# its state_dict keys when it is swapped)
_FORWARD = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called")
_BACKWARD = ("_backward_pre_hooks", "_backward_hooks")
_STATE_DICT = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_OUTPUT = ("_forward_hooks", "_backward_pre_hooks", "_backward_hooks")  # see the output or its gradient


def _registered(module: torch.nn.Module, names: tuple) -> list[str]:
    return [n.strip("_").replace("_", " ") for n in names if getattr(module, n, None)]


def replaced_forward(module: torch.nn.Module) -> str | None:
    """How `module`'s forward is replaced on the instance, or None."""
    if "forward" not in vars(module):
        return None
    if getattr(module, "_hf_hook", None) is not None:
        return f"its forward is wrapped by accelerate's {type(module._hf_hook).__name__}"
    return "its forward is replaced on the instance"


def parametrized(module: torch.nn.Module) -> str | None:
    """Which of `module`'s own tensors torch.nn.utils.parametrize computes, or None."""
    if not parametrize.is_parametrized(module):
        return None
    names = list(module.parametrizations)
    return f"its {', '.join(names)} {'is' if len(names) == 1 else 'are'} computed by torch.nn.utils.parametrize"


def described(module: torch.nn.Module) -> str | None:
    """What runs around `module`'s forward besides its own code, or None."""
    hooks = _registered(module, _FORWARD + _BACKWARD)
    found = [replaced_forward(module), parametrized(module), f"it has {', '.join(hooks)}" if hooks else None]
    return ", and ".join(f for f in found if f) or None


def observed(module: torch.nn.Module) -> bool:
    """Whether something outside the module sees its output, its gradient or its whole call."""
    return bool(replaced_forward(module) or _registered(module, _OUTPUT))


def why_not(old: torch.nn.Module, new: torch.nn.Module, path: str) -> str | None:
    """Why `new` cannot replace `old` without dropping what runs around it, or None."""
    # a forward replaced on the instance is bound to `old`: even a shallow copy would run old's own
    own = replaced_forward(old) or (parametrized(old) if type(new) is not type(old) else None)
    if own:
        return f"{own}, which a module put in its place would not run"
    kept = {id(m) for m in new.modules()}
    for name, part in old.named_modules():
        if name and id(part) not in kept and (what := described(part)) is not None:
            return (f"{path}.{name} is not called by {type(new).__name__} (its work is fused), and {what}: "
                    "they would never run")
    return None


def carry(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Make `old`'s hooks `new`'s, shared (see the module docstring); convert's swaps and export's way
    back both do. A shallow copy shares them already. Where `new` has hooks of its own, old's are
    added to them (their handles then remove them from `old` only)."""
    for name in _FORWARD + _BACKWARD + _STATE_DICT:
        mine, theirs = getattr(new, name), getattr(old, name)
        if mine is theirs or not theirs:
            continue
        if mine:
            mine.update(theirs)
        else:
            object.__setattr__(new, name, theirs)
    if old._is_full_backward_hook is not None:
        object.__setattr__(new, "_is_full_backward_hook", old._is_full_backward_hook)
