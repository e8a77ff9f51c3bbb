"""Measure what autograd saves for backward during one forward pass, per module.

    m = lo.memory.measure(model, **batch)      # or measure(model, x)
    print(m)                                    # a table: bytes per module, shared tensors, cast copies
    m.plot("memory.png", before=m0)             # a bar chart, optionally against an earlier measurement

Every saved tensor is seen through torch.autograd.graph.saved_tensors_hooks, deduplicated by the
storage it lives in (a view and its base count once), with parameters and buffers excluded (they
exist anyway), and counted only if the graph that saved it is still alive when the forward returns:
a graph built and dropped inside it (DoRA computes its weight norm through its adapters on an
identity matrix and detaches the result) holds nothing at backward. Each storage is attributed to
the innermost module running when it was first saved; a storage that a second module saves too is
flagged as shared. A saved tensor made by a dtype cast
(`.to(dtype)`) is flagged as a cast copy, with how many copies were cast from the same source:
PEFT's default fp32 LoRA adapters make one per adapter.

Works on real, meta and fake tensors alike. lo.memory.plan / compare / max_batch (lowmem_ops.plan)
plan a whole training step's peak on fake tensors (docs/plan.md).
"""

from __future__ import annotations

import contextlib
import io
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._snapshot import calls_give_back_rng, state_kept


