"""The convert matrix over the Hugging Face architectures issue 11's "Done when" names (35 families;
the issue counts 34) and 9 more that are often fine-tuned (GPT-2, GPT-NeoX, GPT-J, Qwen2, Phi-3, BERT,
DeBERTa-v2, ViT, FLAN-T5): build each tiny and random from its config, convert it with the defaults,
and record what happened.

    python tune/hf_matrix.py                       # all architectures (a few minutes on CPU)
    python tune/hf_matrix.py --arch llama --arch t5
    python tune/hf_matrix.py --no-lora --json out.json

Per architecture: whether lo.convert succeeded (or the error); the saved-for-backward ratio
converted / baseline for a full fine-tune and for PEFT LoRA r=8 on every linear layer PEFT's
"all-linear" picks (adapters as PEFT makes them, float32), both measured here with lo.memory on a
copy taken before converting, in train mode, each side as convert measures (lo.memory.comparable_runs);
the whole-model gradient cosine from convert's report; the bits chosen per activation; every module
left alone (skipped or undone) with the report's reason.

Models are 2 layers (or 2 stages) with hidden sizes of 16 to 64, one batch of 2, bf16 where a
forward and backward run in bf16 (else float32, recorded), with the parameters the class keeps in
float32 when loaded in bf16 (`_keep_in_fp32_modules`: T5's `wo`) in float32, as from_pretrained
leaves them. Weights and inputs come from fixed seeds,
so two runs give the same numbers. tests/test_hf_matrix.py imports the builders from here.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench_common, also when imported by a test

from _bench_common import REPO_ROOT, new_table, write_json  # noqa: E402  (puts the checkout first on sys.path)

import torch  # noqa: E402

import lowmem_ops as lo  # noqa: E402
from lowmem_ops import conversion  # noqa: E402

SEED = 0
BATCH = 2
TOKENS = 16
VOCAB = 256
IMAGE = 32

# What every decoder-only LM here gets: 2 layers, d=64, 4 heads of 16, 2 KV heads.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=VOCAB, max_position_embeddings=64)
# token ids inside the tiny vocabulary (the defaults of some configs are the real tokenizer's)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE, patch_size=8)


@dataclass(frozen=True)
class Arch:
    config: str   # transformers' config class
    model: str    # transformers' model class
    kwargs: dict  # the tiny config
    inputs: str   # which example batch: tokens, seq2seq, image, clip, wave, whisper


ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", _DECODER, "tokens"),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", _DECODER, "tokens"),
    "mixtral": Arch("MixtralConfig", "MixtralForCausalLM",
                    {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}, "tokens"),
    "phi": Arch("PhiConfig", "PhiForCausalLM", _DECODER, "tokens"),
    "falcon": Arch("FalconConfig", "FalconForCausalLM",
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB), "tokens"),
    "opt": Arch("OPTConfig", "OPTForCausalLM",
                dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                     vocab_size=VOCAB, max_position_embeddings=64), "tokens"),
    "bloom": Arch("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
                  "tokens"),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 16}, "tokens"),
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 16, "sliding_window": 8}, "tokens"),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", {**_DECODER, "head_dim": 16, "sliding_window": 8},
                   "tokens"),
    "stablelm": Arch("StableLmConfig", "StableLmForCausalLM", _DECODER, "tokens"),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 16}, "tokens"),
    "qwen3_moe": Arch("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      {**_DECODER, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 64, "decoder_sparse_step": 1}, "tokens"),
    "olmo": Arch("OlmoConfig", "OlmoForCausalLM", _DECODER, "tokens"),
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", _DECODER, "tokens"),
    "cohere": Arch("CohereConfig", "CohereForCausalLM", _DECODER, "tokens"),
    "starcoder2": Arch("Starcoder2Config", "Starcoder2ForCausalLM", _DECODER, "tokens"),
    "t5": Arch("T5Config", "T5Model",
               dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB),
               "seq2seq"),
    "bart": Arch("BartConfig", "BartModel",
                 dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                      max_position_embeddings=64), "seq2seq"),
    "whisper": Arch("WhisperConfig", "WhisperModel",
                    dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                         num_mel_bins=16, max_source_positions=16, max_target_positions=32, **_IDS,
                         decoder_start_token_id=1), "whisper"),
    "clip": Arch("CLIPConfig", "CLIPModel",
                 dict(text_config={**_ENCODER, **_IDS, "max_position_embeddings": 32},
                      vision_config={k: v for k, v in _VIT.items()}, projection_dim=32), "clip"),
    "siglip": Arch("SiglipConfig", "SiglipModel",
                   dict(text_config={**_ENCODER, **_IDS, "max_position_embeddings": 32},
                        vision_config={k: v for k, v in _VIT.items()}), "clip"),
    "swin": Arch("SwinConfig", "SwinModel",
                 dict(image_size=IMAGE, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4),
                 "image"),
    "convnext": Arch("ConvNextConfig", "ConvNextModel",
                     dict(num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], image_size=IMAGE), "image"),
    "dinov2": Arch("Dinov2Config", "Dinov2Model",
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE,
                        patch_size=8), "image"),
    "deit": Arch("DeiTConfig", "DeiTModel", _VIT, "image"),
    "beit": Arch("BeitConfig", "BeitModel", _VIT, "image"),
    "roberta": Arch("RobertaConfig", "RobertaModel", _ENCODER, "tokens"),
    "distilbert": Arch("DistilBertConfig", "DistilBertModel",
                       dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB,
                            max_position_embeddings=64), "tokens"),
    "modernbert": Arch("ModernBertConfig", "ModernBertModel",
                       {**_ENCODER, **_IDS, "cls_token_id": 1, "sep_token_id": 2}, "tokens"),
    "albert": Arch("AlbertConfig", "AlbertModel", {**_ENCODER, "embedding_size": 32}, "tokens"),
    "electra": Arch("ElectraConfig", "ElectraModel", {**_ENCODER, "embedding_size": 32}, "tokens"),
    "wav2vec2": Arch("Wav2Vec2Config", "Wav2Vec2Model",
                     dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4), "wave"),
    "segformer": Arch("SegformerConfig", "SegformerModel",
                      dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                           patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                           decoder_hidden_size=32), "image"),
    "mobilevit": Arch("MobileViTConfig", "MobileViTModel",
                      dict(image_size=IMAGE, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96],
                           num_attention_heads=2, mlp_ratio=2.0), "image"),
    # beyond issue 11's list: the families most often fine-tuned (GPT-2's Conv1D layers, GPT-NeoX's
    # parallel residual with two norms of one input, DeBERTa's disentangled attention)
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64), "tokens"),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER, "tokens"),
    "gptj": Arch("GPTJConfig", "GPTJForCausalLM",
                 dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, rotary_dim=8), "tokens"),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", _DECODER, "tokens"),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", {**_DECODER, **_IDS}, "tokens"),
    "bert": Arch("BertConfig", "BertModel", _ENCODER, "tokens"),
    "deberta_v2": Arch("DebertaV2Config", "DebertaV2Model", _ENCODER, "tokens"),
    "vit": Arch("ViTConfig", "ViTModel", _VIT, "image"),
    # T5 v1.1 / FLAN-T5 / mT5: the gated-GELU feed-forward (two input projections, a dropout inside)
    "flan_t5": Arch("T5Config", "T5Model",
                    dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                         vocab_size=VOCAB, feed_forward_proj="gated-gelu"), "seq2seq"),
}


class Unavailable(Exception):
    """This transformers has no such config or model class."""


def _example(kind: str, dtype: torch.dtype, cfg) -> dict:
    """One batch of the kind the model takes, from a generator of its own (the global RNG is not used)."""
    g = torch.Generator().manual_seed(SEED)
    tokens = lambda: torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)  # noqa: E731
    pixels = lambda: torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(dtype)  # noqa: E731
    if kind == "tokens":
        return {"input_ids": tokens()}
    if kind == "seq2seq":
        return {"input_ids": tokens(), "decoder_input_ids": tokens()}
    if kind == "image":
        return {"pixel_values": pixels()}
    if kind == "clip":
        return {"input_ids": tokens(), "pixel_values": pixels()}
    if kind == "wave":
        return {"input_values": torch.randn(BATCH, 1600, generator=g).to(dtype)}
    if kind == "whisper":  # the encoder takes exactly 2 * max_source_positions frames
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(BATCH, cfg.num_mel_bins, frames, generator=g).to(dtype),
                "decoder_input_ids": tokens()}
    raise ValueError(f"hf_matrix: unknown input kind {kind!r}")


def _construct(name: str, dtype: torch.dtype):
    import transformers

    arch = ARCHS[name]
    missing = [c for c in (arch.config, arch.model) if not hasattr(transformers, c)]
    if missing:
        raise Unavailable(f"transformers {transformers.__version__} has no {', '.join(missing)}")
    cfg = getattr(transformers, arch.config)(**copy.deepcopy(arch.kwargs))
    torch.manual_seed(SEED)
    model = getattr(transformers, arch.model)(cfg).to(dtype).train()
    if dtype != torch.float32:
        _keep_in_float32(model)
    batch = _example(arch.inputs, dtype, cfg)
    _calibrate_batchnorm(model, batch)
    return model, batch


def _keep_in_float32(model: torch.nn.Module) -> None:
    """The parameters the model class keeps in float32 when loaded in half precision, as
    from_pretrained(dtype=...) leaves them (T5's `wo`: `_keep_in_fp32_modules`), matched by dotted
    name component."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or []), *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]
    patterns = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in keep]
    for name, p in model.named_parameters():
        if p.is_floating_point() and any(r.search(name) for r in patterns):
            p.data = p.data.float()


