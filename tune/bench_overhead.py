"""Host overhead per call: forward + backward of every public op on a tiny tensor, ours against
torch's equivalent, timed in interleaved rounds (min / median / max per call).

On a tiny tensor the kernels take next to no time, so this measures what runs on the host around
them: argument checks, the backend choice, autograd, the launch path. On CUDA the loop is not
synchronised per call (the host runs ahead of the GPU as in training); each round ends with one
synchronize, so a round's time is the host's unless the GPU is slower.

--launch-path replaces the Triton kernel launch with a no-op and times, per kernel call, the part
of the launch path that finds the arch, the kernel module and the launch config (on CPU tensors:
through the interpreter's path, on CUDA tensors: the real one). Target: <= 10 us.

    python tune/bench_overhead.py [--device cpu|cuda] [--threads 1] [--rounds 15] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from _bench_common import REPO_ROOT, device_name, environment, new_table, write_json

import torch
import torch.nn.functional as F

import lowmem_ops as lo
from lowmem_ops import _configs, _norm_backends, _triton_backend
from lowmem_ops import _contract as C
from lowmem_ops._tree import get_op

ROWS, COLS = 4, 64  # 256 elements: kernel time is negligible, host time is all there is
TARGET_RATIO = 2.0  # ours / torch, fwd+bwd host time per call
TARGET_LAUNCH_PATH_US = 10.0


def _leaf(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def op_pairs(device: str, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """op -> (ours, torch's): each a function running forward + backward once."""
    x = _leaf(ROWS, COLS, device=device, dtype=dtype)
    g, u = _leaf(ROWS, COLS, device=device, dtype=dtype), _leaf(ROWS, COLS, device=device, dtype=dtype)
    # norm parameters as trained models have them (within the inverse-mode rule: the sharing path)
    w = (1 + 0.1 * torch.randn(COLS, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(COLS, device=device)).to(dtype).requires_grad_()
    dy = torch.ones(ROWS, COLS, device=device, dtype=dtype)

    def step(f, *inputs):
        return lambda: f(*inputs).backward(dy)

    return {
        "regelu2": (step(lo.regelu2, x), step(F.gelu, x)),
        "resilu2": (step(lo.resilu2, x), step(F.silu, x)),
        "swiglu": (step(lo.swiglu, g, u), step(lambda a, c: F.silu(a) * c, g, u)),
        "geglu": (step(lo.geglu, g, u), step(lambda a, c: F.gelu(a) * c, g, u)),
        "layernorm": (step(lambda t: lo.ms_layernorm(t, COLS, w, b), x),
                      step(lambda t: F.layer_norm(t, (COLS,), w, b), x)),
        "rmsnorm": (step(lambda t: lo.ms_rmsnorm(t, COLS, w), x), step(lambda t: F.rms_norm(t, (COLS,), w), x)),
    }


def time_rounds(fns: list[Callable[[], object]], rounds: int, calls: int, sync: Callable[[], None]) -> list[list[float]]:
    """Per-call microseconds of each fn in each round; the fns take turns round by round."""
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    sync()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, out):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - start) / calls * 1e6)
    return out


def spread(times: list[float]) -> dict:
    return {"min_us": min(times), "median_us": statistics.median(times), "max_us": max(times)}


