"""Benchmark the memory-sharing norms lowmem_ops.ms_layernorm / ms_rmsnorm against torch's own.

Ops (each on a (tokens, width) input):
  layernorm           lo.ms_layernorm(x, d, weight, bias, eps=1e-5)  vs F.layer_norm(x, (d,), weight, bias, 1e-5)
  layernorm_noaffine  lo.ms_layernorm(x, d)                          vs F.layer_norm(x, (d,), eps=1e-5)
  rmsnorm             lo.ms_rmsnorm(x, d, weight, eps=1e-6)          vs F.rms_norm(x, (d,), weight, 1e-6)
On CUDA, with liger_kernel importable, Liger-Kernel's LigerLayerNormFunction / LigerRMSNormFunction
are a third column (not for layernorm_noaffine: Liger's LayerNorm needs a weight and a bias).

For each (op, dtype, width) it times three phases, as tune/bench_activations.py does:
  fwd     forward on inputs that require grad (so each saves what its backward needs)
  bwd     backward only, re-run on one retained graph via torch.autograd.grad (dx and the
          weight/bias grads)
  fwdbwd  forward then backward on a fresh graph
Ours is timed through the public function. Its inverse-mode safety check on the parameters syncs
with the host only when they change (once per optimizer step in training), so with the fixed
parameters here the timed calls do not pay it.

It also measures, per width, the bytes autograd keeps for backward through norm -> nn.Linear (the
pairing the memory sharing is for), parameters excluded. It prints rich tables (microseconds, and
torch_time / our_time: > 1 means we are faster; saved bytes) and writes JSON. On CUDA it also
reports GB/s moved and the fraction of peak DRAM bandwidth.

    .venv/bin/python tune/bench_norms.py --quick          # smoke run, well under a minute on CPU
    .venv/bin/python tune/bench_norms.py                  # default widths/dtypes for the device
    .venv/bin/python tune/bench_norms.py --device cuda --widths 4096 8192 --tokens 8192 --dtypes bf16 --ops rmsnorm

The backend of lowmem_ops is whatever LOWMEM_OPS_BACKEND selects (auto|torch|triton|triton-interpret).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

# The sibling module must come before lowmem_ops: it puts this checkout first on sys.path.
from _bench_common import (DTYPE_SHORT, DTYPES, Timer, add_bandwidth, add_common_args, add_device_arg,
                           add_grouped_rows, bandwidth_cells, check_device, environment, fmt_bytes,
                           fmt_ratio, header_line, make_timer, new_table, parse_size, parse_sizes, spread_fields,
                           resolve_common_args, start, summary_table, write_json)
import lowmem_ops as lo

Norm = Callable[..., torch.Tensor]  # (x, *params) -> y


@dataclass(frozen=True)
class NormOp:
    params: tuple[str, ...]  # the parameters ours and torch's take after x, in order
    torch_stats: int         # float32 per-row statistics torch's kernel saves: mean+rstd, or rstd
    ours: Norm
    torch: Norm
    baseline: str


LN_EPS, RMS_EPS = 1e-5, 1e-6
OPS = {
    "layernorm": NormOp(
        ("weight", "bias"), 2,
        lambda x, w, b: lo.ms_layernorm(x, x.shape[-1], w, b, eps=LN_EPS),
        lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, LN_EPS),
        "torch.nn.functional.layer_norm"),
    "layernorm_noaffine": NormOp(
        (), 2,
        lambda x: lo.ms_layernorm(x, x.shape[-1], eps=LN_EPS),
        lambda x: F.layer_norm(x, x.shape[-1:], eps=LN_EPS),
        "torch.nn.functional.layer_norm (no weight, no bias)"),
    "rmsnorm": NormOp(
        ("weight",), 1,
        lambda x, w: lo.ms_rmsnorm(x, x.shape[-1], w, eps=RMS_EPS),
        lambda x, w: F.rms_norm(x, x.shape[-1:], w, RMS_EPS),
        "torch.nn.functional.rms_norm"),
}
PHASES = ("fwd", "bwd", "fwdbwd")
OUT_STEM = "norms"  # JSON: bench-results/norms-<device>.json
STAT_BYTES = 4  # every implementation here keeps its per-row statistics in float32
# The linear after the norm saves its input and its weight; its output width changes neither, so a
# narrow one keeps the saved-bytes measurement cheap even at width 16384.
LINEAR_OUT_FEATURES = 64

DEFAULTS = {  # device -> (widths, tokens, dtypes, reps, warmup)
    "cuda": ([768, 1024, 4096, 8192, 16384], 4096, ["bf16", "fp16", "fp32"], 100, 10),
    "cpu": ([768, 1024, 4096, 8192, 16384], 256, ["fp32", "bf16"], 10, 2),
}
QUICK = {  # device -> (widths, tokens, reps, warmup): a smoke run, not a measurement
    "cuda": ([1024, 4096], 1024, 10, 3),
    "cpu": ([768, 4096], 64, 5, 2),
}


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arg(p)
    p.add_argument("--widths", nargs="+", metavar="D", help="normalised widths: 4096, 2**12 or 1<<12 (default per device)")
    p.add_argument("--tokens", type=parse_size, metavar="T", help="rows of the input (default: 4096 on cuda, 256 on cpu)")
    add_common_args(p, OPS, OUT_STEM)
    args = p.parse_args(argv)

    check_device(p, args)
    widths, tokens, dtypes, reps, warmup = DEFAULTS[args.device]
    if args.quick:
        widths, tokens, reps, warmup = QUICK[args.device]
    args.widths = parse_sizes(p, args.widths, widths)
    args.tokens = args.tokens or tokens
    resolve_common_args(p, args, OPS, OUT_STEM, dtypes, reps, warmup)
    return args


# ---------------------------------------------------------------------------------------------
# Liger-Kernel, the optional third column


def load_liger(device: str) -> tuple[dict[str, Norm], str]:
    """Liger's norms by op name (empty when unavailable) and a line saying what was done."""
    if device != "cuda":
        return {}, "Liger-Kernel: skipped (its kernels need CUDA)"
    try:
        from importlib.metadata import version

        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as err:  # a broken install (say, a triton mismatch) must not end the benchmark
        return {}, f"Liger-Kernel: skipped (not importable: {type(err).__name__}: {err})"
    fns = {
        "layernorm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, LN_EPS),
        # offset 0 and "llama" casting are Liger's defaults; in_place=False because its in-place
        # backward overwrites dy, which the timed calls share with ours and torch's.
        "rmsnorm": lambda x, w: LigerRMSNormFunction.apply(x, w, RMS_EPS, 0.0, "llama", False),
    }
    return fns, f"Liger-Kernel {version('liger-kernel')}: third column (layernorm, rmsnorm)"


