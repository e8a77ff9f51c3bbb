"""kernelgen: specs -> Triton kernels for every GPU target we ship (NVIDIA archs, AMD targets).

    spec.py        TOML spec -> validated Spec
    expr.py        forward expression -> sympy -> Triton / torch code
    contract.py    the names shared with the runtime (lowmem_ops/_contract.py)
    archs.py       static NVIDIA arch table, dtype names
    targets.py     GPU targets as objects: the NVIDIA archs and the AMD targets the build iterates
    space.py       launch-config spaces and shape buckets: the pieces (templates/*.space.toml)
    kernels.py     TuneGroup, KernelVariant and the Family protocol
    families/      one module per kernel family (activation, norm): template, space, static
                   config, tuning groups, variants, configs.py table, traffic and timing inputs
    templating.py  the Jinja environment and the marked text types a template accepts
    render.py      the arch-independent files (ops.py, cpu_kernels.cpp) and configs.py
    aot.py         ahead-of-time compiles in worker processes, resource usage per cubin
                   (aot_amd.py: the HIP compile and its resource report; aot_common.py: shared parts)
    prune.py       static pruning (spills, shared memory) and occupancy ranking (prune_amd.py: AMD)
    tunedb.py      the tuning database tune/db/<arch>.json and choosing its winners
    tuner.py       the measuring tuner: breadth-first search under a budget, CUDA timing
    build.py       build an arch: compile, prune, bake configs, manifest, atomic install, freshness check
    cli.py         the `kernelgen` command (tune_cli.py: its tune subcommand)
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
