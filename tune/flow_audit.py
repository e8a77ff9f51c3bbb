"""Audit lowmem_ops.convert in common fine-tuning flows the test suite may not cover (CPU, tiny HF models).

Each flow compares a converted model with an unconverted copy (outputs, parameter gradients, saved bytes
via lo.memory.measure) and prints one line: PASS/FAIL, the flow, the measured numbers. A flow that raises
prints FAIL with the exception. Run from the repository root:

    python tune/flow_audit.py [flow ...]        # default: every flow
"""

import copy
import io
import math
import os
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

import lowmem_ops as lo  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None
try:
    import accelerate
except ImportError:  # pragma: no cover
    accelerate = None

V = 300


# --- builders (tests/test_convert.py's sizes, dropout off unless asked so gradients compare exactly) ---

def llama(seq_cls=False, **kw):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, pad_token_id=0, **kw)
    cls = transformers.LlamaForSequenceClassification if seq_cls else transformers.LlamaForCausalLM
    return cls(cfg)


def gpt2(p=0.0):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    return transformers.GPT2LMHeadModel(cfg)


def bert_cls(p=0.0, num_labels=3):
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=V, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                                  num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg)


def ids(b=2, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (b, t), generator=g)


def spread_norms(model, seed=1):
    """Norm weights away from 1 (as in a pretrained model), so a fold is visible in weights and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith("weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
    return model


def pair(build, seed=0, spread=False, lora=False):
    """The unconverted model and an identical copy (LoRA added before copying: the same adapter init)."""
    torch.manual_seed(seed)
    stock = build()
    if spread:
        spread_norms(stock)
    if lora:
        stock = _lora(stock)
    return stock, copy.deepcopy(stock)


def lm_loss(model, batch):
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.logits.float().square().mean()


def grads(model, batch, loss=lm_loss):
    model.zero_grad(set_to_none=True)
    loss(model, batch).backward()
    g = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def folded_linears(report):
    """Names of linear layers a norm was folded into (their weight gradients differ by diag(gamma))."""
    out = set()
    for c in report.applied:
        if "affine folded into" in c.after:
            tail = c.after.split("affine folded into", 1)[1].split(")")[0]
            out |= {s.strip() for s in tail.split(",")}
    return out


def unfold(gc, report, stock):
    """The converted model's gradients in the stock parameterisation: a norm folded into linear L (W' = W diag(g),
    b' = b + W beta) gives dL/dW = dL/dW' diag(g) + dL/db' beta^T; the folded norm's own gamma/beta have none."""
    out = dict(gc)
    for c in report.applied:
        if "affine folded into" not in c.after:
            continue
        norm = stock.get_submodule(c.path)
        g = norm.weight.detach().float()
        beta = getattr(norm, "bias", None)
        tail = c.after.split("affine folded into", 1)[1].split(")")[0]
        for lin in (s.strip() for s in tail.split(",")):
            w = lin + ".weight"
            if w not in gc:
                continue
            conv1d = type(stock.get_submodule(lin)).__name__ == "Conv1D"  # GPT-2: weight is (in, out)
            gw = gc[w] * (g[:, None] if conv1d else g[None, :])
            if beta is not None and lin + ".bias" in gc:
                outer = torch.outer(beta.detach().float(), gc[lin + ".bias"]) if conv1d else \
                    torch.outer(gc[lin + ".bias"], beta.detach().float())
                gw = gw + outer
            out[w] = gw
    return out


def compare_grads(ga, gb, skip=()):
    """Cosine of the gradients of the common parameters (those outside `skip` prefixes), as one vector,
    the largest relative difference per tensor, and the names that have a gradient on one side only."""
    common = [n for n in ga if n in gb and not any(n.startswith(s + ".") for s in skip)]
    a = torch.cat([ga[n].flatten().double() for n in common])
    b = torch.cat([gb[n].flatten().double() for n in common])
    cos = float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-30))
    rel = max(float((ga[n] - gb[n]).abs().max() / (gb[n].abs().max() + 1e-12)) for n in common)
    only = sorted((set(ga) ^ set(gb)))
    return cos, rel, only, len(common)


def saved(model, batch):
    return lo.memory.measure(model, **batch).total_bytes


def packed_bytes(model, batch):
    """Bytes autograd is asked to save during one forward as called (lo.memory.measure turns grad on itself)."""
    n = [0]

    def pack(t):
        n[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    held = [t for t in out.values() if torch.is_tensor(t) and t.grad_fn is not None]
    return n[0] + (1 if held else 0)


def rel_diff(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


RESULTS = []


def line(ok, flow, msg):
    s = f"{'PASS' if ok else 'FAIL'}  {flow}: {msg}"
    RESULTS.append(s)
    print(s, flush=True)


# --- 1. dtype after convert --------------------------------------------------------------------------

def flow_dtype():
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        for dtype, how in ((torch.bfloat16, "to(bf16)"), (torch.float16, "half()")):
            stock, conv = pair(build, spread=True)
            batch = {"input_ids": ids()}
            rep = lo.convert(conv, example_inputs=batch)
            for m in (stock, conv):
                m.to(dtype) if dtype == torch.bfloat16 else m.half()
            wrong = sorted({str(t.dtype) for t in list(conv.parameters()) + list(conv.buffers())
                            if t.is_floating_point() and t.dtype != dtype})
            stock.eval(), conv.eval()
            with torch.no_grad():
                d = rel_diff(conv(**batch).logits, stock(**batch).logits)
            stock.train(), conv.train()
            gs, gc = grads(stock, batch), grads(conv, batch)
            cos, rel, only, n = compare_grads(unfold(gc, rep, stock), gs)
            bs, bc = saved(stock, batch), saved(conv, batch)
            fp32_ratio = rep.memory_after.total_bytes / rep.memory_before.total_bytes
            finite = all(torch.isfinite(g).all() for g in gc.values())
            ok = d < 3e-2 and cos > 0.99 and bc < bs and finite and not wrong
            line(ok, f"1 dtype {name} convert(fp32) then {how}",
                 f"out rel diff {d:.2e}, grad cos {cos:.5f} over {n} tensors (folded linears mapped back), finite {finite}, "
                 f"saved {bs} -> {bc} B ({bc / bs:.3f}x; in fp32 at convert {fp32_ratio:.3f}x), "
                 f"non-{dtype} tensors left: {wrong or 'none'}")


def flow_autocast():
    """Autocast (what Trainer(bf16=True) and accelerate's bf16 use on CPU) on an fp32 converted model."""
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        stock, conv = pair(build, spread=True)
        batch = {"input_ids": ids()}
        rep = lo.convert(conv, example_inputs=batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bs, bc = saved(stock, batch), saved(conv, batch)
            stock.eval(), conv.eval()
            with torch.no_grad():
                d = rel_diff(conv(**batch).logits, stock(**batch).logits)
            stock.train(), conv.train()
            gs, gc = grads(stock, batch), grads(conv, batch)
        cos, rel, only, n = compare_grads(unfold(gc, rep, stock), gs)
        fp32_ratio = rep.memory_after.total_bytes / rep.memory_before.total_bytes
        ok = d < 3e-2 and cos > 0.99 and bc < bs
        line(ok, f"1b autocast(cpu, bf16) {name} fp32 weights",
             f"out rel diff {d:.2e}, grad cos {cos:.5f}, saved {bs} -> {bc} B ({bc / bs:.3f}x under autocast; "
             f"fp32 without autocast {fp32_ratio:.3f}x)")


# --- 2. HF Trainer ------------------------------------------------------------------------------------

def _data(n=8, t=32):
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(3, V, (t,), generator=g)} for _ in range(n)]
    for r in rows:
        r["labels"] = r["input_ids"].clone()
    return rows