def _calibrate_batchnorm(model: torch.nn.Module, batch: dict) -> None:
    """Running statistics of the example batch in every BatchNorm, as training would leave them.
    MobileViT's init draws BatchNorm weights from N(0, 0.02) with running statistics (0, 1): in eval
    mode (where convert compares gradients) each BatchNorm then scales by about 0.02, and after its
    ~20 of them the output is exactly 0 even in float32, leaving no gradient to compare."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics after one pass
    torch.manual_seed(SEED)
    with torch.no_grad():
        model(**batch)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def loss(out) -> torch.Tensor:
    """Any float tensor the model returned, reduced: enough to see that a backward runs."""
    tensors = [t for t in (out.values() if hasattr(out, "values") else [out]) if torch.is_tensor(t) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in tensors)


def build(name: str, dtype: torch.dtype | None = None):
    """(model, batch, dtype) for one architecture, in train mode, seeded. dtype None: bf16 where a
    forward and backward run in bf16, else float32. Raises Unavailable when transformers lacks it."""
    if name not in ARCHS:
        raise KeyError(f"hf_matrix: unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    if dtype is not None:
        return (*_construct(name, dtype), dtype)
    model, batch = _construct(name, torch.bfloat16)
    try:
        loss(model(**batch)).backward()
    except (RuntimeError, TypeError, NotImplementedError):
        return (*_construct(name, torch.float32), torch.float32)
    model, batch = _construct(name, torch.bfloat16)  # again: no .grad, nothing touched
    return model, batch, torch.bfloat16


def measure(model: torch.nn.Module, batch: dict) -> int:
    """Bytes saved for backward in train mode, measured as convert measures (lowmem_ops.memory)."""
    model.train()
    with lo.memory.comparable_runs(model, seed=conversion.RUN_SEED):
        return lo.memory.measure(model, **batch).total_bytes


def left_alone(report: conversion.Report, model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(path, class, reason) of every module convert saw and did not change: skipped or undone."""
    def cls(path):
        try:
            return type(model.get_submodule(path)).__name__
        except AttributeError:
            return "?"
    return ([(p, cls(p), why) for p, why in report.skipped]
            + [(c.path, c.before, c.reason) for c in report.changes if c.status != "applied"])


