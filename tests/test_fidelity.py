"""A shortened run of tune/fidelity.py: converted models train like the originals."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location("fidelity", Path(__file__).resolve().parent.parent / "tune" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


@pytest.mark.parametrize("task", ["vit", "llama"])
def test_converted_model_trains_like_the_original(task):
    differences = []
    for seed in (0, 1, 2):
        r = fidelity.run(task, steps=150, seed=seed)
        assert r["converted_modules"] >= 5
        base, conv = r["final_loss"]["baseline"], r["final_loss"]["converted"]
        first = r["baseline"]["losses"][0]
        assert base < 0.85 * first and conv < 0.85 * first  # both learn
        # and alike: the last 15 minibatch losses are noisy, so 25 %; the 300-step runs land 7 % apart
        assert abs(conv - base) <= 0.25 * base, (seed, base, conv)
        differences.append(100 * (r["converted"]["accuracy"] - r["baseline"]["accuracy"]))
    # One seed's accuracy is noisy at 150 steps: on ViT the paired difference measured -5.1 .. +5.4
    # points over seeds 0-2 (and moved by a point when only the norms' rounding changed); the paper
    # setting's 5 seeds have a spread of 3 points. So: no seed far off, and no systematic loss.
    assert max(abs(d) for d in differences) <= 10.0, differences
    assert sum(differences) / len(differences) >= -4.0, differences


def test_paper_setting_lora_after_pretraining():
    """Pretrain with stock ops, LoRA-fine-tune on another corpus: the LLaMA conversion (exact SwiGLU,
    memory-sharing norms) changes no gradient, so baseline and converted land together."""
    r = fidelity.run_paper_setting("llama", seeds=[0], pretrain_steps=10, finetune_steps=10)
    assert r["gradient_cosine"][0] >= 0.999
    (base,), (conv,) = r["baseline"], r["converted"]
    assert abs(base["accuracy"] - conv["accuracy"]) <= 0.02
    assert base["final_loss"] == pytest.approx(conv["final_loss"], rel=0.02)