def require_matplotlib(what: str):
    """matplotlib, which only the plots need: it comes with the `kernelgen` extra, not with lowmem-ops."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"lowmem_ops: {what} draws with matplotlib, which is not installed ({err}): "
                          "pip install 'lowmem-ops[kernelgen]' (or matplotlib)") from None
    return matplotlib


@dataclass
class SavedStorage:
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    module: str  # first saver
    also_saved_by: list[str] = field(default_factory=list)
    cast_from: int | None = None  # id of the autograd node the cast copied from, if it is a cast copy

    @property
    def savers(self) -> list[str]:
        return [self.module, *self.also_saved_by]


@dataclass
class Measurement:
    storages: dict[int, SavedStorage]
    label: str = ""
    ran: frozenset[str] = frozenset()  # the paths of the modules called during the forward
    # of those, the ones called inside a torch.utils.checkpoint region, whose saves autograd does not
    # keep at forward time (backward recomputes them): they show no bytes here
    checkpointed: frozenset[str] = frozenset()

    def did_run(self, path: str) -> bool:
        """The module at `path` was called (a layer that LayerDrop skipped was not: it saved nothing, and
        says nothing about what it saves when it runs)."""
        return path in self.ran

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values())

    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for s in self.storages.values():
            out[s.module] += s.nbytes
        return dict(out)

    def exclusive_bytes(self, *paths: str) -> int:
        """Bytes saved only by the modules at `paths` and the modules inside them: what would no longer
        be saved if those modules saved nothing (a storage some other module saves too stays)."""
        return sum(s.nbytes for s in self.storages.values() if all(map(self._inside(paths), s.savers)))

    def savers_among(self, paths) -> list[set[str]]:
        """For each storage saved by modules inside two or more of `paths`, those paths."""
        found = []
        for s in self.storages.values():
            hit = {p for p in paths if any(map(self._inside((p,)), s.savers))}
            if len(hit) > 1:
                found.append(hit)
        return found

    @staticmethod
    def _inside(paths):
        def inside(name: str) -> bool:
            return any(name == p or name.startswith(p + ".") or not p for p in paths)
        return inside

    @property
    def shared(self) -> list[SavedStorage]:
        return [s for s in self.storages.values() if s.also_saved_by]

    def cast_copies(self) -> dict[int, list[SavedStorage]]:
        """Saved tensors produced by dtype casts, grouped by the tensor they were cast from."""
        groups: dict[int, list[SavedStorage]] = defaultdict(list)
        for s in self.storages.values():
            if s.cast_from is not None:
                groups[s.cast_from].append(s)
        return dict(groups)

    def table(self, before: "Measurement | None" = None):
        """A rich Table of bytes per module (and, with `before`, the change)."""
        from rich.table import Table

        title = f"saved for backward{': ' + self.label if self.label else ''}: {_mib(self.total_bytes)}"
        if before is not None:
            title += f" (before: {_mib(before.total_bytes)}, {self.total_bytes / max(before.total_bytes, 1):.3f}x)"
        table = Table(title=title)
        table.add_column("module")
        if before is not None:
            table.add_column("before", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("notes")
        mine, theirs = self.by_module(), before.by_module() if before is not None else {}
        notes = self._notes()
        for name in sorted(set(mine) | set(theirs), key=lambda n: -max(mine.get(n, 0), theirs.get(n, 0))):
            row = [name or "(top level)"]
            if before is not None:
                row.append(_mib(theirs.get(name, 0)))
            table.add_row(*row, _mib(mine.get(name, 0)), notes.get(name, ""))
        return table

    def _notes(self) -> dict[str, str]:
        notes: dict[str, list[str]] = defaultdict(list)
        for s in self.shared:
            notes[s.module].append(f"shared with {', '.join(s.also_saved_by)}")
        for group in self.cast_copies().values():
            for s in group:
                notes[s.module].append(f"dtype-cast copy ({len(group)} from one source)")
        return {k: "; ".join(dict.fromkeys(v)) for k, v in notes.items()}

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, file=io.StringIO())
        console.print(self.table())
        return console.file.getvalue()

    def plot(self, path: str | Path, before: "Measurement | None" = None, top: int = 20) -> Path:
        """A horizontal bar chart of the largest modules (PNG)."""
        matplotlib = require_matplotlib("Measurement.plot")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mine, theirs = self.by_module(), before.by_module() if before is not None else {}
        names = sorted(set(mine) | set(theirs), key=lambda n: -max(mine.get(n, 0), theirs.get(n, 0)))[:top][::-1]
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
        ys = range(len(names))
        if before is not None:
            ax.barh([y + 0.2 for y in ys], [theirs.get(n, 0) / 2**20 for n in names], height=0.4,
                    label=f"before ({_mib(before.total_bytes)})")
        ax.barh([y - 0.2 if before is not None else y for y in ys], [mine.get(n, 0) / 2**20 for n in names],
                height=0.4 if before is not None else 0.7, label=f"{self.label or 'after'} ({_mib(self.total_bytes)})")
        ax.set_yticks(list(ys), [n or "(top level)" for n in names])
        ax.set_xlabel("MiB saved for backward")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} B"


def measure(model: torch.nn.Module, *args, label: str = "", **kwargs) -> Measurement:
    """Run model(*args, **kwargs) once with grad enabled and record what autograd saves.

    Works the same on real, meta and fake (FakeTensorMode) tensors: storages are told apart by the
    storage object itself, never by data_ptr (every meta storage has data_ptr 0)."""
    excluded = {storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    stack: list[str] = [""]
    first: dict[int, SavedStorage] = {}  # each storage as first seen
    saves: list = []  # (storage key, module, a weak reference to what the graph holds for that save)
    held: list = []  # a key is an address: the storages seen stay alive, so none is reused during the run

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in excluded or storage.nbytes() == 0:
            return t
        if key not in first:
            held.append(storage)
            first[key] = SavedStorage(storage.nbytes(), t.dtype, tuple(t.shape), stack[-1], cast_from=_cast_source(t))
        holder = _Saved(t)
        saves.append((key, stack[-1], weakref.ref(holder)))
        return holder

    ran: set[str] = set()
    checkpointed: set[str] = set()
    handles = track_modules(model, stack, ran, checkpointed)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _Saved.unpack):
            out = model(*args, **kwargs)
        storages: dict[int, SavedStorage] = {}
        for key, module, ref in saves:  # while `out` keeps the graph alive: the saves it still holds
            if ref() is None:
                continue
            if key not in storages:
                storages[key] = SavedStorage(first[key].nbytes, first[key].dtype, first[key].shape, module,
                                             cast_from=first[key].cast_from)
            elif module not in storages[key].savers:
                storages[key].also_saved_by.append(module)
        del out
    finally:
        for h in handles:
            h.remove()
    return Measurement(storages, label, frozenset(ran), frozenset(checkpointed))


class _Saved:
    """What a graph holds for one saved tensor (measure's pack hook): alive exactly as long as some
    graph node holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed


@contextlib.contextmanager
def comparable_runs(model: torch.nn.Module, seed: int = 0):
    """Runs of `model` inside it can be compared with another model's under the same seed (a converted
    model and its original): its random number generators start from `seed`, every module call gives
    them back as it found them, so the layers LayerDrop or stochastic depth skips are the same however
    the modules draw inside (a converted model's dropouts draw differently from torch's); BatchNorm
    statistics and your own RNG stream are as they were after. lo.convert measures this way.

        with lo.memory.comparable_runs(model):
            m = lo.memory.measure(model, **batch)"""
    with state_kept(model, seed=seed), calls_give_back_rng(model):
        yield


def storage_key(t: torch.Tensor) -> int:
    """The identity of t's storage (shared by its views), the same for meta, fake and real tensors while
    that storage lives; data_ptr is not (0 for every meta storage)."""
    return t.untyped_storage()._cdata


def track_modules(model: torch.nn.Module, stack: list[str], ran: set[str] | None = None,
                  checkpointed: set[str] | None = None) -> list:
    """Hooks that keep stack[-1] the path of the innermost module running (and add each module called
    to `ran`, and to `checkpointed` where it runs inside a checkpoint region); returns their handles."""

    def enter(name):
        def hook(module, args):
            stack.append(name)  # returns None: the inputs stay as they are
            if ran is not None:
                ran.add(name)
            if checkpointed is not None and _inside_checkpoint():
                checkpointed.add(name)

        return hook

    def leave(module, args, output):
        stack.pop()  # returns None: the output stays as it is

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    return handles


def _inside_checkpoint() -> bool:
    """A forward running inside torch.utils.checkpoint: the non-reentrant kind puts its own saved-tensor
    hooks on top; the reentrant kind runs the region with grad off, from its autograd Function."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and getattr(hooks[0], "__module__", None) == _CHECKPOINT_MODULE:
        return True
    if torch.is_grad_enabled():
        return False
    frame = sys._getframe(2)  # (a frame walk only where grad is off inside a forward run with grad)
    while frame is not None:
        if frame.f_globals.get("__name__") == _CHECKPOINT_MODULE:
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_MODULE = "torch.utils.checkpoint"


def _cast_source(t: torch.Tensor) -> int | None:
    fn = t.grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0" and fn.next_functions and fn.next_functions[0][0] is not None:
        return id(fn.next_functions[0][0])
    return None


_PLANNING = ("Comparison", "Plan", "compare", "max_batch", "plan", "variant")


def __getattr__(name: str):
    """lo.memory.plan and the rest of lowmem_ops.plan, imported on first use (python -m lowmem_ops.plan
    runs that module as a script: importing lowmem_ops must not have imported it already)."""
    if name in _PLANNING:
        from . import plan as planning

        return getattr(planning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