def _train(model, tmp, **kw):
    args = transformers.TrainingArguments(output_dir=tmp, max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps",
                                          save_steps=3, learning_rate=1e-3, seed=0, data_seed=0,
                                          dataloader_num_workers=0, **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data())
    for cb in (transformers.trainer_callback.ProgressCallback, transformers.trainer_callback.PrinterCallback):
        trainer.remove_callback(cb)  # one line per flow in the output, the losses are read from log_history
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return out, losses


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                        "gate_proj", "up_proj"]))


def flow_trainer():
    example = {"input_ids": torch.stack([r["input_ids"] for r in _data()[:2]])}
    for lora in (False, True):
        if lora and peft is None:
            line(False, "2 Trainer LoRA", "peft not installed")
            continue
        for kw in ({"gradient_checkpointing": True}, {"bf16": True}, {"gradient_checkpointing": True, "bf16": True}):
            tag = f"2 Trainer {'LoRA ' if lora else ''}{'+'.join(k for k in kw)}"
            stock, conv = pair(llama, spread=True, lora=lora)
            rep = lo.convert(conv, example_inputs=example)
            kept = len(rep.applied)
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                torch.manual_seed(0)
                res_s, loss_s = _train(stock, a, **kw)
                torch.manual_seed(0)
                res_c, loss_c = _train(conv, b, **kw)
                dl = max(abs(x - y) for x, y in zip(loss_s, loss_c))
                finite = all(math.isfinite(x) for x in loss_c)
                ck = os.path.join(b, "checkpoint-3")
                conv.eval()
                with torch.no_grad():
                    want = conv(**example).logits.float()
                if lora:
                    torch.manual_seed(0)  # the stock base: the weights `pair` built (frozen, so untrained)
                    base = llama()
                    spread_norms(base)
                    reloaded = peft.PeftModel.from_pretrained(base, ck).eval()
                else:
                    reloaded = transformers.LlamaForCausalLM.from_pretrained(ck).eval()
                with torch.no_grad():
                    got = reloaded(**example).logits.float()
                dr = rel_diff(got, want)
            ok = res_c.global_step == 3 and finite and dl < 5e-2 and dr < (3e-2 if "bf16" in kw else 1e-4)
            line(ok, tag, f"{kept} changes kept, steps {res_c.global_step}, losses conv {[round(x, 4) for x in loss_c]} "
                          f"stock {[round(x, 4) for x in loss_s]} (max diff {dl:.2e}), checkpoint-3 reloaded into "
                          f"the stock class: logits rel diff {dr:.2e}")


