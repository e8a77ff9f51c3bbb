"""The measuring tuner: time the configs static pruning kept, per tuning group, on a GPU, and store
the times per (key, config) in tune/db/<arch>.json for `kernelgen build` to bake.

The search is breadth-first under a time budget: round 0 times every group's static config (so a
speed-up is always known), round r the r-th best-ranked survivor of every group, so a short budget
still covers every group. Results already in the DB for the same key are not measured again, so an
interrupted or extended run resumes; a config that fails (out of resources, compile timeout, any
error) is stored as infinitely slow with its reason. Time and the measurement itself are injected
(`clock`, `measure`), so the search is tested without a GPU; `CudaMeasure` is the real one.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import prune, render, space, tunedb
from .aot import one_line
from .archs import DTYPE_BYTES, Arch
from .spec import Spec


class TuneError(RuntimeError):
    """Tuning cannot start: no GPU, another arch, a stale tree; the message says what to do."""


class CompileTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class Task:
    group: render.TuneGroup
    source_sha256: str
    ranked: tuple[dict, ...]  # kept candidates, measuring order: the static choice, then by occupancy
    problem: tuple[int, ...]  # (n,) or (rows, cols)
    bytes_moved: int

    @property
    def static(self) -> dict:
        return self.ranked[0]


# --- what to measure -------------------------------------------------------------------------

_ELEMENTWISE_TRAFFIC = {  # (elements of the dtype read + written, code arrays touched) per element
    "forward": (2, 1), "forward_nograd": (2, 0), "backward": (2, 1),
    "gated_forward": (3, 0), "gated_forward_approx": (4, 1),
    "gated_backward": (5, 0), "gated_backward_approx": (5, 1),
}
_NORM_TRAFFIC = {"forward": 2, "backward": 3, "param_grad": 2}  # row tensors read + written


def bytes_moved(group: render.TuneGroup, problem: tuple[int, ...], bits: int) -> int:
    """The DRAM traffic one launch cannot avoid: its inputs read once, its outputs written once."""
    d = DTYPE_BYTES[group.dtype]
    if group.op == render.NORM_FILE:
        rows, cols = problem
        return _NORM_TRAFFIC[group.kernel.rsplit(".", 1)[1]] * d * rows * cols + 4 * rows
    (n,) = problem
    tensors, codes = _ELEMENTWISE_TRAFFIC[group.kernel]
    return tensors * d * n + codes * -(-n * bits // 8)


def problem_of(group: render.TuneGroup) -> tuple[int, ...]:
    if group.op == render.NORM_FILE:
        return space.norm_space().problem_shape(*group.index)
    return (space.activation_space().problem_size(group.index[0]),)


def plan(specs: list[Spec], arch: Arch, tree: Path, norms: bool, select: Callable[[render.TuneGroup], bool]) -> list[Task]:
    """The tasks of `tree`'s `arch` build, from its manifest (what pruning kept) and the spaces.
    Refuses a tree whose kernel files are not what the current templates and specs render: times
    measured on them would be stale the moment they are stored."""
    from .build import groups_for

    manifest_path = tree / arch.name / "manifest.json"
    if not manifest_path.is_file():
        raise TuneError(f"{manifest_path} is missing: run `kernelgen build --arch {arch.name}` first")
    manifest = json.loads(manifest_path.read_text())
    fresh = {s.name: render.render_activation(s, arch) for s in specs}
    if norms:
        fresh[render.NORM_FILE] = render.render_norm(arch)
    for op, text in fresh.items():
        path = tree / arch.name / f"{op}.py"
        if not path.is_file() or path.read_text() != text or op not in manifest.get("ops", {}):
            raise TuneError(f"{path} is not what the current templates and specs render: run "
                            f"`kernelgen build --arch {arch.name}` first, then tune")
    verdicts = {(v["op"], v["kernel"], v["dtype"], space.config_id(v["config"])): v for v in manifest["variants"]}
    bits = {s.name: s.bits for s in specs}
    tasks = []
    for g in groups_for(specs, arch, norms):
        if not select(g):
            continue

        def verdict_of(c, g=g):
            v = verdicts.get((g.op, g.kernel, g.dtype, space.config_id(c)))
            if v is None:
                raise TuneError(f"{manifest_path} has no entry for {g.op}.{g.kernel}[{g.dtype}] {c}: rebuild it")
            return prune.Verdict(v["kept"], v["reason"], v.get("occupancy", 0.0))

        ordered = prune.measuring_order(list(g.candidates), verdict_of)
        if len(ordered) < 2:
            continue  # nothing to choose between
        problem = problem_of(g)
        tasks.append(Task(g, manifest["ops"][g.op]["source_sha256"], tuple(ordered), problem,
                          bytes_moved(g, problem, bits.get(g.op, 0))))
    return tasks


# --- the search ------------------------------------------------------------------------------

@dataclass
class SearchStats:
    measured: int = 0
    reused: int = 0
    failed: int = 0
    rounds: int = 0
    out_of_time: bool = False


def search(tasks: list[Task], db: tunedb.TuneDB, measure: Callable[[Task, dict], float], *, gpu: str, triton: str,
           budget_s: float, clock: Callable[[], float] = time.monotonic, save: Callable[[], None] = lambda: None,
           progress: Callable[[Task, dict, float], None] = lambda t, c, ms: None) -> SearchStats:
    """Measure breadth-first until every task's candidates are timed or the budget is spent.
    `measure` returns milliseconds; an exception scores the config as infinitely slow."""
    stats = SearchStats()
    deadline = clock() + budget_s
    entries = [db.entry(tunedb.EntryKey(*t.group.key, t.source_sha256, triton, gpu), list(t.problem), t.bytes_moved,
                        t.static) for t in tasks]
    depth = max((len(t.ranked) for t in tasks), default=0)
    for r in range(depth):
        stats.rounds = r + 1
        for t, entry in zip(tasks, entries):
            if r >= len(t.ranked):
                continue
            config = t.ranked[r]
            if space.config_id(config) in entry.results:
                stats.reused += 1
                progress(t, config, entry.results[space.config_id(config)].ms)
                continue
            if clock() >= deadline:
                stats.out_of_time = True
                save()
                return stats
            try:
                ms, error = float(measure(t, config)), ""
                if not ms > 0 or not math.isfinite(ms):
                    raise RuntimeError(f"the timer returned {ms!r}")
            except Exception as err:  # out of resources, timeouts, launch errors: never stop the run
                ms, error = math.inf, one_line(err)
                stats.failed += 1
            db.record(entry.key, config, ms, error)
            stats.measured += 1
            progress(t, config, ms)
        save()  # after every round: an interrupted run keeps what it measured
    return stats


# --- the real measurement (CUDA) ---------------------------------------------------------------

def run_with_timeout(fn: Callable[[], object], seconds: float) -> None:
    """Run fn (a first launch, which compiles) in a thread; CompileTimeout if it takes longer.
    The thread cannot be killed; the config is scored as failed and the search moves on."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise CompileTimeout(f"the first launch (compile) took over {seconds:g} s")
    if "error" in box:
        raise box["error"]


