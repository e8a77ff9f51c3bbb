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

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import families, prune, space, tunedb
from .aot import one_line
from .archs import Arch
from .contract import contract
from .kernels import Family, TuneGroup
from .spec import Spec


class TuneError(RuntimeError):
    """Tuning cannot start: no GPU, another arch, a stale tree; the message says what to do."""


class CompileTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class Task:
    group: TuneGroup
    source_sha256: str
    ranked: tuple[dict, ...]  # kept candidates, measuring order: the static choice, then by occupancy
    problem: tuple[int, ...]  # (n,) or (rows, cols)
    bytes_moved: int

    @property
    def static(self) -> dict:
        return self.ranked[0]


# --- what to measure -------------------------------------------------------------------------

def plan(specs: list[Spec], arch: Arch, tree: Path, fams: tuple[Family, ...],
         select: Callable[[TuneGroup], bool]) -> list[Task]:
    """The tasks of `tree`'s `arch` build, from its build record (what pruning kept) and the spaces.
    Refuses a tree whose kernel files are not what the current templates and specs render: times
    measured on them would be stale the moment they are stored."""
    from .build import build_record

    record = build_record(tree, arch)
    if record is None:
        raise TuneError(f"{tree / arch.name / contract.MANIFEST_FILE} is missing: run `kernelgen build --arch "
                        f"{arch.name}` first")
    for family in fams:
        for source in family.sources(specs, arch):
            sha = hashlib.sha256(source.text.encode()).hexdigest()
            path = tree / contract.kernel_file(contract.kernel_name(source.stem, sha))
            if not path.is_file() or path.read_text() != source.text or record.sources.get(source.stem) != sha:
                raise TuneError(f"{path} is not what the current templates and specs render: run "
                                f"`kernelgen build --arch {arch.name}` first, then tune")
    tasks = []
    for g in families.groups(specs, arch, fams):
        if not select(g):
            continue

        def verdict_of(c, g=g):
            v = record.verdict(g, c)
            if v is None:
                raise TuneError(f"{record.manifest} has no entry for {g.op}.{g.kernel}[{g.dtype}] {c}: rebuild it")
            return v

        ordered = prune.measuring_order(list(g.candidates), verdict_of)
        if len(ordered) < 2:
            continue  # nothing to choose between
        family = families.of(g)
        problem = family.problem(g)
        tasks.append(Task(g, record.sources[g.op], tuple(ordered), problem, family.bytes_moved(g, problem, specs)))
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
            gen = self.torch.Generator(device=self.device).manual_seed(0)
            self._inputs[key] = families.of(g).measure_inputs(g, self._shape(task), self.device, self.interpret, gen)
        return families.of(g).launcher(g, self._inputs[key], cfg, self.interpret, self.arch)