# --- 3. accelerate ------------------------------------------------------------------------------------

def flow_accelerate():
    if accelerate is None:
        line(False, "3 accelerate", "not installed (skipped)")
        return
    from accelerate import Accelerator
    batch = {"input_ids": ids(), "labels": ids()}
    stock, conv = pair(llama, spread=True)
    rep = lo.convert(conv, example_inputs={"input_ids": batch["input_ids"]})
    results = {}
    for tag, m in (("stock", stock), ("conv", conv)):
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        pm, popt = acc.prepare(m, opt)
        pm.train()
        b0 = saved(pm, {"input_ids": batch["input_ids"]})
        losses = []
        g = None
        for step in range(3):
            out = pm(**batch)
            acc.backward(out.loss)
            if step == 0:
                g = {n: p.grad.detach().float().clone() for n, p in pm.named_parameters() if p.grad is not None}
            popt.step()
            popt.zero_grad()
            losses.append(float(out.loss))
        results[tag] = (b0, losses, g, type(pm).__name__)
        acc.free_memory()
    cos, rel, only, n = compare_grads(unfold(results["conv"][2], rep, stock), results["stock"][2])
    bs, bc = results["stock"][0], results["conv"][0]
    dl = max(abs(x - y) for x, y in zip(results["stock"][1], results["conv"][1]))
    ok = cos > 0.99 and bc < bs and dl < 5e-2 and all(math.isfinite(x) for x in results["conv"][1])
    line(ok, "3 accelerate Accelerator(cpu, bf16).prepare after convert",
         f"first-step grad cos {cos:.5f}, saved {bs} -> {bc} B ({bc / bs:.3f}x), losses conv "
         f"{[round(x, 4) for x in results['conv'][1]]} stock {[round(x, 4) for x in results['stock'][1]]}")


# --- 4. convert twice; convert after export -----------------------------------------------------------

def flow_twice():
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        stock, conv = pair(build, spread=True)
        batch = {"input_ids": ids()}
        r1 = lo.convert(conv, example_inputs=batch)
        b1 = saved(conv, batch)
        try:
            r2 = lo.convert(conv, example_inputs=batch)
            err = None
        except Exception as e:  # noqa: BLE001
            r2, err = None, f"{type(e).__name__}: {e}"
        b2 = saved(conv, batch)
        stock.eval(), conv.eval()
        with torch.no_grad():
            d = rel_diff(conv(**batch).logits, stock(**batch).logits)
        conv.train(), stock.train()
        cos = compare_grads(unfold(grads(conv, batch), r1, stock), grads(stock, batch))[0]
        # export, then the stock model must come back and be convertible again
        lo.export(conv)
        left = [type(m).__name__ for m in conv.modules() if type(m).__module__.startswith("lowmem_ops")]
        stock.eval(), conv.eval()
        with torch.no_grad():
            de = rel_diff(conv(**batch).logits, stock(**batch).logits)
        conv.train()
        r3 = lo.convert(conv, example_inputs=batch)
        b3 = saved(conv, batch)
        lo.export(conv)
        left2 = [type(m).__name__ for m in conv.modules() if type(m).__module__.startswith("lowmem_ops")]
        n2 = None if r2 is None else (len(r2.applied), len([c for c in r2.changes if c.status == "undone"]))
        ok = (err is None and b2 <= b1 and d < 1e-4 and cos > (0.999 if name == "llama" else 0.99) and not left and de < 1e-4 and b3 == b1
              and len(r3.applied) == len(r1.applied) and not left2)
        line(ok, f"4 convert twice / after export {name}",
             f"first {len(r1.applied)} applied, saved {b1} B; second: {err or f'(applied, undone) {n2}'}, saved {b2} B; "
             f"out rel diff {d:.1e}, grad cos {cos:.5f}; export left {left or 'nothing'} of lowmem_ops, out diff {de:.1e}; "
             f"re-convert {len(r3.applied)} applied, saved {b3} B; export again left {left2 or 'nothing'}")


# --- 5. inference: eval, generate with KV cache, no_grad ----------------------------------------------

