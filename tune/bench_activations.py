"""Benchmark lowmem_ops.regelu2 / resilu2 against torch's exact GELU / SiLU.

For each (op, dtype, size) it times three phases, for ours and for torch's:
  fwd     forward on an input that requires grad (so ours also writes its 2-bit codes)
  bwd     backward only, re-run on one retained graph via torch.autograd.grad
  fwdbwd  forward then backward on a fresh graph

It prints a rich table (microseconds, and torch_time / our_time: > 1 means we are faster) and
writes JSON, one record per (op, dtype, size, phase). On CUDA it also reports GB/s moved and the
fraction of peak DRAM bandwidth, and whether the targets are met.

    .venv/bin/python tune/bench_activations.py --quick          # smoke run, well under a minute on CPU
    .venv/bin/python tune/bench_activations.py                  # default sizes/dtypes for the device
    .venv/bin/python tune/bench_activations.py --device cuda --sizes 2**24 2**26 --dtypes bf16 --reps 200

The backend of lowmem_ops is whatever LOWMEM_OPS_BACKEND selects (auto|torch|cpp|triton|triton-interpret),
or --backend. On CPU, auto and cpp time the C++ kernels (compiled before timing starts), e.g.

    .venv/bin/python tune/bench_activations.py --device cpu --threads 1 --backend cpp --sizes 2**20 2**24 --reps 10
This is a script, not a module: tune/ needs no __init__.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

# The sibling module must come before lowmem_ops: it puts this checkout first on sys.path.
from _bench_common import (DTYPE_SHORT, DTYPES, Timer, add_bandwidth, add_common_args, add_device_arg,
                           add_grouped_rows, bandwidth_cells, check_device, environment, fmt_numel,
                           fmt_ratio, header_line, make_timer, new_table, parse_sizes, spread_fields,
                           resolve_common_args, start, summary_table, write_json)
import lowmem_ops as lo

# Our op -> the exact torch activation it replaces (F.gelu's default is the erf form, as ours).
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"regelu2": F.gelu, "resilu2": F.silu}
PHASES = ("fwd", "bwd", "fwdbwd")
CODE_BITS = 2  # regelu2/resilu2 store 2-bit codes: numel / 4 bytes
OUT_STEM = "activations"  # JSON: bench-results/activations-<device>.json

DEFAULTS = {  # device -> (sizes, dtypes, reps, warmup)
    "cuda": ([2**16, 2**20, 2**24, 2**26], ["bf16", "fp16", "fp32"], 100, 10),
    "cpu": ([2**14, 2**18, 2**20], ["fp32", "bf16"], 20, 3),
}
QUICK = {  # device -> (sizes, reps, warmup): a smoke run, not a measurement
    "cuda": ([2**16, 2**20], 10, 3),
    "cpu": ([2**10, 2**14], 5, 2),
}

TARGET_PEAK_FRACTION = 0.85
TARGET_MIN_NUMEL = 2**24  # the bandwidth target applies from 16M elements up


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arg(p)
    p.add_argument("--sizes", nargs="+", metavar="N", help="element counts: 1048576, 2**20 or 1<<20 (default per device)")
    p.add_argument("--backend", choices=lo.BACKENDS, help="LOWMEM_OPS_BACKEND for this run (default: the environment's)")
    add_common_args(p, OPS, OUT_STEM)
    args = p.parse_args(argv)
    if args.backend:
        os.environ["LOWMEM_OPS_BACKEND"] = args.backend  # read per call; recorded in the JSON environment

    check_device(p, args)
    sizes, dtypes, reps, warmup = DEFAULTS[args.device]
    if args.quick:
        sizes, reps, warmup = QUICK[args.device]
    args.sizes = parse_sizes(p, args.sizes, sizes)
    resolve_common_args(p, args, OPS, OUT_STEM, dtypes, reps, warmup)
    return args


# ---------------------------------------------------------------------------------------------
# What is measured


def phase_fns(act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three timed callables for one activation. x requires grad, so the forward saves what its
    backward needs (codes for ours, x for torch's). torch.autograd.grad returns dx without
    accumulating into x.grad, so no extra add kernel is timed."""
    y = act(x)  # one graph kept alive for the backward-only timing
    return {
        "fwd": lambda: act(x),
        "bwd": lambda: torch.autograd.grad(y, x, dy, retain_graph=True),
        "fwdbwd": lambda: torch.autograd.grad(act(x), x, dy),
    }


def bytes_moved(impl: str, phase: str, numel: int, itemsize: int) -> int:
    """DRAM bytes a perfect kernel must move. Ours: fwd reads x, writes y and the codes; bwd reads dy
    and the codes, writes dx. Torch's: fwd reads x, writes y; bwd reads x and dy, writes dx."""
    tensor = numel * itemsize
    codes = math.ceil(numel * CODE_BITS / 8)
    per_phase = {
        "ours": {"fwd": 2 * tensor + codes, "bwd": 2 * tensor + codes},
        "torch": {"fwd": 2 * tensor, "bwd": 3 * tensor},
    }[impl]
    per_phase["fwdbwd"] = per_phase["fwd"] + per_phase["bwd"]
    return per_phase[phase]


def check_forward(op: str, device: str, dtype: torch.dtype) -> None:
    """Our forward is exact, so it must agree with torch's: a benchmark of a wrong kernel is worthless."""
    x = torch.randn(4099, device=device, dtype=dtype)  # odd size: covers the partial code byte
    torch.testing.assert_close(lo.approx_activation(x, op), OPS[op](x), msg=lambda m: f"{op} {dtype}: {m}")


