"""`kernelgen tune`: measure on this GPU into the database, or report what the database holds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import build as build_mod
from . import families, tunedb, tuner
from .archs import DTYPES, Arch, gpu_peak_gbps
from .kernels import TuneGroup


def _split(text: str | None) -> set[str] | None:
    return {t.strip() for t in text.split(",") if t.strip()} if text else None


def _selector(args, default_dtypes: set[str], known_ops: set[str] | None = None):
    ops, kernels = _split(args.ops), _split(args.kernels)
    dtypes = _split(args.dtypes) or default_dtypes
    if dtypes - set(DTYPES):
        raise ValueError(f"--dtypes: unknown {', '.join(sorted(dtypes - set(DTYPES)))}; choose from {', '.join(DTYPES)}")
    if known_ops is not None and ops and ops - known_ops:
        raise ValueError(f"--ops: unknown {', '.join(sorted(ops - known_ops))}; choose from {', '.join(sorted(known_ops))}")

    def select(g: TuneGroup) -> bool:
        return ((ops is None or g.op in ops) and g.dtype in dtypes
                and (kernels is None or any(k in g.kernel for k in kernels)))

    return select


def _space_dtypes() -> set[str]:
    return {d for f in families.ALL for d in f.space().dtypes}


def measure(arch: Arch, db_dir: Path, specs, console, args) -> int:
    import torch
    import triton

    if not torch.cuda.is_available():
        raise tuner.TuneError(f"measuring {arch.name} needs a CUDA GPU, and this machine has none "
                              f"(`kernelgen tune --arch {arch.name} --report` reads the database without one)")
    major, minor = torch.cuda.get_device_capability()
    if 10 * major + minor != arch.capability:
        raise tuner.TuneError(f"this GPU ({torch.cuda.get_device_name()}) is sm{10 * major + minor}, not {arch.name}: "
                              f"times measured here would not hold there; use --arch native")
    out = Path(args.out) if args.out else build_mod.default_out()
    if out is None:
        raise tuner.TuneError("kernelgen is not running from a checkout: pass --out DIR for the tree to tune")
    fams = families.for_tree(builtin=not args.spec)
    builtin_only = [f.name for f in fams if f.builtin_only]
    if builtin_only:
        from lowmem_ops._tree import builtin_tree

        if out.resolve() != builtin_tree():
            raise tuner.TuneError(f"{out} is not the tree lowmem_ops loads ({builtin_tree()}): the "
                                  f"{'/'.join(builtin_only)} kernels run from that one; pass --spec for a tree of "
                                  "your own activations")
    path = tunedb.db_path(db_dir, arch.name)
    try:
        db = tunedb.load(path, arch.name)
    except tunedb.DBError as err:  # never overwrite what we cannot read: it may be someone's measurements
        raise tuner.TuneError(f"{err}; fix or move that file, then tune again") from None
    known = {stem for f in fams for stem in f.stems(specs)}
    tasks = tuner.plan(specs, arch, out, fams, _selector(args, _space_dtypes(), known))
    if not tasks:
        raise tuner.TuneError("nothing to tune: no group matches --ops / --kernels / --dtypes with two or more "
                              "configs that survived pruning")
    gpu, version = torch.cuda.get_device_name(), triton.__version__
    total = sum(len(t.ranked) for t in tasks)
    console.print(f"tuning {len(tasks)} groups ({total} configs) of {arch.name} on {gpu}, Triton {version}, "
                  f"budget {args.budget:g} s -> {path}")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=not console.is_terminal) as bar:
        job = bar.add_task("measuring", total=total)

        def progress(t: tuner.Task, config: dict, ms: float) -> None:
            bar.update(job, advance=1, description=f"{t.group.op}.{t.group.kernel}[{t.group.dtype}] {t.group.bucket}")

        stats = tuner.search(tasks, db, tuner.CudaMeasure(out, arch, compile_timeout_s=args.compile_timeout),
                             gpu=gpu, triton=version, budget_s=args.budget, save=lambda: db.save(path),
                             progress=progress)
    console.print(f"measured {stats.measured} configs ({stats.failed} failed), reused {stats.reused} from the "
                  f"database, in {stats.rounds} rounds" + ("; the budget ran out first" if stats.out_of_time else ""))
    console.print(f"wrote {path}; bake it with `kernelgen build --arch {arch.name}`")
    return 0


def report(arch: Arch, db_dir: Path, console, args) -> int:
    from rich.table import Table

    path = tunedb.db_path(db_dir, arch.name)
    try:
        db = tunedb.load(path, arch.name)
    except tunedb.DBError as err:
        raise tuner.TuneError(str(err)) from None
    tree = Path(args.out) if args.out else build_mod.default_out()
    record = build_mod.build_record(tree, arch) if tree else None
    current = record.sources if record else {}
    select = _selector(args, set(DTYPES))
    rows = [r for r in (_row(e, current) for e in db.entries.values()) if select(_as_group(r))]
    if not rows:
        print(f"{path}: no measurements for {arch.name}"
              + ("" if path.exists() else f" (no such file); run `kernelgen tune --arch native` on an {arch.name} GPU"))
        return 0
    table = Table(title=f"{path}: tuned vs static launch configs")
    numeric = ("configs", "static us", "best us", "speed-up", "GB/s", "of peak")
    for col in ("op", "kernel", "dtype", "bucket", "GPU") + numeric + ("best config", "state"):
        table.add_column(col, justify="right" if col in numeric else "left")
    order = {b: i for i, b in enumerate(b for f in families.ALL for b in f.space().buckets)}
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["dtype"], order.get(r["bucket"], -1), r["bucket"], r["gpu"])):
        table.add_row(r["op"], r["kernel"], r["dtype"], r["bucket"], r["gpu"], f"{r['ok']}/{r['configs']}",
                      _us(r["static_ms"]), _us(r["best_ms"]), f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      f"{r['gbps']:.0f}" if r["gbps"] else "-", f"{r['peak']:.0%}" if r["peak"] else "-",
                      r["best_config"], r["state"])
    console.print(table)
    fresh = [r for r in rows if r["state"] == "fresh"]
    speedups = [r["speedup"] for r in fresh if r["speedup"]]
    peaks = [r["peak"] for r in fresh if r["peak"]]
    summary = f"{len(fresh)} of {len(rows)} entries fresh (measured on the kernels generated/ holds now)"
    if speedups:
        summary += (f"; best vs static: geometric mean {math.exp(statistics.fmean(math.log(s) for s in speedups)):.3f}x, "
                    f"max {max(speedups):.2f}x")
    if peaks:
        summary += f"; best configs reach a median {statistics.median(peaks):.0%} of peak DRAM bandwidth"
    print(summary)  # unwrapped, greppable
    return 0


def _as_group(r: dict) -> TuneGroup:
    return TuneGroup(r["op"], r["kernel"], r["dtype"], r["bucket"], (), ())


def _us(ms: float | None) -> str:
    return f"{ms * 1e3:.1f}" if ms is not None else "-"


def _row(e: tunedb.Entry, current: dict[str, str]) -> dict:
    k, best = e.key, e.best()
    static = e.results.get(e.static)
    static_ms = static.ms if static and math.isfinite(static.ms) else None
    best_ms = best[1].ms if best else None
    gbps = e.bytes_moved / (best_ms * 1e-3) / 1e9 if best_ms else None
    peak = gpu_peak_gbps(k.gpu)
    return {"op": k.op, "kernel": k.kernel, "dtype": k.dtype, "bucket": k.bucket, "gpu": k.gpu,
            "configs": len(e.results), "ok": sum(math.isfinite(r.ms) for r in e.results.values()),
            "static_ms": static_ms, "best_ms": best_ms,
            "speedup": static_ms / best_ms if static_ms and best_ms else None,
            "gbps": gbps, "peak": gbps / peak if gbps and peak else None,
            "best_config": best[0] if best else "-",
            "state": "fresh" if current.get(k.op) == k.source_sha256 else "stale"}