def flow_inference():
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        stock, conv = pair(build, spread=True)
        batch = {"input_ids": ids()}
        lo.convert(conv, example_inputs=batch)
        stock.eval(), conv.eval()
        prompt = ids(2, 8, seed=3)
        kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            ts, tc = stock.generate(prompt, **kw), conv.generate(prompt, **kw)
            tn = conv.generate(prompt, **{**kw, "use_cache": False})
            m_s, m_c = packed_bytes(stock, batch), packed_bytes(conv, batch)
        g_c = packed_bytes(conv, batch)  # the same count with grad on: the hook does see saves
        # inference_mode too
        with torch.inference_mode():
            ti = conv.generate(prompt, **kw)
        ok = torch.equal(ts, tc) and torch.equal(tc, tn) and torch.equal(tc, ti) and m_s == 0 and m_c == 0 and g_c > 0
        line(ok, f"5 inference {name} eval+generate(KV cache)",
             f"tokens equal to stock {torch.equal(ts, tc)}, cache vs no cache {torch.equal(tc, tn)}, inference_mode "
             f"{torch.equal(tc, ti)}; saved (pack hooks) under no_grad stock {m_s} B, converted {m_c} B (with grad on: {g_c} B)")
        # eval mode WITH grad (e.g. evaluation loss with grad on, or eval-mode fine-tuning): still lower
        b_s, b_c = saved(stock, batch), saved(conv, batch)
        line(b_c < b_s, f"5b eval-mode forward with grad {name}", f"saved {b_s} -> {b_c} B ({b_c / b_s:.3f}x)")


# --- 6. partially frozen ------------------------------------------------------------------------------

def flow_frozen():
    for name, build, emb, first in (("llama", llama, "model.embed_tokens", "model.layers.0"),
                                    ("gpt2", gpt2, "transformer.wte", "transformer.h.0")):
        stock, conv = pair(build, spread=True)
        batch = {"input_ids": ids()}
        for m in (stock, conv):
            m.get_submodule(emb).requires_grad_(False)
            m.get_submodule(first).requires_grad_(False)
            if name == "gpt2":
                m.transformer.wpe.requires_grad_(False)
        rep = lo.convert(conv, example_inputs=batch)
        trainable = [n for n, p in conv.named_parameters() if p.requires_grad]
        frozen_ok = not any(n.startswith(emb) or n.startswith(first + ".") for n in trainable)
        gs, gc = grads(stock, batch), grads(conv, batch)
        cos, rel, only, n = compare_grads(unfold(gc, rep, stock), gs)
        bs, bc = saved(stock, batch), saved(conv, batch)
        thr = 0.999 if name == "llama" else 0.99
        ok = cos > thr and bc < bs and frozen_ok and not any(n.startswith(emb) or n.startswith(first + ".") for n in gc)
        line(ok, f"6 frozen embeddings+layer 0 {name}",
             f"{len(rep.applied)} applied, {len([c for c in rep.changes if c.status == 'undone'])} undone; grad cos "
             f"{cos:.5f} (max rel {rel:.1e}) over {n}, frozen stay frozen {frozen_ok}, grads on one side only {only or 'none'}; "
             f"saved {bs} -> {bc} B ({bc / bs:.3f}x)")


# --- 7. deepcopy and torch.save/load ------------------------------------------------------------------

def flow_copy():
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        stock, conv = pair(build, spread=True)
        batch = {"input_ids": ids()}
        rep = lo.convert(conv, example_inputs=batch)
        g0 = grads(conv, batch)
        b0 = saved(conv, batch)
        twins = {"deepcopy": copy.deepcopy(conv)}
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        twins["torch.save/load"] = torch.load(buf, weights_only=False)
        for tag, twin in twins.items():
            g1 = grads(twin, batch)
            cos, rel, only, n = compare_grads(g1, g0)
            b1 = saved(twin, batch)
            shared = any(p is q for p, q in zip(twin.parameters(), conv.parameters()))
            # the copy must also export back to the stock class
            sd_keys = list(twin.state_dict()) == list(conv.state_dict())
            lo.export(twin)
            left = [type(m).__name__ for m in twin.modules() if type(m).__module__.startswith("lowmem_ops")]
            twin.eval(), stock.eval()
            with torch.no_grad():
                d = rel_diff(twin(**batch).logits, stock(**batch).logits)
            stock.train()
            ok = rel == 0.0 and b1 == b0 and not shared and sd_keys and not left and d < 1e-4
            line(ok, f"7 {tag} {name}", f"grads vs original max rel {rel:.1e} (cos {cos:.6f}), saved {b0} / {b1} B, "
                                        f"shares params {shared}, same state_dict keys {sd_keys}, export left "
                                        f"{left or 'nothing'}, exported out diff vs stock {d:.1e}")


# --- 8. sequence classification with padding ----------------------------------------------------------

