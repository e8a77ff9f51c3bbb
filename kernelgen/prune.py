"""Static pruning, valid with no GPU: judge each compiled config by the resources the ahead-of-time
compile reports, and rank the survivors of a tuning group by occupancy on the arch's table."""

from __future__ import annotations

from dataclasses import dataclass

from .aot import CompileResult, Outcome
from .archs import Arch
from .space import compile_part, config_id


@dataclass(frozen=True)
class Verdict:
    kept: bool
    reason: str
    occupancy: float  # 0 for dropped configs
    spilled_bytes: int | None = None  # per thread; None: did not compile


def judge(arch: Arch, num_warps: int, outcome: Outcome) -> Verdict:
    if not isinstance(outcome, CompileResult):
        return Verdict(False, f"does not compile: {outcome}", 0.0)
    if outcome.registers > arch.max_regs_per_thread:
        return Verdict(False, f"{outcome.registers} registers per thread; {arch.name} allows {arch.max_regs_per_thread}",
                       0.0)
    # ptxas' own count: a stack frame alone can be a local array, which is no spill
    if outcome.spill_stores or outcome.spill_loads:
        spilled = outcome.spill_stores + outcome.spill_loads
        return Verdict(False, f"spills registers: {outcome.spill_stores} B stored, {outcome.spill_loads} B loaded "
                              f"per thread at {outcome.registers} registers", 0.0, spilled)
    if outcome.shared_bytes > arch.max_smem_per_block:
        return Verdict(False, f"needs {outcome.shared_bytes} B of shared memory per block; "
                              f"{arch.name} allows {arch.max_smem_per_block}", 0.0)
    occupancy = arch.occupancy(num_warps, outcome.registers, outcome.shared_bytes)
    if occupancy <= 0:
        return Verdict(False, "no block of it fits on an SM", 0.0)
    return Verdict(True, f"kept: occupancy {occupancy:.0%} ({outcome.registers} registers)", round(occupancy, 4), 0)


def combine(verdicts: list[Verdict]) -> Verdict:
    """One config compiled for several runtime cases (weight dtypes): kept only if kept in every
    one, at its lowest occupancy (ties: the first case, the usual one)."""
    dropped = [v for v in verdicts if not v.kept]
    if dropped:
        spilled = [v.spilled_bytes for v in dropped]
        return Verdict(False, dropped[0].reason, 0.0,
                       None if any(b is None for b in spilled) else max(spilled))
    return min(verdicts, key=lambda v: v.occupancy)


def rank(candidates: list[dict], verdict_of) -> list[dict]:
    """The kept candidates, highest occupancy first; ties keep the space's order (static first).
    `verdict_of(compile_config)` gives the Verdict of a candidate's compiled kernel."""
    kept = [(i, c, verdict_of(compile_part(c))) for i, c in enumerate(candidates)]
    kept = [(i, c, v) for i, c, v in kept if v.kept]
    return [c for i, c, v in sorted(kept, key=lambda t: (-t[2].occupancy, t[0]))]


def static_choice(candidates: list[dict], ranked: list[dict]) -> dict | None:
    """The static table's config (candidates[0]) if it survived pruning, else the best-ranked one."""
    if not ranked:
        return None
    kept = {config_id(c) for c in ranked}
    return candidates[0] if config_id(candidates[0]) in kept else ranked[0]


def measuring_order(candidates: list[dict], verdict_of) -> list[dict]:
    """The kept candidates in the order the tuner measures them: the static choice first (the
    baseline of every speed-up), then by occupancy. Empty when nothing was kept."""
    ranked = rank(candidates, verdict_of)
    static = static_choice(candidates, ranked)
    return [static] + [c for c in ranked if c != static] if static else []


def least_spilling(candidates: list[dict], verdict_of) -> dict | None:
    """When every candidate spills, the one that spills least (a slow kernel beats no kernel); None
    when none of them compiles or fits."""
    spilled = [(v.spilled_bytes, i, c) for i, c in enumerate(candidates)
               if (v := verdict_of(compile_part(c))).spilled_bytes is not None]
    return min(spilled, key=lambda t: t[:2])[2] if spilled else None
