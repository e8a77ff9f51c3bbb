"""Gradient agreement between a model and its converted self on the example inputs (used by
lowmem_ops.convert). Forward outputs of a converted model are exact by construction; what the
approximate ops change is the backward, so this is the check that can see it.

    probe = Probe(run, params, loss_fn=None)       # before changing the model: the exact gradients
    ...                                             # swap modules
    overall, local = probe.compare(run, watched)    # after: the cosines

`run(then)` runs the model once on the example inputs (eval mode, buffers and RNG kept) and returns
then(outputs), computed inside that run. Gradients are taken with torch.autograd.grad, so no
parameter's .grad is touched. The loss is loss_fn(outputs) or, by default, a fixed random
projection of every floating output (a generator of its own, seeded: the same projection before and
after, on every call, and the global RNG is not used).

Overall: the cosine between the two models' parameter gradients (every parameter that requires
grad, as one vector, float64). Local, per watched (new, old) module pair: on each call of the new
module in the converted run, its input x and the gradient g reaching its output are recorded, and
the gradient w.r.t. x through the new module is compared with the one through the old module on the
same x and g. That isolates what this one layer's approximate backward does (what a per-layer bit
width controls), from what the layers after it do to g.
"""

from __future__ import annotations

import torch

from ._snapshot import in_eval

PROJECTION_SEED = 0x5EED


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """cos(a, b) of two lists of tensors taken as one vector each, in float64; None if either is 0."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    na = sum(x.double().square().sum() for x in a) ** 0.5
    nb = sum(y.double().square().sum() for y in b) ** 0.5
    if not a or na == 0 or nb == 0:
        return None
    return float(dot / (na * nb))


class RandomProjection:
    """loss(outputs) = sum over floating outputs of <output, R>, R ~ N(0, 1) from a seeded generator
    of its own, drawn on the first call and reused (so both models get the same loss)."""

    def __init__(self, seed: int = PROJECTION_SEED):
        self.seed, self.directions = seed, None

    def __call__(self, outputs) -> torch.Tensor:
        tensors = [t for t in _floating(outputs)]
        if not tensors:
            raise ValueError("the model returned no floating-point tensor to take a gradient of")
        if self.directions is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.directions = [torch.randn(t.shape, generator=generator).to(t.device) for t in tensors]
        if [d.shape for d in self.directions] != [t.shape for t in tensors]:
            raise ValueError("the outputs changed shape between the two runs")
        return sum((t.float() * d).sum() for t, d in zip(tensors, self.directions))


class Probe:
    """The unconverted model's parameter gradients, taken at construction."""

    def __init__(self, run, params: list[torch.nn.Parameter], loss_fn=None, watch: dict | None = None):
        """watch: key -> module of the unconverted model whose calls to record: self.calls[key] is
        [(x, g)] per call whose output reached the loss (input, gradient at the output), the exact
        model's, from which lowmem_ops._bits estimates each width's local cosine."""
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no parameter requires grad")
        self.loss_fn = loss_fn if loss_fn is not None else RandomProjection()
        watch = watch or {}
        recorded, handles = _record_calls(watch)
        try:
            self.reference = run(self._gradients)
        finally:
            for h in handles:
                h.remove()
        self.calls = {key: [(x, holder[0]) for x, holder in recorded[key] if holder] for key in watch}

    def _gradients(self, outputs) -> list[torch.Tensor]:
        loss = self.loss_fn(outputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads)]

    def compare(self, run, watched: dict, ignored: set[int] = frozenset()) -> tuple[float | None, dict]:
        """(overall cosine over the parameters not in `ignored` (ids), {key: local cosine}) for the
        model as it is now; watched: key -> (new module, old module) whose local cosine to take."""
        calls, handles = _record_calls({key: new for key, (new, _) in watched.items()})

        def measure(outputs):
            grads = self._gradients(outputs)
            for h in handles:  # the local runs below must not record themselves
                h.remove()
            local = {key: _local_cosine(calls[key], *watched[key]) for key in watched}
            return grads, local

        try:
            grads, local = run(measure)
        finally:
            for h in handles:
                h.remove()
        keep = [i for i, p in enumerate(self.params) if id(p) not in ignored]
        overall = cosine([grads[i] for i in keep], [self.reference[i] for i in keep])
        return overall, local


def _record_calls(modules: dict) -> tuple[dict, list]:
    """Hooks recording, at each call of modules[key], its input x as the module received it and a
    holder that receives the gradient reaching its output: ({key: [(x, holder)]}, hook handles to
    remove). A module that writes its input in place (`inplace=True`, as timm's and torchvision's
    activations are built) gets a copy taken before it runs; a call whose input changed in place
    without that flag is not recorded (what it received is gone)."""
    calls = {key: [] for key in modules}

    def recorder(key):
        pending = []

        def before(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                copy = x.detach().clone() if getattr(module, "inplace", False) else x.detach()
                pending.append((x, x._version, copy))

        def after(module, args, out):
            if not pending:
                return
            x, version, copy = pending.pop()
            if x._version != version and copy.data_ptr() == x.data_ptr():
                return  # written in place by a module without an `inplace` flag
            if isinstance(out, torch.Tensor) and out.requires_grad:
                holder = []
                out.register_hook(lambda g: holder.append(g.detach()))
                calls[key].append((copy, holder))
        return before, after

    handles = []
    for key, m in modules.items():
        before, after = recorder(key)
        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    return calls, handles


def _local_cosine(calls: list, new: torch.nn.Module, old: torch.nn.Module) -> float | None:
    """cos(d new(x)/dx . g, d old(x)/dx . g) over every recorded call (x, g) of the module, both in
    eval mode (a dropout inside, as in a gated MLP, would otherwise draw two masks)."""
    ours, exact = [], []
    with in_eval(new, old):
        for x, holder in calls:
            if not holder:
                continue  # the output did not reach the loss
            g = holder[0]
            for module, into in ((new, ours), (old, exact)):
                leaf = x.detach().requires_grad_()
                out = module(leaf.clone())  # a copy: an in-place module (ReLU(inplace=True)) may write it
                (gx,) = torch.autograd.grad(out, leaf, g, allow_unused=True)
                into.append(torch.zeros_like(leaf) if gx is None else gx)
    return cosine(ours, exact)


def _floating(out):
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            yield out
        return
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            yield from _floating(o)