def flow_seqcls():
    # padded batch: second row half padding (right padding for BERT; LLaMA uses pad_token_id to find the last token)
    x = ids(4, 32)
    mask = torch.ones_like(x)
    mask[1, 16:] = 0
    mask[3, 5:] = 0
    x = x.masked_fill(mask == 0, 0)
    labels = torch.tensor([0, 1, 2, 1])
    for name, build in (("bert", bert_cls), ("llama", lambda: llama(seq_cls=True, num_labels=3))):
        stock, conv = pair(build, spread=True)
        example = {"input_ids": ids(2, 32, seed=9)}  # examples without padding, as a user might pass
        batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
        rep = lo.convert(conv, example_inputs=example)
        stock.eval(), conv.eval()
        with torch.no_grad():
            d = rel_diff(conv(**batch).logits, stock(**batch).logits)
        stock.train(), conv.train()
        gs, gc = grads(stock, batch), grads(conv, batch)
        cos, rel, only, n = compare_grads(unfold(gc, rep, stock), gs)
        inp = {"input_ids": x, "attention_mask": mask}
        bs, bc = saved(stock, inp), saved(conv, inp)
        finite = all(torch.isfinite(g).all() for g in gc.values())
        thr = 0.999 if name == "llama" else 0.99
        ok = d < 1e-3 and cos > thr and bc < bs and finite
        line(ok, f"8 seq-cls {name} padded mask",
             f"{len(rep.applied)} applied; logits rel diff {d:.1e}, grad cos {cos:.5f} (report's own "
             f"{rep.gradient_cosine if rep.gradient_cosine is not None else float('nan'):.5f}), finite {finite}, "
             f"saved {bs} -> {bc} B ({bc / bs:.3f}x)")


# --- 9. gradient accumulation -------------------------------------------------------------------------

def flow_accum():
    for name, build in (("llama", llama), ("gpt2", gpt2)):
        stock, conv = pair(build, spread=True)
        x = ids(4, 32, seed=11)
        lo.convert(conv, example_inputs={"input_ids": x[:2]})
        res = {}
        for tag, m in (("stock", stock), ("conv", conv)):
            loss = lambda mm, b: mm(**b).logits.float().square().mean()  # noqa: E731  mean over equal halves
            m.zero_grad(set_to_none=True)
            for half in (x[:2], x[2:]):
                (loss(m, {"input_ids": half}) / 2).backward()
            acc = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
            full = grads(m, {"input_ids": x}, loss)
            res[tag] = compare_grads(acc, full)
        cos_c, rel_c = res["conv"][:2]
        cos_s, rel_s = res["stock"][:2]
        ok = cos_c > 0.9999 and rel_c < max(10 * rel_s, 1e-4)
        line(ok, f"9 grad accumulation 2x2 vs 4 {name}",
             f"converted: cos {cos_c:.7f}, max rel {rel_c:.1e}; stock: cos {cos_s:.7f}, max rel {rel_s:.1e}")


# --- 10. PEFT merge_and_unload after convert ---------------------------------------------------------

def flow_merge():
    if peft is None:
        line(False, "10 merge", "peft not installed")
        return
    batch = {"input_ids": ids()}
    stock, conv = pair(llama, spread=True, lora=True)
    with torch.no_grad():  # trained-looking adapters (lora_B starts at 0)
        for m in (stock, conv):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    lo.convert(conv, example_inputs=batch)
    try:
        merged_c = conv.merge_and_unload()
        err = None
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    merged_s = stock.merge_and_unload()
    if err:
        line(False, "10 PEFT merge_and_unload after convert", err)
        return
    merged_s.eval(), merged_c.eval()
    with torch.no_grad():
        d = rel_diff(merged_c(**batch).logits, merged_s(**batch).logits)
    left_lora = [n for n, _ in merged_c.named_modules() if "lora" in n]
    with tempfile.TemporaryDirectory() as t:
        merged_c.save_pretrained(t)
        re = transformers.LlamaForCausalLM.from_pretrained(t).eval()
        with torch.no_grad():
            dr = rel_diff(re(**batch).logits, merged_s(**batch).logits)
    ok = d < 1e-4 and dr < 1e-4 and not left_lora
    line(ok, "10 PEFT merge_and_unload after convert (no export)",
         f"merged out rel diff vs stock merged {d:.1e}; lora modules left {len(left_lora)}; save_pretrained -> stock "
         f"class out diff {dr:.1e}")


# --- 11. train()/eval() toggles and dropout models ----------------------------------------------------

