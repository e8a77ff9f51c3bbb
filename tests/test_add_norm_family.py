"""The add_norm kernel family (kernelgen/families/add_norm.py): its static configs are the launch the
hand-written kernel made, its table covers every row width the runtime asks for, and the tuner times
it through the runtime's launcher, which gives the same results for every candidate config."""

from __future__ import annotations

import dataclasses

import torch

from kernelgen import families
from kernelgen.archs import ARCHS
from lowmem_ops import _configs
from lowmem_ops import _contract as C
from lowmem_ops._tree import builtin_tree
from lowmem_ops.dropout import keep_mask

SM80 = ARCHS["sm80"]


def test_static_configs_are_the_hand_written_launch():
    """Warps = BLOCK_C / 256, 1 to 16 (the hand-written kernel's rule on 32-wide warps; twice the lanes
    per warp on 64-wide ones), dropout + add 8 elements per thread over 4 warps (1024 elements on
    32-wide warps); BLOCK_C the row's width rounded up to a power of two, at least the smallest bucket's."""
    for arch, per_warp in ((SM80, 256), (dataclasses.replace(SM80, warp_size=64), 512)):
        for g in families.ADD_NORM.groups([], arch):
            static = g.candidates[0]
            if g.kernel == C.ADD_NORM_DROPOUT_ADD:
                assert static == {"BLOCK": 4 * per_warp, "num_warps": 4}
            else:
                assert static["num_warps"] == max(1, min(16, static["BLOCK_C"] // per_warp)), (g, static)
    tree = builtin_tree()
    widths = _configs.table(tree, "sm90").ADD_NORM_WIDTHS
    for cols, block in ((1, widths[0]), (widths[0], widths[0]), (widths[0] + 1, 2 * widths[0]), (3000, 4096),
                        (8192, 8192)):
        cfg = _configs.lookup(tree, "sm90", C.ADD_NORM_TABLE, (C.ADD_NORM_FORWARD, "bfloat16"), (cols,))
        assert cfg["BLOCK_C"] == block and cfg["BLOCK_C"] >= cols
    assert widths[-1] == 8192  # MAX_COLS of the kernel file: wider rows take dropout_add
    assert _configs.lookup(tree, "sm90", C.ADD_NORM_TABLE, (C.ADD_NORM_DROPOUT_ADD, "float32"), (8193,)) == \
        {"BLOCK": 1024, "num_warps": 4}


def test_every_group_has_a_baked_row_in_every_arch():
    tree = builtin_tree()
    for arch in ("sm80", "sm86", "sm89", "sm90", "sm100"):
        table = getattr(_configs.table(tree, arch), C.ADD_NORM_TABLE)
        keys = {families.ADD_NORM.config_key(g) for g in families.ADD_NORM.groups([], ARCHS[arch])}
        assert set(table) == keys


def test_the_tuner_times_add_norm_through_the_runtimes_launcher():
    """What `kernelgen tune` runs for an add_norm group: the runtime's launcher with a candidate
    config. The new residual is dropout(x) + residual exactly (the mask from the seed), the same for
    every config; y is LayerNorm of it (float64 reference, float32 tolerance)."""
    for kernel, cols in ((C.ADD_NORM_FORWARD, 1000), (C.ADD_NORM_DROPOUT_ADD, 8200)):
        group = next(g for g in families.ADD_NORM.groups([], SM80) if g.dtype == "float32" and g.kernel == kernel
                     and (kernel == C.ADD_NORM_DROPOUT_ADD or g.candidates[0]["BLOCK_C"] == 1024))
        a = families.ADD_NORM.measure_inputs(group, (3, cols), "cpu", True, torch.Generator().manual_seed(0))
        keep = keep_mask(a["x"].shape, a["seed"], 0, 0.1)
        want_h = torch.where(keep, a["x"] * torch.tensor(1 / 0.9, dtype=torch.float32), 0.0) + a["r"]
        want_y = torch.nn.functional.layer_norm(want_h.double(), (cols,), a["w"].double(), a["b"].double(), 1e-5)
        assert len(group.candidates) >= 1
        for cfg in group.candidates:
            y, h, _, _ = families.ADD_NORM.launcher(group, a, cfg, True, SM80)()
            assert torch.equal(h, want_h), cfg
            torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
