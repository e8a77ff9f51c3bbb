"""Undo for model surgery, and model runs that leave no trace (used by lowmem_ops.convert).

    snap = Snapshot(model, writes=[linear.weight], attributes=[(lora_layer, "cast_input_dtype_enabled")])
    ...                                              # swap modules, write into linear.weight, set the flag
    snap.restore()                                   # every module, Parameter and buffer as it was, bitwise

    with state_kept(model):                          # BatchNorm statistics and the RNG untouched
        model(x)

    with state_kept(model, seed=0), calls_give_back_rng(model):   # two models' runs take the same
        model(x)                                                  # random decisions between module calls
"""

from __future__ import annotations

import contextlib
from itertools import chain

import torch


class Snapshot:
    """What a conversion can change, taken before it changes anything: which module sits under each
    name, which Parameter and buffer objects each module holds, the data tensor behind every
    Parameter (a dtype cast replaces it), the values of the tensors named in `writes` (written in
    place), the (object, attribute name) pairs in `attributes` (flags set on a module) and the
    contents of the dicts and sets in `keep` (bookkeeping). restore() puts all of it back."""

    def __init__(self, model: torch.nn.Module, writes=(), keep=(), attributes=()):
        modules = list(model.modules())
        self._structure = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in modules]
        self._data = [(p, p.data) for m in modules for p in m._parameters.values() if p is not None]
        unique = {id(t): t for t in writes if t is not None}
        self._values = [(t, t.detach().clone()) for t in unique.values()]
        self._kept = [(k, dict(k) if isinstance(k, dict) else set(k)) for k in keep]
        self._attributes = [(o, name, o.__dict__.get(name, _ABSENT)) for o, name in attributes]

    def restore(self) -> None:
        for module, children, params, buffers in self._structure:
            for now, then in ((module._modules, children), (module._parameters, params), (module._buffers, buffers)):
                if not _same_entries(now, then):
                    now.clear()
                    now.update(then)
        for p, data in self._data:
            if not _same_tensor(p, data):
                p.data = data
        with torch.no_grad():
            for t, value in self._values:
                t.copy_(value)
        for kept, contents in self._kept:
            kept.clear()
            kept.update(contents)
        for o, name, value in self._attributes:
            if value is _ABSENT:
                o.__dict__.pop(name, None)  # the class's value shows again
            else:
                o.__dict__[name] = value


_ABSENT = object()


def _same_entries(now: dict, then: dict) -> bool:
    return list(now) == list(then) and all(now[k] is v for k, v in then.items())


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


@contextlib.contextmanager
def in_mode(training: bool, *modules: torch.nn.Module):
    """The modules in training or eval mode (through their train(), which a module may override);
    every submodule's own training flag given back after (through its train(), parents first, as
    Module.modules() lists them)."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.train(training)
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


def in_eval(*modules: torch.nn.Module):
    return in_mode(False, *modules)


@contextlib.contextmanager
def state_kept(model: torch.nn.Module, seed: int | None = None):
    """Run the model without changing it: every buffer (BatchNorm running statistics, counters) gets its
    object and values back, and the random number generators of the CPU and of the CUDA devices the
    model is on are forked, so dropout during a measurement consumes nothing of the user's stream.
    seed: start those generators from this seed inside (dropout, LayerDrop draw the same numbers on
    every run, whatever the user's RNG state), so two runs under the same seed are comparable."""
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    devices = _cuda_devices(model)
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for device in devices:
                torch.cuda.default_generators[device].manual_seed(seed)
        try:
            yield
        finally:
            with torch.no_grad():
                for module, name, buffer, value in buffers:
                    module._buffers[name] = buffer
                    buffer.copy_(value)


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    tensors = chain(model.parameters(), model.buffers())
    return sorted({t.device.index for t in tensors if t.device.type == "cuda" and t.device.index is not None})


@contextlib.contextmanager
def calls_give_back_rng(model: torch.nn.Module):
    """Every module call of `model` leaves the CPU's and the model's CUDA devices' random number
    generators as it found them. What a model draws between its module calls (LayerDrop's and
    stochastic depth's choice of layers) is then the same whatever its modules draw inside: a converted
    model's dropouts draw differently from torch's, which without this made a run of it skip other
    layers than the original's run under the same seed, and the two runs' saved bytes incomparable."""
    devices = _cuda_devices(model)
    found: list = []

    def take(module, args):
        found.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))

    def give_back(module, args, output):
        cpu, cuda = found.pop()
        torch.set_rng_state(cpu)
        for device, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, device)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(take))
        handles.append(module.register_forward_hook(give_back, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
