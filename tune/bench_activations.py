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

The backend of lowmem_ops is whatever LOWMEM_OPS_BACKEND selects (auto|torch|triton|triton-interpret).
This is a script, not a module: tune/ needs no __init__.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
# Benchmark the checkout this script sits in, whether or not (and however) lowmem_ops is installed.
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import lowmem_ops as lo  # noqa: E402

# Our op -> the exact torch activation it replaces (F.gelu's default is the erf form, as ours).
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"regelu2": F.gelu, "resilu2": F.silu}
PHASES = ("fwd", "bwd", "fwdbwd")
CODE_BITS = 2  # regelu2/resilu2 store 2-bit codes: numel / 4 bytes

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

DEFAULTS = {  # device -> (sizes, dtypes, reps, warmup)
    "cuda": ([2**16, 2**20, 2**24, 2**26], ["bf16", "fp16", "fp32"], 100, 10),
    "cpu": ([2**14, 2**18, 2**20], ["fp32", "bf16"], 20, 3),
}
QUICK = {  # device -> (sizes, reps, warmup): a smoke run, not a measurement
    "cuda": ([2**16, 2**20], 10, 3),
    "cpu": ([2**10, 2**14], 5, 2),
}

# Peak DRAM bandwidth in GB/s, matched against torch.cuda.get_device_name (case-insensitive, first
# match wins, so the more specific patterns come first). Unknown GPUs need --peak-gbps.
PEAK_GBPS = [
    (r"\bH200", 4800),                  # not GH200, whose memory differs
    (r"\bB200", 8000),
    (r"H100.*PCIe", 2039),
    (r"H100.*(SXM|HBM3)", 3352),        # the SXM part reports itself as "H100 80GB HBM3"
    (r"A100.*SXM.*80GB", 2039),
    (r"A100.*40GB", 1555),
    (r"L40S", 864),
    (r"\bA10G?\b", 600),                # A10 and A10G, not A100
    (r"RTX 4090", 1008),
    (r"RTX 3090(?! Ti)", 936),
]

TARGET_PEAK_FRACTION = 0.85
TARGET_MIN_NUMEL = 2**24  # the bandwidth target applies from 16M elements up
L2_FLUSH_BYTES = 256 * 2**20  # larger than any listed GPU's L2, so every rep reads from DRAM


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """'1048576', '2**20' or '1<<20'."""
    text = text.strip()
    if m := re.fullmatch(r"(\d+)\s*\*\*\s*(\d+)", text):
        return int(m[1]) ** int(m[2])
    if m := re.fullmatch(r"(\d+)\s*<<\s*(\d+)", text):
        return int(m[1]) << int(m[2])
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"bad size {text!r}: use an integer, 2**k or 1<<k")


def split_commas(values: list[str] | None) -> list[str] | None:
    """Let list flags take `a b`, `a,b` or both."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", metavar="N", help="element counts: 1048576, 2**20 or 1<<20 (default per device)")
    p.add_argument("--dtypes", nargs="+", metavar="DT", help="fp32, fp16, bf16 (default: all three on cuda, fp32 bf16 on cpu)")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"any of {', '.join(OPS)} (default: all)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps: a smoke run")
    p.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth of the GPU, overriding the built-in table")
    p.add_argument("--out", type=Path, help="JSON output (default: <repo>/bench-results/activations-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    sizes, dtypes, reps, warmup = DEFAULTS[args.device]
    if args.quick:
        sizes, reps, warmup = QUICK[args.device]
    try:
        args.sizes = [parse_size(s) for s in split_commas(args.sizes)] if args.sizes else sizes
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    args.dtypes = split_commas(args.dtypes) or dtypes
    args.ops = split_commas(args.ops) or list(OPS)
    args.reps = args.reps if args.reps is not None else reps
    args.warmup = args.warmup if args.warmup is not None else warmup
    for name in args.dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; use fp32, fp16 or bf16")
    for name in args.ops:
        if name not in OPS:
            p.error(f"unknown op {name!r}; this benchmark knows {', '.join(OPS)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    args.out = args.out or REPO_ROOT / "bench-results" / f"activations-{args.device}.json"
    return args


# ---------------------------------------------------------------------------------------------
# Timing


# Ours and torch's are timed in alternation, rep by rep, so that drift or a noisy neighbour (this
# matters on shared CPU machines) hits both alike instead of skewing one side of the ratio.
Timer = Callable[[list[Callable[[], object]]], list[float]]


def time_cpu(fns: list[Callable[[], object]], reps: int, warmup: int) -> list[float]:
    """Median wall time of each fn in microseconds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e6 for t in times]


