"""python -m lowmem_ops.plan: the shipped configs are the published models, and the CLI runs on a config.json."""

import json

import pytest
import torch

from lowmem_ops import plan as planning

pytest.importorskip("transformers")

# parameter counts as published (the model cards / papers), in millions, for the task head planned
PUBLISHED = {"llama-2-7b": 6738.4, "llama-2-13b": 13015.9, "llama-3-8b": 8030.3, "mistral-7b": 7241.7,
             "gpt2": 124.4, "vit-b/16": 86.6, "vit-l/16": 304.3, "roberta-base": 124.6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_known_configs_are_the_published_models(name):
    cfg, task = planning.load_config(name)
    model = planning.build(cfg, task, torch.bfloat16, lora=0)
    unique = {id(p): p.numel() for p in model.parameters()}  # GPT-2's tied head counts once
    assert sum(unique.values()) / 1e6 == pytest.approx(PUBLISHED[name], rel=0.002)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_cli_on_a_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "vocab_size": 128}))
    planning.main([str(path), "--batch", "2", "--seq", "32", "--lora", "4", "--gpu", "1KiB", "64MiB",
                   "--variants", "baseline", "converted"])
    out = capsys.readouterr().out
    assert "baseline" in out and "converted" in out
    lines = [line for line in out.splitlines() if "largest batch on 64.00 MiB" in line]
    assert len(lines) == 2 and all(int(line.rsplit(":", 1)[1]) > 2 for line in lines)
    assert "largest batch on 1024 B: 0" in out


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        planning.main(["no-such-model"])
    with pytest.raises(SystemExit):
        planning.main(["gpt2", "--gpu", "24 parsecs"])
    assert planning.parse_bytes("24GiB") == 24 * 2**30 and planning.parse_bytes("40GB") == 40 * 10**9


@pytest.mark.parametrize("lora, variants", [(0, ["checkpointed", "converted"]), (4, ["baseline"])])
def test_depth_extrapolation_is_planning_every_layer(tmp_path, lora, variants):
    """Planned at 2 and 3 layers and extrapolated to 6 = planned at 6: every byte count, each phase's
    peak and make-up, the phase and module of the peak (full fine-tuning with checkpointing: the
    highest phase changes from backward at 3 layers to the optimizer step at 6), and the timeline the
    plots draw, point by point (stitched from the shallow ones)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                "intermediate_size": 172, "num_hidden_layers": 6, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "vocab_size": 128}))
    settings = dict(batch=2, seq=64, lora=lora, dtype="bf16", gpus=[], optimizer="adamw", variants=variants)
    fast, _ = planning.run(str(path), **settings)
    full, _ = planning.run(str(path), **settings, exact=True)
    for name in variants:
        a, b = fast.plans[name], full.plans[name]
        assert "planned at 2 and 3 layers, extrapolated to 6" in a.notes
        assert not any("extrapolated" in n for n in b.notes)
        a.notes, b.notes = [], []
        assert a == b
        assert a.timeline == b.timeline and a.phase_starts == b.phase_starts
        assert len(a.timeline["weights"]) > 500


def tiny_llama_json(tmp_path, layers: int = 4):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                "intermediate_size": 172, "num_hidden_layers": layers, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "vocab_size": 128}))
    return path


@pytest.mark.parametrize("lora, variants", [(0, ["checkpointed"])])
def test_largest_batch_on_the_line_is_the_verified_one(tmp_path, lora, variants):
    """The CLI's largest batch, every timeline point on its line through two plans, is max_batch's planned
    search (full fine-tuning with checkpointing: a line through the two batches' peaks alone overshot,
    236 for 218, where the peak moves between ops as the batch grows)."""
    settings = dict(batch=2, seq=64, lora=lora, dtype="bf16", gpus=[6 * 2**20, 64 * 2**20],
                    optimizer="adamw", variants=variants)
    path = str(tiny_llama_json(tmp_path, layers=3))  # planned as it is: the lines, not the depth, under test
    _, line = planning.run(path, **settings)
    _, verified = planning.run(path, **settings, search="verified")
    assert line == verified
    assert all(b > 0 for fits in line.values() for b in fits.values())


def test_cli_qlora_and_plots(tmp_path, capsys):
    """--quant nf4 --double-quant: a 4-bit base under the adapters (the weights well under bf16's, the
    adapters the same); --plots writes each variant's step."""
    path = str(tiny_llama_json(tmp_path))
    planning.main([path, "--batch", "2", "--seq", "32", "--lora", "4", "--quant", "nf4", "--double-quant",
                   "--variants", "baseline", "--plots", str(tmp_path / "plots")])
    assert "baseline" in capsys.readouterr().out
    assert [f.name for f in (tmp_path / "plots").iterdir()] == ["config-baseline.png"]
    cfg, task = planning.load_config(path)
    bf16, nf4 = (planning.build(cfg, task, torch.bfloat16, 4, quant, True) for quant in (None, "nf4"))
    assert storage_bytes(nf4) < 0.7 * storage_bytes(bf16)
    adapters = lambda m: {n: p.shape for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert adapters(nf4) == adapters(bf16) != {}
    with pytest.raises(SystemExit):
        planning.main([path, "--quant", "nf4"])  # no --lora


def storage_bytes(model) -> int:
    from lowmem_ops.plan import _tensors_in

    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in _tensors_in(model)}.values())
