"""One call that makes a model store less: swap activations, norms and gated MLPs, verify, explain.

    report = lo.convert(model, example_inputs=batch)   # changes `model` in place; returns a Report
    print(report)                                        # what changed, what was skipped and why

What is swapped (options turn each part off):
- activations: torch.nn.GELU / SiLU / Mish / ELU / Softplus and the activation modules Hugging Face
  models hold (GELUActivation, NewGELUActivation, GELUTanh, QuickGELUActivation, SiLUActivation,
  MishActivation) -> the approximate op with the same forward, at the fewest bits (1..4 where built)
  whose local gradient cosine, estimated from the unconverted model on the example inputs
  (lowmem_ops._bits), reaches grad_tolerance, or left exact when none does; raised further (or kept
  exact) while the whole model's gradient cosine misses grad_tolerance; ReLU and LeakyReLU(0.01) ->
  relu1 / leaky_relu1, whose 1-bit derivative is exact (kept whatever the tolerance);
- norms: torch.nn.LayerNorm / RMSNorm (a subclass overriding forward only when it computes torch's
  norm on every call on the example inputs) and RMSNorm classes of the LLaMA family (LlamaRMSNorm,
  Qwen2RMSNorm, MistralRMSNorm, ...) -> MSLayerNorm / MSRMSNorm, saving their output. With example inputs, a norm whose output is read only by untied nn.Linear /
  Conv1D layers, each called only on that output, gets its gamma/beta folded into them; every
  other norm keeps them in inverse mode (exact in any topology, post-LN included); a norm whose
  output is modified in place stays torch's (the MS norm saves that output for backward);
- by behaviour: with example inputs, every other leaf that may be an activation or a norm is probed
  (lowmem_ops._recognition) and swapped for the op or MS norm computing the same (T5LayerNorm,
  Gemma's 1 + weight RMSNorm, OLMo's weightless LayerNorm, ConvNeXt's channels-first LayerNorm,
  BloomGelu, a user's Swish), an op of a tree the user loaded (lo.load) included (a built-in op
  that fits comes first); a norm returning another dtype than its input's (T5LayerNorm in a bf16
  T5 with a float32 `wo`) gets that out_dtype; what it matches nothing of, or cannot be probed, is
  a report line;
- gated MLPs: modules with gate_proj / up_proj / down_proj and a SiLU or GELU act_fn (LLaMA,
  Qwen2, Mistral, Gemma) -> GatedMLP with the fused activation (mode="auto"); recognised by
  behaviour (lowmem_ops._gated_mlp), two input projections under other names (FLAN-T5's wi_0 /
  wi_1 / wo) -> GatedMLP under those names, one projection for both halves (Phi-3's gate_up_proj,
  ModernBERT's Wi) -> FusedGatedMLP; transformers 5's MoE experts (one module, 3-D Parameters:
  Mixtral, Qwen2/3-MoE, OLMoE, ...) whose `_apply_gate` is transformers' default act_fn(gate) * up
  -> the same module (a shallow clone, the same Parameters) with that gate fused, exact
  (lowmem_ops._moe_experts); used by the grouped_mm (default) and batched_mm implementations, not
  by "eager" (undone, with the reason); under PEFT's target_parameters LoRA, experts (GPT-OSS's
  too) whose grouped matmuls save the adapters' factors instead of the merged expert weights
  (lowmem_ops._moe_lora);
- PEFT LoRA adapters kept in float32 by default -> the dtype their base computes in (the base
  weight's; a bitsandbytes 4-bit base's compute_dtype; an 8-bit base's input dtype), so no adapter
  casts its input (each cast is a new tensor that is saved and shares nothing).

A module held under several names is one object: swapped under all of them, restored under all.

With example inputs, the model is run before and after (in eval mode, so dropout does not blur the
comparison, building the autograd graph, so what autograd rejects fails here; training flags,
buffers and the RNG state are restored); outputs must agree within the dtype's tolerance, otherwise
the changes are rolled back and retried one by one, and those that raise or break agreement are
undone and reported. Transactional: any failure restores every module, Parameter, buffer and folded
weight bitwise (lowmem_ops._snapshot). The memory saved is measured with lowmem_ops.memory (train
mode, a fixed seed on both sides), and a change that does not reduce it is undone. Gradients are
compared with the unconverted model's on the example inputs (lowmem_ops._gradients). Every
swapped module keeps the original's parameters (the same Parameter objects); a folded norm's
state_dict keys stay (lowmem_ops._folding), so checkpoints load both ways.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _attention, _bits, _checkpointing, _folding, _gradients, _hooks, _lora, _moe_experts, _recognition, memory
from ._gated_mlp import gated_mlp
from ._post_ln import DropoutAddNorm, fused_block
from ._folding import ConsumersInPlace, Fold, fold_affine, folded, in_features, install_state_dict_hooks, remove_state_dict_hooks, transposed
from ._snapshot import Snapshot, in_eval, in_mode, state_kept
from .gated import MODES
from ._tree import is_builtin
from .nn import Approx, Dropout, GatedMLP, MSLayerNorm, MSRMSNorm

# class name -> the op with exactly that forward for this instance (None: its arguments have no match)
_ACTIVATIONS = {
    "GELU": lambda m: {"none": "regelu2", "tanh": "tanh_gelu2"}.get(getattr(m, "approximate", "none")),
    "GELUActivation": lambda m: "regelu2",  # erf GELU, through torch or in Python
    "SiLU": lambda m: "resilu2",
    "SiLUActivation": lambda m: "resilu2",
    "Mish": lambda m: "mish2",
    "MishActivation": lambda m: "mish2",
    "Softplus": lambda m: "softplus2" if getattr(m, "beta", 1.0) == 1.0 else None,
    "ELU": lambda m: "elu2" if getattr(m, "alpha", 1.0) == 1.0 else None,
    # all the tanh form 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), however written
    "NewGELUActivation": lambda m: "tanh_gelu2",
    "GELUTanh": lambda m: "tanh_gelu2",
    "PytorchGELUTanh": lambda m: "tanh_gelu2",
    "FastGELUActivation": lambda m: "tanh_gelu2",
    "AccurateGELUActivation": lambda m: "tanh_gelu2",
    "QuickGELUActivation": lambda m: "quick_gelu2",
    # exact: a step derivative is theirs (other LeakyReLU slopes: a spec of your own, _NO_OP_HINT)
    "ReLU": lambda m: "relu1",
    "LeakyReLU": lambda m: "leaky_relu1" if getattr(m, "negative_slope", 0.01) == 0.01 else None,
}
# what the report adds when a class-table activation's arguments have no built-in op
_NO_OP_HINT = {
    "LeakyReLU": lambda m: (f"; build one: kernelgen new NAME --expr \"where(x > 0, x, {m.negative_slope} * x)\" "
                            "--bits 1, then lo.nn.Approx(NAME)"),
}
_GATED_OPS = {"regelu2", "resilu2", "tanh_gelu2"}  # the specs with fused gated kernels
# The default grad_tolerance: the smallest local cosine an activation's width must reach
# (docs/convert.md: measured on tests/test_convert.py's models, what keeps the whole model >= 0.95).
GRAD_TOLERANCE = 0.95


@dataclass
class Change:
    path: str
    before: str
    after: str
    status: str = "applied"  # applied | undone
    reason: str = ""
    gradient_cosine: float | None = None  # activations: this layer's local gradient cosine (lowmem_ops._gradients)
    bits: int | None = None                # activations: the code width chosen (lowmem_ops._bits)
    estimated_cosine: float | None = None  # its local cosine estimated from the exact model's inputs
    bytes_before: int | None = None        # saved for backward by this module alone, before and after
    bytes_after: int | None = None


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, why)
    max_difference: float | None = None
    tolerance: float | None = None
    memory_before: memory.Measurement | None = None
    memory_after: memory.Measurement | None = None
    gradient_cosine: float | None = None  # parameter gradients, converted vs original model, example inputs
    gradient_loss: str = ""               # what the gradients are of: "random projection" or "loss_fn"
    gradient_note: str = ""               # why there is no gradient cosine, when there is none
    notes: list[str] = field(default_factory=list)  # about the conversion as a whole

    @property
    def applied(self) -> list[Change]:
        return [c for c in self.changes if c.status == "applied"]

    def __str__(self) -> str:
        lines = [f"lowmem_ops.convert: {len(self.applied)} modules swapped, "
                 f"{len(self.changes) - len(self.applied)} undone, {len(self.skipped)} left alone"]
        for c in self.changes:
            extra = f" ({c.reason})" if c.reason else ""
            if c.bits is not None:
                extra += f" [{c.bits} bits"
                if c.estimated_cosine is not None:
                    extra += f", estimated local gradient cosine {c.estimated_cosine:.3f}"
                extra += "]"
            if c.bytes_before is not None and c.bytes_after is not None:
                extra += f" [saved bytes {c.bytes_before} -> {c.bytes_after}]"
            if c.gradient_cosine is not None:
                extra += f" [local gradient cosine {c.gradient_cosine:.3f}]"
            lines.append(f"  {c.status:8s} {c.path or '(model)'}: {c.before} -> {c.after}{extra}")
        for path, why in self.skipped:
            lines.append(f"  skipped  {path}: {why}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.max_difference is not None:
            lines.append(f"  verified: max relative output difference |a-b|/(|b|+max(1, rms b)) {self.max_difference:.3g} "
                         f"(tolerance {self.tolerance:.3g})")
        if self.gradient_cosine is not None:
            lines.append(f"  gradients: cosine {self.gradient_cosine:.4f} between the converted and the original "
                         f"model's parameter gradients ({self.gradient_loss} of the outputs, eval mode)")
        elif self.gradient_note:
            lines.append(f"  gradients: not compared ({self.gradient_note})")
        if self.memory_before is not None and self.memory_after is not None:
            b, a = self.memory_before.total_bytes, self.memory_after.total_bytes
            lines.append(f"  saved for backward: {b / 2**20:.2f} MiB -> {a / 2**20:.2f} MiB ({a / max(b, 1):.3f}x)")
        return "\n".join(lines)


def _replacement(module: torch.nn.Module, activations: bool, norms: bool, gated: bool, gated_mode: str,
                 folded: bool = False, observation: "_Observation | None" = None, dropout: bool = False,
                 param_wrapped: bool = False):
    """The module to put in place of `module`, or (None, reason) / (None, None) when not ours.
    folded: the norm's affine goes into its consumers, so the new norm has none.
    observation: what the example inputs showed (a norm subclass's forward checked against torch's).
    param_wrapped: the module is the base layer of a PEFT ParamWrapper (target_parameters LoRA)."""
    name = type(module).__name__
    if type(module).__module__.startswith("lowmem_ops"):
        return None, None  # already ours (convert() called twice)
    match = observation.matches.get(id(module)) if observation is not None else None
    if dropout:
        new, why = _dropout_replacement(module, norms, observation)
        if new is not None or why:
            return new, why
    if gated and _moe_experts.candidate(module):  # transformers 5's experts: 3-D Parameters, one module
        op = _gated_op_of(module.act_fn, observation)
        if op in _GATED_OPS:
            return _moe_experts.fused(module, op, gated_mode), None
        if not param_wrapped:
            return None, f"MoE experts with activation {type(module.act_fn).__name__}, which has no fused kernel"
    if gated and param_wrapped and _moe_experts.experts(module):  # its own gate (gpt-oss) or an unfusable one
        return _moe_experts.factored(module), None
    # by its names: LLaMA's MLP (projections that are layers: Inkling's shared experts hold 3-D Parameters
    # under the same names, which only the behavioural recognition below may judge)
    if gated and all(isinstance(getattr(module, a, None), torch.nn.Module)
                     for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        op = _gated_op_of(module.act_fn, observation)
        if op in _GATED_OPS:
            return GatedMLP.from_mlp(module, act=op, mode=gated_mode), None
        return None, f"gated MLP with activation {type(module.act_fn).__name__}, which has no fused kernel"
    if gated:
        def op_of(child):
            op = _gated_op_of(child, observation)
            return op if op in _GATED_OPS else None

        new, why = gated_mlp(module, op_of, gated_mode, swap_dropout=dropout)
        if new is not None or why:
            return new, why
    if activations and name in _ACTIVATIONS:
        op = _ACTIVATIONS[name](module)
        if op is None and match is not None and match.op is not None:  # a user's op computes it (probed)
            return Approx(match.op), None
        if op is None:
            hint = _NO_OP_HINT[name](module) if name in _NO_OP_HINT else ""
            return None, f"{name} with these arguments has no built-in approximation{hint}"
        return Approx(op), None
    if match is not None and not match.is_norm:
        if not activations:
            return None, None
        if match.op is None:
            return None, f"{name} computes {match.name}: {_recognition.NOT_BUILT.get(match.name, 'no built-in approximation')}"
        if match.out_dtype is not None:
            return None, (f"{name} computes {match.name} but returns {match.out_dtype} for {observation.calls[id(module)][1]} "
                          "input; the approximate ops return their input's dtype")
        return Approx(match.op), None
    if match is not None and norms and not _has_torch_forward(module, observation):
        return _ms_norm_for(match, module, observation.calls[id(module)][0], folded), None
    if observation is not None and id(module) in observation.unknown and (norms or not _is_norm(module)):
        return None, f"{name} {observation.unknown[id(module)]}"
    if norms and isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and not _has_torch_forward(module, observation):
        # e.g. ConvNeXt's channels-first LayerNorm: same parameters, another computation
        base = _torch_norm_class(module).__name__
        if observation is None:
            return None, f"{name} overrides {base}.forward, so it may compute something else (example inputs would check it)"
        return None, f"{name} overrides {base}.forward and was not seen to compute torch's {base} on the example inputs"
    if norms and isinstance(module, torch.nn.LayerNorm):
        affine = "inverse" if module.elementwise_affine and not folded else "none"
        new = MSLayerNorm(module.normalized_shape, eps=module.eps, affine=affine, bias=module.bias is not None)
        return (new if folded else _adopt(new, module)), None
    if norms and isinstance(module, torch.nn.RMSNorm):  # eps None: finfo(dtype).eps in both
        affine = "inverse" if module.weight is not None and not folded else "none"
        new = MSRMSNorm(module.normalized_shape, eps=module.eps, affine=affine)
        return (new if folded else _adopt(new, module)), None
    if norms and name.endswith("RMSNorm"):
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", None)
        if weight is None or eps is None or "Gemma" in name:  # Gemma scales by (1 + weight)
            return None, f"{name}: unknown parameterisation"
        new = MSRMSNorm(tuple(weight.shape), eps=eps, affine="none" if folded else "inverse")
        return (new if folded else _adopt(new, module)), None
    if norms and isinstance(module, torch.nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        # not a probing candidate (its eval-mode forward is a per-channel affine), but a norm left alone
        return None, f"{name}: normalises with batch or instance statistics; memory-sharing kernels are LayerNorm / RMSNorm only"
    return None, None


def _gated_op_of(act: torch.nn.Module, observation: "_Observation | None") -> str | None:
    """The op a gated MLP's activation module computes: by its class, else by probing; None if neither."""
    pick = _ACTIVATIONS.get(type(act).__name__)
    probed = observation.matches.get(id(act)) if observation is not None else None
    return pick(act) if pick else probed.op if probed is not None else None


