"""The C++ CPU backend against torch's eager ops, for the issue-12 targets of the ops without a
benchmark of their own:

  gated   backward of out = act(g) * u: ours (swiglu / geglu, mode exact and approx) vs torch's
          eager autograd of F.silu(g) * u / F.gelu(g) * u (mul backward + silu_backward). Target:
          exact within 1.5x of torch.
  halves  forward + backward of act(a) * b for a, b = gate_up.chunk(2, -1), as a fused gated MLP's one
          projection (Phi-3) and MoE experts give them: lowmem_ops.gated.gated_halves (one C++ op, or
          on CUDA one autograd.Function over the Triton rows kernels; the gradient of gate_up written
          whole), swiglu / geglu on the two chunks (autograd concatenates their gradients) and on
          contiguous copies of the chunks (what the Triton path did before its rows kernels) vs torch's
          eager F.silu(a) * b on the chunks. The one case that also runs on CUDA (--device cuda).
  norm    forward + backward of lo.ms_layernorm / ms_rmsnorm (no affine, and inverse-mode affine)
          vs F.layer_norm / F.rms_norm (same affine). Target: within 1.5x.

Timed interleaved rep by rep (min / median / max, microseconds); ratio = ours / torch median
(< 1: ours faster). Elements: gated 2^k elements as (2^k / 4096, 4096); norms (rows, cols) with
rows * cols = 2^k.

    python tune/bench_cpu.py --threads 1 --sizes 2**20 2**24 --dtypes fp32 bf16 --reps 7 --out results.json
    python tune/bench_cpu.py --device cuda --only halves --sizes 2**24 2**26 --dtypes bf16 --reps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from _bench_common import Timing, environment, make_timer, parse_sizes, time_cpu  # noqa: F401  (puts the checkout first)

import lowmem_ops as lo
from lowmem_ops.gated import gated_halves

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GATED = {"swiglu": (lo.swiglu, F.silu), "geglu": (lambda g, u, mode: lo.geglu(g, u, mode=mode), F.gelu)}


def gated_cases(n, dtype, reps, warmup):
    cols = 4096 if n >= 4096 else n
    shape = (n // cols, cols)
    gen = torch.Generator().manual_seed(0)
    g0, u0, dy = ((torch.randn(shape, generator=gen) * 2).to(dtype) for _ in range(3))
    out = []
    for name, (ours, act) in GATED.items():
        def graph(fn):
            g, u = g0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
            return fn(g, u), (g, u)

        y_t, in_t = graph(lambda g, u: act(g) * u)
        fns = {"torch": lambda: torch.autograd.grad(y_t, in_t, dy, retain_graph=True)}
        for mode in ("exact", "approx"):
            y_o, in_o = graph(lambda g, u, mode=mode: ours(g, u, mode))
            fns[mode] = (lambda y_o=y_o, in_o=in_o: torch.autograd.grad(y_o, in_o, dy, retain_graph=True))
        times = dict(zip(fns, time_cpu(list(fns.values()), reps, warmup)))
        for mode in ("exact", "approx"):
            out.append(row(f"{name} {mode}", "bwd", n, dtype, times[mode], times["torch"]))
    return out


def halves_cases(n, dtype, reps, warmup, device="cpu"):
    cols = 2816 if n >= 2816 else n  # LLaMA-7B's FFN width is 11008; Phi-3-mini's 8192
    gen = torch.Generator().manual_seed(0)
    gu = (torch.randn(max(1, n // cols), 2 * cols, generator=gen) * 2).to(device, dtype).requires_grad_(True)
    dy = torch.randn(gu.shape[0], cols, generator=gen).to(device, dtype)
    out = []
    for name, (ours, act) in GATED.items():
        op = {"swiglu": "resilu2", "geglu": "regelu2"}[name]

        def grad(fn):
            return lambda: torch.autograd.grad(fn(), gu, dy)

        fns = {"torch": grad(lambda: (lambda a, b: act(a) * b)(*gu.chunk(2, -1))),
               "gated_halves": grad(lambda: gated_halves(gu, op)),
               "chunks": grad(lambda: ours(*gu.chunk(2, -1), "exact")),
               "copies": grad(lambda: ours(*(h.contiguous() for h in gu.chunk(2, -1)), "exact"))}
        times = dict(zip(fns, make_timer(device, reps, warmup)(list(fns.values()))))
        for impl, label in (("gated_halves", "gated_halves"), ("chunks", "on chunks"), ("copies", "on copies")):
            out.append(row(f"{name} {label}", "fwdbwd", n, dtype, times[impl], times["torch"]))
    return out


def norm_cases(n, dtype, reps, warmup, cols_list):
    out = []
    for cols in cols_list:
        rows = max(1, n // cols)
        gen = torch.Generator().manual_seed(0)
        x0 = (torch.randn(rows, cols, generator=gen) * 2 + 0.5).to(dtype)
        dy = torch.randn(rows, cols, generator=gen).to(dtype)
        w0 = (torch.rand(cols, generator=gen) + 0.5).to(dtype)
        b0 = torch.randn(cols, generator=gen).to(dtype)
        for is_rms in (False, True):
            for affine in ("none", "inverse"):
                def step(fn, affine=affine, is_rms=is_rms):
                    def run():
                        x = x0.clone().requires_grad_(True)
                        w = w0.clone().requires_grad_(True) if affine != "none" else None
                        b = b0.clone().requires_grad_(True) if affine != "none" and not is_rms else None
                        fn(x, w, b).backward(dy)
                    return run

                ours = step(lambda x, w, b, is_rms=is_rms: lo.ms_rmsnorm(x, cols, w, 1e-6) if is_rms
                            else lo.ms_layernorm(x, cols, w, b, 1e-5))
                theirs = step(lambda x, w, b, is_rms=is_rms: F.rms_norm(x, (cols,), w, 1e-6) if is_rms
                              else F.layer_norm(x, (cols,), w, b, 1e-5))
                t_o, t_t = time_cpu([ours, theirs], reps, warmup)
                name = f"{'rmsnorm' if is_rms else 'layernorm'} {affine} {cols}c"
                out.append(row(name, "fwdbwd", n, dtype, t_o, t_t))
    return out


def row(op, phase, n, dtype, ours, theirs):
    return {"op": op, "phase": phase, "numel": n, "dtype": str(dtype).removeprefix("torch."),
            "ours_us": float(ours), "ours_us_min": ours.min, "ours_us_max": ours.max,
            "torch_us": float(theirs), "torch_us_min": theirs.min, "torch_us_max": theirs.max,
            "ratio": float(ours) / float(theirs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: --only halves (the Triton rows kernels); the rest times the C++ backend")
    p.add_argument("--sizes", nargs="+", help="element counts (2**20 ...), default 2**20 2**24")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cols", type=int, nargs="+", default=[768, 4096], help="norm widths")
    p.add_argument("--only", choices=("gated", "halves", "norm"))
    p.add_argument("--out", help="JSON output")
    args = p.parse_args(argv)
    sizes = parse_sizes(p, args.sizes, [2**20, 2**24])
    if args.device == "cuda" and (args.only != "halves" or not torch.cuda.is_available()):
        p.error("--device cuda times --only halves, on a machine with a CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("LOWMEM_OPS_BACKEND", "cpp" if args.device == "cpu" else "auto")
    records = []
    for dtype in (DTYPES[d] for d in args.dtypes):
        for n in sizes:
            if args.only in (None, "gated"):
                records += gated_cases(n, dtype, args.reps, args.warmup)
            if args.only in (None, "halves"):
                records += halves_cases(n, dtype, args.reps, args.warmup, args.device)
            if args.only in (None, "norm"):
                records += norm_cases(n, dtype, args.reps, args.warmup, args.cols)
    print(f"device {args.device}  threads {torch.get_num_threads()}  backend {os.environ['LOWMEM_OPS_BACKEND']}  "
          f"torch {torch.__version__}")
    print(f"{'op':28} {'dtype':9} {'numel':>9} {'ours us (min-max)':>28} {'torch us (min-max)':>28} {'ours/torch':>10}")
    for r in records:
        print(f"{r['op']:28} {r['dtype']:9} {r['numel']:>9} "
              f"{r['ours_us']:>10.0f} ({r['ours_us_min']:.0f}-{r['ours_us_max']:.0f}) ".rjust(28)
              + f"{r['torch_us']:>10.0f} ({r['torch_us_min']:.0f}-{r['torch_us_max']:.0f}) ".rjust(28)
              + f"{r['ratio']:>10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "backend": os.environ["LOWMEM_OPS_BACKEND"],
                       "torch": torch.__version__, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
