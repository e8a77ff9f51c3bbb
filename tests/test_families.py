"""The family registry and the target's warp size (kernelgen/families, kernelgen/archs.py): what the
build, tuner and CLI rely on when they iterate families instead of naming them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kernelgen import aot, families, spec, targets
from kernelgen.archs import ARCHS
from kernelgen.contract import contract
from kernelgen.families import activation, dropout, norm

ROOT = Path(__file__).resolve().parent.parent
SM80 = ARCHS["sm80"]


def test_every_group_names_the_family_that_made_it():
    specs = spec.load_builtin()
    for family in families.ALL:
        groups = family.groups(specs, SM80)
        assert groups and all(g.family == family.name and families.of(g) is family for g in groups)
        # configs.py keys are unique within a family's table (one baked config per lookup)
        keys = [family.config_key(g) for g in groups]
        assert len(keys) == len(set(keys))
        assert {g.op for g in groups} == set(family.stems(specs))


def test_a_users_tree_builds_only_the_families_that_are_not_builtin_only():
    assert families.for_tree(builtin=True) == families.ALL
    assert families.for_tree(builtin=False) == (families.ACTIVATION,)
    assert families.NORM.stems([]) == [contract.NORM_STEM] and contract.NORM_STEM in contract.RESERVED_STEMS
    assert families.DROPOUT.stems([]) == [contract.DROPOUT_STEM] and contract.DROPOUT_STEM in contract.RESERVED_STEMS


def test_warp_size_comes_from_the_arch():
    wide = dataclasses.replace(SM80, warp_size=64)
    # the static activation config holds the same vectors per thread: twice the elements per program
    for dtype in ("float32", "bfloat16"):
        assert activation.static_config(wide, dtype, 4)["BLOCK_BYTES"] == 2 * activation.static_config(SM80, dtype, 4)["BLOCK_BYTES"]
    # the space's configs: vectors x (16 B / element size) x lanes x warps elements, over codes per byte
    sp = activation.config_space()
    expected = {(v * 16 // 4 * 64 * w) // 4 for v in sp.vectors_per_thread for w in sp.num_warps}
    assert {c["BLOCK_BYTES"] for c in sp.configs(wide, "float32", 4)[1:]} <= expected
    # norms: 8 columns per thread, so a 4096-wide row takes 8 warps of 64 (16 of 32)
    assert norm.static_config(SM80)["single_warps"][4096] == 16
    assert norm.static_config(wide)["single_warps"][4096] == 8
    # dropout: 8 elements per thread over 4 warps, 1024 per program on 32 lanes (the launch before it was
    # generated); the space's BLOCKs are elements per thread x lanes x warps
    assert dropout.static_config(SM80) == {"BLOCK": 1024, "num_warps": 4}
    assert dropout.static_config(wide) == {"BLOCK": 2048, "num_warps": 4}
    dsp = dropout.config_space()
    assert {(c["BLOCK"], c["num_warps"]) for c in dsp.configs(wide, "float32")[1:]} <= \
        {(e * 64 * w, w) for e in dsp.elements_per_thread for w in dsp.num_warps}
    assert targets.nvidia(wide).warp_size == 64 and targets.nvidia(SM80).warp_size == 32


def test_compile_keys_of_32_wide_warps_are_the_ones_the_manifests_recorded():
    manifest = json.loads((ROOT / "generated" / "sm80" / contract.MANIFEST_FILE).read_text())
    row = next(r for r in manifest["variants"] if r["op"] == "regelu2" and r["kernel"] == "forward")
    variant = activation.variant(row["op"], row["kernel"], row["dtype"], row["config"])
    job = aot.CompileJob(str(ROOT / "generated" / manifest["ops"]["regelu2"]["file"]), variant.fn, variant.signature,
                         variant.constexprs, variant.num_warps, variant.num_stages, SM80.capability,
                         variant.aligned_args, SM80.warp_size)
    source, triton = manifest["ops"]["regelu2"]["source_sha256"], manifest["compiled_with"]["triton"]
    assert job.key(source, triton) == row["compile_key"]
    assert dataclasses.replace(job, warp_size=64).key(source, triton) != row["compile_key"]


def test_the_tuner_times_dropout_through_the_runtimes_launcher():
    """What `kernelgen tune` runs for a dropout group: the runtime's launcher with the candidate config,
    giving the rule's output (mask from the seed, x * float32(1 / (1 - p)) where kept) for any BLOCK."""
    import torch

    from lowmem_ops.dropout import keep_mask

    group = next(g for g in families.DROPOUT.groups([], SM80) if g.dtype == "float32")
    inputs = families.DROPOUT.measure_inputs(group, (3000,), "cpu", True, torch.Generator().manual_seed(0))
    x, seed = inputs["x"], inputs["seed"]
    want = torch.where(keep_mask(x.shape, seed, 0, 0.1), x * torch.tensor(1 / 0.9, dtype=torch.float32), 0.0)
    for cfg in group.candidates[:2]:  # the static config and another BLOCK
        assert torch.equal(families.DROPOUT.launcher(group, inputs, cfg, True, SM80)(), want), cfg