class CudaMeasure:
    """Times a task's kernel with a candidate config through lowmem_ops' own launchers (the code
    training runs), captured in a CUDA graph so launch overhead does not drown small buckets.
    `timer(fn) -> ms` is triton.testing.do_bench_cudagraph unless given; device="cpu" with
    interpret=True runs the same launches under the Triton interpreter (for tests)."""

    def __init__(self, tree: Path, arch: Arch, device: str = "cuda", interpret: bool = False,
                 compile_timeout_s: float = 120.0, timer: Callable[[Callable[[], object]], float] | None = None,
                 max_elements: int | None = None):
        import torch

        from lowmem_ops import _tree

        self.torch, self.tree, self.arch, self.device, self.interpret = torch, Path(tree), arch, device, interpret
        self.compile_timeout_s, self.max_elements = compile_timeout_s, max_elements
        self.timer = timer or self._cuda_timer
        _tree.load_tree(self.tree)
        self._inputs: dict = {}

    @staticmethod
    def _cuda_timer(fn) -> float:
        from triton.testing import do_bench, do_bench_cudagraph

        try:
            return float(do_bench_cudagraph(fn, rep=40))
        except RuntimeError:  # not capturable on this setup: plain events, launch overhead included
            return float(do_bench(fn, warmup=10, rep=40))

    def _shape(self, task: Task) -> tuple[int, ...]:
        if self.max_elements is None:
            return task.problem
        if len(task.problem) == 1:
            return (min(task.problem[0], self.max_elements),)
        rows, cols = task.problem
        return (max(1, min(rows, self.max_elements // cols)), cols)

    def __call__(self, task: Task, config: dict) -> float:
        fn = self._launcher(task, config)
        run_with_timeout(fn, self.compile_timeout_s)
        return self.timer(fn)

    def _launcher(self, task: Task, cfg: dict) -> Callable[[], object]:
        g = task.group
        key = (g.op, g.kernel, g.dtype, self._shape(task))
        if key not in self._inputs:
            self._inputs.clear()  # one task's tensors at a time: the largest buckets are GBs
            self._inputs[key] = self._make_inputs(task)
        args = self._inputs[key]
        return (self._norm_launcher if g.op == render.NORM_FILE else self._activation_launcher)(g, args, cfg)

    def _make_inputs(self, task: Task) -> dict:
        torch = self.torch
        from lowmem_ops import _norm_backends as nb
        from lowmem_ops import _triton_backend as tb
        from lowmem_ops._tree import get_op

        g, shape = task.group, self._shape(task)
        dtype = getattr(torch, g.dtype)
        gen = torch.Generator(device=self.device).manual_seed(0)

        def randn(*s):
            return torch.randn(*s, generator=gen, device=self.device, dtype=torch.float32).to(dtype)

        if g.op != render.NORM_FILE:
            op = get_op(g.op)
            x, dy = randn(*shape), randn(*shape)
            args = {"op": op, "x": x, "dy": dy, "up": randn(*shape)}
            if g.kernel == "backward":
                args["codes"] = tb.forward(op, x, True, self.interpret)[1]
            if g.kernel == "gated_backward_approx":
                _, args["h"], args["codes"] = tb.gated_forward(op, x, args["up"], True, True, self.interpret)
            return args
        kind, *rest = g.kernel.split(".")
        affine = rest[0] == "affine"
        rows, cols = shape
        w = (1.0 + 0.1 * torch.rand(cols, generator=gen, device=self.device)) if affine else None
        b = 0.1 * torch.randn(cols, generator=gen, device=self.device) if affine and kind == "layernorm" else None
        x = randn(rows, cols)
        y, rstd, _ = nb.triton_forward(x, w, b, 1e-5, kind == "rmsnorm", dtype, self.interpret)
        return {"x": x, "w": w, "b": b, "y": y, "rstd": rstd, "dy": randn(rows, cols), "is_rms": kind == "rmsnorm",
                "dtype": dtype}

    def _activation_launcher(self, g, a: dict, cfg: dict):
        from lowmem_ops import _triton_backend as tb

        op, x, dy, up, it = a["op"], a["x"], a["dy"], a["up"], self.interpret
        return {
            "forward": lambda: tb.forward(op, x, True, it, cfg),
            "forward_nograd": lambda: tb.forward(op, x, False, it, cfg),
            "backward": lambda: tb.backward(op, dy, a.get("codes"), it, cfg),
            "gated_forward": lambda: tb.gated_forward(op, x, up, False, False, it, cfg),
            "gated_forward_approx": lambda: tb.gated_forward(op, x, up, True, True, it, cfg),
            "gated_backward": lambda: tb.gated_backward(op, dy, x, up, None, None, False, True, True, it, cfg),
            "gated_backward_approx": lambda: tb.gated_backward(op, dy, None, up, a.get("h"), a.get("codes"), True, True,
                                                               True, it, cfg),
        }[g.kernel]

    def _norm_launcher(self, g, a: dict, cfg: dict):
        from lowmem_ops import _norm_backends as nb

        stage, it = g.kernel.rsplit(".", 1)[1], self.interpret
        if stage == "forward":
            return lambda: nb.triton_forward(a["x"], a["w"], a["b"], 1e-5, a["is_rms"], a["dtype"], it, cfg)
        if stage == "backward":
            return lambda: nb.triton_backward(a["dy"], a["y"], a["rstd"], a["w"], a["b"], a["is_rms"], a["dtype"], it, cfg)
        # dgamma/dbeta runs after the looped backward: time both, the backward at its static config
        loop = space.norm_space().configs(self.arch, "backward", g.dtype, len(space.norm_space().widths))[0]
        return lambda: nb.triton_backward(a["dy"], a["y"], a["rstd"], a["w"], a["b"], a["is_rms"], a["dtype"], it,
                                          loop, param_cfg=cfg)

