"""What the tune/ benchmark scripts share: timers, peak-bandwidth lookup, the common flags, the
environment record and JSON output, and table formatting.

Importing it puts the repository root first on sys.path, so the scripts benchmark the checkout they
sit in, whether or not (and however) lowmem_ops is installed. The scripts import it as a sibling
(`from _bench_common import ...`): tune/ is a folder of scripts, not a package.
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
from typing import Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from kernelgen.archs import gpu_peak_gbps  # noqa: E402
from rich.table import Table  # noqa: E402

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

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


def parse_sizes(p: argparse.ArgumentParser, values: list[str] | None, default: list[int]) -> list[int]:
    """A list flag of sizes (see parse_size), or the default when it was not given."""
    try:
        return [parse_size(s) for s in split_commas(values)] if values else default
    except argparse.ArgumentTypeError as err:
        p.error(str(err))


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")


def add_common_args(p: argparse.ArgumentParser, ops: Iterable[str], out_stem: str) -> None:
    """The flags every benchmark takes after its own size flags (which come right after --device)."""
    p.add_argument("--dtypes", nargs="+", metavar="DT", help="fp32, fp16, bf16 (default: all three on cuda, fp32 bf16 on cpu)")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"any of {', '.join(ops)} (default: all)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps: a smoke run")
    p.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth of the GPU, overriding the built-in table")
    p.add_argument("--out", type=Path, help=f"JSON output (default: <repo>/bench-results/{out_stem}-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's own choice)")


def check_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")


def resolve_common_args(p: argparse.ArgumentParser, args: argparse.Namespace, ops: Iterable[str], out_stem: str,
                        dtypes: list[str], reps: int, warmup: int) -> None:
    """Fill in the device's defaults for the add_common_args flags and reject bad values."""
    ops = list(ops)
    args.dtypes = split_commas(args.dtypes) or dtypes
    args.ops = split_commas(args.ops) or ops
    args.reps = args.reps if args.reps is not None else reps
    args.warmup = args.warmup if args.warmup is not None else warmup
    for name in args.dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; use fp32, fp16 or bf16")
    for name in args.ops:
        if name not in ops:
            p.error(f"unknown op {name!r}; this benchmark knows {', '.join(ops)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    args.out = args.out or REPO_ROOT / "bench-results" / f"{out_stem}-{args.device}.json"
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------
# Timing


# The callables of one measurement (ours, torch's, ...) are timed in alternation, rep by rep, so
# that drift or a noisy neighbour (this matters on shared CPU machines) hits all alike instead of
# skewing one side of a ratio.
class Timing(float):
    """A median in microseconds that also carries the fastest and slowest repetition."""

    def __new__(cls, samples_us: list[float]):
        timing = super().__new__(cls, statistics.median(samples_us))
        timing.min, timing.max = min(samples_us), max(samples_us)
        return timing


def spread_fields(impl: str, t: float) -> dict:
    """{impl}_us_min / _max for a record, where the timer gave a Timing."""
    return {f"{impl}_us_min": t.min, f"{impl}_us_max": t.max} if isinstance(t, Timing) else {}


Timer = Callable[[list[Callable[[], object]]], list[float]]


def time_cpu(fns: list[Callable[[], object]], reps: int, warmup: int) -> list[float]:
    """Wall time of each fn in microseconds: a Timing (median, min, max)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [Timing([x * 1e6 for x in t]) for t in times]


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
            flush.zero_()  # evict the inputs from L2: we measure DRAM traffic, not cache hits
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return [Timing([s.elapsed_time(e) * 1e3 for s, e in fn_events]) for fn_events in events]


def make_timer(device: str, reps: int, warmup: int) -> Timer:
    if device == "cpu":
        return lambda fns: time_cpu(fns, reps, warmup)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return lambda fns: time_cuda(fns, reps, warmup, flush)


def add_bandwidth(rec: dict, impl: str, n_bytes: int, peak_gbps: float | None) -> None:
    """Record impl's bytes, GB/s and fraction of peak from rec[f'{impl}_us']."""
    gbps = n_bytes / (rec[f"{impl}_us"] * 1e-6) / 1e9
    rec[f"{impl}_bytes"], rec[f"{impl}_gbps"] = n_bytes, gbps
    rec[f"{impl}_peak_frac"] = gbps / peak_gbps if peak_gbps else None


# ---------------------------------------------------------------------------------------------
# Machine description and output


def peak_bandwidth(device_name: str, override: float | None) -> float | None:
    return override or gpu_peak_gbps(device_name)


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
                 + ", median (min and max in *_us_min / *_us_max), ours and torch interleaved rep by rep",
    }
    if args.device == "cuda":
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        env["peak_gbps"] = peak_gbps
    return env


def header_line(env: dict) -> str:
    return (f"{env['device_name']} | LOWMEM_OPS_BACKEND={env['lowmem_ops_backend']} | torch {env['torch_version']} | "
            f"triton {env['triton_version']} | reps {env['reps']}, warmup {env['warmup']}")


def write_json(path: Path, env: dict, records: list[dict], **sections: object) -> None:
    """{"environment": env, "records": records, **sections}; sections that are None are left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "records": records}
    doc.update({key: value for key, value in sections.items() if value is not None})
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Tables


def fmt_numel(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"[green]{r:.2f}[/green]" if r >= 1 else f"[red]{r:.2f}[/red]"


def fmt_frac(f: float | None) -> str:
    return "-" if f is None else f"{100 * f:.0f}%"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def geomean(values: Iterable[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def new_table(title: str, columns: list[str], left: Iterable[str] = ("op", "dtype", "phase")) -> Table:
    """A table whose columns are right-aligned (numbers) except those named in left."""
    table = Table(title=title)
    left = set(left)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def add_grouped_rows(table: Table, records: list[dict], group: Callable[[dict], object],
                     row: Callable[[dict], list[str]]) -> None:
    """One row per record, with a rule wherever group(record) changes: keeps long tables scannable."""
    previous = None
    for r in records:
        key = group(r)
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        table.add_row(*row(r))


def bandwidth_cells(r: dict, impls: Iterable[str]) -> list[str]:
    """GB/s and %peak of each impl, or '-' where that impl was not measured."""
    cells = []
    for impl in impls:
        gbps = r.get(f"{impl}_gbps")
        cells += ["-", "-"] if gbps is None else [f"{gbps:.0f}", fmt_frac(r[f"{impl}_peak_frac"])]
    return cells


def summary_table(records: list[dict], phases: Iterable[str], title: str, ratio_key: str = "ratio") -> Table:
    """Geometric mean of records' ratio_key per (op, phase); records without it are skipped."""
    phases = list(phases)
    table = Table(title=title)
    table.add_column("op")
    for phase in phases:
        table.add_column(phase, justify="right")
    measured = [r for r in records if r.get(ratio_key) is not None]
    for op in dict.fromkeys(r["op"] for r in measured):
        cells = []
        for phase in phases:
            ratios = [r[ratio_key] for r in measured if r["op"] == op and r["phase"] == phase]
            cells.append(fmt_ratio(geomean(ratios)) if ratios else "-")
        table.add_row(op, *cells)
    return table


def start(args: argparse.Namespace) -> tuple[str, float | None]:
    """Seed torch; the device's name and, on CUDA, its peak DRAM bandwidth (GB/s, None if unknown)."""
    torch.manual_seed(args.seed)
    name = device_name(args.device)
    return name, (peak_bandwidth(name, args.peak_gbps) if args.device == "cuda" else None)
