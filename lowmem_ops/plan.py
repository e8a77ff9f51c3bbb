"""Plan a training step's memory without the hardware: one step on fake tensors, live bytes tracked.

    p = lo.memory.plan(model, batch, optimizer="adamw")   # model real or on meta; nothing is allocated
    print(p)                       # weights, grads, optimizer states, saved, peak (phase, module)
    c = lo.memory.compare(model, batch)                   # baseline / converted / checkpointed / both
    lo.memory.max_batch(model, lambda b: make_batch(b), 24 * 2**30)

The model is copied onto fake tensors (torch's FakeTensorMode: shapes, dtypes and storages, no data;
a model on the meta device becomes fake CPU tensors), so a 7B model plans in a few hundred MB of host
memory. Its tensors run CPU's kernels: the same ops, outputs and storages as a real CPU run, which is
what the tests check. A GPU run takes other kernels in places (flash attention's workspace, cuBLAS
workspaces, the caching allocator's rounding and fragmentation, the CUDA context): none of that is here.

One steady-state training step is tracked: the optimizer's state exists from the start (it is made by
a step on zero gradients first, as after step one), then forward and loss, backward (the outputs are
dropped after it, as Hugging Face's Trainer does), the optimizer step, zero_grad(set_to_none=True).
A TorchDispatchMode sees every op's outputs; each new storage (told apart by identity, not data_ptr)
counts from then until torch frees it (a weakref finalizer on the storage object). The peak is the
most bytes live at once after any op, with the phase and the innermost module running then
(torch.utils.module_tracker; in backward, the module whose backward is running).
"""

from __future__ import annotations

import copy
import gc
import io
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.module_tracker import ModuleTracker

OPTIMIZERS = ("adamw", "adam", "sgd", "none")
CATEGORIES = ("weights", "grads", "optimizer_states", "inputs", "activations")


@dataclass
class Plan:
    """Bytes of one training step. weights: parameters and buffers; grads: the trainable parameters'
    .grad after backward; optimizer_states: every tensor in the optimizer's state; saved: what autograd
    saves for backward in the forward (as lo.memory.measure: storages deduplicated, parameters and
    buffers excluded; a checkpointed region's held inputs are invisible to those hooks); activations:
    what forward and loss leave alive beyond what was alive before them (checkpointing's held inputs
    included); peak: the most bytes live at once, at_peak: those bytes by category (activations there
    means everything else: saved tensors, temporaries, partial gradients)."""
    weights: int
    trainable: int
    grads: int
    optimizer_states: int
    saved: int
    activations: int
    peak: int
    peak_phase: str
    peak_module: str
    at_peak: dict[str, int]
    phase_peaks: dict[str, int] = field(default_factory=dict)  # the most bytes live in each phase
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self, title: str | None = None):
        from rich.table import Table

        table = Table(title=title or f"training step{': ' + self.label if self.label else ''}")
        table.add_column("bytes")
        table.add_column("", justify="right")
        for name in ("weights", "trainable", "grads", "optimizer_states", "saved", "activations", "peak"):
            table.add_row(name, gib(getattr(self, name)))
        table.add_row("peak at", f"{self.peak_phase}, {self.peak_module or '(top level)'}")
        for name, n in self.at_peak.items():
            table.add_row(f"  at peak: {name}", gib(n))
        return table

    def __str__(self) -> str:
        return _render(self.table()) + "".join(f"note: {n}\n" for n in self.notes)


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} B"


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=140, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, from the op that made each (or track()) until torch frees it."""

    def __init__(self, phase: list[str], module: Callable[[], str]):
        super().__init__()
        self.phase, self.module = phase, module  # phase[0] and module(): where the step is now
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, nbytes)
        self.serial = 0
        self.total = 0
        self.reset_peak()

    def where(self) -> tuple[str, str]:
        return self.phase[0], self.module()

    def reset_peak(self) -> None:
        self.peak, self.peak_where, self.peak_live = self.total, self.where(), dict(self.live)
        self.phase_peaks: dict[str, int] = {}

    def track(self, t: torch.Tensor) -> int:
        """Count t's storage from now on (once); its serial."""
        storage = t.untyped_storage()
        key = id(storage)  # the storage object stays the same while it lives: its id is unique until then
        if key not in self.live:
            self.serial += 1
            self.live[key] = (self.serial, storage.nbytes())
            self.total += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        return self.live[key][0]

    def _freed(self, key: int) -> None:
        self.total -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.total > self.phase_peaks.get(self.phase[0], 0):
            self.phase_peaks[self.phase[0]] = self.total
            if self.total > self.peak:
                self.peak, self.peak_where, self.peak_live = self.total, self.where(), dict(self.live)
        return out