def launch_path_fns(device: str, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """What one kernel call spends finding its arch, module and config (the kernel itself not run)."""
    interpret = device == "cpu"
    x = torch.empty(ROWS, COLS, device=device, dtype=dtype)
    regelu2 = get_op("regelu2")

    def activation():
        return _triton_backend._module_and_config(regelu2, "forward", x, interpret, None)

    def norm():
        _, tree, arch = _norm_backends._module(x.device, interpret)
        return _configs.lookup(tree, arch, C.NORM_TABLE, (_norm_backends.kernel_name(True, True, "forward"),
                                                           _configs.DTYPE_NAMES[x.dtype]), (COLS, ROWS))

    fns = {"activation": activation, "norm": norm}
    if device == "cuda":  # the floor below ours: Triton's own launch of the same kernel, nothing around it
        module, cfg = activation()
        y, codes = torch.empty_like(x), torch.empty(x.numel(), dtype=torch.uint8, device=device)
        grid = (-(-x.numel() // cfg["BLOCK_BYTES"]),)

        def bare_triton_launch():
            module.forward_kernel[grid](x, y, codes, x.numel(), WRITE_CODES=True, BLOCK_BYTES=cfg["BLOCK_BYTES"],
                                        num_warps=cfg["num_warps"])

        fns["bare Triton launch (regelu2 forward kernel)"] = bare_triton_launch
    return fns


def write_profiles(path: Path, pairs: dict, calls: int, sync: Callable[[], None]) -> None:
    """Where our host time goes, op by op: cProfile's top functions by own time."""
    import cProfile
    import io
    import pstats

    text = io.StringIO()
    for name, (ours, _) in pairs.items():
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            ours()
        sync()
        profile.disable()
        text.write(f"===== {name}: {calls} calls of forward + backward\n")
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--launch-path", action="store_true", help="also time the launch path with kernels stubbed")
    p.add_argument("--stub-kernels", action="store_true",
                   help="replace every Triton launch with a no-op and take the Triton path (the interpreter's on CPU): "
                        "what our host code costs without the launches (outputs are garbage)")
    p.add_argument("--out", help="JSON output (default: bench-results/overhead-<device>.json)")
    p.add_argument("--profile", metavar="FILE", help="also write cProfile's top functions of each op's calls to FILE")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    args.reps, args.warmup, args.quick, args.seed = args.rounds, args.calls // 10, False, 0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    env = environment(args, device_name(args.device), None)
    env.update(timer=f"time.perf_counter over {args.calls} calls per round, {args.rounds} interleaved rounds",
               threads=args.threads, shape=[ROWS, COLS], dtype=args.dtype)

    if args.stub_kernels:
        def no_launch(kernel, grid, *launch_args, **meta):
            return None
        _triton_backend.launch = _norm_backends.launch = no_launch
        os.environ["LOWMEM_OPS_BACKEND"] = "triton" if args.device == "cuda" else "triton-interpret"
        env["stub_kernels"] = True
    records, failures = [], []
    table = new_table(f"host time per forward + backward, {ROWS}x{COLS} {args.dtype} on {args.device} "
                      f"(ratio = ours / torch, target <= {TARGET_RATIO:g})",
                      ["op", "ours min", "ours median", "ours max", "torch median", "ratio"], left=("op",))
    for name, (ours, ref) in op_pairs(args.device, dtype).items():
        t_ours, t_ref = time_rounds([ours, ref], args.rounds, args.calls, sync)
        rec = {"op": name, "ours": spread(t_ours), "torch": spread(t_ref)}
        rec["ratio"] = rec["ours"]["median_us"] / rec["torch"]["median_us"]
        records.append(rec)
        if rec["ratio"] > TARGET_RATIO:
            failures.append(f"{name}: {rec['ratio']:.2f}x torch")
        table.add_row(name, *(f"{rec['ours'][k]:.1f}" for k in ("min_us", "median_us", "max_us")),
                      f"{rec['torch']['median_us']:.1f}", f"{rec['ratio']:.2f}")

    launch = None
    if args.launch_path:
        launch = {}
        for kind, fn in launch_path_fns(args.device, dtype).items():
            (times,) = time_rounds([fn], args.rounds, args.calls, sync)
            launch[kind] = spread(times)
            if kind in ("activation", "norm") and launch[kind]["median_us"] > TARGET_LAUNCH_PATH_US:
                failures.append(f"launch path ({kind}): {launch[kind]['median_us']:.1f} us")

    if args.profile:
        write_profiles(Path(args.profile), op_pairs(args.device, dtype), args.calls, sync)

    from rich.console import Console
    console = Console(width=120)
    console.print(table)
    if launch:
        for kind, s in launch.items():
            what = (f"launch path per {kind} kernel call (arch, module, config)" if kind in ("activation", "norm")
                    else kind)
            console.print(f"{what}: median {s['median_us']:.2f} us (min {s['min_us']:.2f}, max {s['max_us']:.2f})")
    console.print("targets met" if not failures else "targets missed: " + "; ".join(failures))
    out = args.out or REPO_ROOT / "bench-results" / f"overhead-{args.device}.json"
    write_json(Path(out), env, records, launch_path=launch,
               targets={"ratio_max": TARGET_RATIO, "launch_path_us_max": TARGET_LAUNCH_PATH_US, "failures": failures})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("LOWMEM_OPS_BACKEND", "auto")
    main()
