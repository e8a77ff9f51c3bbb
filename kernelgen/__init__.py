"""kernelgen: specs -> Triton kernels for every NVIDIA arch we ship.

    spec.py    TOML spec -> validated Spec
    expr.py    forward expression -> sympy -> Triton / torch code
    archs.py   static arch table and launch configs
    render.py  Jinja templates -> source
    build.py   ahead-of-time compile, manifest, atomic install, freshness check
    cli.py     the `kernelgen` command
"""