def _dropout_replacement(module: torch.nn.Module, norms: bool, observation: "_Observation | None"):
    """What stores no dropout mask in place of `module` (docs/convert.md, "Dropout"): a post-LN output
    block -> DropoutAddNorm (with norms), an HF attention module on sdpa -> its copy whose CPU dropout
    is regenerated, torch's nn.Dropout -> lowmem_ops' Dropout; (None, None) for anything else."""
    if norms:
        fused, why = fused_block(module)
        if fused is not None:
            norm = getattr(fused, fused.names[2])
            if observation is not None and id(norm) in observation.modified:
                return None, (f"{observation.modified[id(norm)]}; the fused block saves the norm's output for "
                              "backward, so it stays as it is")
            return fused, None
        if why:
            return None, why
    if observation is not None and id(module) in observation.attention and _attention.candidate(module):
        return _attention.with_regenerated_dropout(module), None
    if type(module) is torch.nn.Dropout and module.p > 0:
        return Dropout(module.p, module.inplace), None
    return None, None


def _ms_norm_for(match: "_recognition.Match", module: torch.nn.Module, shape: tuple, folded: bool) -> torch.nn.Module:
    """The MS norm computing what probing found `module` computes, holding its weight (and bias)
    when it uses them; folded: they went into its consumers instead."""
    n = shape[1] if match.channels_first else shape[-1]
    affine = "inverse" if match.weight and not folded else "none"
    options = {"eps": match.eps, "affine": affine, "weight_offset": match.weight_offset,
               "channels_first": match.channels_first, "out_dtype": match.out_dtype}
    new = MSRMSNorm((n,), **options) if match.rms else MSLayerNorm((n,), bias=match.bias, **options)
    if affine == "inverse":
        new.weight = module.weight  # the very Parameter objects (see _adopt)
        if match.bias:
            new.bias = module.bias
    return new


def _foldable(module: torch.nn.Module, observation: "_Observation | None") -> bool:
    """A norm whose affine can go into its consumers: not an offset (1 + weight) or channels-first
    norm, and one that uses every affine parameter it holds (a probed norm may hold one it ignores)."""
    if observation is not None and any(id(p) in observation.foreign for p in module.parameters(recurse=False)):
        return False  # the model reads its weight or bias itself (NemotronH: `norm(h.to(norm.weight.dtype))`)
    match = observation.matches.get(id(module)) if observation is not None else None
    if match is None:
        return True
    return (match.is_norm and match.weight and not match.weight_offset and not match.channels_first
            and (match.bias or getattr(module, "bias", None) is None))


def _torch_norm_class(norm: torch.nn.Module) -> type:
    return torch.nn.LayerNorm if isinstance(norm, torch.nn.LayerNorm) else torch.nn.RMSNorm


def _has_torch_forward(norm: torch.nn.Module, observation: "_Observation | None" = None) -> bool:
    """Whether a LayerNorm / RMSNorm (or subclass) computes torch's norm: its forward is torch's own,
    or (timm's LayerNorm) every call on the example inputs returned exactly torch's norm of its input."""
    if type(norm).forward is _torch_norm_class(norm).forward:
        return True
    return observation is not None and observation.matches_torch.get(id(norm)) is True


