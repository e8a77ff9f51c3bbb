"""The `kernelgen` command: build, tune, list, fit, new, plot."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
import time
from pathlib import Path

from . import archs as archs_mod
from . import build as build_mod
from . import families
from . import spec as spec_mod
from . import targets as targets_mod
from .templating import RenderError
from .tuner import TuneError


def _specs(paths: list[str] | None) -> list[spec_mod.Spec]:
    if not paths:
        return spec_mod.load_builtin()
    specs = [spec_mod.load(p) for p in paths]
    spec_mod.check_unique(specs)
    return specs


def _build_out(args) -> Path:
    """--out; without it a user's specs go to ./kernels (as `kernelgen new`), the built-ins to generated/.
    A tree of a user's specs never goes into generated/: it would delete the built-in kernels."""
    if args.out is not None:
        if not args.out.strip():
            raise ValueError("--out is empty: give the folder for the generated tree (e.g. --out kernels)")
        return Path(args.out)
    if args.spec:
        return Path("kernels")
    out = build_mod.default_out()
    if out is None:
        raise ValueError("kernelgen is not running from a checkout: pass --out DIR for the generated tree")
    return out


def _cmd_build(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    arch_list = targets_mod.resolve(args.arch)  # NVIDIA archs and AMD targets
    specs = _specs(args.spec)
    out = _build_out(args)
    fams = families.for_tree(builtin=not args.spec)  # a tree of the user's own activations, or the built-in one
    db_dir = Path(args.db) if args.db else build_mod.default_db_dir()
    opts = build_mod.BuildOptions(workers=args.jobs, recompile=args.recompile, db_dir=db_dir)
    configs = sum(build_mod.config_count(specs, a, fams) for a in arch_list)
    # the aligned compiles; the chosen configs' unaligned ones come on top (a few hundred per arch)
    total = sum(build_mod.compile_count(specs, a, fams) for a in arch_list)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task("compiling", total=total)

        def progress(msg: str) -> None:
            bar.update(task, advance=1, description=f"compiling {msg}")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = None
            if args.check:
                problems = build_mod.check(specs, arch_list, out, progress, fams, opts)
            else:
                compiled = build_mod.build(specs, arch_list, out, progress, fams, opts)
                problems = []
    for w in caught:
        print(f"kernelgen build: warning: {w.message}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    names = ", ".join(a.name for a in arch_list)
    if problems:
        console.print(f"[red]{out} is stale[/red] for {names}; run `kernelgen build --arch {args.arch}`:")
        for p in problems:
            print(p, file=sys.stderr)  # unwrapped: paths and diffs stay greppable
        return 1
    verb = "is fresh" if args.check else "built"
    what = f"{len(specs)} activations" + "".join(f" + {f.name}s" for f in fams if f.builtin_only)
    how = "" if compiled is None else f" ({compiled} compiles run, the others' results reused from the manifests)"
    print(f"{out}: {what}, {configs} kernel configs {verb} for {names}{how} in {elapsed:.1f} s",
          file=sys.stderr)  # status on stderr, as the progress bar; unwrapped
    return 0


def _cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kernelgen ops")
    for col in ("op", "bits", "forward h(x)", "thresholds c_i", "levels L[code]", "fit error", "spec"):
        table.add_column(col)
    for s in _specs(args.spec):
        table.add_row(
            s.name, str(s.bits), s.forward.text,
            ", ".join(f"{c:.6g}" for c in s.thresholds),
            ", ".join(f"{v:.6g}" for v in s.levels),
            f"{s.fit_error:.7f}",
            Path(s.path).name,
        )
    Console().print(table)
    return 0


def _print_fit(console, name: str, f) -> None:
    from rich.table import Table

    table = Table(title=f"{name}: {f.bits}-bit fit, E = {f.error:.7g} ({f.seconds:.2f} s, {f.evaluations} evaluations)")
    table.add_column("code")
    table.add_column("threshold below it")
    table.add_column("level L[code]")
    for j, level in enumerate(f.levels):
        table.add_row(str(j), "-inf" if j == 0 else f"{f.thresholds[j - 1]:.9g}", f"{level:.9g}")
    console.print(table)


def _cmd_fit(args) -> int:
    from rich.console import Console

    from . import expr, fit

    h = expr.parse(args.expr)
    f = fit.fit(h, args.bits)
    _print_fit(Console(), args.expr, f)
    if args.plot:
        from .plot import plot

        plot(h, f.thresholds, f.levels, args.expr, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _cmd_new(args) -> int:
    from rich.console import Console

    from . import expr, fit, plaintext, specfile

    # Every argument is checked before the fit (seconds) and before anything is written.
    if spec_mod.name_problem(args.name):
        raise ValueError(f"name: {spec_mod.name_problem(args.name)}")
    for field in ("description", "replaces"):
        bad = plaintext.problem(getattr(args, field))
        if bad:
            raise ValueError(f"--{field}: {bad}")
    path = Path(args.dir) / f"{args.name}.toml"
    if path.exists() and not args.force:
        raise ValueError(f"{path} already exists; pass --force to overwrite it")
    h = expr.parse(args.expr)
    f = fit.fit(h, args.bits)
    _print_fit(Console(), args.name, f)
    try:  # the canonical expression text: what the spec validates and the kernels print
        specfile.write(path, specfile.render(args.name, h.text, f, args.description, args.replaces), args.force)
    except FileExistsError as err:  # appeared while fitting
        raise ValueError(str(err)) from None
    spec_mod.load(path)  # what we wrote must read back
    print(f"wrote {path}")
    if args.no_build:
        return 0
    build_args = argparse.Namespace(arch=args.arch, spec=[str(path)], out=args.out, check=False, jobs=os.cpu_count() or 1,
                                    recompile=False, db=None)
    return _cmd_build(build_args)


def _cmd_plot(args) -> int:
    from .plot import plot

    specs = _specs(args.spec)
    chosen = [s for s in specs if s.name == args.name]
    if not chosen:
        raise ValueError(f"no op named {args.name!r}; known: {', '.join(s.name for s in specs)}")
    s = chosen[0]
    out = Path(args.out or f"{s.name}.png")
    err = plot(s.forward, s.thresholds, s.levels, s.name, out)
    print(f"wrote {out} (E = {err:.7g}; the spec records {s.fit_error:.7g})")
    return 0


def _tune_arch(name: str) -> archs_mod.Arch:
    """native: the arch of this machine's GPU; smXX: that arch (measuring it needs such a GPU)."""
    if name in targets_mod.AMD_TARGETS:
        raise ValueError(f"kernelgen tune measures on NVIDIA GPUs only: {name} builds its static configs "
                         f"(`kernelgen build --arch {name}`); no AMD GPU has tuned them yet (docs/amd.md)")
    if name != "native":
        return archs_mod.resolve(name)[0]
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--arch native needs a CUDA GPU, and this machine has none "
                         "(`kernelgen tune --arch smXX --report` reads a database without one)")
    major, minor = torch.cuda.get_device_capability()
    return archs_mod.resolve(f"sm{10 * major + minor}")[0]


def _cmd_tune(args) -> int:
    from rich.console import Console

    from . import tune_cli

    arch = _tune_arch(args.arch)
    db_dir = Path(args.db) if args.db else build_mod.default_db_dir()
    if db_dir is None:
        raise ValueError("kernelgen is not running from a checkout: pass --db DIR for the tuning database")
    console = Console(stderr=True)
    if args.report:  # a wide table: not wrapped to 80 columns when piped to a file
        return tune_cli.report(arch, db_dir, Console(width=None if sys.stdout.isatty() else 200), args)
    return tune_cli.measure(arch, db_dir, _specs(args.spec), console, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernelgen", description="Generate approximate-backprop Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render and compile kernels ahead of time for an arch")
    b.add_argument("--arch", required=True, help=f"one of {', '.join(targets_mod.TARGETS)} or all")
    b.add_argument("--spec", action="append", metavar="FILE", help="build this spec file instead of the built-ins (repeatable)")
    b.add_argument("--out", metavar="DIR", help="the generated tree to write: a new or empty folder, or a kernelgen "
                   "tree (default: generated/ of this checkout; with --spec: ./kernels)")
    b.add_argument("--check", action="store_true", help="rebuild in a scratch folder and fail if the tree differs")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="compile in N worker processes (default: one per CPU; 1 compiles in this process)")
    b.add_argument("--recompile", action="store_true",
                   help="compile every config again instead of reusing the results the tree's manifests recorded")
    b.add_argument("--db", metavar="DIR", help="tuning databases <arch>.json to bake (default: tune/db of this checkout)")
    b.set_defaults(run=_cmd_build)
    ls = sub.add_parser("list", help="the ops, their bits, coefficients and fit error")
    ls.add_argument("--spec", action="append", metavar="FILE", help="list this spec file instead of the built-ins")
    ls.set_defaults(run=_cmd_list)
    f = sub.add_parser("fit", help="fit step-function levels to an activation and print them")
    f.add_argument("--expr", required=True, help="h(x), e.g. \"x * tanh(log(1 + exp(x)))\" (docs/spec-format.md)")
    f.add_argument("--bits", type=int, default=2, choices=(1, 2, 3, 4))
    f.add_argument("--plot", metavar="PNG", help="also draw h, g and their derivatives")
    f.set_defaults(run=_cmd_fit)
    n = sub.add_parser("new", help="fit an activation, write its spec, build its kernels")
    n.add_argument("name")
    n.add_argument("--expr", required=True)
    n.add_argument("--bits", type=int, default=2, choices=(1, 2, 3, 4))
    n.add_argument("--description", default="")
    n.add_argument("--replaces", default="", help="the torch activation it stands in for (informational)")
    n.add_argument("--dir", default=".", help="where to write NAME.toml (default: here)")
    n.add_argument("--arch", default="sm80", help="arch to build for (default sm80; all for every arch and AMD target)")
    n.add_argument("--out", default="kernels", help="the generated tree to build into (default ./kernels)")
    n.add_argument("--no-build", action="store_true", help="only write the spec")
    n.add_argument("--force", action="store_true", help="overwrite NAME.toml if it exists")
    n.set_defaults(run=_cmd_new)
    t = sub.add_parser("tune", help="measure launch configs on this GPU into tune/db/<arch>.json (or --report it)")
    t.add_argument("--arch", required=True, help="native (this GPU) or one of " + ", ".join(archs_mod.ARCHS))
    t.add_argument("--report", action="store_true", help="print what the database holds: best vs static, bandwidth")
    t.add_argument("--budget", type=float, default=600.0, metavar="S", help="stop measuring after S seconds (600)")
    t.add_argument("--ops", help="only these ops, comma-separated (ms_norm for the norms)")
    t.add_argument("--kernels", help="only kernels whose name contains one of these, comma-separated")
    t.add_argument("--dtypes", help="only these dtypes, comma-separated (default: the spaces' dtypes)")
    t.add_argument("--compile-timeout", type=float, default=120.0, metavar="S", help="per config (120)")
    t.add_argument("--spec", action="append", metavar="FILE", help="tune a tree of these specs (with --out)")
    t.add_argument("--out", metavar="DIR", help="the generated tree to tune (default: generated/ of this checkout)")
    t.add_argument("--db", metavar="DIR", help="where <arch>.json lives (default: tune/db of this checkout)")
    t.set_defaults(run=_cmd_tune)
    pl = sub.add_parser("plot", help="draw h vs g and h' vs the levels of an op (PNG)")
    pl.add_argument("name")
    pl.add_argument("--spec", action="append", metavar="FILE", help="look in these spec files instead of the built-ins")
    pl.add_argument("--out", metavar="PNG", help="default: NAME.png")
    pl.set_defaults(run=_cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (spec_mod.SpecError, build_mod.BuildError, RenderError, TuneError, ValueError) as err:  # FitError,
        # ExprError, SpaceError, DBError too
        print(f"kernelgen {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
