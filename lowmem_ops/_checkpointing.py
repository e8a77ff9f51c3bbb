"""Gradient checkpointing switched off while convert observes and measures a model.

Inside a checkpointed region autograd saves nothing (checkpoint's own saved-tensor hooks keep only
the region's inputs), and a reentrant region runs its forward without grad. convert judges each change
by what its module saves for backward, so on a checkpointed model it measured nothing inside a layer
and undid every change there ("saves no memory (+0 bytes)"). Yet the changes matter there as much as
anywhere: backward recomputes each region's forward, saving what it saves, and holds that while the
region's backward runs. So convert judges a layer as it runs, with the switches the libraries check
before checkpointing turned off, and turns them back on when it is done (whatever happens).

The switches: Hugging Face transformers (and diffusers) modules' `gradient_checkpointing` and timm's
`grad_checkpointing`, set True by `gradient_checkpointing_enable()` / `set_grad_checkpointing()`;
and torch's CheckpointWrapper (`checkpoint_wrapper`, `apply_activation_checkpointing`, what FSDP
recipes and accelerate use), whose `checkpoint_fn` runs the wrapped module directly meanwhile.
A torch.utils.checkpoint call a forward makes unconditionally has no switch: the changes inside it are
undone, their report lines saying so (conversion.CHECKPOINTED, from Measurement.checkpointed).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

SWITCHES = ("gradient_checkpointing", "grad_checkpointing")  # transformers / diffusers, timm


_WRAPPER_MODULE = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"


def _run_directly(fn, *args, **kwargs):
    """A CheckpointWrapper's checkpoint_fn while switched off: the wrapped call, not checkpointed."""
    return fn(*args, **kwargs)


def _switches_on(model: torch.nn.Module) -> list:
    """(path, module, attribute, its value while off) for every checkpointing switch that is on."""
    wrappers = sys.modules.get(_WRAPPER_MODULE)  # a CheckpointWrapper exists only once torch imported it
    wrapper = getattr(wrappers, "CheckpointWrapper", None)
    on = []
    for path, module in model.named_modules():
        on += [(path, module, switch, False) for switch in SWITCHES
               if getattr(module, switch, None) is True]  # a bool flag, not a method or property of that name
        if wrapper is not None and isinstance(module, wrapper) and "checkpoint_fn" in vars(module):
            on.append((path, module, "checkpoint_fn", _run_directly))
    return on


@contextlib.contextmanager
def switched_off(model: torch.nn.Module):
    """Every checkpointing switch that is on in `model` turned off for the block; yields the module
    paths whose switches were on (empty for a model not checkpointed)."""
    if not isinstance(model, torch.nn.Module):  # convert's own checks name what is wrong with it
        yield []
        return
    on = _switches_on(model)
    kept = [getattr(module, attribute) for _, module, attribute, _ in on]
    for _, module, attribute, off in on:
        setattr(module, attribute, off)
    try:
        yield sorted({path or "(model)" for path, _, _, _ in on})
    finally:
        for (_, module, attribute, _), value in zip(on, kept):
            setattr(module, attribute, value)


def judged_without(convert):
    """convert run with checkpointing switched off, its report noting that it was."""
    @functools.wraps(convert)
    def run(model, *args, **kwargs):
        with switched_off(model) as paths:
            report = convert(model, *args, **kwargs)
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            report.notes.append(f"gradient checkpointing is on ({shown}): it was switched off while converting, so "
                                "each layer was judged by what it saves when it runs (as backward recomputes it), "
                                "and is back on; the saved bytes here are the model's without checkpointing")
        return report

    return run


__all__ = ["switched_off", "judged_without", "SWITCHES"]
