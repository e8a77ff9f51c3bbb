"""A trust audit of lo.convert beyond tune/hf_matrix.py's 44 hand-written families: every model type of
the installed transformers that has a causal-LM, masked-LM, seq2seq-LM, image-classification or base
model class (its auto mappings), built tiny and random from its config class, converted with the
defaults, and checked independently of convert's own report.

    python tune/hf_sweep.py                               # as many as fit in --budget seconds
    python tune/hf_sweep.py --arch llama --arch bert      # model types (transformers' names)
    python tune/hf_sweep.py --budget 300 --json out.json
    python tune/hf_sweep.py --lora --task causal-lm --types-from earlier.json   # under PEFT LoRA

Per model type: built or skipped (why: no config/model class, the tiny config or model does not build,
custom inputs, needs an extra package, a forward + backward over --build-seconds); then lo.convert
(a traceback head if it raised); report.max_difference vs report.tolerance; report.gradient_cosine;
the saved-for-backward ratio re-measured here as hf_matrix.convert_and_measure does (a copy taken
before converting); every change undone and every module skipped, with the reason; an independent
check on a copy of the unconverted model: the eval-mode output difference and the cosine of the
gradients of the parameters convert left untouched (same names, same values) under a fixed random
projection of the outputs; whether the converted model trains (a training-mode backward, finite
gradients). "anomalies" lists, per model, what the audit flags (see ANOMALIES). The output
difference is the audit's own (output_difference: relative to each element's size and to the output
tensor's root mean square, not to 1), compared with report.tolerance.

--lora: each model wrapped in PEFT LoRA as users do (wrap_lora: all-linear, r=8) before the copy
and the conversion; the independent gradient cosine is then over the LoRA parameters (the only
trainable ones; values are compared after casting, as an older convert put them in bf16), per
lora_A / lora_B too; PEFT's merge_and_unload of both is compared; two AdamW steps on each model
record how many adapter elements a step changes (bf16 adapters lose steps under half their ulp). --lora random: PEFT's
init_lora_weights=False (lora_A gets a gradient too); --lora-kwargs: more LoraConfig fields (DoRA,
lora_dropout, named target modules where PEFT refuses all-linear, as for Mamba).

Tiny: the size fields the config class has (hidden_size / d_model / n_embd ... 64, the feed-forward
128, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocabulary 256, 64 positions, 4 experts of which 2
per token, 32x32 images in patches of 8), in sub-configs too; token ids outside the vocabulary moved
inside it. Order: decoder LMs, then masked LMs, image classifiers, seq2seq LMs, other base models;
the types tune/hf_matrix.py already covers last. One batch of 2 (tune/hf_matrix.py's examples), bf16
where a forward and backward run in bf16, else float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_matrix  # noqa: E402  (its builders: batches, loss, measure, left_alone, BatchNorm calibration)
from _bench_common import REPO_ROOT, write_json  # noqa: E402

import torch  # noqa: E402

import lowmem_ops as lo  # noqa: E402
from lowmem_ops import conversion  # noqa: E402
from lowmem_ops._snapshot import in_eval, state_kept  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "tune" / "results" / "cpu-2026-11-30-hf-sweep" / "hf_sweep.json"
GRADIENT_COSINE = 0.95  # the whole-model target at the default grad_tolerance

# (task, auto mapping, input kind); the first task a model type has decides its class
TASKS = [
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "tokens"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "tokens"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image"),
    ("seq2seq-lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq"),
    ("base", "MODEL_MAPPING_NAMES", None),  # input kind read from forward's signature
]

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
# size fields, by meaning; set where the config class has them (dataclass fields or default attributes)
_SIZES = [  # (value, names)
    (HIDDEN, ["hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "model_dim", "word_embed_proj_dim",
             "embedding_size", "projection_dim"]),
    (FFN, ["intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "ffn_hidden_size",
          "inner_hidden_size", "hidden_dim", "dim_feedforward", "mlp_dim"]),
    (LAYERS, ["num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
             "num_decoder_layers", "num_encoder_layers"]),
    (HEADS, ["num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
            "decoder_attention_heads"]),
    (HEAD_DIM, ["head_dim", "d_kv", "attention_head_size", "kv_channels", "v_head_dim", "linear_key_head_dim",
               "linear_value_head_dim"]),
    (64, ["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
         "max_target_positions", "seq_length", "moe_intermediate_size", "shared_expert_intermediate_size",
         "expert_intermediate_size"]),
    (32, ["kv_lora_rank", "q_lora_rank", "image_size"]),
    (8, ["qk_rope_head_dim", "qk_nope_head_dim", "patch_size", "sliding_window"]),
    (4, ["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "linear_num_key_heads",
        "linear_num_value_heads"]),
    (2, ["num_experts_per_tok", "moe_topk", "top_k", "n_group", "topk_group"]),
]
_KV = ["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_key_value_groups"]


def _names(config_cls) -> dict:
    """field name -> default value of a config class (its dataclass fields, else a default instance's)."""
    if dataclasses.is_dataclass(config_cls):
        out = {}
        for f in dataclasses.fields(config_cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out
    return dict(vars(config_cls()))


def tiny_kwargs(config_cls, depth: int = 0) -> dict:
    """The overrides that make a config class tiny (recursing into its sub-configs)."""
    defaults = _names(config_cls)
    kw = {}
    for value, names in _SIZES:
        for n in names:
            if n in defaults and (isinstance(defaults[n], int) and not isinstance(defaults[n], bool)):
                kw[n] = value
    for n in _KV:  # multi-query (1) stays 1; grouped becomes 2 of 4
        if n in defaults and isinstance(defaults[n], int) and defaults[n] > 1:
            kw[n] = KV_HEADS if n != "num_key_value_groups" else HEADS // KV_HEADS
        elif n in defaults and defaults[n] is None and n == "num_key_value_heads":
            kw[n] = KV_HEADS
    if "vocab_size" in defaults:
        kw["vocab_size"] = hf_matrix.VOCAB
    spare = iter(range(3, 64))
    for n, v in defaults.items():  # ids the real tokenizer gives: inside the tiny vocabulary
        if n.endswith(("token_id", "token_index")) and isinstance(v, int) and not isinstance(v, bool) \
                and not 0 <= v < hf_matrix.VOCAB:
            kw[n] = next(spare)
        elif n.endswith(("token_id", "token_ids")) and isinstance(v, list) and any(
                isinstance(x, int) and x >= hf_matrix.VOCAB for x in v):
            kw[n] = [2]
    for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if n in defaults and isinstance(defaults[n], int) and defaults[n] >= hf_matrix.VOCAB:
            kw[n] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[n]
    if "num_channels" in defaults and isinstance(defaults["num_channels"], int):
        kw["num_channels"] = 3
    if "hidden_sizes" in defaults and isinstance(defaults["hidden_sizes"], list):  # hierarchical vision models
        k = len(defaults["hidden_sizes"])
        kw["hidden_sizes"] = [16 * 2 ** min(i, 2) for i in range(k)]
    if "depths" in defaults and isinstance(defaults["depths"], list):
        kw["depths"] = [1] * len(defaults["depths"])
    subs = getattr(config_cls, "sub_configs", None) or {}
    if depth < 2:
        for name, sub in subs.items():
            if isinstance(sub, type):
                try:
                    kw[name] = tiny_kwargs(sub, depth + 1)
                except Exception:
                    pass
    return kw


class Skip(Exception):
    """The model type cannot be built or run here; the message says why."""


class TimeUp(BaseException):
    """An alarm: not an Exception, so convert's own handlers do not take it for a failed change."""


@contextmanager
def time_limit(seconds: float, what: str):
    def ring(signum, frame):
        raise TimeUp(f"{what} took over {seconds:g} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def entries() -> list[dict]:
    """Every model type with one of TASKS' classes: {type, task, config, model, inputs}, in sweep order."""
    from transformers.models.auto import configuration_auto, modeling_auto

    configs = configuration_auto.CONFIG_MAPPING_NAMES
    chosen: dict[str, dict] = {}
    for task, mapping, kind in TASKS:
        for mtype, cls in getattr(modeling_auto, mapping).items():
            if mtype in chosen or mtype not in configs:
                continue
            cls = cls[0] if isinstance(cls, (list, tuple)) else cls
            chosen[mtype] = {"type": mtype, "task": task, "config": configs[mtype], "model": cls, "inputs": kind}
    covered = {a.model for a in hf_matrix.ARCHS.values()} | set(hf_matrix.ARCHS)
    rank = {task: i for i, (task, _, _) in enumerate(TASKS)}
    order = sorted(chosen.values(), key=lambda e: (e["type"] in covered or e["model"] in covered, rank[e["task"]],
                                                    e["type"]))
    for e in order:
        e["in_hf_matrix"] = e["type"] in covered or e["model"] in covered
    return order


def _input_kind(model_cls) -> str:
    params = inspect.signature(model_cls.forward).parameters
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if "decoder_input_ids" in params and "input_ids" in params:
        kind = "seq2seq"
    elif "input_ids" in params:
        kind = "tokens"
    elif "pixel_values" in params:
        kind = "image"
    elif "input_values" in params:
        kind = "wave"
    else:
        raise Skip(f"custom inputs: forward takes {', '.join(n for n in params if n != 'self')}")
    extra = [n for n in required if n not in ("input_ids", "decoder_input_ids", "pixel_values", "input_values")]
    if extra:
        raise Skip(f"custom inputs: forward requires {', '.join(extra)}")
    return kind


def _construct(entry: dict, dtype: torch.dtype):
    import transformers

    try:
        config_cls = getattr(transformers, entry["config"])
        model_cls = getattr(transformers, entry["model"])
    except (AttributeError, ImportError) as e:
        raise Skip(f"class not importable: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    kind = entry["inputs"] or _input_kind(model_cls)
    if kind in ("tokens", "seq2seq"):
        _input_kind(model_cls)  # a required input beyond the tokens: skipped the same way
    try:
        cfg = config_cls(**tiny_kwargs(config_cls))
    except Exception as e:
        raise Skip(f"tiny config does not build: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if hasattr(cfg, "_attn_implementation"):
        try:
            cfg._attn_implementation = "eager" if dtype is torch.float32 else cfg._attn_implementation
        except Exception:
            pass
    torch.manual_seed(hf_matrix.SEED)
    try:
        model = model_cls(cfg).to(dtype).train()
    except ImportError as e:
        raise Skip(f"needs an extra package: {str(e).splitlines()[0][:200]}") from None
    except Exception as e:
        raise Skip(f"tiny model does not build: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    n = sum(p.numel() for p in model.parameters())
    if n > 20_000_000:
        raise Skip(f"not tiny: {n / 1e6:.0f}M parameters after the overrides (a size field this script misses)")
    batch = hf_matrix._example(kind, dtype, cfg)
    hf_matrix._calibrate_batchnorm(model, batch)
    return model, batch, kind


def build(entry: dict, seconds: float):
    """(model, batch, dtype, kind, build seconds) in train mode: bf16 where a forward and backward run,
    else float32; Skip when neither does within `seconds`."""
    t0 = time.perf_counter()
    errors = []
    for dtype in (torch.bfloat16, torch.float32):
        try:
            with time_limit(seconds, "building and one forward + backward"):
                model, batch, kind = _construct(entry, dtype)
                hf_matrix.loss(model(**batch)).backward()
        except TimeUp as e:
            raise Skip(f"too slow on CPU: {e}") from None
        except Skip:
            raise
        except ImportError as e:
            raise Skip(f"needs an extra package: {str(e).splitlines()[0][:200]}") from None
        except Exception as e:
            errors.append(f"{str(dtype).removeprefix('torch.')}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        model, batch, kind = _construct(entry, dtype)  # again: no .grad, nothing touched
        return model, batch, dtype, kind, time.perf_counter() - t0
    raise Skip("the unconverted model's forward + backward fails: " + " | ".join(errors))


# ---------------------------------------------------------------------------------------------
# Independent checks (a copy of the unconverted model; nothing from convert's report)


def _float_outputs(out) -> list[torch.Tensor]:
    return [t for t in conversion._tensors(out) if t.is_floating_point()]


def _eval_run(model, batch, grad: bool):
    with in_eval(model), torch.set_grad_enabled(grad):
        torch.manual_seed(hf_matrix.SEED)
        return model(**batch)


def output_difference(outs_a: list[torch.Tensor], outs_b: list[torch.Tensor]) -> float | None:
    """The audit's own measure of how far outputs a moved from the reference b, on the scale of each
    reference tensor: per tensor, r = max(1, root mean square of b's finite elements), and the largest
    |a-b| / (|b| + r) over its elements, in float64. An element is judged against its own size where it
    is large and against the tensor's typical size where it is near 0, so bf16 rounding of large logits
    (MT5's reach 49) is not read as a change, while a change of the tensor's scale is. Where the two
    disagree on which elements are finite: infinite. None when no pair of tensors has a common shape."""
    worst = None
    for a, b in zip(outs_a, outs_b):
        if a.shape != b.shape or not a.numel():
            continue
        a, b = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf")
        if not finite.any():
            continue
        ref = b[finite]
        typical = max(1.0, ref.square().mean().sqrt().item())
        moved = ((a[finite] - ref).abs() / (ref.abs() + typical)).max().item()
        worst = moved if worst is None else max(worst, moved)
    return worst


def _lora_names(model) -> list[str]:
    """The trainable LoRA parameters of a PEFT model (lora_A / lora_B / lora_embedding_*)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in f".{n}"]


def independent_check(original, converted, batch, lora: bool = False) -> dict:
    """Eval mode, fixed seed: output_difference over the float outputs, and the cosine of the parameter
    gradients (a fixed random projection of the outputs) over the parameters both models hold under one
    name with equal values (a fold rewrites the ones it touches); with lora, over the LoRA parameters
    (compared after casting to the converted model's dtype: convert keeps them float32 now, an older
    one put them in bf16), also per lora_A / lora_B."""
    out_a = _float_outputs(_eval_run(converted, batch, grad=False))
    out_b = _float_outputs(_eval_run(original, batch, grad=False))
    diff = output_difference(out_a, out_b)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g) for t in out_b]

    def grads(model):
        for p in model.parameters():
            p.grad = None
        outs = _float_outputs(_eval_run(model, batch, grad=True))
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights) if o.requires_grad)
        if not torch.is_tensor(loss):
            return {}
        loss.backward()
        out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        for p in model.parameters():
            p.grad = None
        return out

    params_a, params_b = dict(converted.named_parameters()), dict(original.named_parameters())
    if lora:  # the same values, in the dtype convert chose
        same = [n for n in _lora_names(original) if n in params_a and params_a[n].shape == params_b[n].shape
                and torch.equal(params_a[n].detach(), params_b[n].detach().to(params_a[n].dtype))]
    else:
        same = [n for n in params_b if n in params_a and params_a[n].shape == params_b[n].shape
                and torch.equal(params_a[n].detach(), params_b[n].detach())]
    ga, gb = grads(converted), grads(original)
    names = [n for n in same if n in gb]
    if not names:
        return {"output_difference": diff, "gradient_cosine": None, "parameters_compared": 0}
    rec = {}

    def cosine(subset):
        if not subset:
            return None
        a = torch.cat([ga.get(n, torch.zeros_like(gb[n])).flatten() for n in subset]).double()
        b = torch.cat([gb[n].flatten() for n in subset]).double()
        return (torch.dot(a, b) / (a.norm() * b.norm())).item() if a.norm() > 0 and b.norm() > 0 else None

    rec.update(output_difference=diff, gradient_cosine=cosine(names), parameters_compared=len(names),
               parameters_total=len(params_b))
    if lora:
        rec["lora_parameters"] = len(_lora_names(original))
        rec["lora_rewritten"] = [n for n in _lora_names(original) if n not in same]  # values beyond a cast
        rec["lora_retyped"] = [n for n in _lora_names(original) if n in params_a
                               and params_a[n].dtype != params_b[n].dtype]  # convert keeps their dtype now
        rec["lora_without_gradient"] = [n for n in same if n not in gb]  # their adapter did not run
        rec["gradient_cosine_lora_A"] = cosine([n for n in names if ".lora_A." in n])
        rec["gradient_cosine_lora_B"] = cosine([n for n in names if ".lora_B." in n])
    return rec


def _eval_backward(model, batch) -> str:
    """Whether the unconverted model alone runs an eval-mode backward (RWKV's eval mode does not)."""
    try:
        sum(t.float().sum() for t in _float_outputs(_eval_run(model, batch, grad=True))).backward()
        return "runs"
    except Exception as e:
        return f"fails too: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def trains(model, batch) -> str | None:
    """None when a training-mode backward runs and every gradient is finite, else what went wrong. The
    model's buffers are given back (BatchNorm statistics: the merge check after compares eval outputs
    with the unconverted model's, which never ran in training mode)."""
    model.train()
    for p in model.parameters():
        p.grad = None
    try:
        with state_kept(model):
            hf_matrix.loss(model(**batch)).backward()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        return f"non-finite gradients in {len(bad)} parameters, first {bad[0]}"
    if all(p.grad is None for p in model.parameters()):
        return "no parameter got a gradient"
    return None


def merged_difference(original, converted, batch) -> float | str | None:
    """PEFT's merge_and_unload on a copy of each (what a user does after training), then
    output_difference of the merged converted model from the merged original; the error where the
    converted copy's merge or forward fails (the original's did not)."""
    try:
        ref = _float_outputs(_eval_run(copy.deepcopy(original).merge_and_unload(), batch, grad=False))
    except Exception as e:
        return f"the original's merge fails too: {type(e).__name__}"
    try:
        out = _float_outputs(_eval_run(copy.deepcopy(converted).merge_and_unload(), batch, grad=False))
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return output_difference(out, ref)


def adapter_steps(model, batch, lr: float = 1e-4) -> dict:
    """Two AdamW steps (lr 1e-4, no weight decay) on the trainable parameters, in training mode, from a
    fixed seed: the share of the LoRA elements the second step changed, per lora_A / lora_B. At PEFT's
    init lora_B is 0, so the first step moves only lora_B and the second is the first to reach lora_A:
    an adapter held in a dtype too coarse for the update keeps its value (the step is lost)."""
    model.train()
    names = _lora_names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    named = dict(model.named_parameters())
    for step in range(2):
        before = {n: named[n].detach().clone() for n in names}
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(hf_matrix.SEED)
        hf_matrix.loss(model(**batch)).backward()
        opt.step()
    out = {}
    for part in ("lora_A", "lora_B"):
        subset = [n for n in names if f".{part}." in n]
        total = sum(named[n].numel() for n in subset)
        moved = sum(int((named[n].detach() != before[n]).sum()) for n in subset)
        out[f"{part}_changed"] = moved / total if total else None
    out["dtypes"] = sorted({str(named[n].dtype).removeprefix("torch.") for n in names})
    return out


def _unexplained(model, report) -> list[str]:
    """Leaves named like a norm or an activation that no change, skip or swapped ancestor accounts for
    (tests/test_hf_matrix.py's coverage check)."""
    import re
    pattern = re.compile(r"Norm|GELU|Gelu|ReLU|SiLU|Swish|Mish|ELU|Softplus|Tanh|Sigmoid|Activation")
    seen = {c.path for c in report.changes} | {p for p, _ in report.skipped}
    swapped = [c.path for c in report.applied]
    paths_of: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if not list(m.children()) and pattern.search(type(m).__name__) and ".parametrizations." not in f".{path}.":
            paths_of.setdefault(id(m), []).append(path)
    return [ps[0] for ps in paths_of.values()
            if not any(p in seen or any(p.startswith(s + ".") for s in swapped if s) for p in ps)]


# ---------------------------------------------------------------------------------------------
# One model type

ANOMALIES = {
    "convert_raised": "lo.convert raised",
    "check_failed": "report.max_difference > report.tolerance with changes applied, or the independent output "
                    "difference over the tolerance",
    "low_gradient": "gradient cosine (report or independent) < 0.95 with changes applied",
    "gradient_disagrees": "the independent gradient cosine and the report's differ by more than 0.02",
    "bytes_up": "saved bytes after > before (re-measured here)",
    "unexplained": "a norm- or activation-named leaf missing from the report, or a left-alone entry without reason",
    "does_not_train": "the converted model's training-mode backward fails or gives non-finite gradients, and the "
                      "unconverted model's does not (trains_unconverted)",
    "independent_check_failed": "the independent eval-mode check raised (original_alone says whether the "
                                "unconverted model's eval-mode backward fails as well)",
    "lora_rewritten": "--lora: a LoRA parameter's value after converting is not its value before, cast to its new dtype",
    "lora_retyped": "--lora: a LoRA parameter's dtype after converting is not its dtype before (convert keeps the "
                    "adapters' float32 master weights since 4b8a504; before, it cast them to bf16)",
    "merge_differs": "--lora: PEFT's merge_and_unload of the converted model fails, or its outputs are over the "
                     "tolerance from the merged unconverted model's",
    "updates_lost": "--lora: an AdamW step (lr 1e-4) changed under half as many LoRA elements of the converted "
                    "model as of the unconverted one",
}


def wrap_lora(model, init: str = "default", extra: dict | None = None):
    """PEFT LoRA as users apply it (tune/hf_matrix.py's: r=8, alpha 16, every linear layer but the
    output layer, adapters in float32), PEFT's default init (lora_B = 0: the adapted model computes what
    the base does, and only lora_B gets a gradient) or, init="random", PEFT's init_lora_weights=False
    (both random: an adapter partway through training, whose lora_A gets a gradient too); Skip when
    PEFT declines. extra: more LoraConfig fields (use_dora, lora_dropout, ...)."""
    import peft

    torch.manual_seed(hf_matrix.SEED)
    try:
        if init == "default" and not extra:
            wrapped = hf_matrix.lora(model)
        else:
            kw = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **(extra or {})}
            if init != "default":
                kw["init_lora_weights"] = False
            wrapped = peft.get_peft_model(model, peft.LoraConfig(**kw))
    except Exception as e:
        raise Skip(f"PEFT does not wrap it: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") \
            from None
    if wrapped is None:
        raise Skip("PEFT's all-linear finds no layer to adapt")
    return wrapped


def _check_runs(model, batch, seconds: float) -> None:
    """Skip unless the (wrapped) model's own forward + backward runs; its .grad left as it was (None)."""
    try:
        with time_limit(seconds, "the PEFT model's forward + backward"):
            hf_matrix.loss(model(**batch)).backward()
    except TimeUp as e:
        raise Skip(f"too slow on CPU: {e}") from None
    except Exception as e:
        raise Skip(f"the unconverted PEFT model's forward + backward fails: {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    finally:
        for q in model.parameters():
            q.grad = None


def run_one(entry: dict, build_seconds: float, convert_seconds: float, lora: str | None = None,
            lora_kwargs: dict | None = None) -> dict:
    """One model type's record; lora: None, or "default" / "random" (wrap_lora's init) to audit it under PEFT
    LoRA, with lora_kwargs added to its LoraConfig."""
    rec = {k: entry[k] for k in ("type", "task", "model", "config", "in_hf_matrix")}
    try:
        model, batch, dtype, kind, seconds = build(entry, build_seconds)
        if lora:
            model = wrap_lora(model, lora, lora_kwargs)
            _check_runs(model, batch, build_seconds)
    except Skip as e:
        return {**rec, "status": "skipped", "why": str(e)}
    rec.update(status="built", dtype=str(dtype).removeprefix("torch."), inputs=kind, build_s=round(seconds, 2),
               parameters=sum(p.numel() for p in model.parameters()))
    if lora:
        rec["lora_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    original = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        with time_limit(convert_seconds, "convert"):
            baseline = hf_matrix.measure(copy.deepcopy(model), batch)
            report = lo.convert(model, example_inputs=batch)
            after = hf_matrix.measure(model, batch)
    except TimeUp as e:
        rec.update(status="skipped", why=f"too slow on CPU: {e}")
        return rec
    except Exception as e:
        tb = traceback.format_exception(e)
        rec.update(convert="raised", error=f"{type(e).__name__}: {str(e)[:300]}",
                   traceback="".join(tb[-6:])[-2500:], anomalies=["convert_raised"])
        return rec
    rec["convert_s"] = round(time.perf_counter() - t0, 2)
    rec.update(convert="ok", bytes_before=baseline, bytes_after=after, ratio=after / max(baseline, 1),
               max_difference=report.max_difference, tolerance=report.tolerance,
               gradient_cosine=report.gradient_cosine, gradient_note=report.gradient_note,
               applied=[[c.path, c.before, c.after, c.bits, c.reason] for c in report.applied],
               undone=[[c.path, c.before, c.reason] for c in report.changes if c.status != "applied"],
               skipped=[[p, why] for p, why in report.skipped])
    try:
        with time_limit(convert_seconds, "the independent check"):
            rec["independent"] = independent_check(original, model, batch, lora=bool(lora))
            rec["trains"] = trains(model, batch)
            if rec["trains"] is not None:  # the model's own doing where the unconverted fails the same way
                rec["trains_unconverted"] = trains(original, batch)
            if lora:
                rec["merged_difference"] = merged_difference(original, model, batch)
                rec["steps"] = {"unconverted": adapter_steps(original, batch), "converted": adapter_steps(model, batch)}
    except TimeUp as e:
        rec["independent"] = {"error": str(e)}
    except Exception as e:
        rec["independent"] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                              "original_alone": _eval_backward(original, batch)}
    rec["unexplained"] = _unexplained(model, report) + [p for p, _, why in hf_matrix.left_alone(report, model)
                                                        if not (why and why.strip())]
    rec["anomalies"] = anomalies(rec, report)
    return rec


def anomalies(rec: dict, report) -> list[str]:
    found = []
    applied = bool(report.applied)
    ind = rec.get("independent", {})
    tol = report.tolerance
    if applied and (report.max_difference is None or report.max_difference > tol
                    or (ind.get("output_difference") is not None and tol is not None and ind["output_difference"] > tol)):
        found.append("check_failed")
    cosines = [c for c in (report.gradient_cosine, ind.get("gradient_cosine")) if c is not None]
    if applied and any(c < GRADIENT_COSINE for c in cosines):
        found.append("low_gradient")
    if applied and report.gradient_cosine is not None and ind.get("gradient_cosine") is not None \
            and abs(report.gradient_cosine - ind["gradient_cosine"]) > 0.02:
        found.append("gradient_disagrees")
    if rec["bytes_after"] > rec["bytes_before"]:
        found.append("bytes_up")
    if rec["unexplained"]:
        found.append("unexplained")
    if rec.get("trains") is not None and rec.get("trains_unconverted") is None:
        found.append("does_not_train")
    if "error" in ind:
        found.append("independent_check_failed")
    if ind.get("lora_rewritten"):
        found.append("lora_rewritten")
    if ind.get("lora_retyped"):
        found.append("lora_retyped")
    merged = rec.get("merged_difference")
    if isinstance(merged, str) and not merged.startswith("the original's") or \
            isinstance(merged, float) and tol is not None and merged > tol:
        found.append("merge_differs")
    steps = rec.get("steps")
    if steps and any((steps["unconverted"][k] or 0) > 0 and (steps["converted"][k] or 0) < 0.5 * steps["unconverted"][k]
                     for k in ("lora_A_changed", "lora_B_changed")):
        found.append("updates_lost")
    return found


# ---------------------------------------------------------------------------------------------


def summary(records: list[dict]) -> str:
    from collections import Counter
    built = [r for r in records if r["status"] == "built"]
    ok = [r for r in built if r.get("convert") == "ok"]
    kinds = Counter(a for r in built for a in r.get("anomalies", []))
    lines = [f"{len(records)} model types tried: {len(built)} built, {len(records) - len(built)} skipped; "
             f"convert ran on {len(ok)}, raised on {len(built) - len(ok)}; "
             f"{sum(1 for r in ok if not r['anomalies'])} with no anomaly",
             "anomalies: " + (", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "none")]
    skips = Counter(r["why"].split(":")[0] for r in records if r["status"] == "skipped")
    lines.append("skipped: " + ", ".join(f"{k} {n}" for k, n in skips.most_common()))
    for r in built:
        if r.get("anomalies"):
            detail = r.get("error") or (f"diff {r['max_difference']} cos {r['gradient_cosine']} "
                                       f"ind {r.get('independent')} ratio {r['ratio']:.3f} trains {r.get('trains')} "
                                       f"unexplained {r['unexplained'][:3]}")
            lines.append(f"  {r['type']} ({r['model']}, {r['dtype']}): {', '.join(r['anomalies'])}: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="a model type (transformers' name; repeatable); default all")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--budget", type=float, default=900, help="seconds for the whole sweep (default 900)")
    p.add_argument("--build-seconds", type=float, default=10, help="build + one forward/backward limit")
    p.add_argument("--convert-seconds", type=float, default=60, help="convert + measuring limit")
    p.add_argument("--task", action="append", choices=[t for t, _, _ in TASKS],
                   help="only model types whose class is of this task (repeatable); default all")
    p.add_argument("--skip-matrix", action="store_true", help="leave out the types tune/hf_matrix.py covers")
    p.add_argument("--lora", nargs="?", const="default", choices=["default", "random"],
                   help="wrap each model in PEFT LoRA (all-linear, r=8) before converting and check the adapters; "
                        "'random': PEFT's init_lora_weights=False (lora_A gets a gradient too)")
    p.add_argument("--lora-kwargs", type=json.loads, default=None,
                   help='more LoraConfig fields, as JSON: \'{"use_dora": true, "lora_dropout": 0.05}\'')
    p.add_argument("--types-from", action="append", type=Path, default=[],
                   help="only the model types a sweep's JSON lists as built (repeatable; with --task: of those tasks)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    import warnings

    import transformers
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    todo = entries()
    if args.arch:
        known = {e["type"]: e for e in todo}
        unknown = [a for a in args.arch if a not in known]
        if unknown:
            p.error(f"unknown model types {unknown} (none of the audited auto mappings has them)")
        todo = [known[a] for a in args.arch]
    else:
        if args.task:
            todo = [e for e in todo if e["task"] in args.task]
        if args.skip_matrix:
            todo = [e for e in todo if not e["in_hf_matrix"]]
        if args.types_from:
            built = {r["type"] for f in args.types_from for r in json.loads(f.read_text())["records"]
                     if r["status"] == "built"}
            todo = [e for e in todo if e["type"] in built]
    _warm_up()
    start = time.perf_counter()
    records = []
    for entry in todo:
        if time.perf_counter() - start > args.budget:
            records.append({k: entry[k] for k in ("type", "task", "model", "in_hf_matrix")}
                           | {"status": "left_out", "why": f"time budget of {args.budget:g} s spent"})
            continue
        t = time.perf_counter()
        rec = run_one(entry, args.build_seconds, args.convert_seconds, lora=args.lora, lora_kwargs=args.lora_kwargs)
        rec["total_s"] = round(time.perf_counter() - t, 2)
        records.append(rec)
        short = rec.get("why") or rec.get("error") or (
            f"ratio {rec['ratio']:.3f} cos {rec['gradient_cosine']} anomalies {rec['anomalies']}")
        print(f"[{time.perf_counter() - start:6.0f}s] {entry['type']}: {rec['status']} {short}", file=sys.stderr,
              flush=True)
        write_json(args.json, _env(args), records)  # as it goes: a crash leaves what was done
    text = summary([r for r in records if r["status"] != "left_out"])
    left = [r["type"] for r in records if r["status"] == "left_out"]
    if left:
        text += f"\nleft out (time budget): {len(left)}: {' '.join(left)}"
    print(text)
    write_json(args.json, _env(args), records, summary=text.splitlines(), anomaly_kinds=ANOMALIES)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _warm_up() -> None:
    """One small convert before the clock starts: the first one in a process compiles (or loads) the C++
    kernels, which would otherwise count against the first model type's time limit."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                  torch.nn.Linear(32, 16)).to(dtype)
        lo.convert(net, example_inputs=torch.randn(4, 16, dtype=dtype))


def _env(args) -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "seed": hf_matrix.SEED,
            "grad_tolerance": conversion.GRAD_TOLERANCE, "budget_s": args.budget, "threads": torch.get_num_threads(),
            **({"peft": __import__("peft").__version__, "lora": f"r=8, alpha 16, all-linear, init {args.lora}",
                "lora_kwargs": args.lora_kwargs}
               if args.lora else {})}


if __name__ == "__main__":
    sys.exit(main())