def flow_modes():
    stock, conv = pair(lambda: gpt2(p=0.1), spread=True)
    batch = {"input_ids": ids()}
    stock.eval()
    conv.eval()  # as from_pretrained returns it
    rep = lo.convert(conv, example_inputs=batch)
    conv.train(), stock.train()
    bs, bc = saved(stock, batch), saved(conv, batch)
    torch.manual_seed(0)
    out1 = conv(**batch).logits
    torch.manual_seed(0)
    out2 = conv(**batch).logits
    conv.eval(), stock.eval()
    with torch.no_grad():
        d = rel_diff(conv(**batch).logits, stock(**batch).logits)
    drop = [m for m in conv.modules() if isinstance(m, (torch.nn.Dropout, lo.nn.Dropout))]
    modes_follow = all(not m.training for m in drop)
    ok = bc < bs and torch.equal(out1, out2) and d < 1e-4 and modes_follow and not torch.equal(out1, conv(**batch).logits)
    line(ok, "11 gpt2 dropout 0.1 converted in eval, then train()/eval()",
         f"{len(rep.applied)} applied; train saved {bs} -> {bc} B ({bc / bs:.3f}x); same seed same train output "
         f"{torch.equal(out1, out2)}; eval out diff vs stock {d:.1e}; dropouts follow eval() {modes_follow}")


# --- 12. LoRA added AFTER convert (docs/convert.md: "optional, before or after converting") ---------------

def _set_lora_b(model):
    with torch.no_grad():  # trained-looking adapters (lora_B starts at 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))


def _lora_modules(model):
    return sum(1 for m in model.modules() if type(m).__module__.startswith("peft") and hasattr(m, "base_layer"))