# ---------------------------------------------------------------------------------------------
# What is measured


def make_inputs(op: NormOp, tokens: int, width: int, dtype: torch.dtype, device: str
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """x (requires grad), the op's parameters (require grad) and dy. Weight near 1 and a small bias,
    like trained norms, and inside inverse mode's safety rule so ours shares rather than falls back."""
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    init = {"weight": lambda: 1 + 0.1 * torch.randn(width, device=device),
            "bias": lambda: 0.1 * torch.randn(width, device=device)}
    params = tuple(init[name]().to(dtype).requires_grad_() for name in op.params)
    dy = torch.randn(tokens, width, device=device, dtype=dtype)
    return x, params, dy


def phase_fns(norm: Norm, x: torch.Tensor, params: tuple[torch.Tensor, ...], dy: torch.Tensor
              ) -> dict[str, Callable[[], object]]:
    """The three timed callables for one norm. torch.autograd.grad returns the grads without
    accumulating into .grad, so no extra add kernel is timed."""
    inputs = (x, *params)
    y = norm(*inputs)  # one graph kept alive for the backward-only timing
    return {
        "fwd": lambda: norm(*inputs),
        "bwd": lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
        "fwdbwd": lambda: torch.autograd.grad(norm(*inputs), inputs, dy),
    }


def bytes_moved(impl: str, phase: str, op: NormOp, tokens: int, width: int, itemsize: int) -> int:
    """DRAM bytes a perfect kernel must move; parameter-grad partial sums are not counted.
    Ours:    fwd reads x and the params, writes y and rstd; bwd reads dy, y, rstd and the params
             (inverse mode needs the bias too), writes dx and the param grads.
    Torch's: fwd reads x and the params, writes y and its stats (mean+rstd, or rstd for RMSNorm);
             bwd reads dy, x, the stats and the weight, writes dx and the param grads.
    Liger's kernels save what torch's do, so they are counted as torch's."""
    act = tokens * width * itemsize
    n_params = len(op.params)
    param = width * itemsize
    if impl == "ours":
        fwd = 2 * act + n_params * param + tokens * STAT_BYTES
        bwd = 3 * act + tokens * STAT_BYTES + 2 * n_params * param
    else:
        stats = op.torch_stats * tokens * STAT_BYTES
        weight_read = param if "weight" in op.params else 0
        fwd = 2 * act + n_params * param + stats
        bwd = 3 * act + stats + weight_read + n_params * param
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[phase]


def forward_mismatch(name: str, norm: Norm, device: str, dtype: torch.dtype) -> str | None:
    """How norm's forward disagrees with torch's, or None: a benchmark of a wrong kernel is worthless.
    Tolerance: about one rounding of y to the dtype (Liger's llama casting rounds twice)."""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    x, params, _ = make_inputs(OPS[name], 67, 1000, dtype, device)  # odd rows, non-power-of-two width
    with torch.no_grad():
        try:
            torch.testing.assert_close(norm(x, *params), OPS[name].torch(x, *params), atol=tol, rtol=tol)
        except AssertionError as err:
            return f"{name} {DTYPE_SHORT[dtype]}: {err}"
    return None


def checked_norms(name: str, liger: dict[str, Norm], device: str, dtype: torch.dtype, console: Console) -> dict[str, Norm]:
    """The implementations to time for one (op, dtype), ours first and torch's second. Ours must match
    torch's; Liger is a reference only, so a mismatch drops its column here instead of the run."""
    if msg := forward_mismatch(name, OPS[name].ours, device, dtype):
        raise SystemExit(f"ours disagrees with torch: {msg}")
    norms = {"ours": OPS[name].ours, "torch": OPS[name].torch}
    if name in liger:
        if msg := forward_mismatch(name, liger[name], device, dtype):
            console.print(f"[yellow]Liger-Kernel left out, its forward disagrees with torch's: {msg}[/yellow]")
        else:
            norms["liger"] = liger[name]
    return norms


def saved_bytes(norm: Norm, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> int:
    """Bytes autograd keeps for backward through norm -> nn.Linear: distinct storages (ours and the
    linear save the same y; count it once), parameters excluded since they exist anyway."""
    linear = torch.nn.Linear(x.shape[-1], LINEAR_OUT_FEATURES, device=x.device, dtype=x.dtype)
    excluded = {p.untyped_storage().data_ptr() for p in (*params, *linear.parameters())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linear(norm(x, *params))
    del out  # held until here so that no saved storage is freed and its address reused mid-count
    return sum(kept.values())


def bench_case(name: str, norms: dict[str, Norm], dtype: torch.dtype, tokens: int, width: int, device: str,
               timer: Timer, peak_gbps: float | None) -> tuple[list[dict], dict]:
    """Time every phase of one (op, dtype, width) for each implementation in norms (ours first,
    torch's second); one record per phase, and the saved-bytes record."""
    op = OPS[name]
    x, params, dy = make_inputs(op, tokens, width, dtype, device)
    fns = {impl: phase_fns(norm, x, params, dy) for impl, norm in norms.items()}
    base = {"op": name, "dtype": DTYPE_SHORT[dtype], "tokens": tokens, "width": width}
    records = []
    for phase in PHASES:
        rec = {**base, "baseline": op.baseline, "numel": tokens * width, "phase": phase}
        for impl, us in zip(fns, timer([f[phase] for f in fns.values()])):
            rec[f"{impl}_us"] = us
            rec.update(spread_fields(impl, us))
        rec["ratio"] = rec["torch_us"] / rec["ours_us"]  # > 1: we are faster
        if "liger" in fns:
            rec["liger_ratio"] = rec["liger_us"] / rec["ours_us"]
        if device == "cuda":  # bandwidth only means something for GPU kernel times
            for impl in fns:
                add_bandwidth(rec, impl, bytes_moved(impl, phase, op, tokens, width, x.element_size()), peak_gbps)
        records.append(rec)
    saved = {**base, **{f"{impl}_saved_bytes": saved_bytes(norm, x, params) for impl, norm in norms.items()}}
    saved["saved_ratio"] = saved["ours_saved_bytes"] / saved["torch_saved_bytes"]
    return records, saved


# ---------------------------------------------------------------------------------------------
# Reporting


def results_table(records: list[dict], device: str, tokens: int, impls: list[str]) -> Table:
    liger = "liger" in impls
    columns = ["op", "dtype", "width", "phase", "ours µs", "torch µs", "ratio"]
    columns += ["liger µs", "liger ratio"] if liger else []
    if device == "cuda":
        columns += [f"{impl} {unit}" for impl in impls for unit in ("GB/s", "%peak")]
    table = new_table(f"memory-sharing norms vs torch on {device}, {tokens} tokens: "
                      "ratio = torch µs / ours µs, liger ratio = liger µs / ours µs (> 1: ours faster)", columns)

    def row(r: dict) -> list[str]:
        cells = [r["op"], r["dtype"], str(r["width"]), r["phase"],
                 f"{r['ours_us']:.1f}", f"{r['torch_us']:.1f}", fmt_ratio(r["ratio"])]
        if liger:
            cells += [f"{r['liger_us']:.1f}", fmt_ratio(r["liger_ratio"])] if "liger_us" in r else ["-", "-"]
        return cells + (bandwidth_cells(r, impls) if device == "cuda" else [])

    add_grouped_rows(table, records, lambda r: (r["op"], r["dtype"]), row)
    return table


def saved_table(saved: list[dict], tokens: int, impls: list[str]) -> Table:
    columns = ["op", "dtype", "width", *(f"{impl} saved" for impl in impls), "ours / torch"]
    table = new_table(f"saved for backward by norm -> nn.Linear, {tokens} tokens (parameters excluded)", columns)

    def row(s: dict) -> list[str]:
        sizes = [fmt_bytes(s[f"{impl}_saved_bytes"]) if f"{impl}_saved_bytes" in s else "-" for impl in impls]
        return [s["op"], s["dtype"], str(s["width"]), *sizes, f"{s['saved_ratio']:.2f}"]

    add_grouped_rows(table, saved, lambda s: (s["op"], s["dtype"]), row)
    return table


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    name, peak_gbps = start(args)
    liger, liger_note = load_liger(args.device)
    env = {**environment(args, name, peak_gbps), "tokens": args.tokens, "liger": liger_note,
           "linear_out_features": LINEAR_OUT_FEATURES}
    console.print(header_line(env) + f" | {args.tokens} tokens", highlight=False)
    console.print(liger_note, highlight=False)
    if args.device == "cuda" and peak_gbps is None:
        console.print(f"[yellow]no peak bandwidth known for {name!r}: pass --peak-gbps for %peak[/yellow]")

    timer = make_timer(args.device, args.reps, args.warmup)
    records, saved = [], []
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            norms = checked_norms(op, liger, args.device, dtype, console)
            for width in args.widths:
                with console.status(f"{op} {DTYPE_SHORT[dtype]} {args.tokens}x{width}"):
                    case_records, case_saved = bench_case(op, norms, dtype, args.tokens, width, args.device,
                                                          timer, peak_gbps)
                records += case_records
                saved.append(case_saved)
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the 16384-wide fp32 cases need the room

    impls = ["ours", "torch", *(["liger"] if liger else [])]
    console.print(results_table(records, args.device, args.tokens, impls))
    console.print(summary_table(records, PHASES, "geometric-mean ratio (torch / ours) over dtypes and widths"))
    if liger:
        console.print(summary_table(records, PHASES, "geometric-mean ratio (liger / ours) over dtypes and widths",
                                    "liger_ratio"))
    console.print(saved_table(saved, args.tokens, impls))
    write_json(args.out, env, records, saved=saved)
    console.print(f"wrote {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