def convert_and_measure(model: torch.nn.Module, batch: dict) -> dict:
    """lo.convert with the defaults, and the ratio of saved bytes measured here (before: on a copy)."""
    baseline = measure(copy.deepcopy(model), batch)
    report = lo.convert(model, example_inputs=batch)
    after = measure(model, batch)
    return {"report": report, "bytes_before": baseline, "bytes_after": after, "ratio": after / baseline}


def lora(model: torch.nn.Module):
    """PEFT LoRA r=8 on what "all-linear" selects (every linear but the output layer); None when it
    finds nothing to target."""
    import peft

    try:
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    except ValueError as e:
        if "not found in the base model" in str(e) or "No modules were targeted" in str(e):
            return None
        raise


def _summarise(report: conversion.Report, model: torch.nn.Module) -> dict:
    return {
        "applied": sorted(Counter(c.after.split()[0] for c in report.applied).items()),
        "gradient_cosine": report.gradient_cosine,
        "gradient_note": report.gradient_note,
        "bits": {c.path: c.bits for c in report.applied if c.bits is not None},
        "left_alone": left_alone(report, model),
        "report_ratio": (report.memory_after.total_bytes / report.memory_before.total_bytes
                         if report.memory_before is not None and report.memory_after is not None else None),
        "max_difference": report.max_difference,
    }