def time_cuda(fns: list[Callable[[], object]], reps: int, warmup: int, flush: torch.Tensor) -> list[float]:
    """Median GPU time of each fn in microseconds: triton.testing.do_bench's method (CUDA events, L2
    flushed before every rep), but with a fixed rep count so --reps means the same on every device."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for _ in fns]
    torch.cuda.synchronize()
    for rep in range(reps):
        for fn, fn_events in zip(fns, events):
            start, end = fn_events[rep]
            flush.zero_()  # evict x, dy and codes from L2: we measure DRAM traffic, not cache hits
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return [statistics.median([s.elapsed_time(e) for s, e in fn_events]) * 1e3 for fn_events in events]


def make_timer(device: str, reps: int, warmup: int) -> Timer:
    if device == "cpu":
        return lambda fns: time_cpu(fns, reps, warmup)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return lambda fns: time_cuda(fns, reps, warmup, flush)


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
        }
        rec["ratio"] = rec["torch_us"] / rec["ours_us"]  # > 1: we are faster
        if device == "cuda":  # bandwidth only means something for GPU kernel times
            for impl in ("ours", "torch"):
                n_bytes = bytes_moved(impl, phase, numel, x.element_size())
                gbps = n_bytes / (rec[f"{impl}_us"] * 1e-6) / 1e9
                rec[f"{impl}_bytes"], rec[f"{impl}_gbps"] = n_bytes, gbps
                rec[f"{impl}_peak_frac"] = gbps / peak_gbps if peak_gbps else None
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Machine description


def peak_bandwidth(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for pattern, gbps in PEAK_GBPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return float(gbps)
    return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, name: str, peak_gbps: float | None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": args.device, "device_name": name,
        "lowmem_ops_backend": os.environ.get("LOWMEM_OPS_BACKEND", "auto"),
        "torch_version": torch.__version__, "triton_version": triton_version,
        "python_version": platform.python_version(), "torch_num_threads": torch.get_num_threads(),
        "reps": args.reps, "warmup": args.warmup, "quick": args.quick, "seed": args.seed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "timer": ("cuda events, L2 flushed" if args.device == "cuda" else "time.perf_counter")
                 + ", median, ours and torch interleaved rep by rep",
    }
    if args.device == "cuda":
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        env["peak_gbps"] = peak_gbps
    return env


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt_numel(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def fmt_ratio(r: float) -> str:
    return f"[green]{r:.2f}[/green]" if r >= 1 else f"[red]{r:.2f}[/red]"


def fmt_frac(f: float | None) -> str:
    return "-" if f is None else f"{100 * f:.0f}%"


def results_table(records: list[dict], device: str) -> Table:
    table = Table(title=f"lowmem_ops vs torch on {device}: ratio = torch µs / ours µs (> 1: ours faster)")
    columns = ["op", "dtype", "numel", "phase", "ours µs", "torch µs", "ratio"]
    if device == "cuda":
        columns += ["ours GB/s", "ours %peak", "torch GB/s", "torch %peak"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("op", "dtype", "phase") else "right")
    previous = None
    for r in records:
        group = (r["op"], r["dtype"])
        if previous is not None and group != previous:
            table.add_section()  # a rule between (op, dtype) blocks keeps the table scannable
        previous = group
        row = [r["op"], r["dtype"], fmt_numel(r["numel"]), r["phase"],
               f"{r['ours_us']:.1f}", f"{r['torch_us']:.1f}", fmt_ratio(r["ratio"])]
        if device == "cuda":
            row += [f"{r['ours_gbps']:.0f}", fmt_frac(r["ours_peak_frac"]),
                    f"{r['torch_gbps']:.0f}", fmt_frac(r["torch_peak_frac"])]
        table.add_row(*row)
    return table


def summary_table(records: list[dict]) -> Table:
    """Geometric mean of the ratio per (op, phase), over every dtype and size measured."""
    table = Table(title="geometric-mean ratio (torch / ours) over dtypes and sizes")
    table.add_column("op")
    for phase in PHASES:
        table.add_column(phase, justify="right")
    for op in dict.fromkeys(r["op"] for r in records):
        cells = []
        for phase in PHASES:
            ratios = [r["ratio"] for r in records if r["op"] == op and r["phase"] == phase]
            cells.append(fmt_ratio(math.exp(statistics.fmean(math.log(x) for x in ratios))))
        table.add_row(op, *cells)
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


def write_json(path: Path, env: dict, records: list[dict], targets: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "records": records}
    if targets is not None:
        doc["targets"] = targets
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    torch.manual_seed(args.seed)
    name = device_name(args.device)
    peak_gbps = peak_bandwidth(name, args.peak_gbps) if args.device == "cuda" else None
    env = environment(args, name, peak_gbps)
    console.print(f"{name} | LOWMEM_OPS_BACKEND={env['lowmem_ops_backend']} | torch {env['torch_version']} | "
                  f"triton {env['triton_version']} | reps {args.reps}, warmup {args.warmup}", highlight=False)
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
    console.print(summary_table(records))
    targets = check_targets(records, peak_gbps) if args.device == "cuda" else None
    if targets is not None:
        print_targets(console, targets)
    write_json(args.out, env, records, targets)
    console.print(f"wrote {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