def _innermost(tracker: ModuleTracker) -> str:
    names = [n for n in tracker.parents if n != "Global"]
    if not names:
        return ""
    name = max(names, key=lambda n: n.count("."))
    return name.partition(".")[2]  # the tracker names the root by its class


def fake_copy(obj, mode: FakeTensorMode):
    """A deep copy of obj (a module, or inputs) with every tensor in it a fake tensor of `mode`: no
    data is copied or allocated. Meta tensors become fake CPU tensors (CPU's kernels, below); the same
    tensor object twice (tied weights) stays one."""
    memo: dict[int, object] = {}
    for t in _tensors_in(obj):
        if isinstance(t, FakeTensor):
            if t.fake_mode is not mode:
                raise ValueError("lowmem_ops.memory.plan: the model's fake tensors belong to another FakeTensorMode; "
                                 "pass real or meta tensors, or fake ones of one mode")
            fake = t
        elif t.device.type == "meta":
            with mode:
                fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        else:
            fake = mode.from_tensor(t)
        if isinstance(t, torch.nn.Parameter) and not isinstance(fake, torch.nn.Parameter):
            with mode:
                fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
        elif t.requires_grad and not fake.requires_grad and t.is_leaf:
            fake.requires_grad_(True)
        memo[id(t)] = fake
    return copy.deepcopy(obj, memo)


def _tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor deepcopy would reach in obj: through modules, containers and objects' attributes."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found[id(o)] = o
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, torch.nn.Module) or (hasattr(o, "__dict__") and not isinstance(o, type)
                                                 and not callable(o) and type(o).__module__ != "builtins"):
            stack.extend(vars(o).values())
    return list(found.values())


def _optimizer(spec, params: list, foreach: bool):
    if callable(spec):
        return spec(params)
    if spec not in OPTIMIZERS and spec is not None:
        raise ValueError(f"lowmem_ops.memory.plan: optimizer must be one of {', '.join(OPTIMIZERS)}, None or a "
                         f"callable params -> torch.optim.Optimizer, got {spec!r}")
    if spec in (None, "none") or not params:
        return None
    if spec == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=foreach)
    return (torch.optim.AdamW if spec == "adamw" else torch.optim.Adam)(params, lr=1e-4, foreach=foreach)


def default_loss(outputs) -> torch.Tensor:
    """outputs.loss when the model computed one (pass labels to a Hugging Face model), else the sum of
    the first floating tensor output (a sum saves nothing: pass loss_fn for a real loss)."""
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    from .conversion import _tensors

    for t in _tensors(outputs):
        if t.is_floating_point() and t.requires_grad:
            return t.sum()
    raise ValueError("lowmem_ops.memory.plan: the model's outputs hold no floating tensor that requires grad; "
                     "pass loss_fn(outputs) -> scalar")


