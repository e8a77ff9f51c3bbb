"""Is a plan's peak what a real GPU allocates? Issue 14's check: within 5 % of torch.cuda.max_memory_allocated.

    python tune/plan_gpu_check.py --out plan-check.json            # on a CUDA machine
    python tune/plan_gpu_check.py --device cpu --tiny               # the same path on CPU (smoke run)

For each model (a LLaMA-style decoder and a ViT, built from config with random weights, bf16) and
variant (baseline, converted): lo.memory.plan on fake tensors, then the same step for real: AdamW
(foreach) in steady state (its state made by a first step on zero gradients, as the plan does),
forward + loss + backward + step + zero_grad, with the peak measured by the device's allocator
(torch.cuda.max_memory_allocated, from a reset just before the step). On CPU there is no allocator
peak: the real step is measured by the plan's own tracker on real tensors (plan(fake=False)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lowmem_ops as lo  # noqa: E402
from lowmem_ops import plan as planning  # noqa: E402


def _models(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    if tiny:
        llama = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256)
        vit = ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, num_labels=10)
        batch, seq, vit_batch = 2, 16, 2
    else:
        llama = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                            num_key_value_heads=16, vocab_size=32000)
        vit = ViTConfig(num_hidden_layers=4, num_labels=1000)  # ViT-B/16 widths, 224 px
        batch, seq, vit_batch = 4, 512, 32
    ids = torch.randint(0, llama.vocab_size, (batch, seq))
    yield "llama-style", lambda: LlamaForCausalLM(llama), {"input_ids": ids, "labels": ids}
    pixels = torch.randn(vit_batch, 3, vit.image_size, vit.image_size)
    yield "vit", lambda: ViTForImageClassification(vit), {"pixel_values": pixels,
                                                         "labels": torch.randint(0, vit.num_labels, (vit_batch,))}


def _to(inputs: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def _real_peak_cuda(model, inputs) -> int:
    """Peak bytes the CUDA allocator holds during one steady-state AdamW step (weights included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = planning._optimizer("adamw", params, foreach=True)  # the optimizer the plan steps
    planning.steady_state(opt, params)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = planning.default_loss(model(**inputs))
    loss.backward()
    del loss
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    rows = []
    for name, make, inputs in _models(args.tiny):
        for variant in ("baseline", "converted"):
            torch.manual_seed(0)
            model = make().to(device, dtype)
            batch = _to(inputs, device, dtype)
            if variant == "converted":
                model, _ = planning.variant(model, "converted", batch)
            planned = lo.memory.plan(model, batch).peak
            if device.type == "cuda":
                measured, how = _real_peak_cuda(model, batch), "torch.cuda.max_memory_allocated"
            else:
                measured, how = lo.memory.plan(model, batch, fake=False).peak, "the tracker on real tensors"
            ratio = planned / measured
            rows.append({"model": name, "variant": variant, "planned": planned, "measured": measured,
                         "measured_by": how, "ratio": ratio, "within_5_percent": abs(ratio - 1) <= 0.05})
            print(f"{name:12s} {variant:10s} planned {planned / 2**20:9.1f} MiB  measured {measured / 2**20:9.1f} MiB "
                  f"({how})  ratio {ratio:.3f}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0 if all(r["within_5_percent"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
