"""Training fidelity: fine-tune small models on real data that ships offline, baseline vs converted
(lowmem_ops.convert), same seeds, and compare loss curves and final accuracy.

    python tune/fidelity.py                      # both tasks, 300 steps each (a few minutes on CPU)
    python tune/fidelity.py --steps 40 --quick   # what the test runs

Tasks:
  vit    a small ViT (transformers, from config) classifying scikit-learn's 8x8 digits, upscaled to 16x16
  llama  a small LLaMA (from config) learning next-character prediction on Python's own stdlib source

Writes bench-results/fidelity.json and fidelity.png (loss curves, baseline vs converted).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowmem_ops as lo  # noqa: E402


def digits_task(seed: int, corpus: str = "a"):
    """(model, train batches fn, eval fn) for a ViT on scikit-learn's digits (1797 images, 10 classes).
    corpus "b", the fine-tuning data of the paper setting: the same digits transposed and inverted."""
    import transformers
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="nearest").repeat(1, 3, 1, 1)
    if corpus == "b":
        x = 1 - x.transpose(-1, -2)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1500], order[1500:]
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=16, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(cfg)

    def batch(step, size=64):
        idx = train[torch.randint(0, len(train), (size,), generator=torch.Generator().manual_seed(step))]
        return {"pixel_values": x[idx]}, y[idx]

    def loss_fn(model, inputs, target):
        return F.cross_entropy(model(**inputs).logits, target)

    def accuracy(model):
        with torch.no_grad():
            return (model(pixel_values=x[test]).logits.argmax(-1) == y[test]).float().mean().item()

    return model, batch, loss_fn, accuracy, {"pixel_values": x[train[:8]]}


def text_task(seed: int, corpus: str = "a"):
    """A small LLaMA predicting the next character of the standard library's own source code: json,
    argparse and copy (corpus "a"), or textwrap, dataclasses and inspect (corpus "b", the fine-tuning
    data of the paper setting). One character set over both, so a model moves from one to the other."""
    import transformers

    import dataclasses
    import textwrap
    texts = {"a": [json, argparse, copy], "b": [textwrap, dataclasses, inspect]}
    text = "".join(inspect.getsource(m) for m in texts[corpus])
    chars = sorted(set("".join(inspect.getsource(m) for ms in texts.values() for m in ms)))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(len(ids) * 0.9)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(chars), max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    block = 64

    def batch(step, size=16, source=ids[:split]):
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(source) - block - 1, (size,), generator=g)
        rows = torch.stack([source[s:s + block + 1] for s in starts.tolist()])
        return {"input_ids": rows[:, :-1]}, rows[:, 1:]

    def loss_fn(model, inputs, target):
        logits = model(**inputs).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def accuracy(model):
        inputs, target = batch(10**6, size=64, source=ids[split:])
        with torch.no_grad():
            return (model(**inputs).logits.argmax(-1) == target).float().mean().item()

    return model, batch, loss_fn, accuracy, batch(0, size=2)[0]


TASKS = {"vit": digits_task, "llama": text_task}
HEADS = {"vit": ["classifier"], "llama": []}  # trained in full beside the LoRA adapters


def train(model, batch, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        inputs, target = batch(step)
        loss = loss_fn(model, inputs, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(task: str, steps: int, seed: int = 0, lr: float = 2e-3) -> dict:
    out = {}
    for variant in ("baseline", "converted"):
        model, batch, loss_fn, accuracy, example = TASKS[task](seed)
        if variant == "converted":
            report = lo.convert(model, example_inputs=example)
            out["converted_modules"] = len(report.applied)
        torch.manual_seed(seed + 1)  # same dropout stream for both
        losses = train(model, batch, loss_fn, steps, lr)
        out[variant] = {"losses": losses, "accuracy": accuracy(model)}
    window = max(1, steps // 10)
    tail = lambda v: sum(out[v]["losses"][-window:]) / window  # noqa: E731
    out["final_loss"] = {v: tail(v) for v in ("baseline", "converted")}
    out["accuracy_points_apart"] = 100 * abs(out["baseline"]["accuracy"] - out["converted"]["accuracy"])
    return out


def run_paper_setting(task: str, seeds: list[int], pretrain_steps: int, finetune_steps: int,
                      pretrain_lr: float = 2e-3, finetune_lr: float = 1e-3, rank: int = 8) -> dict:
    """The paper's setting: a model pretrained with stock ops on corpus "a" (once), then fine-tuned
    with PEFT LoRA (rank `rank`, every linear layer) on corpus "b", baseline vs converted, per seed
    (the seed sets the adapters' initialisation, dropout and the batch order). Held-out accuracy on b."""
    import statistics

    import peft

    model, batch, loss_fn, _, _ = TASKS[task](0, "a")
    train(model, batch, loss_fn, pretrain_steps, pretrain_lr)
    pretrained = copy.deepcopy(model.state_dict())
    out = {"baseline": [], "converted": [], "gradient_cosine": [], "bits": []}
    for seed in seeds:
        for variant in ("baseline", "converted"):
            model, batch, loss_fn, accuracy, example = TASKS[task](seed, "b")
            model.load_state_dict(pretrained)
            torch.manual_seed(seed)
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear",
                                                               modules_to_save=HEADS[task] or None))
            if variant == "converted":
                report = lo.convert(model, example_inputs=example)
                out["gradient_cosine"].append(report.gradient_cosine)
                out["bits"].append(sorted({c.bits for c in report.applied if getattr(c, "bits", None)}))
            torch.manual_seed(seed + 1)
            losses = train(model, lambda step: batch(step + 100_003 * seed), loss_fn, finetune_steps, finetune_lr)
            out[variant].append({"seed": seed, "accuracy": accuracy(model), "final_loss": sum(losses[-20:]) / 20})
    for variant in ("baseline", "converted"):
        acc = [r["accuracy"] for r in out[variant]]
        out[f"{variant}_accuracy_mean"] = statistics.fmean(acc)
        out[f"{variant}_accuracy_std"] = statistics.stdev(acc) if len(acc) > 1 else 0.0
    out["paired_difference_points"] = [100 * (c["accuracy"] - b["accuracy"])
                                       for b, c in zip(out["baseline"], out["converted"])]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(REPO_ROOT / "bench-results" / "fidelity.json"))
    p.add_argument("--quick", action="store_true", help="no plot")
    p.add_argument("--paper", action="store_true",
                   help="the paper's setting instead: pretrain with stock ops, then LoRA fine-tune on another corpus")
    p.add_argument("--seeds", type=int, default=5, help="--paper: fine-tuning runs per variant")
    p.add_argument("--pretrain-steps", type=int, default=300)
    args = p.parse_args(argv)
    if args.paper:
        return main_paper(args)
    results = {}
    for task in args.tasks:
        r = results[task] = run(task, args.steps)
        print(f"{task}: final loss baseline {r['final_loss']['baseline']:.4f} converted {r['final_loss']['converted']:.4f}; "
              f"accuracy baseline {100 * r['baseline']['accuracy']:.1f}% converted {100 * r['converted']['accuracy']:.1f}% "
              f"({r['accuracy_points_apart']:.1f} points apart; {r['converted_modules']} modules converted)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1, sort_keys=True))
    if not args.quick:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
        for ax, (task, r) in zip(axes[0], results.items()):
            for variant in ("baseline", "converted"):
                ax.plot(r[variant]["losses"], label=f"{variant} (acc {100 * r[variant]['accuracy']:.1f}%)", alpha=0.8)
            ax.set_title(f"{task}: training loss")
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main_paper(args) -> int:
    results = {}
    for task in args.tasks:
        r = results[task] = run_paper_setting(task, list(range(args.seeds)), args.pretrain_steps, args.steps)
        print(f"{task}: held-out accuracy over {args.seeds} seeds, baseline "
              f"{100 * r['baseline_accuracy_mean']:.1f} +- {100 * r['baseline_accuracy_std']:.1f} %, converted "
              f"{100 * r['converted_accuracy_mean']:.1f} +- {100 * r['converted_accuracy_std']:.1f} %; paired "
              f"differences (points): {', '.join(f'{d:+.1f}' for d in r['paired_difference_points'])}; "
              f"gradient cosine {min(r['gradient_cosine']):.3f}..{max(r['gradient_cosine']):.3f}, bits {r['bits'][0]}")
    out = Path(args.out).with_name(Path(args.out).stem + "-paper.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pretrain_steps": args.pretrain_steps, "finetune_steps": args.steps,
                               "results": results}, indent=1, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
