"""Whole training steps: a ViT-B-style and a LLaMA-style model (2 layers, from transformers configs; a
Phi-3-style one, its MLP one projection for gate and up, on request), baseline vs lowmem_ops.convert
vs activation checkpointing, full fine-tuning and PEFT LoRA.

Per variant: the median time of forward + backward + an SGD step (the variants take turns step by
step), the bytes autograd saves in one forward (lowmem_ops.memory: storages deduplicated, parameters
excluded; not for checkpointing, whose held inputs those hooks cannot see), and on CUDA the peak memory
one step allocates above what the model and optimizer hold.

    python tune/bench_step.py [--device cpu|cuda] [--models vit llama phi3] [--dtypes bf16 fp32] [--reps 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

from _bench_common import REPO_ROOT, device_name, environment, fmt_bytes, new_table, write_json

import torch
import torch.nn.functional as F

import lowmem_ops as lo

SIZES = {  # device -> model -> config sizes and batch
    "cuda": {"vit": dict(hidden=768, heads=12, inter=3072, image=224, patch=16, batch=32),
             "llama": dict(hidden=2048, heads=16, inter=5504, vocab=32000, seq=1024, batch=4)},
    "cpu": {"vit": dict(hidden=768, heads=12, inter=3072, image=224, patch=16, batch=2),
            "llama": dict(hidden=1024, heads=8, inter=2816, vocab=8000, seq=256, batch=2)},
}
QUICK = {"vit": dict(hidden=32, heads=2, inter=64, image=16, patch=8, batch=2),  # a smoke run, not a measurement
         "llama": dict(hidden=32, heads=2, inter=64, vocab=64, seq=8, batch=2)}
for sizes in (*SIZES.values(), QUICK):
    sizes["phi3"] = sizes["llama"]  # the same sizes: the two differ in the MLP's projections
# model -> (config class, model class, config arguments beyond the sizes: Phi-3's default token ids
# lie beyond these vocabularies)
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=1))}
VARIANTS = ("baseline", "converted", "checkpointed")


def build(name: str, s: dict, device: str, dtype: torch.dtype, lora: bool, seed: int = 0):
    """(model, inputs, loss(model, inputs)) for one configuration, seeded."""
    import transformers

    torch.manual_seed(seed)
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=s["hidden"], num_hidden_layers=2, num_attention_heads=s["heads"],
                                     intermediate_size=s["inter"], image_size=s["image"], patch_size=s["patch"],
                                     num_labels=10)
        model = transformers.ViTForImageClassification(cfg)
        inputs = {"pixel_values": torch.randn(s["batch"], 3, s["image"], s["image"], device=device, dtype=dtype)}
        target = torch.randint(0, 10, (s["batch"],), device=device)

        def loss(m, x):
            return F.cross_entropy(m(**x).logits.float(), target)
    else:
        config, causal_lm, extra = DECODERS[name]
        cfg = getattr(transformers, config)(hidden_size=s["hidden"], num_hidden_layers=2, num_attention_heads=s["heads"],
                                            num_key_value_heads=s["heads"], intermediate_size=s["inter"],
                                            vocab_size=s["vocab"], max_position_embeddings=s["seq"], **extra)
        model = getattr(transformers, causal_lm)(cfg)
        ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
        inputs = {"input_ids": ids}

        def loss(m, x):
            logits = m(**x).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    model = model.to(device=device, dtype=dtype).train()
    if lora:
        import peft
        # every linear layer but the head, by leaf name (names differ across transformers versions)
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and not n.endswith(("classifier", "lm_head"))})
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets))
    return model, inputs, loss


def make_variant(variant: str, model, inputs, loss):
    model = copy.deepcopy(model)
    if variant == "converted":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lo.convert(model, inputs, loss_fn=None)
        info = {"gradient_cosine": report.gradient_cosine}
    else:
        info = {}
        if variant == "checkpointed":
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers 5
                warnings.simplefilter("ignore")
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model, inputs).backward()
        opt.step()

    return model, step, info


def time_steps(steps: list, reps: int, sync) -> list[list[float]]:
    for step in steps:  # warm-up: kernels compiled and caches filled
        step()
        step()
    sync()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for step, t in zip(steps, times):
            sync()
            start = time.perf_counter()
            step()
            sync()
            t.append((time.perf_counter() - start) * 1e3)
    return times


def peak_step_bytes(step, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=("vit", *DECODERS), default=["vit", "llama"])
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    p.add_argument("--lora", choices=("both", "yes", "no"), default="both")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--out", help="JSON output (default: bench-results/step-<device>.json)")
    p.add_argument("--quick", action="store_true", help="tiny models and 2 reps: a smoke run")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    args.warmup, args.seed = 2, 0
    args.sizes = QUICK if args.quick else SIZES[args.device]
    if args.quick:
        args.reps = 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    env = environment(args, device_name(args.device), None)
    env.update(timer="time.perf_counter per step, synchronised, variants interleaved step by step, median",
               sizes=args.sizes, step="zero_grad + forward + loss + backward + SGD step")
    table = new_table(f"training step on {args.device} (time ratio and saved ratio: variant / baseline)",
                      ["model", "dtype", "lora", "variant", "ms median", "time ratio", "saved", "saved ratio",
                       "peak step", "grad cos"], left=("model", "dtype", "lora", "variant"))
    records = []
    loras = {"both": [False, True], "yes": [True], "no": [False]}[args.lora]
    for name in args.models:
        for dt in args.dtypes:
            for lora in loras:
                model, inputs, loss = build(name, args.sizes[name], args.device, dtypes[dt], lora)
                made = {v: make_variant(v, model, inputs, loss) for v in VARIANTS}
                del model
                times = dict(zip(VARIANTS, time_steps([made[v][1] for v in VARIANTS], args.reps, sync)))
                for v in VARIANTS:
                    m, step, info = made[v]
                    # checkpointing keeps its regions' inputs outside autograd's saved-tensor hooks, so the
                    # hooks cannot count what it holds: its memory is the CUDA peak column
                    saved = None if v == "checkpointed" else lo.memory.measure(m, **inputs).total_bytes
                    rec = {"model": name, "dtype": dt, "lora": lora, "variant": v,
                           "ms_median": statistics.median(times[v]), "ms_min": min(times[v]), "ms_max": max(times[v]),
                           "saved_bytes": saved, "peak_step_bytes": peak_step_bytes(step, args.device), **info}
                    records.append(rec)
                base = next(r for r in records if r["model"] == name and r["dtype"] == dt and r["lora"] == lora
                            and r["variant"] == "baseline")
                for rec in records[-len(VARIANTS):]:
                    rec["time_ratio"] = rec["ms_median"] / base["ms_median"]
                    saved = rec["saved_bytes"]
                    rec["saved_ratio"] = None if saved is None else saved / base["saved_bytes"]
                    table.add_row(name, dt, "LoRA" if lora else "full", rec["variant"], f"{rec['ms_median']:.1f}",
                                  f"{rec['time_ratio']:.3f}", "-" if saved is None else fmt_bytes(saved),
                                  "-" if saved is None else f"{rec['saved_ratio']:.3f}",
                                  "-" if rec["peak_step_bytes"] is None else fmt_bytes(rec["peak_step_bytes"]),
                                  "-" if rec.get("gradient_cosine") is None else f"{rec['gradient_cosine']:.3f}")
                table.add_section()
                del made
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    from rich.console import Console
    Console(width=140).print(table)
    out = args.out or REPO_ROOT / "bench-results" / f"step-{args.device}.json"
    write_json(Path(out), env, records)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