def run_arch(name: str, with_lora: bool = True) -> dict:
    """One row of the matrix (never raises for a model's failure: the error is recorded)."""
    rec: dict = {"arch": name, "model": ARCHS[name].model}
    try:
        model, batch, dtype = build(name)
    except Unavailable as e:
        return {**rec, "status": "unavailable", "error": str(e)}
    except Exception as e:  # the tiny config itself does not build: a row saying so
        return {**rec, "status": "error", "error": f"building: {type(e).__name__}: {e}"}
    rec["dtype"] = str(dtype).removeprefix("torch.")
    try:
        full = convert_and_measure(model, batch)
        loss(model(**batch)).backward()  # the converted model trains
    except Exception as e:  # a matrix row, not a crash of the whole run
        return {**rec, "status": "error", "error": f"{type(e).__name__}: {e}"}
    rec.update(status="ok", bytes_before=full["bytes_before"], bytes_after=full["bytes_after"], ratio=full["ratio"],
               **_summarise(full["report"], model))
    if with_lora:
        model, batch, _ = build(name, dtype)
        adapted = lora(model)
        if adapted is None:
            rec["lora"] = None
        else:
            try:
                res = convert_and_measure(adapted, batch)
                rec["lora"] = {"ratio": res["ratio"], "gradient_cosine": res["report"].gradient_cosine,
                               "bits": _summarise(res["report"], adapted)["bits"],
                               "left_alone": left_alone(res["report"], adapted)}
            except Exception as e:
                rec["lora"] = {"error": f"{type(e).__name__}: {e}"}
    return rec


# ---------------------------------------------------------------------------------------------
# Output


def bits_text(bits: dict) -> str:
    """'3 x4, 2 x1': how many activations got each width; '-' when none was swapped."""
    if not bits:
        return "-"
    return ", ".join(f"{k} x{n}" for k, n in sorted(Counter(bits.values()).items()))


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def left_alone_text(items: list) -> str:
    """One clause per (class, reason), reasons that differ only in numbers merged with the numbers as
    ranges: '4x QuickGELUActivation: kept exact: ... cosine 0.930-0.941, 2 bits'. Paths are in the JSON."""
    if not items:
        return "nothing"
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for _, cls, why in items:
        why = why.removeprefix(f"{cls}: ").removeprefix(f"{cls} ")  # skip lines often start with the class name
        groups.setdefault((cls, _NUMBER.sub("\0", why)), []).append(_NUMBER.findall(why))
    clauses = []
    for (cls, template), numbers in groups.items():
        cells = []
        for column in zip(*numbers):
            lo_, hi = min(column, key=float), max(column, key=float)
            cells.append(lo_ if lo_ == hi else f"{lo_}-{hi}")
        parts = template.split("\0")
        why = "".join(part + cell for part, cell in zip(parts, cells + [""]))
        clauses.append(f"{len(numbers)}x {cls}: {why}" if len(numbers) > 1 else f"{cls}: {why}")
    return "; ".join(clauses)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows(records: list[dict]) -> list[list[str]]:
    out = []
    for r in records:
        if r["status"] != "ok":
            out.append([r["arch"], r.get("dtype", "-"), r["status"], "-", "-", "-", "-", r.get("error", "")])
            continue
        lr = r.get("lora")
        lora_cell = "-" if lr is None else lr.get("error", _fmt(lr.get("ratio")))
        out.append([r["arch"], r["dtype"], "ok", _fmt(r["ratio"]), lora_cell, _fmt(r["gradient_cosine"]),
                    bits_text(r["bits"]), left_alone_text(r["left_alone"])])
    return out


COLUMNS = ["arch", "dtype", "convert", "saved ratio (full)", "LoRA ratio", "gradient cosine", "bits chosen",
           "left alone (why)"]


def markdown(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows(records)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=sorted(ARCHS), help="one architecture (repeatable); default all")
    p.add_argument("--no-lora", action="store_true", help="skip the PEFT LoRA column")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "bench-results" / "hf_matrix.json")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (docs/convert.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

    from rich.console import Console

    import peft
    import transformers

    records = []
    for name in args.arch or list(ARCHS):
        records.append(run_arch(name, with_lora=not args.no_lora))
        print(f"{name}: {records[-1]['status']} {rows(records[-1:])[0]}", file=sys.stderr)
    table = new_table("lo.convert on tiny random Hugging Face models (defaults)", COLUMNS,
                      left=("arch", "dtype", "convert", "bits chosen", "left alone (why)"))
    for row in rows(records):
        table.add_row(*row)
    Console(width=200).print(table)
    if args.markdown:
        print(markdown(records))
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "grad_tolerance": conversion.GRAD_TOLERANCE, "seed": SEED}
    write_json(args.json, env, records)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "unavailable") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
