"""The kernel families kernelgen builds, tunes and bakes: one module each, registered here.

The build, the tuner and the CLI iterate REGISTRY (in this order: activations, norms, dropout,
add_norm) and see a family only through the protocol of kernelgen/kernels.py; what is particular to
a family lives in its module. A new family is a module here, one line in REGISTRY, and its template
and space file in templates/; its configs.py table is data its module returns (configs_table),
rendered and read back like every other (docs/extending.md).
"""

from __future__ import annotations

from ..kernels import Family, KernelVariant, TuneGroup
from ..space import compile_part, config_id
from ..spec import Spec
from .activation import ACTIVATION
from .add_norm import ADD_NORM
from .dropout import DROPOUT
from .norm import NORM

REGISTRY: dict[str, Family] = {f.name: f for f in (ACTIVATION, NORM, DROPOUT, ADD_NORM)}
ALL: tuple[Family, ...] = tuple(REGISTRY.values())


def for_tree(builtin: bool) -> tuple[Family, ...]:
    """The families of the built-in tree (all), or of a tree of a user's specs (those not builtin_only)."""
    return ALL if builtin else tuple(f for f in ALL if not f.builtin_only)


def of(group: TuneGroup) -> Family:
    return REGISTRY[group.family]


def groups(specs: list[Spec], arch, families: tuple[Family, ...] = ALL) -> list[TuneGroup]:
    return [g for f in families for g in f.groups(specs, arch)]


def variants(tune_groups: list[TuneGroup]) -> list[list[KernelVariant]]:
    """Every distinct compiled config the groups' candidates need (launch-only parameters aside), as
    the aligned compiles it is launched as (a family may need several: the norms' affine kernels, one
    per weight dtype, the usual one first). A config is judged on all of them (one baked config
    serves every case)."""
    seen, out = set(), []
    for g in tune_groups:
        for c in g.candidates:
            cfg = compile_part(c)
            ident = (g.op, g.kernel, g.dtype, config_id(cfg))
            if ident in seen:
                continue
            seen.add(ident)
            out.append(of(g).variants(g, cfg))
    return out