def flow_lora_after():
    batch = {"input_ids": ids()}
    cfgs = {"llama": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
            "gpt2": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
    builds = {"llama": llama, "gpt2": lambda: gpt2(p=0.1)}
    for name, fold in (("llama", True), ("gpt2", True), ("llama", False), ("gpt2", False)):
        # a) the same adapter on the stock model and on the converted one: the same function?
        stock, conv = pair(builds[name], spread=True)
        rep = lo.convert(conv, example_inputs=batch, fold=fold)
        name = name if fold else name + " fold=False"
        torch.manual_seed(7)
        stock = peft.get_peft_model(stock, cfgs[name.split()[0]])
        torch.manual_seed(7)
        pm = peft.get_peft_model(conv, cfgs[name.split()[0]])
        _set_lora_b(stock), _set_lora_b(pm)
        stock.eval(), pm.eval()
        if fold and any(lin.endswith("." + t) for lin in folded_linears(rep) for t in cfgs[name.split()[0]].target_modules):
            # adapters around layers a norm was folded into are refused at the first forward
            try:
                with torch.no_grad():
                    pm(**batch)
                ok, msg = False, "the forward ran: adapters around folded layers were accepted"
            except RuntimeError as e:
                ok, msg = "after lo.convert folded the scale of" in str(e), str(e)[:150]
            line(ok, f"12a LoRA after convert {name}: adapters around folded layers refused", msg)
            continue
        with torch.no_grad():
            want_stock = stock(**batch).logits
            want = pm(**batch).logits
        d_same = rel_diff(want, want_stock)
        # b) the adapter saved from the converted model, loaded onto the stock base (what PEFT users do)
        with tempfile.TemporaryDirectory() as t:
            pm.save_pretrained(t)
            torch.manual_seed(0)
            base = spread_norms(builds[name.split()[0]]())
            re = peft.PeftModel.from_pretrained(base, t).eval()
            with torch.no_grad():
                d_port = rel_diff(re(**batch).logits, want)
        # b') the other way: an adapter trained on the stock model loaded onto the converted base
        with tempfile.TemporaryDirectory() as t:
            stock.save_pretrained(t)
            torch.manual_seed(0)
            base = spread_norms(builds[name.split()[0]]())
            lo.convert(base, example_inputs=batch, fold=fold)
            re = peft.PeftModel.from_pretrained(base, t).eval()
            with torch.no_grad():
                d_load = rel_diff(re(**batch).logits, want_stock)
        folded_into_lora = sorted(lin for lin in folded_linears(rep)
                                  if any(lin.endswith("." + t) for t in cfgs[name.split()[0]].target_modules))
        line(d_same < 1e-4 and d_port < 1e-4 and d_load < 1e-4, f"12a LoRA after convert {name}: adapters portable",
             f"same adapter weights, converted vs stock out rel diff {d_same:.2e}; adapter saved from the converted "
             f"model on the stock base: rel diff {d_port:.2e}; a stock adapter loaded onto the converted base "
             f"(PeftModel.from_pretrained): rel diff {d_load:.2e}; LoRA targets holding a folded norm affine: "
             f"{len(folded_into_lora)} {folded_into_lora[:2]}")
        # c) export of the PeftModel (the object the user holds), adapters kept, outputs kept
        n_lora = _lora_modules(pm)
        try:
            lo.export(pm)
            err = None
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
        if err:  # what a user would try next: the inner model
            lo.export(pm.base_model.model)
        left = sorted({type(m).__name__ for m in pm.modules() if type(m).__module__.startswith("lowmem_ops")})
        stock_norm = type(builds[name.split()[0]]().get_submodule("model.norm" if name.startswith("llama")
                                                                  else "transformer.ln_f"))
        wrong_class = sorted({type(m).__name__ for m in pm.modules()
                              if "Norm" in type(m).__name__ and type(m) is not stock_norm})
        with torch.no_grad():
            d_exp = rel_diff(pm(**batch).logits, want)
        ok = err is None and not left and not wrong_class and _lora_modules(pm) == n_lora and d_exp < 1e-4
        line(ok, f"12b LoRA after convert {name}: lo.export(peft_model)",
             f"{err or 'ran'}; lowmem_ops modules left {left or 'none'}, non-stock norm classes {wrong_class or 'none'}; "
             f"LoRA layers {n_lora} -> {_lora_modules(pm)}; export moved outputs by {d_exp:.2e}")
    # b'') BERT with dropout: LoRA on the `dense` a fused post-LN block (DropoutAddNorm) holds
    stock, conv = pair(lambda: bert_cls(p=0.1), spread=True)
    rep = lo.convert(conv, example_inputs=batch)
    pm = peft.get_peft_model(conv, peft.LoraConfig(r=4, target_modules=["query", "value", "dense"]))
    _set_lora_b(pm)
    pm.eval()
    n_lora = _lora_modules(pm)
    with torch.no_grad():
        want = pm(**batch).logits
    lo.export(pm)
    left = sorted({type(m).__name__ for m in pm.modules() if type(m).__module__.startswith("lowmem_ops")})
    with torch.no_grad():
        d_exp = rel_diff(pm(**batch).logits, want)
    fused = sorted({c.after.split()[0] for c in rep.applied})
    line(not left and _lora_modules(pm) == n_lora and d_exp < 1e-4,
         "12b LoRA after convert bert dropout 0.1: lo.export(peft_model)",
         f"converted {fused}; lowmem_ops modules left {left or 'none'}; LoRA layers {n_lora} -> {_lora_modules(pm)}; "
         f"export moved outputs by {d_exp:.2e}")
    # d) convert again after adding LoRA (to get the adapters' compute dtype), then export
    stock, conv = pair(llama, spread=True)
    lo.convert(conv, example_inputs=batch, fold=False)  # adapters on folded layers are refused (12a)
    pm = peft.get_peft_model(conv, cfgs["llama"])
    _set_lora_b(pm)
    try:
        r2 = lo.convert(pm, example_inputs=batch)
        pm.eval()
        with torch.no_grad():
            want = pm(**batch).logits
        lo.export(pm)
        left = sorted({type(m).__name__ for m in pm.modules() if type(m).__module__.startswith("lowmem_ops")})
        with torch.no_grad():
            d = rel_diff(pm(**batch).logits, want)
        ok, msg = not left and d < 1e-4, (f"second convert {len(r2.applied)} applied; export left {left or 'none'}, "
                                          f"moved outputs by {d:.2e}, LoRA layers {_lora_modules(pm)}")
    except Exception as e:  # noqa: BLE001
        ok, msg = False, f"raised {type(e).__name__}: {str(e)[:200]}"
    line(ok, "12c convert(base), get_peft_model, convert(peft_model), export(peft_model)", msg)


# --- 13. gradient checkpointing switched on AFTER convert (Trainer(gradient_checkpointing=True) does this) ---

def flow_ckpt_after():
    x = ids(2, 32)
    batch = {"input_ids": x, "labels": x}
    big = ids(4, 256, seed=2)  # activations well above the weights, so the plan's peak shows them
    big = {"input_ids": big, "labels": big}
    for name, build in (("llama", llama), ("gpt2 dropout 0.1", lambda: gpt2(p=0.1))):
        stock, conv = pair(build, spread=True)
        lo.convert(conv, example_inputs={"input_ids": x})
        torch.manual_seed(0)
        ref = grads(conv, batch)
        peaks = {}
        for m, tag in ((stock, "stock"), (conv, "conv")):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peaks[tag] = lo.memory.plan(m, big).peak
            m.gradient_checkpointing_disable()
        peaks_plain = {tag: lo.memory.plan(m, big).peak for m, tag in ((stock, "stock"), (conv, "conv"))}
        rels = {}
        for reentrant in (False, True):
            twin = copy.deepcopy(conv)
            twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                twin.enable_input_require_grads()
            torch.manual_seed(0)
            g = grads(twin, batch)
            rels[reentrant] = compare_grads(g, ref)[1]
        ok = max(rels.values()) < 1e-5 and peaks["conv"] < peaks["stock"]
        line(ok, f"13 gradient_checkpointing_enable after convert {name}",
             f"grads vs converted unchecked (same seed): max rel {rels[False]:.1e} (non-reentrant), {rels[True]:.1e} "
             f"(reentrant); lo.memory.plan step peak, 4x256 tokens, checkpointed stock {peaks['stock'] / 2**20:.2f} MiB -> converted "
             f"{peaks['conv'] / 2**20:.2f} MiB (unchecked {peaks_plain['stock'] / 2**20:.2f} -> "
             f"{peaks_plain['conv'] / 2**20:.2f} MiB)")


# --- 14. torch.compile (aot_eager: dynamo + AOTAutograd tracing of the custom autograd functions) -------

def flow_compile():
    batch = {"input_ids": ids()}
    big = {"input_ids": ids(4, 128, seed=4)}
    for name, build in (("llama", llama), ("gpt2 dropout 0.1", lambda: gpt2(p=0.1))):
        stock, conv = pair(build, spread=True)
        lo.convert(conv, example_inputs=batch)
        torch.manual_seed(0)
        ref = grads(conv, batch)
        compiled = torch.compile(conv, backend="aot_eager")
        torch.manual_seed(0)
        g = {k.replace("_orig_mod.", ""): v for k, v in grads(compiled, batch).items()}
        cos, rel, only, n = compare_grads(g, ref)
        torch._dynamo.reset()
        # what autograd is asked to save, eager and compiled by inductor (pack-hook count: every save of a
        # tensor counts, shared storages and saved weights included, so not lo.memory's figure)
        stock.train(), conv.train()
        eager = packed_bytes(stock, big), packed_bytes(conv, big)
        cs, cc = torch.compile(stock), torch.compile(conv)
        ind = packed_bytes(cs, big), packed_bytes(cc, big)
        torch._dynamo.reset()
        line(rel < 1e-5 and not only and ind[1] < ind[0], f"14 torch.compile after convert {name}",
             f"aot_eager grads vs eager converted (same seed): max rel {rel:.1e}, cos {cos:.7f} over {n} tensors; "
             f"packed bytes 4x128 tokens eager {eager[0]} -> {eager[1]} ({eager[1] / eager[0]:.3f}x), inductor "
             f"{ind[0]} -> {ind[1]} ({ind[1] / ind[0]:.3f}x)")


# --- 15. HF Trainer's weight-decay groups (full fine-tuning, weight_decay > 0) --------------------------

def clip_vision():
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.CLIPVisionModel(cfg)


def flow_decay():
    """Trainer leaves out of weight decay the parameters of nn.LayerNorm instances and names matching
    bias / layernorm / rmsnorm / norm patterns; a norm that is an MS norm now must stay out too."""
    for name, build, batch in (("gpt2", gpt2, {"input_ids": ids()}), ("bert", bert_cls, {"input_ids": ids()}),
                               ("clip-vision", clip_vision, {"pixel_values": torch.randn(2, 3, 32, 32)})):
        stock, conv = pair(build, spread=True)
        lo.convert(conv, example_inputs=batch)
        with tempfile.TemporaryDirectory() as t:
            args = transformers.TrainingArguments(output_dir=t, use_cpu=True, report_to=[], weight_decay=0.1)
            names = {}
            for tag, m in (("stock", stock), ("conv", conv)):
                real = {n for n, p in m.named_parameters() if p.requires_grad}
                names[tag] = real & set(transformers.Trainer(model=m, args=args).get_decay_parameter_names(m))
        extra = sorted(names["conv"] - names["stock"])
        line(not extra, f"15 Trainer weight-decay groups {name}",
             f"decayed {len(names['stock'])} stock / {len(names['conv'])} converted tensors; decayed only once "
             f"converted: {extra or 'none'}")


FLOWS = {"dtype": flow_dtype, "autocast": flow_autocast, "trainer": flow_trainer, "accelerate": flow_accelerate,
         "twice": flow_twice, "inference": flow_inference, "frozen": flow_frozen, "copy": flow_copy,
         "seqcls": flow_seqcls, "accum": flow_accum, "merge": flow_merge, "modes": flow_modes, "lora_after": flow_lora_after, "ckpt_after": flow_ckpt_after, "compile": flow_compile, "decay": flow_decay}


def main(names):
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{getattr(peft, '__version__', None)}, accelerate {getattr(accelerate, '__version__', None)}, "
          f"threads {torch.get_num_threads()}", flush=True)
    for n in names or FLOWS:
        t = time.time()
        try:
            FLOWS[n]()
        except Exception as e:  # noqa: BLE001
            line(False, n, f"raised {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=6, file=sys.stderr)
        print(f"      ({n}: {time.time() - t:.1f} s)", flush=True)
    fails = sum(r.startswith("FAIL") for r in RESULTS)
    print(f"{len(RESULTS) - fails} PASS, {fails} FAIL")


if __name__ == "__main__":
    main(sys.argv[1:])
