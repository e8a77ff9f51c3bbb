"""The `kernelgen` command: build and list kernels."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import archs as archs_mod
from . import build as build_mod
from . import spec as spec_mod
from .render import RenderError


def _specs(paths: list[str] | None) -> list[spec_mod.Spec]:
    if not paths:
        return spec_mod.load_builtin()
    specs = [spec_mod.load(p) for p in paths]
    spec_mod.check_unique(specs)
    return specs


def _cmd_build(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    arch_list = archs_mod.resolve(args.arch)
    specs = _specs(args.spec)
    out = Path(args.out) if args.out else build_mod.default_out()
    if out is None:
        raise ValueError("kernelgen is not running from a checkout: pass --out DIR for the generated tree")
    norms = not args.spec  # a tree of the user's own activations; the norms live in the built-in tree
    total = sum(build_mod.variant_count(specs, a, norms) for a in arch_list)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task("compiling", total=total)

        def progress(msg: str) -> None:
            bar.update(task, advance=1, description=f"compiling {msg}")

        if args.check:
            problems = build_mod.check(specs, arch_list, out, progress, norms)
        else:
            build_mod.build(specs, arch_list, out, progress, norms)
            problems = []
    elapsed = time.perf_counter() - start
    names = ", ".join(a.name for a in arch_list)
    if problems:
        console.print(f"[red]{out} is stale[/red] for {names}; run `kernelgen build --arch {args.arch}`:")
        for p in problems:
            print(p, file=sys.stderr)  # unwrapped: paths and diffs stay greppable
        return 1
    verb = "is fresh" if args.check else "built"
    what = f"{len(specs)} activations" + (" + norms" if norms else "")
    console.print(f"{out}: {what}, {total} variants {verb} for {names} in {elapsed:.1f} s")
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernelgen", description="Generate approximate-backprop Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render and compile kernels ahead of time for an arch")
    b.add_argument("--arch", required=True, help=f"one of {', '.join(archs_mod.ARCHS)} or all")
    b.add_argument("--spec", action="append", metavar="FILE", help="build this spec file instead of the built-ins (repeatable)")
    b.add_argument("--out", metavar="DIR", help="the generated tree to write (default: generated/ of this checkout)")
    b.add_argument("--check", action="store_true", help="rebuild in a scratch folder and fail if the tree differs")
    b.set_defaults(run=_cmd_build)
    ls = sub.add_parser("list", help="the ops, their bits, coefficients and fit error")
    ls.add_argument("--spec", action="append", metavar="FILE", help="list this spec file instead of the built-ins")
    ls.set_defaults(run=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (spec_mod.SpecError, build_mod.BuildError, RenderError, ValueError) as err:
        print(f"kernelgen {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