def bench_case(op: str, dtype: torch.dtype, numel: int, device: str, timer: Timer, peak_gbps: float | None) -> list[dict]:
    """Time every phase of one (op, dtype, size) for ours and torch's; one record per phase."""
    x = torch.randn(numel, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(numel, device=device, dtype=dtype)
    ours = phase_fns(lambda t: lo.approx_activation(t, op), x, dy)
    theirs = phase_fns(OPS[op], x, dy)
    records = []
    for phase in PHASES:
        ours_us, torch_us = timer([ours[phase], theirs[phase]])
        rec = {
            "op": op, "baseline": f"torch.nn.functional.{OPS[op].__name__}", "dtype": DTYPE_SHORT[dtype],
            "numel": numel, "phase": phase, "ours_us": ours_us, "torch_us": torch_us,
            **spread_fields("ours", ours_us), **spread_fields("torch", torch_us),
        }
        rec["ratio"] = rec["torch_us"] / rec["ours_us"]  # > 1: we are faster
        if device == "cuda":  # bandwidth only means something for GPU kernel times
            for impl in ("ours", "torch"):
                add_bandwidth(rec, impl, bytes_moved(impl, phase, numel, x.element_size()), peak_gbps)
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Reporting


def results_table(records: list[dict], device: str) -> Table:
    columns = ["op", "dtype", "numel", "phase", "ours µs", "torch µs", "ratio"]
    if device == "cuda":
        columns += ["ours GB/s", "ours %peak", "torch GB/s", "torch %peak"]
    table = new_table(f"lowmem_ops vs torch on {device}: ratio = torch µs / ours µs (> 1: ours faster)", columns)

    def row(r: dict) -> list[str]:
        cells = [r["op"], r["dtype"], fmt_numel(r["numel"]), r["phase"],
                 f"{r['ours_us']:.1f}", f"{r['torch_us']:.1f}", fmt_ratio(r["ratio"])]
        return cells + (bandwidth_cells(r, ("ours", "torch")) if device == "cuda" else [])

    add_grouped_rows(table, records, lambda r: (r["op"], r["dtype"]), row)
    return table


def check_targets(records: list[dict], peak_gbps: float | None) -> dict:
    """CUDA targets: each of our kernels (fwd, bwd) moves >= 85% of peak bandwidth at >= 16M elements,
    and our fwd+bwd is no slower than torch's at every size measured. met is None when not checked."""
    big = [r for r in records if r["numel"] >= TARGET_MIN_NUMEL and r["phase"] in ("fwd", "bwd")]
    if peak_gbps is None or not big:
        bandwidth = {"met": None, "failures": [],
                     "why_unchecked": "no peak bandwidth known (pass --peak-gbps)" if peak_gbps is None
                     else f"no size >= {TARGET_MIN_NUMEL} measured"}
    else:
        failures = [f"{r['op']} {r['dtype']} {fmt_numel(r['numel'])} {r['phase']}: {100 * r['ours_peak_frac']:.1f}% of peak"
                    for r in big if r["ours_peak_frac"] < TARGET_PEAK_FRACTION]
        bandwidth = {"met": not failures, "failures": failures}
    fwdbwd = [r for r in records if r["phase"] == "fwdbwd"]
    slower = [f"{r['op']} {r['dtype']} {fmt_numel(r['numel'])}: ratio {r['ratio']:.2f}" for r in fwdbwd if r["ratio"] < 1]
    return {
        "bandwidth": {"target": f"ours fwd and bwd >= {TARGET_PEAK_FRACTION:.0%} of peak at numel >= {TARGET_MIN_NUMEL}",
                      **bandwidth},
        "fwdbwd_vs_torch": {"target": "ours fwd+bwd time <= torch's", "met": not slower, "failures": slower},
    }


def print_targets(console: Console, targets: dict) -> None:
    for key, t in targets.items():
        verdict = {True: "[green]met[/green]", False: "[red]NOT met[/red]", None: "[yellow]not checked[/yellow]"}[t["met"]]
        console.print(f"target {key}: {t['target']}: {verdict}" + (f" ({t['why_unchecked']})" if "why_unchecked" in t else ""))
        for failure in t["failures"]:
            console.print(f"    {failure}", highlight=False)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    name, peak_gbps = start(args)
    env = environment(args, name, peak_gbps)
    console.print(header_line(env), highlight=False)
    if args.device == "cuda" and peak_gbps is None:
        console.print(f"[yellow]no peak bandwidth known for {name!r}: pass --peak-gbps for %peak and the targets[/yellow]")

    timer = make_timer(args.device, args.reps, args.warmup)
    records = []
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            check_forward(op, args.device, dtype)
            for numel in args.sizes:
                with console.status(f"{op} {DTYPE_SHORT[dtype]} {fmt_numel(numel)}"):
                    records += bench_case(op, dtype, numel, args.device, timer, peak_gbps)
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the 2**26 fp32 cases need the room

    console.print(results_table(records, args.device))
    console.print(summary_table(records, PHASES, "geometric-mean ratio (torch / ours) over dtypes and sizes"))
    targets = check_targets(records, peak_gbps) if args.device == "cuda" else None
    if targets is not None:
        print_targets(console, targets)
    write_json(args.out, env, records, targets=targets)
    console.print(f"wrote {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