def _torch_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What torch's own LayerNorm / RMSNorm forward computes with this module's arguments."""
    if isinstance(norm, torch.nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def _is_named_rmsnorm(module: torch.nn.Module) -> bool:
    """An RMSNorm known by its class name only (LLaMA family), not torch's."""
    return not isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and type(module).__name__.endswith("RMSNorm")


def _is_norm(module: torch.nn.Module) -> bool:
    """A module convert may swap for an MS norm (whose output is watched on the example inputs)."""
    return not type(module).__module__.startswith("lowmem_ops") and (
        isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm"))


def _is_linear(module: torch.nn.Module) -> bool:
    """A layer a norm's affine can be folded into: nn.Linear or GPT-2's Conv1D (x.view(-1, nx) @ W + b).
    Exactly these types: a subclass such as bitsandbytes' Linear4bit / Linear8bitLt holds a quantized
    weight that gamma cannot be multiplied into (its norm keeps its affine, inverse mode)."""
    return type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D"


def _adopt(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give `new` the very Parameter objects of `old` (optimizer state, PEFT, tied weights survive)."""
    for pname in ("weight", "bias"):
        p = getattr(old, pname, None)
        if isinstance(p, torch.nn.Parameter):
            setattr(new, pname, p)
    return new


def _tolerance(outputs, model: torch.nn.Module | None = None) -> float:
    """The output tolerance of the precision the model computes in: its outputs' dtypes and the dtype of
    most of its parameters (a bf16 model returning float32 logits, as Mllama's upcast, rounds in bf16
    all the same). A bitsandbytes 4-bit layer's weight counts as in x out elements of its
    compute_dtype: QLoRA's float32 norms and embeddings (peft's prepare_model_for_kbit_training) do
    not make its bf16 matmuls float32 ones."""
    dtypes = {t.dtype for t in _tensors(outputs)}
    if model is not None:  # the dtype holding most of its parameters' elements, not any one parameter's
        elements: dict[torch.dtype, int] = {}
        for p in model.parameters():
            if p.is_floating_point():
                elements[p.dtype] = elements.get(p.dtype, 0) + p.numel()
        for m in model.modules():
            compute, weight = getattr(m, "compute_dtype", None), getattr(m, "weight", None)
            if (isinstance(compute, torch.dtype) and compute.is_floating_point and isinstance(weight, torch.Tensor)
                    and not weight.is_floating_point()):
                size = getattr(m, "in_features", 0) * getattr(m, "out_features", 0) or weight.numel()
                elements[compute] = elements.get(compute, 0) + size
        if elements:
            dtypes.add(max(elements, key=elements.get))
    return 5e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-3


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


# Every run convert makes starts the RNG from this seed (forked: the user's stream is untouched), so
# its memory measurements and checks are the same on every call and both sides draw the same numbers.
RUN_SEED = 0
# the note of a change whose module the training-mode forward that measures memory skipped
NOT_MEASURED = "kept unmeasured: its module did not run in the training-mode forward that measures memory (LayerDrop)"


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _run(model, inputs, grad: bool = False, then=None):
    """One deterministic forward: eval mode (no dropout), no grad unless asked; training flags,
    buffers and the RNG as they were after. grad=True builds the autograd graph, so an op that
    autograd rejects in training (an in-place write into a saved output) fails here too.
    then: returns then(outputs) instead, computed inside the run (with the graph built), before the
    buffers are put back (a backward reads BatchNorm's running statistics)."""
    with in_eval(model), state_kept(model, seed=RUN_SEED), _quantized_in_training_mode(model), \
            torch.set_grad_enabled(grad or then is not None):
        out = _call(model, inputs)
        return out if then is None else then(out)


@contextlib.contextmanager
def _quantized_in_training_mode(model: torch.nn.Module):
    """bitsandbytes layers in training mode for the duration (their flags restored after). They have
    no dropout, but in eval mode on a CPU with AVX512-BF16 a 4-bit layer repacks its weight, for
    good, into an inference layout that passes no gradient to its input (bitsandbytes 0.50): a run
    of convert's on a model in eval mode (as from_pretrained returns it) would leave QLoRA training
    learning nothing upstream of the last quantized layer."""
    modes = {m: m.training for m in model.modules() if type(m).__module__.split(".")[0] == "bitsandbytes"}
    try:
        for m in modes:
            m.training = True  # this module alone: .train() would switch its children too
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _reference(model, inputs) -> list[torch.Tensor]:
    """The unconverted model's outputs, with the graph built as every check's run builds it: kernels
    may differ with grad mode (CPU SDPA in bf16 rounds otherwise), which would read as outputs moved.
    A forward that fails with the graph built gets a no-grad reference; each check then fails, and
    says why, as it would have."""
    try:
        return _run(model, inputs, then=lambda out: [t.detach() for t in _tensors(out)])
    except Exception:
        return _tensors(_run(model, inputs))


@torch.no_grad()
def _difference(a, b) -> float:
    """max |a - b| / (|b| + s) over every output pair, s = max(1, rms of b's finite values): relative
    where |b| is large, and near zero relative to the tensor's scale, not to 1. Logits of a trained
    LLM reach 20 to 40 in magnitude; the bf16 rounding of an exact rewrite (a fused gated MLP) moves
    them by about 2^-8 of that, which against 1 + |b| read as "moved" wherever a logit is near 0.
    Not finite where the reference is: infinite (never within a tolerance)."""
    diffs = []
    for x, y in zip(_tensors(a), _tensors(b)):
        if not (x.is_floating_point() and x.numel()):
            continue
        x, y = x.float(), y.float()
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return float("inf")
        finite = torch.isfinite(y)
        scale = max(1.0, y[finite].pow(2).mean().sqrt().item()) if finite.any() else 1.0
        diffs.append(((x - y).abs() / (y.abs() + scale))[finite].max().item() if finite.any() else 0.0)
    return max(diffs, default=0.0)


def _describe(error: BaseException) -> str:
    """One line for the report: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:200]}{'...' if len(line) > 200 else ''}"


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, layer) of each PEFT LoRA layer (a `lora_A` ModuleDict)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def _adapter_computes(model: torch.nn.Module, layers: list, seen: dict, report: "Report") -> list["_AdapterCompute"]:
    """PEFT keeps LoRA adapters in float32 by default and casts the input for each adapter: three
    float32 copies of one bf16 activation for q, k and v, none of them shared with the norm before.
    Each layer whose input (`seen`, from the example inputs; without them, what its base computes in:
    _compute_dtype) has another dtype than its adapters gets adapters that compute in the input's
    dtype, their Parameters kept (lowmem_ops._lora). What the example inputs show wins: QLoRA's
    prepare_model_for_kbit_training feeds a 4-bit bf16-compute layer float32 (PEFT's cast is a no-op
    there)."""
    paths = _module_paths(model)
    computes = []
    for path, layer in layers:
        dtype = seen.get(id(layer)) or _compute_dtype(layer)
        holders = [getattr(layer, name) for name in ("lora_A", "lora_B")]
        dtypes = {p.dtype for holder in holders for m in holder.values() for p in m.parameters()}
        if dtype is None or not dtypes or dtypes == {dtype}:
            continue
        if (why := _lora.left_alone(layer)) is not None:
            report.skipped.append((path, why))
            continue
        dicts, why = [], None
        for name, holder in zip(("lora_A", "lora_B"), holders):
            twins = {}
            for key, old in holder.items():
                twins[key] = new = _lora.in_input_dtype(old)
                where = f"{path}.{name}.{key}"
                why = why or (f"{where} is a {type(old).__name__}, which lowmem_ops cannot make compute in its "
                              "input's dtype" if new is None else _hooks.why_not(old, new, where))
            dicts.append((name, holder, twins))
        if why:
            report.skipped.append((path, f"PEFT's float32 cast of its input kept: {why}"))
            continue
        before = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        change = Change(path, f"LoRA adapters computing in {before} (PEFT casts their input)",
                        f"computing in {str(dtype).removeprefix('torch.')}, weights kept in {before}")
        computes.append(_AdapterCompute(layer, paths[id(layer)], dicts, change))
    return computes


def _compute_dtype(lora_layer: torch.nn.Module) -> torch.dtype | None:
    """The dtype a LoRA layer's base computes in, or None where only a forward can tell: a floating
    base weight's dtype; for a bitsandbytes 4-bit base (uint8 weight) its `compute_dtype` (set from the
    input on its first call). An 8-bit base computes in its input's dtype: None."""
    weight = getattr(getattr(lora_layer, "base_layer", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    compute = getattr(getattr(lora_layer, "base_layer", None), "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else None


@contextlib.contextmanager
def _input_dtypes(layers: list):
    """Yields a dict filled, as the block's forwards run, with id(layer) -> the dtype of its input,
    for the (path, layer) pairs called with a single floating dtype (empty where none ran)."""
    calls: dict[int, set] = {id(m): set() for _, m in layers}
    found: dict[int, torch.dtype] = {}

    def called(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor):
            calls[id(module)].add(x.dtype)

    handles = [m.register_forward_pre_hook(called, with_kwargs=True) for _, m in layers]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        found.update({k: next(iter(v)) for k, v in calls.items() if len(v) == 1 and next(iter(v)).is_floating_point})


@_checkpointing.judged_without
def convert(model: torch.nn.Module, example_inputs=None, *, activations: bool = True, norms: bool = True,
            gated: bool = True, gated_mode: str = "auto", fold: bool = True, lora_dtype: bool = True,
            measure_memory: bool = True, check_gradients: bool = True, loss_fn=None,
            grad_tolerance: float | None = GRAD_TOLERANCE, dropout: bool = True) -> Report:
    """Swap, in place, what stores less; verify on example_inputs (a tensor, tuple or dict of kwargs).

    Transactional: a change that cannot be made, raises, or moves the outputs is undone and reported;
    whatever happens, the model is left either with the verified changes or exactly as it was. Its
    buffers (BatchNorm statistics), the parameters' .grad and the global RNG are left as they were.

    fold: fold a norm's gamma/beta into its consumers when, on the example inputs, every consumer is a
    plain nn.Linear or GPT-2 Conv1D (untied weight, held under one name, called only on this norm's
    output, its weight used nowhere else; a bias wherever beta is non-zero) and the output is not
    returned; other norms use inverse mode. A norm whose output is modified in place is left alone.
    lora_dtype: PEFT LoRA adapters compute in their input's dtype (on the example inputs; without
    them, the base layer's weight dtype or a bitsandbytes 4-bit layer's compute_dtype) instead of PEFT
    casting their input to float32, a copy saved for backward; their Parameters stay float32, so the
    optimizer still steps float32 weights (lowmem_ops._lora).
    measure_memory: measure saved bytes before and after (train mode, fixed seed) and undo every
    change that does not reduce them ("saves no memory (+N bytes)").
    dropout: store no dropout masks (docs/convert.md, "Dropout"): torch's nn.Dropout (p > 0) -> lowmem_ops'
    Dropout; a post-LN output block (dense -> dropout -> LayerNorm(h + residual), recognised by its
    behaviour) -> DropoutAddNorm, the dropout, add and norm fused (with norms); a Hugging Face attention
    module on sdpa -> the same module with its attention-probability dropout regenerated off CUDA.
    check_gradients: compare parameter gradients with the unconverted model's on the example inputs
    (report.gradient_cosine, and each activation's local cosine); loss_fn(outputs) -> scalar is the
    loss to differentiate (default: a fixed random projection of the outputs).
    grad_tolerance: each activation gets the fewest bits (1..4, among its op's built widths) whose
    local gradient cosine, estimated from the unconverted model's inputs and output gradients at that
    activation on the example inputs (lowmem_ops._bits), is at least this; an activation no width
    reaches stays exact (a report line gives the best estimate). It is also the whole model's target:
    when the converted model's gradient cosine misses it (local errors compound through deep stacks),
    the local target is raised to 1 - (1 - t) / 4, then 1 - (1 - t) / 16, and at last every activation
    is kept exact, until it is met. None, or no gradients to estimate from (no example inputs,
    check_gradients=False): the 2-bit ops."""
    if gated_mode not in MODES:
        raise ValueError(f"lowmem_ops.convert: gated_mode must be one of {', '.join(MODES)}, got {gated_mode!r}")
    if grad_tolerance is not None and not (isinstance(grad_tolerance, (int, float)) and -1 <= grad_tolerance <= 1):
        raise ValueError(f"lowmem_ops.convert: grad_tolerance must be a cosine in [-1, 1] or None, got {grad_tolerance!r}")
    report = Report()
    examples = example_inputs is not None
    lora_layers = _lora_layers(model) if lora_dtype else []
    with _input_dtypes(lora_layers) as seen:  # read during the reference run: no forward of its own
        reference = _reference(model, example_inputs) if examples else None
    if examples and measure_memory:
        report.memory_before = _measure(model, example_inputs, "before")
    observation = _observe(model, example_inputs) if examples and (norms or activations or gated or dropout) else None
    if observation is not None and report.memory_before is not None:
        observation.ran_in_training = set(report.memory_before.ran)

    actions = _adapter_computes(model, lora_layers, seen, report) if lora_dtype else []
    actions += _plan(model, observation, report, activations=activations, norms=norms, gated=gated,
                     gated_mode=gated_mode, fold=fold, dropout=dropout)
    candidates = _with_inner(actions)
    activation_swaps = {i: a for i, a in enumerate(candidates) if _is_activation_swap(a)}

    def probed(taken: list):
        """The exact model's gradients, and the inputs and output gradients of the activations to swap."""
        if not (examples and check_gradients):
            return None
        ids = {id(a) for a in taken}
        return _probe(model, example_inputs, loss_fn, report, {i: a.old for i, a in activation_swaps.items() if id(a) in ids})

    probe = probed(actions)
    before = _snapshot(model, candidates, keep=(_originals(model), folded(model)))
    planned_skips = len(report.skipped)
    fell_back: list[Change] = []  # modules replaced whole, undone: their parts were tried instead
    try:
        check = _checker(model, example_inputs, reference, report) if examples else (lambda: None)
        while True:
            kept = _convert_with(model, example_inputs, actions, activation_swaps, probe, grad_tolerance, check, before,
                                 report, measure_memory)
            # per-layer widths bound each activation's local error, not what the layers after it make of
            # it: while the whole model misses grad_tolerance, tighten the local target, then keep them exact
            for local in _tighter(grad_tolerance):
                if not (probe is not None and report.gradient_cosine is not None and report.gradient_cosine < grad_tolerance
                        and any(a.change.status == "applied" for a in kept if _is_activation_swap(a))):
                    break
                missed = report.gradient_cosine
                before.restore()
                del report.skipped[planned_skips:]
                _reset(actions)
                kept = _convert_with(model, example_inputs, actions, activation_swaps, probe, local, check, before,
                                     report, measure_memory, missed=(missed, grad_tolerance))
            undone = {id(a) for a in actions if getattr(a, "inner", None) and a.change.status == "undone"}
            if not undone:
                break
            # a fused module that failed its checks: convert what is inside it one by one, from the start
            before.restore()
            del report.skipped[planned_skips:]
            for a in actions:
                if id(a) in undone:
                    a.change.reason += "; its parts were tried one by one instead"
                    fell_back.append(a.change)
                    report.skipped.extend(a.inner_skipped)
            planned_skips = len(report.skipped)
            actions = [x for a in actions for x in (a.inner if id(a) in undone else [a])]
            _reset(actions)
            probe = probed(actions)  # (recording every fused module's activations up front would hold them all)
        _record(model, [a for a in kept if a.change.status == "applied"])
    except BaseException:
        before.restore()  # an unexpected failure (or an interrupt): nothing half done
        raise
    report.changes.extend(fell_back)
    report.changes.extend(a.change for a in kept)
    return report


def _reset(actions: list) -> None:
    """Every action planned again, as before a first attempt (the bits chosen stay)."""
    for a in actions:
        a.change.status, a.change.reason, a.change.gradient_cosine = "applied", "", None
        a.change.bytes_before = a.change.bytes_after = None


def _tighter(tolerance: float | None):
    """The local targets tried after `tolerance` missed end to end: a quarter, then a sixteenth of its
    distance to 1, then None (every activation exact)."""
    if tolerance is None:
        return
    yield 1 - (1 - tolerance) / 4
    yield 1 - (1 - tolerance) / 16
    yield None


def _convert_with(model, inputs, actions, activation_swaps, probe, local, check, before, report, measure_memory,
                  missed=None) -> list:
    """One attempt: choose the widths for the local target `local` (None after a miss: every activation
    exact), apply and verify, undo what saves no memory, measure, compare gradients. Returns the
    actions taken part (those not kept exact)."""
    examples = inputs is not None
    taking = {id(a) for a in actions}  # the activation swaps of fused modules' parts wait for a fallback
    activation_swaps = {key: a for key, a in activation_swaps.items() if id(a) in taking}
    exact: set[int] = set()
    if probe is not None and (local is not None or missed is not None):
        # the local choice (after a miss: at the raised target; at last: at grad_tolerance, the rest exact)
        raised = missed is not None and local is not None
        exact = _choose_bits(activation_swaps, probe.calls, local if local is not None else missed[1], report,
                             label="the raised local target" if raised else "grad_tolerance")
        for key, a in activation_swaps.items():
            if missed is None or id(a) in exact or not probe.calls.get(key):
                continue  # never called with a gradient: its width cannot move the cosine
            if local is None:
                if _bits.is_exact(_bits.get_op(a.new.op_name)):
                    continue  # its gradient is the exact one already: keeping the original saves nothing
                exact.add(id(a))
                report.skipped.append((a.change.path, f"kept exact: at every width tried the whole-model gradient "
                                       f"cosine missed grad_tolerance {missed[1]:g} (last {missed[0]:.3f})"))
            else:
                a.change.reason = (f"whole-model gradient cosine {missed[0]:.3f} < grad_tolerance {missed[1]:g}: "
                                   f"local target raised to {local:.4g}")
    actions = [a for a in actions if id(a) not in exact]
    for a in activation_swaps.values():
        if a.change.bits is None:
            a.change.bits = _bits.get_op(a.new.op_name).bits
    report.memory_after = None
    _apply_verified(model, actions, check)
    if examples and measure_memory and any(a.change.status == "applied" for a in actions):
        try:
            report.memory_after = _measure(model, inputs, "after")
            without = _measure_without_activation_swaps(model, inputs, actions, before)
            if _undo_what_saves_nothing(actions, report, without):
                before.restore()
                kept = [a for a in actions if a.change.status == "applied"]
                _apply_verified(model, kept, check)
                report.memory_after = None
                if kept:
                    report.memory_after = _measure(model, inputs, "after")
                else:
                    check()  # the difference in the report is the unchanged model's
        except Exception as e:  # a training-mode forward that only the converted model fails
            before.restore()
            for a in actions:
                if a.change.status == "applied":
                    a.change.status, a.change.reason = "undone", f"training-mode forward failed: {_describe(e)}"
            report.max_difference = None
    if examples and measure_memory and report.memory_after is None:
        report.memory_after = report.memory_before  # nothing changed
    if examples and measure_memory:
        saved_before, saved_after = report.memory_before, report.memory_after
        for a in actions:  # a module that did not run in both has no bytes to show (NOT_MEASURED)
            path = a.change.path
            if a.change.status == "applied" and saved_before.did_run(path) and saved_after.did_run(path):
                a.change.bytes_before = saved_before.exclusive_bytes(path)
                a.change.bytes_after = saved_after.exclusive_bytes(path)
    if probe is not None:
        report.gradient_cosine, report.gradient_note = None, ""
        failure = _compare_gradients(model, inputs, probe, actions, report)
        if failure is not None:  # the original model's backward ran (the probe's reference): the changes broke it
            before.restore()
            for a in actions:
                if a.change.status == "applied":
                    a.change.status = "undone"
                    a.change.reason = f"{failure} (in the converted model's backward; the original's runs)"
                    a.change.bytes_before = a.change.bytes_after = None
            report.max_difference = None
            report.memory_after = report.memory_before if measure_memory and examples else None
    return actions


CHECKPOINTED = ("it ran inside a torch.utils.checkpoint region, where autograd saves nothing at forward time "
                "(backward recomputes it and saves then): convert before checkpointing; Hugging Face's, timm's and "
                "torch's CheckpointWrapper switches are handled for you")


def _is_activation_swap(action) -> bool:
    return isinstance(action, _Swap) and isinstance(action.new, Approx)


def _measure_without_activation_swaps(model, inputs, actions: list, before: Snapshot):
    """What is saved with every applied change but the activation swaps, or None when there is no
    such mix. An activation's saving depends on the other changes: torch's ReLU saves its output,
    which costs nothing once a LoRA adapter computing in bf16 saves that same tensor (PEFT's float32
    adapter saved a cast copy instead), so its baseline is the model with the others in place, not the
    unconverted one.
    None too when that model fails to run (an in-place op the swapped activation no longer did): then
    the unconverted model is the baseline. The model is left with every applied change in place."""
    applied = [a for a in actions if a.change.status == "applied"]
    if not any(map(_is_activation_swap, applied)) or all(map(_is_activation_swap, applied)):
        return None
    before.restore()
    try:
        for a in applied:
            if not _is_activation_swap(a):
                a.apply()
        return _measure(model, inputs, "without the activation swaps")
    except Exception:
        return None
    finally:  # these very changes were applied and verified together before
        before.restore()
        for a in applied:
            a.apply()


def _undo_what_saves_nothing(actions: list, report: Report, without_activations=None) -> bool:
    """Mark undone every applied change that does not reduce the bytes saved for backward; True if any.
    A change's effect is read from the two measurements, per module: the bytes only its module (and
    what is inside it) saves, after minus before. A storage its module shares with another (an MS
    norm's output, which the next linear saves anyway; the half of a fused projection that an MoE
    expert saves for its product) costs nothing. Judged with every other change in place, so a
    change that saves only together with another one is kept. Changes whose modules saved a storage
    in common are judged as one (the two norms of a parallel-residual block both save the block's
    input: neither alone stops it being saved, the two together do). An activation swap's "before" is
    `without_activations` where given (_measure_without_activation_swaps). A change whose module did not
    run in both measured forwards (a layer LayerDrop skipped) has no measured effect: it stays, with
    a note (its outputs and gradients were verified in eval mode, where every layer runs)."""
    after = report.memory_after
    applied = [a for a in actions if a.change.status == "applied"]
    partners = _saved_together([a.change.path for a in applied if not _is_activation_swap(a)],
                               report.memory_before, after)
    undone = False
    for a in applied:
        path = a.change.path
        before = without_activations if without_activations is not None and _is_activation_swap(a) else report.memory_before
        if not (before.did_run(path) and after.did_run(path)):
            a.change.reason = NOT_MEASURED
            continue
        group = partners.get(path, (path,))
        delta = after.exclusive_bytes(*group) - before.exclusive_bytes(*group)
        if delta >= 0:
            a.change.status, a.change.reason = "undone", f"saves no memory ({delta:+d} bytes)"
            if path in before.checkpointed or path in after.checkpointed:
                why = CHECKPOINTED
            else:
                why = _moe_experts.unused_because(a.new) if isinstance(a, _Swap) else None
            if why:
                a.change.reason += f": {why}"
            undone = True
        elif len(group) > 1:
            others = ", ".join(p for p in group if p != path)
            a.change.reason = f"saves {-delta} bytes together with {others} (they saved a tensor in common)"
    return undone


def _saved_together(paths: list[str], *measurements) -> dict[str, tuple[str, ...]]:
    """path -> every path judged with it: the connected sets of `paths` whose modules saved a storage in
    common in one of `measurements` (only paths with partners are keys)."""
    group = {p: {p} for p in paths}
    for m in measurements:
        for hit in m.savers_among(paths):
            merged = set().union(*(group[p] for p in hit))
            for p in merged:
                group[p] = merged
    return {p: tuple(sorted(g)) for p, g in group.items() if len(g) > 1}


def _probe(model, inputs, loss_fn, report: Report, watch: dict):
    """The unconverted model's parameter gradients on the example inputs, with the calls of the
    `watch` modules recorded, or None (and a note why)."""
    report.gradient_loss = "random projection" if loss_fn is None else "loss_fn"
    try:
        return _gradients.Probe(lambda then: _run(model, inputs, then=then), list(model.parameters()), loss_fn, watch)
    except Exception as e:
        report.gradient_note = _describe(e)
        return None


def _choose_bits(swaps: dict, calls: dict, tolerance: float, report: Report, label: str = "grad_tolerance") -> set[int]:
    """Give each activation swap the fewest bits meeting `tolerance` (lowmem_ops._bits.choose) from
    the exact model's recorded calls; ids of the swaps no width meets (left exact, a report line each).
    A swap whose activation was never called with a gradient keeps its op."""
    exact = set()
    for key, swap in swaps.items():
        recorded = calls.get(key)
        if not recorded:
            continue
        op, estimates = _bits.choose(swap.new.op_name, recorded, tolerance)
        if op is None:
            best = max(estimates, key=lambda k: -2 if estimates[k] is None else estimates[k])
            report.skipped.append((swap.change.path, f"kept exact: no width reaches {label} {tolerance:g} "
                                   f"(best estimated local gradient cosine {estimates[best]:.3f}, {best} bits)"))
            exact.add(id(swap))
            continue
        if op.name != swap.new.op_name:
            swap.new = Approx(op.name)
        swap.change.bits, swap.change.estimated_cosine = op.bits, estimates[op.bits]
    return exact


def _compare_gradients(model, inputs, probe, actions, report: Report) -> str | None:
    """Overall and per-activation gradient cosines of the model as converted. Parameters a fold
    rewrote (the linear weights, which now hold gamma) or removed (the norm's gamma/beta) are left
    out of the overall cosine: their gradients are of another parameterisation. Returns what failed
    where the converted model's backward raises (None where it runs): a model that could train
    before must train after (an in-place write into a tensor a swapped module saves fails here)."""
    applied = [a for a in actions if a.change.status == "applied"]
    ignored = {id(t) for a in applied for t in a.writes}
    ignored |= {id(p) for a in applied if isinstance(a, _Swap) and a.folds for p in a.old.parameters()}
    # activations and gated MLPs: every swap but those whose backward is exact (the norms, docs/norms.md;
    # the dropouts and the fused post-LN blocks, an identity and add + norm in eval mode)
    watched = {i: (a.new, a.old) for i, a in enumerate(applied)
               if isinstance(a, _Swap) and not isinstance(a.new, (MSLayerNorm, MSRMSNorm, Dropout, DropoutAddNorm))
               and type(a.new) is not type(a.old)}
    try:
        overall, local = probe.compare(lambda then: _run(model, inputs, then=then), watched, ignored)
    except Exception as e:  # e.g. a backward only the converted model fails
        report.gradient_note = f"the converted model's backward failed: {_describe(e)}; every change undone"
        return _describe(e)
    report.gradient_cosine = overall
    if overall is None:
        report.gradient_note = "the gradients are zero"
    for i, value in local.items():
        applied[i].change.gradient_cosine = value
    return None


def _measure(model, inputs, label):
    # training mode, as training runs: a model in eval mode (from_pretrained returns one) is put in it
    # with its train(), so its dropouts are judged by the masks they save then, not by eval mode's
    # nothing (T5 converted in eval mode kept 16 of its 32 swaps undone: 0.744x for 0.601x); a model
    # in training mode is measured as it is, modules its user froze in eval mode included.
    # Dropout (LayerDrop) draws random numbers, BatchNorm updates its statistics: the same seed
    # before and after, and module calls that give the RNG back (the swapped dropouts draw
    # differently), so both sides skip the same layers and the ratio is the same every call
    training = contextlib.nullcontext() if model.training else in_mode(True, model)
    with training, memory.comparable_runs(model, seed=RUN_SEED), _quantized_in_training_mode(model):
        if isinstance(inputs, dict):
            return memory.measure(model, label=label, **inputs)
        return memory.measure(model, *(inputs if isinstance(inputs, tuple) else (inputs,)), label=label)


def _checker(model, inputs, reference, report: Report):
    """check() -> None when the model's outputs (eval mode, graph built) agree with `reference`
    within the dtype's tolerance, else why not; records the difference in the report."""
    tol = report.tolerance = _tolerance(reference, model)

    def check():
        diff = report.max_difference = _difference(_run(model, inputs, grad=True), reference)
        return None if diff <= tol else f"outputs moved by {diff:.3g} > {tol:.3g}"

    return check


def _snapshot(model: torch.nn.Module, actions: list, keep=()) -> Snapshot:
    """A Snapshot that can undo `actions`: what they write in place and the flags they set, besides
    the model's structure."""
    return Snapshot(model, writes=[t for a in actions for t in a.writes],
                    attributes=[x for a in actions for x in a.attributes], keep=keep)


def _attempt(actions, check):
    """Apply the actions and check: None when all is well, else what went wrong."""
    try:
        for action in actions:
            action.apply()
        return check()
    except Exception as e:
        return _describe(e)


def _apply_verified(model: torch.nn.Module, actions: list, check) -> None:
    """Apply every action and check the model. When the check fails or anything raises, roll all of
    them back and apply them one at a time, keeping each only if the model still passes with it;
    the ones dropped are marked undone, with the reason."""
    if not actions:
        return
    everything = _snapshot(model, actions)
    if _attempt(actions, check) is None:
        return
    everything.restore()
    for action in actions:
        one = _snapshot(model, [action])
        problem = _attempt([action], check)
        if problem is not None:
            one.restore()
            action.change.status, action.change.reason = "undone", problem
    problem = _attempt([], check)  # those kept, together
    if problem is not None:
        everything.restore()
        for action in actions:
            if action.change.status == "applied":
                action.change.status, action.change.reason = "undone", f"together with the others: {problem}"
        _attempt([], check)  # the difference in the report is the unchanged model's


@dataclass(eq=False)  # compared by identity
class _Swap:
    """Put `new` in place of `old` under every name the model holds it by, folding old's affine
    into `folds` (path, linear layer). Undone by restoring a Snapshot taken before."""

    sites: list  # (parent module, attribute, path)
    old: torch.nn.Module
    new: torch.nn.Module
    change: Change
    folds: list
    inner: list = field(default_factory=list)  # the swaps inside `old`, made where this one is undone
    inner_skipped: list = field(default_factory=list)  # their report lines
    around: list = field(default_factory=list)  # the swaps this one is inner to, outermost first

    def holds(self, path: str) -> bool:
        """Whether `path` names a module inside the one replaced, gone from the model once it is:
        not one `new` keeps where it was (see _keeps)."""
        return any(path.startswith(p + ".") and not self._keeps(path[len(p) + 1:]) for _, _, p in self.sites)

    def _keeps(self, inner: str) -> bool:
        """Whether the module at `inner` (a path relative to `old`) stays in the model under the same
        name with `new` in place: its parent, not `old` itself, is the same object in both (the PEFT
        layers a GatedMLP keeps as its projections, with their lora_dropout; the children of an
        attention module swapped for one with another config). A swap there stays valid either way."""
        parent = inner.rpartition(".")[0]
        if not parent:
            return False  # its parent is `old`: setting it there would not reach `new`
        try:
            return self.new.get_submodule(parent) is self.old.get_submodule(parent)
        except AttributeError:
            return False

    @property
    def writes(self) -> list:
        return [p for _, linear in self.folds for p in (linear.weight, linear.bias) if p is not None]

    attributes = ()  # no flags set

    def apply(self) -> None:
        _hooks.carry(self.old, self.new)  # here: the bits chosen may give `new` another module
        kept = {id(m) for m in self.old.modules()}
        for m in self.new.modules():  # what is new takes the old module's mode (a dropout in an eval model stays off)
            if id(m) not in kept:
                m.training = self.old.training
        for parent, attr, _ in self.sites:
            setattr(parent, attr, self.new)
        gamma, beta = getattr(self.old, "weight", None), getattr(self.old, "bias", None)
        with torch.no_grad():
            for _, linear in self.folds:
                w, b = fold_affine(linear.weight, linear.bias, gamma, beta, transposed(linear))
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)


@dataclass(eq=False)
class _AdapterCompute:
    """A PEFT LoRA layer's adapters compute in its input's dtype, PEFT's input cast off (_lora).
    Undone by restoring a Snapshot taken before (its `attributes` hold the flag)."""

    layer: torch.nn.Module
    paths: list  # every name of the layer
    dicts: list  # ("lora_A" or "lora_B", its ModuleDict, {key: the adapter computing in its input's dtype})
    change: Change
    writes: list = field(default_factory=list)  # nothing written in place

    @property
    def attributes(self) -> list:
        return [(self.layer, "cast_input_dtype_enabled")]

    def apply(self) -> None:
        for name, holder, twins in self.dicts:  # (each twin shares its adapter's hook dicts: _lora._as)
            new = _lora.AdapterDict(f"{self.paths[0]}.{name}", twins)
            _hooks.carry(holder, new)
            setattr(self.layer, name, new)
        self.layer.cast_input_dtype_enabled = False


def _module_paths(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name the model holds it by (a module registered twice has two)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _plan(model, observation, report: Report, *, activations, norms, gated, gated_mode, fold, dropout=False
          ) -> list[_Swap]:
    """The swaps to make, one per module object (at all its names); what cannot be swapped is a
    report line. What is inside a module replaced whole (a gated MLP) is planned too, as that swap's
    `inner` swaps with their own report lines: convert makes them where the whole swap is undone."""
    paths = _module_paths(model)
    tied = _tied_parameters(model)
    planned: list[_Swap] = []
    every: list[_Swap] = []  # in the order of named_modules: a swap comes after the swaps around it
    done: set[int] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in done:
            continue
        done.add(id(module))
        owner = next((o for o in reversed(every) if o.holds(path)), None)
        skipped = report.skipped if owner is None else owner.inner_skipped
        try:
            swap = _swap_for(model, path, module, paths, observation, tied, skipped,
                             activations=activations, norms=norms, gated=gated, gated_mode=gated_mode, fold=fold,
                             dropout=dropout)
        except Exception as e:  # e.g. an op missing from the loaded kernel tree
            skipped.append((path, f"could not be converted: {_describe(e)}"))
            continue
        if swap is not None:
            if owner is not None:
                swap.around = [*owner.around, owner]
            (planned if owner is None else owner.inner).append(swap)
            every.append(swap)
    # a name inside another module replaced whole (not one this swap is inside) is not the model's any
    # more; every swap's sites are judged against the others' sites as planned, then replaced
    sites = {id(swap): [s for s in swap.sites
                        if not any(o is not swap and all(o is not a for a in swap.around) and o.holds(s[2]) for o in every)]
             for swap in every}
    for swap in every:
        swap.sites = sites[id(swap)]
    return planned


def _with_inner(actions: list) -> list:
    """The actions and, recursively, the inner swaps they fall back to."""
    return [x for a in actions for x in (a, *_with_inner(getattr(a, "inner", [])))]


def _swap_for(model, path, module, paths, observation, tied, skipped: list, *, activations, norms, gated, gated_mode,
              fold, dropout=False):
    """The swap for one module (held under paths[id(module)]), or None, with a line in `skipped` when it is skipped."""
    names = paths[id(module)]
    shared = len(names) > 1
    watched = observation is not None and id(module) in observation.uses
    if watched and id(module) in observation.modified:
        new, why = _replacement(module, activations, norms, gated, gated_mode, observation=observation, dropout=dropout)
        if new is None or isinstance(new, (MSLayerNorm, MSRMSNorm)):  # an activation saves its codes, not its output
            if new is not None:
                why = (f"{observation.modified[id(module)]}; a memory-sharing norm saves that output for "
                       "backward, so torch's norm stays")
            if why:
                skipped.append((path, why))
            return None
    targets = (_fold_targets(model, module, observation, tied, paths)
               if watched and fold and not shared and _foldable(module, observation) and not _hooks.observed(module)
               else [])
    # experts under PEFT's target_parameters (only those: finding the parent walks the path)
    param_wrapped = bool(path) and _moe_experts.experts(module) and _lora.param_wrapper(_home(model, path)[0])
    new, why = _replacement(module, activations, norms, gated, gated_mode, folded=bool(targets), observation=observation,
                            dropout=dropout, param_wrapped=param_wrapped)
    if new is None:
        if why:
            skipped.append((path, why))
        return None
    if not path:
        skipped.append(("(model)", "the model itself is one of ours to swap: convert a model that holds it"))
        return None
    if (why := _hooks.why_not(module, new, path)) is not None:
        skipped.append((path, why))
        return None
    only_in_training = False
    if observation is not None and not any(p in observation.ran for p in names):
        # a dropout called in training mode only (PEFT's DoRA skips lora_dropout in eval) is an identity
        # in the eval-mode checks either way; what it saves is measured in training mode
        only_in_training = isinstance(new, Dropout) and any(p in observation.ran_in_training for p in names)
        if not only_in_training:
            # (a branch these inputs do not take: a vision tower fed no image, cross-attention in a decoder-only call)
            skipped.append((path, "did not run on the example inputs: a swap could be neither verified nor measured"))
            return None
    after = type(new).__name__
    if only_in_training:
        after += " (called in training mode only: measured there)"
    if type(new) is type(module) and getattr(new, "config", None) is not getattr(module, "config", None):
        after += f" (attention dropout regenerated off CUDA: {_attention.NAME})"
    if _moe_experts.is_factored(new):
        after += f" ({_moe_experts.describe(new, param_wrapped)})"
    if observation is not None and id(module) in observation.matches:
        after += f" (probed: {observation.matches[id(module)].describe()})"
    if targets:
        after += f" (affine folded into {', '.join(p for p, _ in targets)})"
    if shared:
        after += f" (the same module is also at {', '.join(names[1:])})"
    sites = [(*_home(model, p), p) for p in names]
    return _Swap(sites, module, new, Change(path, type(module).__name__, after), targets)


def _home(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """(the module holding the one at `path`, the attribute it is held under there)."""
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path), attr


def _record(model: torch.nn.Module, applied: list) -> None:
    """Bookkeeping for lowmem_ops.export and state_dict: the original module under each name it had
    (the same object for all of a shared module's names), and the folds. (The LoRA layers convert
    changed hold an AdapterDict: export finds them by it.)"""
    originals, folds = _originals(model), folded(model)
    for swap in applied:
        if not isinstance(swap, _Swap):
            continue
        for _, _, path in swap.sites:
            originals[path] = swap.old  # it shares the very Parameters with the new module
        if swap.folds:
            folds[swap.change.path] = Fold(swap.new, swap.old, [linear for _, linear in swap.folds])
            homes = [(*_home(model, path), linear, path) for path, linear in swap.folds]
            swap.new._fold_guard = ConsumersInPlace(swap.change.path, homes)
    if folds:
        install_state_dict_hooks(model)


@dataclass
class _Observation:
    """What one run on the example inputs showed about each norm's output and each linear layer."""

    uses: dict = field(default_factory=dict)      # id(norm) -> [(function, module path)] reading its output; None: returned
    modified: dict = field(default_factory=dict)  # id(norm) -> how its output was modified in place
    inputs: dict = field(default_factory=dict)    # id(linear) -> per call, id(norm) whose output it got (None: other)
    foreign: set = field(default_factory=set)     # ids of linear parameters read outside their own module's forward,
                                                  # and of norm parameters read there at all (metadata too)
    matches_torch: dict = field(default_factory=dict)  # id(norm subclass overriding forward) -> every call was torch's norm
    calls: dict = field(default_factory=dict)     # id(candidate leaf) -> its first call: (input shape, dtype, device, why not probed)
    matches: dict = field(default_factory=dict)   # id(candidate leaf) -> what probing found it computes (_recognition.Match)
    unknown: dict = field(default_factory=dict)   # id(candidate leaf) -> why probing found nothing to swap it for
    attention: set = field(default_factory=set)   # ids of the innermost modules that ran scaled_dot_product_attention
    ran: set = field(default_factory=set)         # paths of the modules called on the example inputs
    ran_in_training: set = field(default_factory=set)  # ... in training mode (convert's "before" measurement)


class _UseRecorder(torch.overrides.TorchFunctionMode):
    """Records every torch function that takes a watched norm output, in-place writes into one, and
    reads of a linear layer's parameters from outside that layer's forward."""

    def __init__(self, outputs: dict, owners: dict, stack: list, seen: _Observation, norm_owners: dict | None = None):
        super().__init__()
        self.outputs, self.owners, self.stack, self.seen = outputs, owners, stack, seen
        self.norm_owners = norm_owners or {}
        self.paused = False  # while convert's own checks run inside a hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        name, here = getattr(func, "__name__", str(func)), self.stack[-1]
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if not isinstance(leaf, torch.Tensor):
                continue
            if id(leaf) in self.outputs:
                self.seen.uses[self.outputs[id(leaf)][0]].append((name, here))
            owner = self.owners.get(id(leaf))
            if owner is not None and owner != here and name not in _METADATA:
                self.seen.foreign.add(id(leaf))
            # a fold removes the norm's weight: even `norm.weight.dtype` elsewhere in the forward would
            # then fail (outside the forward, stack [""]: convert's own bookkeeping reading .grad)
            if len(self.stack) > 1 and self.norm_owners.get(id(leaf), here) != here:
                self.seen.foreign.add(id(leaf))
        if func is F.scaled_dot_product_attention:
            self.seen.attention.add(here)  # a path until _observe ends
        target = _written_in_place(name, args, kwargs)
        if target is not None and id(target) in self.outputs:
            self.seen.modified.setdefault(self.outputs[id(target)][0],
                                          f"its output is modified in place by {name} in {here or 'the model'}")
        return func(*args, **kwargs)


_IN_PLACE_OPERATORS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                       "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}


def _written_in_place(name: str, args, kwargs):
    """The tensor a call writes into (x.add_(..), x += .., x[i] = .., F.relu(x, inplace=True), out=), or None."""
    if isinstance(kwargs.get("out"), torch.Tensor):
        return kwargs["out"]
    if args and isinstance(args[0], torch.Tensor) and (
            kwargs.get("inplace") is True or name in _IN_PLACE_OPERATORS
            or (name.endswith("_") and not name.startswith("_"))):
        return args[0]
    return None


def _observe(model: torch.nn.Module, inputs) -> _Observation:
    """Run the model once on the inputs, watching every norm's output and every linear layer."""
    norms = {id(m): m for _, m in model.named_modules() if _is_norm(m) or _is_candidate(m)}
    linears = {id(m): (p, m) for p, m in model.named_modules() if _is_linear(m)}
    seen = _Observation(uses={i: [] for i in norms}, inputs={i: [] for i in linears})
    outputs: dict[int, tuple] = {}  # id(output) -> (id(norm), output, its version counter then); keeps them alive
    owners = {id(p): path for path, m in linears.values() for p in (m.weight, m.bias) if p is not None}
    stack = [""]
    handles = memory.track_modules(model, stack, seen.ran)

    versions: dict[int, int] = {}  # id(candidate) -> its first input's version counter on entry

    def entering(module, args, kwargs):
        x = _first_tensor(args, kwargs)
        if id(module) not in versions and x is not None:
            versions[id(module)] = x._version

    def produced(module, args, kwargs, out):
        if id(module) not in seen.calls:
            try:
                seen.calls[id(module)] = _first_call(args, kwargs, out, versions.get(id(module)))
            except Exception as e:  # a tensor subclass torch.equal rejects, ...: a report line, not a failed run
                seen.calls[id(module)] = None, None, None, f"could not be observed: {_describe(e)}"
        if not isinstance(out, torch.Tensor) or id(out) in outputs:  # an in-place op's output: its producer's
            return
        outputs[id(out)] = (id(module), out, out._version)
        if (isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
                and type(module).forward is not _torch_norm_class(module).forward):
            x = args[0] if args else next(iter(kwargs.values()), None)
            recorder.paused = True
            try:
                same = isinstance(x, torch.Tensor) and torch.equal(_torch_norm(module, x), out)
            except Exception:  # torch's norm does not even take this input (channels-first)
                same = False
            finally:
                recorder.paused = False
            seen.matches_torch[id(module)] = seen.matches_torch.get(id(module), True) and same

    def called(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        seen.inputs[id(module)].append(outputs[id(x)][0] if id(x) in outputs else None)

    handles += [m.register_forward_pre_hook(entering, with_kwargs=True) for m in norms.values()]
    handles += [m.register_forward_hook(produced, with_kwargs=True) for m in norms.values()]
    handles += [m.register_forward_pre_hook(called, with_kwargs=True) for _, m in linears.values()]
    norm_owners = {id(p): path for path, m in model.named_modules() if id(m) in norms
                   for p in m.parameters(recurse=False)}
    recorder = _UseRecorder(outputs, owners, stack, seen, norm_owners)
    try:
        with recorder:
            out = _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for t in _tensors(out):
        if id(t) in outputs:
            seen.uses[outputs[id(t)][0]] = None  # returned: folding would change the model's output
    for norm, out, version in outputs.values():
        if out._version != version:  # any in-place write, through a view or not, bumps it
            seen.modified.setdefault(norm, "its output is modified in place")
    seen.attention = {id(model.get_submodule(path)) for path in seen.attention if path}
    _identify(norms, seen)
    return seen


def _first_tensor(args, kwargs):
    return next((t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)


def _first_call(args, kwargs, out, version_on_entry) -> tuple:
    """(shape, dtype, device, why it cannot be probed or None) of a candidate's first call."""
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    x = tensors[0] if tensors else None
    if len(tensors) != 1 or not x.is_floating_point():
        return None, None, None, f"takes {len(tensors)} tensor inputs, so it was not probed"
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None, None, None, "does not return one tensor of its input's shape, so it was not probed"
    # dropout-like in eval mode (its input back, untouched, or equal values): not a candidate;
    # an in-place activation returns its input too, written (its version counter moved)
    if (out is x and x._version == version_on_entry) or (out is not x and out.dtype == x.dtype and torch.equal(out, x)):
        return None, None, None, "identity"
    return tuple(x.shape), x.dtype, x.device, None


def _identify(candidates: dict, seen: _Observation) -> None:
    """Probe each candidate leaf that ran once with one tensor (lowmem_ops._recognition); torch's norms
    and the activations of the class table need none."""
    for key, module in candidates.items():
        if _known_by_class(module):
            continue
        if key not in seen.calls:
            if _named_like_candidate(module):  # a branch the inputs did not take (an audio tower fed no audio)
                seen.unknown[key] = "did not run on the example inputs, so it was not probed"
            continue
        shape, dtype, device, why = seen.calls[key]
        if why == "identity" or (why and not _named_like_candidate(module)):
            continue  # not an activation or norm: not one convert saw
        if why:
            seen.unknown[key] = why
            continue
        try:
            seen.matches[key] = _recognition.identify(module, shape, dtype, device)
        except _recognition.ProbeError as e:
            seen.unknown[key] = f"probed: {e}"
        except Exception as e:  # anything else the probe hit: a report line, never a failed convert
            seen.unknown[key] = f"could not be probed: {_describe(e)}"


_CANDIDATE_NAME = re.compile(r"(norm|gelu|silu|swish|mish|elu|relu|softplus|activation|act)$", re.IGNORECASE)
# the same words inside a CamelCase name: RMSNormGated (x, gate), MeanVarianceNormLayer, LayerNorm2d
_CANDIDATE_PART = re.compile(r"(Norm|GELU|Gelu|SiLU|Silu|ReLU|Relu|Swish|Mish|Softplus|Activation)(?=[A-Z0-9_])")


def _named_like_candidate(module: torch.nn.Module) -> bool:
    """Named like a norm or activation, or one of torch's: reported even when it cannot be probed
    (several inputs, another output shape)."""
    name = type(module).__name__
    return (bool(_CANDIDATE_NAME.search(name) or _CANDIDATE_PART.search(name)) or name in _ACTIVATIONS
            or type(module).__module__.startswith("torch.nn"))


def _known_by_class(module: torch.nn.Module) -> bool:
    """The fast path: torch's own norms and activations of the class table compute what their class says.
    A class-table activation whose arguments have no built-in op (LeakyReLU(0.2)) is probed: an op the
    user built for it (lo.load) may compute it."""
    pick = _ACTIVATIONS.get(type(module).__name__)
    if pick is not None:
        return pick(module) is not None
    return (isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
            and type(module).forward is _torch_norm_class(module).forward)


def _is_candidate(module: torch.nn.Module) -> bool:
    """A leaf that may be an activation or a norm: of torch's classes only the activations and norms;
    any other class without child modules whose parameters are all one-dimensional (whether it is
    one is decided by probing it)."""
    if type(module).__module__.startswith("lowmem_ops") or any(True for _ in module.children()):
        return False
    if type(module).__module__.startswith("torch.nn"):
        return type(module).__module__ in ("torch.nn.modules.activation", "torch.nn.modules.normalization")
    return all(p.dim() == 1 for p in module.parameters(recurse=False))


def _fold_targets(model: torch.nn.Module, norm: torch.nn.Module, seen: _Observation, tied: set, paths: dict) -> list:
    """The linear consumers to fold `norm`'s affine into, or [] when folding is not safe: each must
    receive this norm's output in every call and have its weight read nowhere else."""
    uses, gamma = seen.uses.get(id(norm)), getattr(norm, "weight", None)
    if not uses or not isinstance(gamma, torch.nn.Parameter):
        return []
    beta = getattr(norm, "bias", None)
    targets = {}
    for func, path in uses:
        if func in _METADATA:
            continue
        module = model.get_submodule(path) if path else model
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        linear = func == "linear" and type(module) is torch.nn.Linear
        conv1d = func == "view" and type(module).__name__ == "Conv1D"  # GPT-2's: x.view(-1, nx) @ W + b
        if not (linear or conv1d) or hasattr(parent, "lora_A") or _hooks.described(module):
            return []  # a non-linear use (residual, dropout, reshape), a LoRA layer's adapters, or hooks that see its input
        params = [p for p in (module.weight, module.bias) if p is not None]
        if (any(id(p) in tied or id(p) in seen.foreign for p in params)
                or len(paths[id(module)]) > 1  # registered under two names
                or any(source != id(norm) for source in seen.inputs.get(id(module), [None]))  # other inputs too
                or not _fold_fits(gamma, module)
                or (beta is not None and module.bias is None and bool(beta.detach().ne(0).any()))):
            return []
        targets[path] = module
    return sorted(targets.items())


def _fold_fits(gamma: torch.Tensor, linear: torch.nn.Module) -> bool:
    """gamma scales the features the layer reads: the norm is over exactly its input's last dimension
    (a multi-dimensional normalized_shape cannot be folded into a layer that reads the last one only)."""
    return gamma.numel() == in_features(linear) == gamma.shape[-1]


# Uses that read only a tensor's metadata (x.shape, x.size(), ...), never its values.
_METADATA = {"__get__", "size", "dim", "numel", "ndimension", "stride", "is_contiguous", "element_size"}


def _tied_parameters(model: torch.nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


_ORIGINALS = "_lowmem_ops_originals"


def _originals(model: torch.nn.Module) -> dict:
    """path -> the module convert() replaced there (for lowmem_ops.export)."""
    if _ORIGINALS not in vars(model):  # its own, not an inner model's that a wrapper's __getattr__ forwards to
        # A plain attribute, not a submodule: it must not add keys to state_dict or parameters().
        object.__setattr__(model, _ORIGINALS, {})
    return vars(model)[_ORIGINALS]


_STOCK_ACTIVATIONS = {
    "regelu": lambda: torch.nn.GELU(), "resilu": lambda: torch.nn.SiLU(),
    "tanh_gelu": lambda: torch.nn.GELU(approximate="tanh"), "mish": lambda: torch.nn.Mish(),
    "softplus": lambda: torch.nn.Softplus(), "elu": lambda: torch.nn.ELU(),
    "relu": lambda: torch.nn.ReLU(), "leaky_relu": lambda: torch.nn.LeakyReLU(),
}


def export(model: torch.nn.Module) -> torch.nn.Module:
    """Put standard modules back, in place, and return the model: what convert() swapped gets its
    original module again under every name it had (which holds the same, trained, Parameters; a
    norm whose affine was folded gets gamma = 1, beta = 0, the folded linear weights stay); ops
    built by hand become their torch equivalents. state_dict / save_pretrained then load into the
    stock architecture.

    What convert recorded on a model inside this one (a PeftModel made from a converted model) is
    restored too, with that model's paths; a module put around a child of a swapped module after
    convert (PEFT's LoRA layer around a fused MLP's gate_proj) is carried to the original."""
    # outermost first: a model converted again once wrapped was changed on top of the inner conversion
    for owner in [m for m in model.modules() if _ORIGINALS in vars(m) or _folding._FOLDED in vars(m)]:
        _restore_originals(owner)
    _lora.give_back(model)
    stocks: dict[int, torch.nn.Module | None] = {}  # one stock module per object, under all its names
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if not path:
            continue
        if id(module) not in stocks:
            stocks[id(module)] = _stock(module)
        if stocks[id(module)] is not None:
            _hooks.carry(module, stocks[id(module)])
            setattr(*_home(model, path), stocks[id(module)])
    return model


def _restore_originals(model: torch.nn.Module) -> None:
    originals, folds = _originals(model), folded(model)
    for path in sorted(originals, key=len, reverse=True):
        ours, (parent, attr) = model.get_submodule(path), _home(model, path)  # before changing anything
        original = originals.pop(path)
        if folds.pop(path, None) is not None:  # its affine lives in the linear layers now: identity here
            with torch.no_grad():
                original.weight.fill_(1.0)
                if getattr(original, "bias", None) is not None:
                    original.bias.zero_()
        # the training flag the model has now (the original kept the one it had at convert time: a
        # dropout restored in training mode into a model in eval mode would drop)
        original.train(ours.training)
        _hooks.carry(ours, original)  # hooks registered after convert, on ours
        _carry_wrappers(ours, original)
        setattr(parent, attr, original)
    if not folds:
        remove_state_dict_hooks(model)


def _carry_wrappers(ours: torch.nn.Module, original: torch.nn.Module) -> None:
    """A child of ours under a name the original has too, which is not the original's child but holds
    it (a PEFT LoRA layer added after convert, its base_layer the original projection): the
    original gets it, or export would drop the adapter."""
    for name, child in ours._modules.items():
        before = original._modules.get(name)
        if child is None or before is None or child is before:
            continue
        if any(m is before for m in child.modules()):
            original._modules[name] = child


def _stock(module: torch.nn.Module):
    if isinstance(module, (MSLayerNorm, MSRMSNorm)) and (module.weight_offset or module.channels_first):
        return None  # torch has no such norm: it stays (what convert swapped gets its original back)
    if isinstance(module, MSLayerNorm):
        new = torch.nn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                                 bias=module.bias is not None)
        return _adopt(new, module)
    if isinstance(module, MSRMSNorm):
        new = torch.nn.RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine)
        return _adopt(new, module)
    if isinstance(module, Dropout):
        return torch.nn.Dropout(module.p, module.inplace)
    if isinstance(module, Approx):
        # by the name's family only for the built-in ops: a user's op is whatever its spec says (one
        # named regelu5 need not be a GELU), so one built by hand stays
        family = module.op_name.rstrip("0123456789")
        return _STOCK_ACTIVATIONS[family]() if family in _STOCK_ACTIVATIONS and is_builtin(module.op_name) else None
    return None
