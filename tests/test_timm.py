"""timm's ViT, converted. timm needs torchvision, which here installs only beside a CUDA build of
torch 2.14.1, so this runs in a CI stage of its own (.ci/run); elsewhere it is skipped."""

import pytest
import torch

import lowmem_ops as lo

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_vit_converts_and_exports(dtype):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2, num_classes=10).to(dtype)
    x = torch.randn(4, 3, 224, 224, dtype=dtype)
    report = lo.convert(model, example_inputs=x)
    kinds = {c.before: c.after.split()[0] for c in report.applied}  # after: the class, then how it was found
    assert kinds == {"LayerNorm": "MSLayerNorm", "GELU": "Approx"}, str(report)
    assert report.max_difference <= report.tolerance
    ratio = report.memory_after.total_bytes / report.memory_before.total_bytes
    assert ratio <= 0.75, str(report)
    model(x).float().square().mean().backward()
    model.eval()
    with torch.no_grad():
        want = model(x)
    lo.export(model)
    assert not any(type(m).__module__.startswith("lowmem_ops") for m in model.modules())
    fresh = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2, num_classes=10).to(dtype).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        # bf16: torch's LayerNorm and ours round differently (ours computes in float32); the same
        # tolerance as convert's own check
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 2e-2}
        torch.testing.assert_close(fresh(x), want, **tol)


def test_timm_vit_with_grad_checkpointing_on_converts_as_without():
    """set_grad_checkpointing() before convert: the same changes as without it (before, every change
    inside the checkpointed blocks measured +0 bytes and was undone), and checkpointing stays on."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10)
    plain.load_state_dict(model.state_dict())
    want = lo.convert(plain, example_inputs=x)
    model.set_grad_checkpointing(True)
    got = lo.convert(model, example_inputs=x)
    assert sorted((c.path, c.after) for c in got.applied) == sorted((c.path, c.after) for c in want.applied)
    assert len(got.applied) == 7 and model.grad_checkpointing is True, str(got)  # 2 norms + GELU a block, final norm
    assert any("gradient checkpointing is on" in n for n in got.notes)
