"""kernelgen: specs -> Triton kernels for every NVIDIA arch we ship.

    spec.py    TOML spec -> validated Spec
    expr.py    forward expression -> sympy -> Triton / torch code
    archs.py   static arch table and the static launch configs
    space.py   launch-config spaces and shape buckets (templates/*.space.toml)
    render.py  Jinja templates -> source; tuning groups and the kernels they compile
    aot.py     ahead-of-time compiles in worker processes, resource usage per cubin
    prune.py   static pruning (spills, shared memory) and occupancy ranking
    tunedb.py  the tuning database tune/db/<arch>.json and choosing its winners
    tuner.py   the measuring tuner: breadth-first search under a budget, CUDA timing
    build.py   build an arch: compile, prune, bake configs, manifest, atomic install, freshness check
    cli.py     the `kernelgen` command (tune_cli.py: its tune subcommand)
"""

import importlib.util as _util


def _missing_dependencies() -> list[str]:
    """The generator's own dependencies (the `kernelgen` extra of lowmem-ops) that are not installed."""
    missing = []
    for name in ("jinja2", "sympy", "scipy", "threadpoolctl", "matplotlib", "tomli_w"):
        try:
            found = _util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


if _missing_dependencies():
    raise ImportError(f"kernelgen needs {', '.join(_missing_dependencies())}, not installed: "
                      "pip install 'lowmem-ops[kernelgen]' (lowmem_ops itself runs without them)")