def _storages_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def plan(model: torch.nn.Module, example_inputs, loss_fn: Callable | None = None, optimizer="adamw", *,
         fake: bool = True, foreach: bool = True, label: str = "") -> Plan:
    """Plan one training step of `model` on `example_inputs` (a tensor, tuple or dict of kwargs) with
    loss_fn(outputs) -> scalar (default: default_loss). optimizer: "adamw", "adam", "sgd" (momentum
    0.9), "none"/None, or a callable params -> optimizer; foreach: torch's multi-tensor optimizer
    implementation, the default on CUDA (its temporaries are whole lists of parameter-sized tensors).
    fake=False runs on a real copy (a small model; the check that the fake run is the real one).
    The model is not changed: it is copied (onto fake tensors unless fake=False)."""
    from .conversion import _call

    mode = next((t.fake_mode for t in _tensors_in(model) if isinstance(t, FakeTensor)), None) or FakeTensorMode()
    if fake:
        model, example_inputs = fake_copy((model, example_inputs), mode)
    else:
        if any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in _tensors_in(model)):
            raise ValueError("lowmem_ops.memory.plan: fake=False needs a model with real tensors")
        model = copy.deepcopy(model)
    model.train()
    context = mode if fake else _nothing()
    phase = ["setup"]
    collecting = gc.isenabled()
    gc.disable()  # its timing would move the numbers run to run: cycles are collected between phases instead
    try:
        with ModuleTracker() as modules, context:
            tracker = LiveBytes(phase, lambda: _innermost(modules))
            return _step(model, example_inputs, loss_fn or default_loss, optimizer, foreach, tracker, phase, label,
                         _call)
    finally:
        if collecting:
            gc.enable()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _step(model, inputs, loss_fn, optimizer, foreach, tracker: LiveBytes, phase: list, label: str, call) -> Plan:
    params = list(dict.fromkeys(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    state = list(model.parameters()) + list(model.buffers())
    with tracker:
        for t in state + [t for t in _tensors_in(inputs)]:
            tracker.track(t)
        opt = _optimizer(optimizer, trainable, foreach)
        if opt is not None:  # steady state: the state a first step makes
            for p in trainable:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        states = [t for s in (opt.state.values() if opt is not None else ()) for t in s.values()
                  if isinstance(t, torch.Tensor)]
        gc.collect(0)  # gc is off during the step: every cycle made in it is still in the youngest generation
        tracker.reset_peak()

        saved: dict[int, int] = {}  # tracker serial -> bytes: serials are never reused, addresses can be
        excluded = {tracker.track(t) for t in state}

        def pack(t):
            serial = tracker.track(t)
            if serial not in excluded:
                saved[serial] = t.untyped_storage().nbytes()
            return t

        phase[0] = "forward"
        before = tracker.total
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = call(model, inputs)
            loss = loss_fn(outputs)
        activations = tracker.total - before
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
            raise ValueError(f"lowmem_ops.memory.plan: loss_fn must return a scalar tensor that requires grad, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        gc.collect(0)  # gc is off during the step: every cycle made in it is still in the youngest generation
        phase[0] = "backward"
        loss.backward()
        del outputs, loss
        grads = _storages_bytes(p.grad for p in trainable)
        grad_serials = {tracker.track(p.grad) for p in trainable if p.grad is not None}
        gc.collect(0)  # gc is off during the step: every cycle made in it is still in the youngest generation
        phase[0] = "optimizer"
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in trainable:
                p.grad = None
    weights = {tracker.track(t) for t in state}
    state_serials = {tracker.track(t) for t in states}
    input_serials = {tracker.track(t) for t in _tensors_in(inputs)}
    at_peak = dict.fromkeys(CATEGORIES, 0)
    for serial, nbytes in tracker.peak_live.values():
        category = ("weights" if serial in weights else "optimizer_states" if serial in state_serials else
                    "inputs" if serial in input_serials else "grads" if serial in grad_serials else "activations")
        at_peak[category] += nbytes
    peak_phase, peak_module = tracker.peak_where
    return Plan(weights=_storages_bytes(state), trainable=_storages_bytes(trainable), grads=grads,
                optimizer_states=_storages_bytes(states), saved=sum(saved.values()), activations=activations,
                peak=tracker.peak, peak_phase=peak_phase, peak_module=peak_module, at_peak=at_peak,
                phase_peaks=dict(tracker.phase_peaks), label=label)


VARIANTS = ("baseline", "converted", "checkpointed", "converted+checkpointed")


def variant(model: torch.nn.Module, name: str, example_inputs=None) -> tuple[torch.nn.Module, list[str]]:
    """A copy of model as `name` (one of VARIANTS), with notes on how it was made. The model's tensors
    are real (convert verifies on example_inputs) or on meta (convert has no values to run on: it is
    given no example inputs, so it recognises by class only, folds nothing (inverse-mode norms, which
    save the same bytes) and uses the 2-bit ops)."""
    if name not in VARIANTS:
        raise ValueError(f"lowmem_ops.memory: variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    tensors = _tensors_in(model)
    if any(isinstance(t, FakeTensor) for t in tensors):
        raise ValueError("lowmem_ops.memory: variants are made from a model with real or meta tensors, not fake ones")
    model, notes = copy.deepcopy(model), []
    if "converted" in name:
        import warnings

        from .conversion import convert

        on_meta = any(t.device.type == "meta" for t in tensors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if on_meta or example_inputs is None:
                report = convert(model, None, measure_memory=False, check_gradients=False)
                notes.append("converted without example inputs (meta tensors): by class, no folds, 2-bit activations")
            else:
                report = convert(model, example_inputs)
        notes.append(f"convert: {len(report.applied)} changes applied")
    if "checkpointed" in name:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "gradient_checkpointing_enable"):
            raise ValueError(f"lowmem_ops.memory: {type(base).__name__} has no gradient_checkpointing_enable (a "
                             "Hugging Face model has); checkpoint its blocks yourself and plan that model")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        notes.append("checkpointed: each decoder/encoder layer (Hugging Face gradient_checkpointing_enable, non-reentrant)")
    return model, notes


@dataclass
class Comparison:
    plans: dict[str, Plan]

    def table(self, title: str = "one training step"):
        from rich.table import Table

        table = Table(title=title)
        for column in ("variant", "weights", "grads", "optimizer", "saved", "activations", "peak", "vs baseline",
                       "peak at"):
            table.add_column(column, justify="left" if column in ("variant", "peak at") else "right")
        base = self.plans.get("baseline")
        for name, p in self.plans.items():
            change = f"{100 * (p.peak / base.peak - 1):+.1f} %" if base is not None else "-"
            table.add_row(name, gib(p.weights), gib(p.grads), gib(p.optimizer_states), gib(p.saved),
                          gib(p.activations), gib(p.peak), change, f"{p.peak_phase}, {p.peak_module or '(top)'}")
        return table

    def __str__(self) -> str:
        notes = [f"{name}: {n}" for name, p in self.plans.items() for n in p.notes]
        return _render(self.table()) + "".join(f"note: {n}\n" for n in notes)


def compare(model: torch.nn.Module, example_inputs, loss_fn: Callable | None = None, optimizer="adamw", *,
            variants=VARIANTS, **plan_kwargs) -> Comparison:
    """plan() for each variant of model (variant(): baseline, lo.convert, activation checkpointing, both)."""
    plans = {}
    for name in variants:
        made, notes = variant(model, name, example_inputs)
        plans[name] = plan(made, example_inputs, loss_fn, optimizer, label=name, **plan_kwargs)
        plans[name].notes.extend(notes)
    return Comparison(plans)


def max_batch(model: torch.nn.Module, make_inputs: Callable[[int], object], gpu_bytes: int, loss_fn=None,
              optimizer="adamw", *, start: int = 1, **plan_kwargs) -> int:
    """The largest batch whose planned peak fits in gpu_bytes (0 if not even `start`). make_inputs(batch)
    gives the inputs of a batch. Each phase's peak grows with the batch along a line (for a fixed
    sequence length) once the activations dominate, but not exactly at small batches (where in the
    step the peak falls moves), so the answer is solved for on the line through two plans, planned,
    and solved again on the line through the nearest plans until the batch fits and the next does not
    (a few plans); bisection between the known fit and misfit if that does not settle."""
    plans: dict[int, Plan] = {}

    def fits(batch: int) -> bool:
        if batch not in plans:
            plans[batch] = plan(model, make_inputs(batch), loss_fn, optimizer, **plan_kwargs)
        return plans[batch].peak <= gpu_bytes

    if not fits(start):
        return 0
    a, b = start, 2 * start
    for _ in range(6):
        fits(a), fits(b)
        guess = max(start, _solve(plans[a], plans[b], a, b, gpu_bytes))
        if fits(guess):
            if not fits(guess + 1):
                return guess
            a, b = guess, guess + 1
        else:
            a, b = max(n for n in plans if fits(n)), guess
    good = max(n for n in plans if fits(n))
    bad = min((n for n in plans if not fits(n)), default=None)
    if bad is None:
        raise ValueError("lowmem_ops.memory.max_batch: the peak does not reach gpu_bytes; check make_inputs")
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _solve(p: Plan, q: Plan, a: int, b: int, gpu_bytes: int) -> int:
    """The largest batch under gpu_bytes on each phase's line through (a, p) and (b, q); the smallest of them."""
    best = None
    for phase, low in p.phase_peaks.items():
        slope = (q.phase_peaks.get(phase, low) - low) / (b - a)
        if slope > 0:
            n = a + int((gpu_bytes - low) // slope)
            best = n if best is None else min(best, n)
    if best is None:
        raise ValueError("lowmem_ops.memory.max_batch: the peak does not grow with the batch; check make_inputs")
    return best
