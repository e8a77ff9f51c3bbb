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
most bytes live at once after any op, with the phase and the innermost module running then (in
backward: the module whose forward made the autograd node running).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.overrides import TorchFunctionMode

from .memory import _Saved

OPTIMIZERS = ("adamw", "adam", "sgd", "none")
CATEGORIES = ("weights", "grads", "optimizer_states", "inputs", "activations")
# the timeline's: saved is what forward's saved-tensor hooks saw (a recompute's are other); other is the
# rest (inputs, outputs, temporaries, partial gradients)
TIMELINE_CATEGORIES = ("weights", "grads", "optimizer_states", "saved", "other")


@dataclass
class Plan:
    """Bytes of one training step. weights: parameters, buffers and any other tensor the model holds
    (a bitsandbytes weight's quant state); grads: the trainable parameters'
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
    phase_at_peak: dict[str, dict[str, int]] = field(default_factory=dict)  # at_peak of each phase's peak
    phase_modules: dict[str, str] = field(default_factory=dict)  # the module at each phase's peak
    label: str = ""
    notes: list[str] = field(default_factory=list)
    # bytes alive by TIMELINE_CATEGORIES after each op that changed them, and the point each phase
    # starts at; empty for an extrapolated plan (lowmem_ops.plan.extrapolate). Not compared: a fake
    # run frees a few temporaries an op later than the real one (the same peaks, other points between)
    timeline: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)
    phase_starts: dict[str, int] = field(default_factory=dict, compare=False)
    timeline_modules: list[str] = field(default_factory=list, repr=False, compare=False)  # each point's module

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

    def plot(self, path, title: str | None = None):
        """Memory over the step (each point: after an op that allocated or freed), stacked by category
        (TIMELINE_CATEGORIES), in GiB (MiB under 0.25 GiB), phases marked, the peak marked; written to path (any format
        matplotlib writes: .png, .svg, .pdf). The figure is returned (closed: its data stays readable)."""
        if not self.timeline:
            raise ValueError("lowmem_ops.memory: this plan has no timeline (extrapolated from plans whose layers "
                             "could not be matched: plan the model itself, or the CLI with --exact, to plot it)")
        from .memory import require_matplotlib

        matplotlib = require_matplotlib("Plan.plot")
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        unit, scale = ("GiB", 2**30) if self.peak >= 2**28 else ("MiB", 2**20)
        x = range(len(self.timeline[TIMELINE_CATEGORIES[0]]))
        layers = [[n / scale for n in self.timeline[c]] for c in TIMELINE_CATEGORIES]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.stackplot(x, *layers, labels=[c.replace("_", " ") for c in TIMELINE_CATEGORIES])
        total = [sum(v) for v in zip(*layers)]
        ax.plot(x, total, color="black", linewidth=0.8, label="total")
        top = max(range(len(total)), key=total.__getitem__)
        ax.annotate(f"peak {gib(self.peak)} ({self.peak_phase})", (top, total[top]),
                    xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
        for phase, start in self.phase_starts.items():
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
            ax.text(start, 1.01, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
        ax.set_xlabel("op (those that allocate or free)")
        ax.set_ylabel(f"{unit} alive")
        ax.set_ylim(0, max(total) * 1.12)
        ax.set_title(title or f"one training step{': ' + self.label if self.label else ''}", pad=18)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return fig


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} B"


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=140, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, from the op that made each (or track()) until torch frees it. Every
    count and free is logged (serial, +-bytes), with how far the log had got after each op: the live set
    at any point, the peaks' make-up and the timeline are replayed from it at the end."""

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
        """Start the log here: what is alive now opens it."""
        self.log: list[tuple[int, int]] = [(serial, n) for serial, n in self.live.values()]
        self.op_ends: list[int] = []  # len(self.log) after each op
        self.op_phases: list[str] = []  # the phase of each op
        self.op_modules: list[str] = []  # the module running at each op
        self.peak, self.peak_where, self.peak_at = self.total, self.where(), len(self.log)
        self.phase_peaks: dict[str, int] = {}
        self.phase_where: dict[str, str] = {}  # the module at each phase's peak
        self.phase_at: dict[str, int] = {}  # len(self.log) at each phase's peak

    def track(self, t: torch.Tensor) -> int:
        """Count t's storage from now on (once); its serial."""
        storage = t.untyped_storage()
        key = id(storage)  # the storage object stays the same while it lives: its id is unique until then
        if key not in self.live:
            self.serial += 1
            self.live[key] = (self.serial, storage.nbytes())
            self.total += storage.nbytes()
            self.log.append(self.live[key])
            weakref.finalize(storage, self._freed, key)
        return self.live[key][0]

    def _freed(self, key: int) -> None:
        serial, nbytes = self.live.pop(key)
        self.total -= nbytes
        self.log.append((serial, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        phase = self.phase[0]
        self.op_ends.append(len(self.log))
        self.op_phases.append(phase)
        self.op_modules.append(self.module())
        if self.total > self.phase_peaks.get(phase, 0):
            self.phase_peaks[phase], self.phase_where[phase] = self.total, self.module()
            self.phase_at[phase] = len(self.log)
            if self.total > self.peak:
                self.peak, self.peak_where, self.peak_at = self.total, self.where(), len(self.log)
        return out

    def live_at(self, end: int) -> dict[int, int]:
        """serial -> bytes of the storages alive when the log was `end` long."""
        live: dict[int, int] = {}
        for serial, n in self.log[:end]:
            if n >= 0:
                live[serial] = n
            else:
                del live[serial]
        return live

    def timeline(self, category: Callable[[int], str], categories):
        """Bytes alive by category after each op that changed them ({category: bytes per point}), the
        point each phase starts at, and the module of each point. Points, not op numbers: a fake run
        dispatches a few more ops that change nothing."""
        totals = dict.fromkeys(categories, 0)
        series: dict[str, list[int]] = {c: [] for c in categories}
        starts: dict[str, int] = {}
        modules: list[str] = []
        position, last = 0, None
        for end, phase, module in zip(self.op_ends, self.op_phases, self.op_modules):
            starts.setdefault(phase, len(series[categories[0]]))
            for serial, n in self.log[position:end]:
                totals[category(serial)] += n
            position = end
            now = tuple(totals.values())
            if now != last:
                last = now
                modules.append(module)
                for c in categories:
                    series[c].append(totals[c])
        return series, starts, modules


class WhereAmI(TorchFunctionMode):
    """The innermost module of `model` running: a stack kept by module hooks in forward (and in
    checkpointing's recompute); in backward, the module whose forward made the autograd node now
    running (its sequence number is recorded when a function's output gets it; nothing is held, so the
    graph is freed as usual; torch's ModuleTracker keeps a checkpointed model's recomputed graph alive)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.made_by: dict[int, str] = {}
        self.last = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    self.made_by.setdefault(t.grad_fn._sequence_nr(), self.stack[-1])
        return out

    def module(self) -> str:
        if self.stack:
            return self.stack[-1]
        node = torch._C._current_autograd_node()
        if node is None:
            return ""
        self.last = self.made_by.get(node._sequence_nr(), self.last)
        return self.last

    def __enter__(self):
        def enter(module, args):
            self.stack.append(self.names.get(id(module), self.stack[-1] if self.stack else ""))

        def leave(module, args, output):
            self.stack.pop()

        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                        torch.nn.modules.module.register_module_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def fake_copy(obj, mode: FakeTensorMode):
    """A deep copy of obj (a module, or inputs) with every tensor in it a fake tensor of `mode`: no
    data is copied or allocated. Meta tensors become fake CPU tensors (CPU's kernels, below), views of
    one meta storage views of one fake storage (an 8-bit weight and its CB)."""
    meta_storages: dict[int, torch.Tensor] = {}  # a meta StorageImpl -> its fake bytes

    def make(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            if t.fake_mode is not mode:
                raise ValueError("lowmem_ops.memory.plan: the model's fake tensors belong to another FakeTensorMode; "
                                 "pass real or meta tensors, or fake ones of one mode")
            return t
        if t.device.type != "meta":
            return mode.from_tensor(t)  # storages shared as in t
        storage = t.untyped_storage()
        if storage._cdata not in meta_storages:
            meta_storages[storage._cdata] = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu")
        return torch.empty(0, dtype=t.dtype, device="cpu").set_(
            meta_storages[storage._cdata].untyped_storage(), t.storage_offset(), t.shape, t.stride())

    with mode:
        return _copy_tensors(obj, make)


def real_copy(obj):
    """A deep copy of obj made as fake_copy makes its copy (storages copied once each, views kept,
    tensors' own attributes carried), with real (or meta) data: the fake run's twin. copy.deepcopy would do for
    most models, but not for bitsandbytes' (Params4bit's __deepcopy__ copies the quant state apart
    from the module's reference to it: two of each)."""
    storages: dict[int, torch.UntypedStorage] = {}

    def make(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in storages:
            storages[storage._cdata] = storage.clone()
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            storages[storage._cdata], t.storage_offset(), t.shape, t.stride())

    with torch.no_grad():
        return _copy_tensors(obj, make)


def _copy_tensors(obj, make: Callable[[torch.Tensor], torch.Tensor]):
    """copy.deepcopy(obj) with make(t) as the copy of each tensor t in it: the same tensor object twice
    (tied weights) stays one; a parameter stays a parameter (a plain one: a subclass's Python state is
    carried as attributes); a tensor's own attributes (a bitsandbytes weight's quant_state, CB, SCB) go
    onto its copy, their tensors copied by make too."""
    memo: dict[int, object] = {}
    attached = []
    for t in _tensors_in(obj):
        new = make(t)
        if isinstance(t, torch.nn.Parameter) and not isinstance(new, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        elif t.requires_grad and not new.requires_grad and t.is_leaf:
            new.requires_grad_(True)
        memo[id(t)] = new
        if new is not t and _own_attributes(t):
            attached.append((t, new))
    copied = copy.deepcopy(obj, memo)
    for t, new in attached:  # after the copy: an attribute pointing back into obj (Params4bit.module) finds its copy
        for name, value in _own_attributes(t).items():
            setattr(new, name, copy.deepcopy(value, memo))
    return copied


@functools.cache
def _tensor_machinery() -> frozenset[str]:
    """Attributes every fake tensor or parameter has of its own: not the user's."""
    with FakeTensorMode():
        return frozenset(vars(torch.nn.Parameter(torch.empty(0)))) | {"_is_param"}


def _own_attributes(t: torch.Tensor) -> dict:
    """What has been set on a tensor object beyond what torch puts there (bitsandbytes' quant_state, CB, SCB)."""
    return {k: v for k, v in vars(t).items() if k not in _tensor_machinery()}


def _tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor deepcopy would reach in obj: through modules, containers, objects' attributes and
    tensors' own attributes (a 4-bit weight's quant state)."""
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
            stack.extend(_own_attributes(o).values())
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


def steady_state(opt, trainable: list) -> None:
    """Give `opt` the state a first step makes (a step on zero gradients), so that the step planned or
    measured after it is a steady-state one."""
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


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
        model = real_copy(model)
    model.train()
    context = mode if fake else contextlib.nullcontext()
    phase = ["setup"]
    collecting = gc.isenabled()
    gc.disable()  # its timing would move the numbers run to run: cycles are collected between phases instead
    try:
        with WhereAmI(model) as where, context:
            tracker = LiveBytes(phase, where.module)
            try:
                return _step(model, example_inputs, loss_fn or default_loss, optimizer, foreach, tracker, phase,
                             label, _call)
            except (DataDependentOutputException, DynamicOutputShapeException) as e:
                raise ValueError(_reads_values(where.module(), e)) from e
    finally:
        if collecting:
            gc.enable()


def _reads_values(path: str, error: Exception) -> str:
    """What a fake run could not do, where, and how to plan anyway."""
    where = f"`{path}`" if path else "the model"
    if isinstance(error, DynamicOutputShapeException):
        return (f"lowmem_ops.memory.plan: {where} runs {error.func}, whose output's shape depends on the values "
                "(boolean-mask indexing, nonzero), which a fake tensor does not have: typically a training-only "
                "random mask such as Wav2Vec2's SpecAugment (config.mask_time_prob). Plan with it off, or plan a "
                "small real model with fake=False")
    return (f"lowmem_ops.memory.plan: {where} branches on a tensor's value (`if tensor:`, `.item()`), which a fake "
            "tensor does not have: typically LayerDrop (`torch.rand([]) < layerdrop` picks the layers to skip in "
            "training). Plan the worst case, every layer running: set the model's layerdrop to 0 (Hugging Face: "
            "config.layerdrop = 0) before planning; or plan a small real model with fake=False")


def _step(model, inputs, loss_fn, optimizer, foreach, tracker: LiveBytes, phase: list, label: str, call) -> Plan:
    params = list(dict.fromkeys(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    # parameters, buffers and whatever else the model holds: a quantised weight's quant state
    state = list(dict.fromkeys(list(model.parameters()) + list(model.buffers()) + _tensors_in(model)))
    with tracker:
        for t in state + [t for t in _tensors_in(inputs)]:
            tracker.track(t)
        opt = _optimizer(optimizer, trainable, foreach)
        if opt is not None:
            steady_state(opt, trainable)
        states = [t for s in (opt.state.values() if opt is not None else ()) for t in s.values()
                  if isinstance(t, torch.Tensor)]
        gc.collect(0)  # gc is off during the step: every cycle made in it is still in the youngest generation
        tracker.reset_peak()

        saves: list = []  # (tracker serial, bytes, a weak reference to what the graph holds for that save)
        excluded = {tracker.track(t) for t in state}

        def pack(t):
            serial = tracker.track(t)
            if serial in excluded:
                return t
            holder = _Saved(t)  # alive as long as a graph node holds it (lowmem_ops.memory.measure's rule)
            saves.append((serial, t.untyped_storage().nbytes(), weakref.ref(holder)))
            return holder

        phase[0] = "forward"
        before = tracker.total
        with torch.autograd.graph.saved_tensors_hooks(pack, _Saved.unpack):
            outputs = call(model, inputs)
            loss = loss_fn(outputs)
        activations = tracker.total - before
        # tracker serial -> bytes (serials are never reused, addresses can be), of the saves a graph alive
        # now holds: one built and dropped inside the forward holds nothing at backward
        saved = {serial: nbytes for serial, nbytes, ref in saves if ref() is not None}
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
    def category(serial: int) -> str:
        return ("weights" if serial in weights else "optimizer_states" if serial in state_serials else
                "inputs" if serial in input_serials else "grads" if serial in grad_serials else "activations")

    def by_category(end: int) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for serial, nbytes in tracker.live_at(end).items():
            out[category(serial)] += nbytes
        return out

    def timeline_category(serial: int) -> str:
        c = category(serial)
        return "saved" if c == "activations" and serial in saved else "other" if c in ("activations", "inputs") else c

    series, phase_starts, point_modules = tracker.timeline(timeline_category, TIMELINE_CATEGORIES)
    peak_phase, peak_module = tracker.peak_where
    return Plan(weights=_storages_bytes(state), trainable=_storages_bytes(trainable), grads=grads,
                optimizer_states=_storages_bytes(states), saved=sum(saved.values()), activations=activations,
                peak=tracker.peak, peak_phase=peak_phase, peak_module=peak_module, at_peak=by_category(tracker.peak_at),
                phase_peaks=dict(tracker.phase_peaks), label=label,
                phase_at_peak={k: by_category(v) for k, v in tracker.phase_at.items()},
                phase_modules=dict(tracker.phase_where), timeline=series, phase_starts=phase_starts,
                timeline_modules=point_modules)


VARIANTS = ("baseline", "converted", "checkpointed", "converted+checkpointed")


def variant(model: torch.nn.Module, name: str, example_inputs=None,
            **convert_kwargs) -> tuple[torch.nn.Module, list[str]]:
    """A copy of model as `name` (one of VARIANTS), with notes on how it was made. The model's tensors
    are real (convert verifies on example_inputs) or on meta (convert has no values to run on: it is
    given no example inputs, so it recognises by class only, folds nothing (inverse-mode norms, which
    save the same bytes) and uses the 2-bit ops). convert_kwargs go to lo.convert (lora_dtype=False
    keeps PEFT's float32 input casts)."""
    if name not in VARIANTS:
        raise ValueError(f"lowmem_ops.memory: variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    tensors = _tensors_in(model)
    if any(isinstance(t, FakeTensor) for t in tensors):
        raise ValueError("lowmem_ops.memory: variants are made from a model with real or meta tensors, not fake ones")
    model, notes = real_copy(model), []  # not copy.deepcopy: see real_copy
    if "converted" in name:
        import warnings

        from .conversion import convert

        on_meta = any(t.device.type == "meta" for t in tensors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if on_meta or example_inputs is None:
                report = convert(model, None, **{"measure_memory": False, "check_gradients": False, **convert_kwargs})
                notes.append("converted without example inputs (meta tensors): by class, no folds, 2-bit activations")
            else:
                report = convert(model, example_inputs, **convert_kwargs)
        notes.append(f"convert: {len(report.applied)} changes applied"
                     + "".join(f", {k}={v!r}" for k, v in convert_kwargs.items()))
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
        notes.append("checkpointed: every layer (Hugging Face gradient_checkpointing_enable, non-reentrant)")
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
            variants=VARIANTS, convert_kwargs: dict | None = None, **plan_kwargs) -> Comparison:
    """plan() for each variant of model (variant(): baseline, lo.convert, activation checkpointing, both)."""
    plans = {}
    for name in variants:
        made, notes = variant(model, name, example_inputs, **(convert_kwargs or {}))
        plans[name] = plan(made, example_inputs, loss_fn, optimizer, label=name, **plan_kwargs)
        plans[name].notes.extend(notes)
    return Comparison(plans)


def max_batch(model: torch.nn.Module, make_inputs: Callable[[int], object], gpu_bytes, loss_fn=None,
              optimizer="adamw", *, start: int = 1, **plan_kwargs):
    """The largest batch whose planned peak fits in gpu_bytes (0 if not even `start`). make_inputs(batch)
    gives the inputs of a batch. Each phase's peak grows with the batch along a line (for a fixed
    sequence length) once the activations dominate, but not exactly at small batches (where in the
    step the peak falls moves), so the answer is solved for on the line through two plans, planned,
    and solved again on the line through the nearest plans until the batch fits and the next does not
    (a few plans); bisection between the known fit and misfit if that does not settle. gpu_bytes may be
    a list of sizes: a list of batches comes back, the plans shared between them."""
    return largest_batch(lambda batch: plan(model, make_inputs(batch), loss_fn, optimizer, **plan_kwargs),
                         gpu_bytes, start)


def largest_batch(planner: Callable[[int], Plan], gpu_bytes, start: int = 1):
    """max_batch for any planner(batch) -> Plan; gpu_bytes an int or a list (plans shared)."""
    plans: dict[int, Plan] = {}
    if isinstance(gpu_bytes, (list, tuple)):
        return [_largest_batch(planner, g, start, plans) for g in gpu_bytes]
    return _largest_batch(planner, gpu_bytes, start, plans)


def _largest_batch(planner, gpu_bytes: int, start: int, plans: dict) -> int:
    def fits(batch: int) -> bool:
        if batch not in plans:
            plans[batch] = planner(batch)
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


# ---- command line: python -m lowmem_ops.plan CONFIG --batch 4 --seq 640 --lora 64 --dtype bf16 --gpu 24GiB

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TASKS = {"causal-lm": "AutoModelForCausalLM", "image-classification": "AutoModelForImageClassification",
         "sequence-classification": "AutoModelForSequenceClassification"}
# the paper's settings where published (LLaMA: LoRA r=64 on all linears, bf16, batch 4, 512+128 tokens);
# the rest are common fine-tuning settings, stated in docs/plan.md
# the paper's settings where published (LLaMA: QLoRA, nf4 with double quant, LoRA r=64 on all linears,
# bf16, batch 4, 512+128 tokens); the rest are common fine-tuning settings, stated in docs/plan.md
QLORA = dict(batch=4, seq=640, lora=64, quant="nf4", double_quant=True)
PAPER = [("llama-2-7b", QLORA), ("llama-2-13b", QLORA), ("mistral-7b", QLORA),
         ("vit-b/16", dict(batch=64, seq=0, lora=8)), ("roberta-base", dict(batch=32, seq=128, lora=0)),
         ("gpt2", dict(batch=8, seq=1024, lora=0))]


def setting(dtype: str, batch: int, seq: int, lora: int, quant: str | None = None, double_quant: bool = False) -> str:
    base = f"QLoRA {quant}{'+dq' if double_quant and quant != 'int8' else ''}" if quant else None
    adapters = f"LoRA r={lora}" if lora else "full"
    return (f"{adapters}{', ' + base if base else ''}, {dtype}, batch {batch}" + (f", {seq} tokens" if seq else ""))


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12}
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text.strip().lower()[len(number):]
    if unit not in units or not number:
        raise ValueError(f"not a size: {text!r} (say 24GiB, 40GB, 80e9)")
    return int(float(number) * units[unit])


def load_config(name_or_path: str):
    """(transformers config, task) for a name in lowmem_ops._known_configs or a config.json path."""
    import json
    from pathlib import Path

    import transformers

    from ._known_configs import KNOWN

    key = name_or_path.lower()
    if key in KNOWN:
        cls, task, kwargs = KNOWN[key]
        return getattr(transformers, cls)(**kwargs), task
    path = Path(name_or_path)
    if not path.is_file():
        raise SystemExit(f"lowmem_ops.plan: {name_or_path!r} is neither a config.json nor one of: {', '.join(KNOWN)}")
    cfg = transformers.AutoConfig.for_model(**json.loads(path.read_text()))
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    task = ("image-classification" if "ImageClassification" in archs else
            "sequence-classification" if "SequenceClassification" in archs else "causal-lm")
    return cfg, task


HEADS = ("lm_head", "classifier", "score", "pooler.dense")


def build(cfg, task: str, dtype: torch.dtype, lora: int, quant: str | None = None, double_quant: bool = True):
    """The model on the meta device (nothing allocated), in dtype as from_pretrained(dtype=...) makes it
    (buffers such as rotary frequencies stay float32), its linear layers but the head quantised by
    bitsandbytes if quant ("nf4", "fp4", "int8"; lowmem_ops.quantized), with PEFT LoRA adapters of rank
    `lora` on every linear layer but the head (0: full fine-tuning)."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, TASKS[task]).from_config(cfg, dtype=dtype)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith(HEADS)})
    if quant:
        from .quantized import quantize_linears

        quantize_linears(model, quant, double_quant=double_quant, compute_dtype=dtype, skip=HEADS)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=targets))
    elif quant:
        raise ValueError("lowmem_ops.plan: a quantised base trains through adapters only: give --lora")
    return model


def make_inputs(cfg, task: str, dtype: torch.dtype, seq: int) -> Callable[[int], dict]:
    def inputs(batch: int) -> dict:
        if task == "image-classification":
            size = cfg.image_size
            return {"pixel_values": torch.empty(batch, cfg.num_channels, size, size, dtype=dtype, device="meta"),
                    "labels": torch.zeros(batch, dtype=torch.long, device="meta")}
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        if task == "sequence-classification":
            return {"input_ids": ids, "labels": torch.zeros(batch, dtype=torch.long, device="meta")}
        return {"input_ids": ids, "labels": ids}

    return inputs


BYTES = ("weights", "trainable", "grads", "optimizer_states", "saved", "activations", "peak")


def extrapolate(p: Plan, q: Plan, depth_p: int, depth_q: int, depth: int) -> Plan:
    """The plan of a model `depth` layers deep from plans of the same model depth_p and depth_q layers
    deep (identical layers): every byte count, each phase's peak and the bytes at the peak on the line
    through the two; the peak is the highest phase's. A module in q's last layer is named in the deep
    model's last layer. The timeline: _stitch (depths one apart, q's 3 or more)."""
    def line(a: int, b: int) -> int:
        return b + (b - a) * (depth - depth_q) // (depth_q - depth_p)

    def deeper(module: str) -> str:
        for layers in ("layers", "layer", "h"):  # LLaMA / Mistral, ViT / RoBERTa, GPT-2
            module = module.replace(f"{layers}.{depth_q - 1}.", f"{layers}.{depth - 1}.")
        return module

    phase_peaks = {k: line(p.phase_peaks.get(k, 0), v) for k, v in q.phase_peaks.items()}
    phase = max(phase_peaks, key=phase_peaks.get)  # each phase's peak is on a line; the highest may change
    phase_at_peak = {k: {c: line(p.phase_at_peak.get(k, {}).get(c, 0), n) for c, n in v.items()}
                     for k, v in q.phase_at_peak.items()}
    fields = {name: line(getattr(p, name), getattr(q, name)) for name in BYTES if name != "peak"}
    timeline, starts = _stitch(p, q, depth) if depth_q - depth_p == 1 and depth_q >= 3 and q.timeline else ({}, {})
    return Plan(**fields, peak=phase_peaks[phase], peak_phase=phase, peak_module=deeper(q.phase_modules[phase]),
                at_peak=phase_at_peak[phase], phase_peaks=phase_peaks, phase_at_peak=phase_at_peak,
                phase_modules={k: deeper(v) for k, v in q.phase_modules.items()}, label=q.label, notes=list(q.notes),
                timeline=timeline, phase_starts=starts)


def _layer(module: str) -> int | None:
    """The layer index in a module name (model.layers.3.mlp -> 3), None outside the layers."""
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "layer", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _stitch(p: Plan, q: Plan, depth: int) -> tuple[dict, dict]:
    """The timeline of the model `depth` layers deep from q's and p's (one layer fewer; q 3 or more deep):
    in forward and in backward the points of layer depth_q - 2 (a middle layer: layer 0 differs, its
    input needs no grad under LoRA, and so does the last) are repeated once per missing layer, from its
    first point to the next layer's, each repeat and everything after it raised by what one layer
    leaves behind in this phase: the change from p's to q's last point of the phase, less the change
    carried in from before it (at the start: one layer's weights and optimizer states). The optimizer
    phase, the same ops at any depth (foreach), point by point on the line through p's and q's.
    ({}, {}) where the layers or phases cannot be matched (a model outside the named layouts)."""
    names = TIMELINE_CATEGORIES
    last = max((layer for layer in map(_layer, q.timeline_modules) if layer is not None), default=None)
    if last is None or last < 2 or not p.timeline or list(p.phase_starts) != list(q.phase_starts):
        return {}, {}
    extra = depth - (last + 1)
    add = lambda a, b, k=1: tuple(x + k * y for x, y in zip(a, b))  # noqa: E731

    def table(plan: Plan) -> tuple[list[tuple], dict[str, tuple[int, int]]]:
        points = [tuple(plan.timeline[c][i] for c in names) for i in range(len(plan.timeline[names[0]]))]
        phases = sorted(plan.phase_starts.items(), key=lambda kv: kv[1])
        return points, {name: (start, phases[i + 1][1] if i + 1 < len(phases) else len(points))
                        for i, (name, start) in enumerate(phases)}

    points, bounds = table(q)
    p_points, p_bounds = table(p)
    out: list[tuple] = []
    starts: dict[str, int] = {}
    carried = add(points[0], p_points[0], -1)  # one layer's weights and optimizer states
    shift = tuple(extra * x for x in carried)
    for phase, (lo, hi) in bounds.items():
        starts[phase] = len(out)
        p_lo, p_hi = p_bounds[phase]
        if hi == lo or p_hi == p_lo:
            continue
        one_layer = add(points[hi - 1], p_points[p_hi - 1], -1)  # one layer more, by the end of this phase
        step, carried = add(one_layer, carried, -1), one_layer
        if phase == "optimizer" and p_hi - p_lo == hi - lo:  # each point on its line
            out.extend(add(points[i], add(points[i], p_points[p_lo + i - lo], -1), extra) for i in range(lo, hi))
            shift = tuple(extra * x for x in one_layer)
            continue
        layer_of = [_layer(q.timeline_modules[i]) for i in range(lo, hi)]
        begins = {layer: lo + layer_of.index(layer) for layer in (last - 2, last - 1, last) if layer in layer_of}
        if len(begins) < 3:
            out.extend(add(points[i], shift) for i in range(lo, hi))
            shift = add(shift, step, extra)
            continue
        start = begins[last - 1]
        end = min((b for b in (begins[last - 2], begins[last]) if b > start), default=hi)
        out.extend(add(points[i], shift) for i in range(lo, end))
        for k in range(1, extra + 1):
            out.extend(add(add(points[i], shift), step, k) for i in range(start, end))
        shift = add(shift, step, extra)
        out.extend(add(points[i], shift) for i in range(end, hi))
    return {c: [point[j] for point in out] for j, c in enumerate(names)}, starts


def run(config: str, *, batch: int, seq: int, lora: int, dtype: str, gpus: list[int], optimizer: str,
        variants=VARIANTS, exact: bool = False, convert_kwargs: dict | None = None, quant: str | None = None,
        double_quant: bool = True, search: str = "line", plot_dir=None, plot_variants=(),
        ) -> tuple[Comparison, dict[str, dict[int, int]]]:
    """The comparison and the largest batches for a config. Unless exact, each variant is planned at
    2 and 3 layers and extrapolated to the config's depth (extrapolate(): the layers are identical;
    the tests check it against planning every layer), so a 13B plan takes seconds.
    The largest batch: search="line" puts every point of the step's timeline on its line through the
    plans at `batch` and 2 x batch (line_batches: two plans a variant; the tests check the answers
    against the verified search); "verified" is max_batch's search (the batch fits and the next does
    not, planned: 8 or more plans a variant), also taken where the timelines do not pair up.
    plot_dir: each of plot_variants plotted there ("<config>-<variant>.png"; the timeline of an
    extrapolated plan is stitched from the two shallow ones, extrapolate())."""
    if search not in ("line", "verified"):
        raise ValueError(f"lowmem_ops.plan: search must be 'line' or 'verified', got {search!r}")
    cfg, task = load_config(config)
    depth = cfg.num_hidden_layers
    depths = [depth] if exact or depth <= 3 else [2, 3]
    for_plots = [v for v in plot_variants if plot_dir is not None]
    models = {}
    for d in depths:
        shallow = copy.deepcopy(cfg)
        shallow.num_hidden_layers = d
        models[d] = build(shallow, task, DTYPES[dtype], lora, quant, double_quant)
    inputs = make_inputs(cfg, task, DTYPES[dtype], seq)
    mode = FakeTensorMode()
    plans, fits = {}, {}
    for name in variants:
        made = {d: variant(m, name, **(convert_kwargs or {})) for d, m in models.items()}
        notes = made[depths[-1]][1] + ([f"planned at 2 and 3 layers, extrapolated to {depth}"] * (len(depths) > 1))
        # faked once: each plan of it copies the module structure only, and the fake mode's op cache is shared
        made = {d: (fake_copy(m, mode), n) for d, (m, n) in made.items()}

        def planner(b: int, made=made, name=name) -> Plan:
            ps = [plan(made[d][0], inputs(b), optimizer=optimizer, label=name) for d in depths]
            return ps[0] if len(ps) == 1 else extrapolate(ps[0], ps[1], 2, 3, depth)

        plans[name] = planner(batch)
        plans[name].notes.extend(notes)
        if search == "verified":
            fits[name] = dict(zip(gpus, largest_batch(planner, gpus)))
        elif gpus:
            answers = line_batches(plans[name], planner(2 * batch), batch, 2 * batch, gpus)
            if answers is None:
                answers = largest_batch(planner, gpus)
                plans[name].notes.append("largest batch planned out: the timelines at two batches do not pair up")
            fits[name] = dict(zip(gpus, answers))
        else:
            fits[name] = {}
        if name in for_plots:
            from pathlib import Path

            tokens = f" x {seq} tokens" if seq and task != "image-classification" else ""
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            stem = Path(config).stem if Path(config).is_file() else config.replace("/", "-")
            plans[name].plot(Path(plot_dir) / f"{stem}-{name.replace('+', '-')}.png",
                             title=f"{config}, {name}: batch {batch}{tokens}")
    return Comparison(plans), fits


def line_batches(p: Plan, q: Plan, a: int, b: int, gpus: list[int]) -> list[int] | None:
    """For each GPU size, the largest batch whose step fits, from the plans at batches a and b: every
    point of the timeline on its own line in the batch (the same ops at any batch, each storage's size
    affine in it), the step's peak the highest of them at each batch, so no point's line may pass the
    GPU's size. None where the timelines do not pair up (other ops at the other batch): plan it out then."""
    if not p.timeline or len(p.timeline["weights"]) != len(q.timeline["weights"]) or p.phase_starts != q.phase_starts:
        return None
    low = [sum(v) for v in zip(*p.timeline.values())]
    high = [sum(v) for v in zip(*q.timeline.values())]
    answers = []
    for gpu in gpus:
        best = None
        for x, y in zip(low, high):
            if y > x:  # x + (n - a) (y - x) / (b - a) <= gpu
                n = a + (gpu - x) * (b - a) // (y - x)
            elif x > gpu:
                n = 0
            else:
                continue
            best = n if best is None else min(best, n)
        if best is None:
            raise ValueError("lowmem_ops.plan: the peak does not grow with the batch; check the inputs")
        answers.append(max(0, best))
    return answers


def markdown_rows(config: str, settings: str, comparison: Comparison, fits: dict) -> list[str]:
    base = comparison.plans["baseline"].peak
    rows = []
    for name, p in comparison.plans.items():
        change = "" if name == "baseline" else f"{100 * (1 - p.peak / base):.1f} %"
        batches = " / ".join(str(b) for b in fits[name].values())
        rows.append(f"| {config} | {settings} | {name} | {p.peak / 2**30:.2f} | {change} | "
                    f"{p.saved / 2**30:.2f} | {p.peak_phase} | {batches} |")
    return rows


def main(argv=None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m lowmem_ops.plan", description=(
        "Plan one training step's peak memory on fake tensors: baseline, lowmem_ops.convert, activation "
        "checkpointing, both; and the largest batch that fits each GPU size."))
    parser.add_argument("config", nargs="?", help="a Hugging Face config.json, or a known name (--list)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (ignored for images)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear but the head; 0: full")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--optimizer", choices=[o for o in OPTIMIZERS if o != "none"], default="adamw")
    parser.add_argument("--gpu", nargs="*", default=[], help="GPU sizes for the largest batch, e.g. 24GiB 80GiB")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--fp32-adapters", action="store_true",
                        help="convert with lora_dtype=False: PEFT's float32 adapters keep casting their input "
                             "to float32 (a saved copy each)")
    parser.add_argument("--quant", choices=["nf4", "fp4", "int8"], default=None,
                        help="a bitsandbytes base (QLoRA: nf4); needs --lora")
    parser.add_argument("--double-quant", action="store_true", help="4-bit: quantise the absmax again (QLoRA's)")
    parser.add_argument("--exact", action="store_true", help="plan every layer (default: 2 and 3, extrapolated)")
    parser.add_argument("--verified", action="store_true",
                        help="largest batch: planned until it fits and the next does not (default: on the line "
                             "through the plans at --batch and twice it)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="write each variant's memory over the step there (--paper: docs/plots)")
    parser.add_argument("--paper", action="store_true", help="the table of docs/plan.md (markdown)")
    parser.add_argument("--list", action="store_true", help="the known config names")
    args = parser.parse_args(argv)
    from ._known_configs import KNOWN

    if args.list:
        print("\n".join(KNOWN))
        return
    try:
        gpus = [parse_bytes(g) for g in args.gpu]
    except ValueError as e:
        parser.error(str(e))
    if args.quant and not args.lora:
        parser.error("--quant needs --lora (a quantised base trains through adapters only)")
    convert_kwargs = {"lora_dtype": False} if args.fp32_adapters else {}
    common = dict(dtype=args.dtype, optimizer=args.optimizer, variants=args.variants, exact=args.exact,
                  convert_kwargs=convert_kwargs, search="verified" if args.verified else "line")
    if args.paper:
        import resource
        import sys
        from pathlib import Path

        plots = Path(args.plots or "docs/plots")
        plots.mkdir(parents=True, exist_ok=True)
        gpus = gpus or [24 * 2**30, 40 * 2**30, 80 * 2**30]
        print("| model | setting | variant | peak GiB | reduction | saved GiB | peak in | largest batch "
              f"({' / '.join(gib(g) for g in gpus)}) |")
        print("|---|---|---|---:|---:|---:|---|---|")
        for name, s in PAPER:
            start = time.process_time()
            c, fits = run(name, **s, gpus=gpus, plot_dir=plots, plot_variants=args.variants, **common)
            print("\n".join(markdown_rows(name, setting(args.dtype, **s), c, fits)), flush=True)
            print(f"{name}: {time.process_time() - start:.1f} s of CPU", file=sys.stderr)
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        print(f"all rows: {sum(u.ru_utime + u.ru_stime for u in usage):.1f} s of CPU, peak RSS "
              f"{usage[0].ru_maxrss / 2**20:.2f} GiB", file=sys.stderr)
        return
    if not args.config:
        parser.error("give a config (a config.json or a known name), --list or --paper")
    c, fits = run(args.config, batch=args.batch, seq=args.seq, lora=args.lora, gpus=gpus, quant=args.quant,
                  double_quant=args.double_quant, plot_dir=args.plots, plot_variants=args.variants, **common)
    print(c, end="")
    for name, by_gpu in fits.items():
        for gpu, b in by_gpu.items():
            print(f"{name}: largest batch on {gib(gpu)}: {b}")


if __name__ == "__main__":
    main()
