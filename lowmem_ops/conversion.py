"""One call that makes a model store less: swap activations, norms and gated MLPs, verify, explain.

    report = lo.convert(model, example_inputs=batch)   # changes `model` in place; returns a Report
    print(report)                                        # what changed, what was skipped and why

What is swapped (options turn each part off):
- activations: torch.nn.GELU / SiLU / Mish / ELU / Softplus and the activation modules Hugging Face
  models hold (GELUActivation, NewGELUActivation, GELUTanh, QuickGELUActivation, SiLUActivation,
  MishActivation) -> the 2-bit approximate op with the same forward;
- norms: torch.nn.LayerNorm / RMSNorm and RMSNorm classes of the LLaMA family (LlamaRMSNorm,
  Qwen2RMSNorm, MistralRMSNorm, ...) -> MSLayerNorm / MSRMSNorm, saving their output. With example
  inputs, a norm whose output is read only by untied nn.Linear / Conv1D layers gets its gamma/beta
  folded into them; every other norm keeps them in inverse mode (exact in any topology, post-LN
  included);
- gated MLPs: modules with gate_proj / up_proj / down_proj and a SiLU or GELU act_fn (LLaMA,
  Qwen2, Mistral, Gemma) -> GatedMLP with the fused activation (mode="auto");
- PEFT LoRA adapters kept in float32 by default -> the base layer's dtype, so no adapter casts its
  input (each cast is a new tensor that is saved and shares nothing).

With example inputs, the model is run before and after (in eval mode, so dropout does not blur the
comparison; training flags are restored); outputs must agree within the dtype's
tolerance, otherwise the changes are retried one by one and those that break agreement are undone
and reported. The memory saved is measured with lowmem_ops.memory. Nothing is lost on failure:
every swapped module keeps the original's parameters (the same Parameter objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import memory
from .gated import MODES
from .nn import Approx, GatedMLP, MSLayerNorm, MSRMSNorm

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
}
_GATED_OPS = {"regelu2", "resilu2", "tanh_gelu2"}  # the specs with fused gated kernels


@dataclass
class Change:
    path: str
    before: str
    after: str
    status: str = "applied"  # applied | undone
    reason: str = ""


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, why)
    max_difference: float | None = None
    tolerance: float | None = None
    memory_before: memory.Measurement | None = None
    memory_after: memory.Measurement | None = None

    @property
    def applied(self) -> list[Change]:
        return [c for c in self.changes if c.status == "applied"]

    def __str__(self) -> str:
        lines = [f"lowmem_ops.convert: {len(self.applied)} modules swapped, "
                 f"{len(self.changes) - len(self.applied)} undone, {len(self.skipped)} left alone"]
        for c in self.changes:
            extra = f" ({c.reason})" if c.reason else ""
            lines.append(f"  {c.status:8s} {c.path or '(model)'}: {c.before} -> {c.after}{extra}")
        for path, why in self.skipped:
            lines.append(f"  skipped  {path}: {why}")
        if self.max_difference is not None:
            lines.append(f"  verified: max |output difference| {self.max_difference:.3g} (tolerance {self.tolerance:.3g})")
        if self.memory_before is not None and self.memory_after is not None:
            b, a = self.memory_before.total_bytes, self.memory_after.total_bytes
            lines.append(f"  saved for backward: {b / 2**20:.2f} MiB -> {a / 2**20:.2f} MiB ({a / max(b, 1):.3f}x)")
        return "\n".join(lines)


def _replacement(module: torch.nn.Module, activations: bool, norms: bool, gated: bool, gated_mode: str,
                 folded: bool = False):
    """The module to put in place of `module`, or (None, reason) / (None, None) when not ours.
    folded: the norm's affine goes into its consumers, so the new norm has none."""
    name = type(module).__name__
    if type(module).__module__.startswith("lowmem_ops"):
        return None, None  # already ours (convert() called twice)
    if gated and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        pick = _ACTIVATIONS.get(type(module.act_fn).__name__)
        op = pick(module.act_fn) if pick else None
        if op in _GATED_OPS:
            return GatedMLP.from_mlp(module, act=op, mode=gated_mode), None
        return None, f"gated MLP with activation {type(module.act_fn).__name__}, which has no fused kernel"
    if activations and name in _ACTIVATIONS:
        op = _ACTIVATIONS[name](module)
        if op is None:
            return None, f"{name} with these arguments has no built-in approximation"
        return Approx(op), None
    if norms and isinstance(module, torch.nn.LayerNorm):
        affine = "inverse" if module.elementwise_affine and not folded else "none"
        new = MSLayerNorm(module.normalized_shape, eps=module.eps, affine=affine, bias=module.bias is not None)
        return (new if folded else _adopt(new, module)), None
    if norms and (isinstance(module, torch.nn.RMSNorm) or name.endswith("RMSNorm")):
        weight = getattr(module, "weight", None)
        eps = getattr(module, "eps", None) if isinstance(module, torch.nn.RMSNorm) else getattr(module, "variance_epsilon", None)
        if weight is None or eps is None or "Gemma" in name:  # Gemma scales by (1 + weight)
            return None, f"{name}: unknown parameterisation"
        new = MSRMSNorm(tuple(weight.shape), eps=eps, affine="none" if folded else "inverse")
        return (new if folded else _adopt(new, module)), None
    return None, None


def _adopt(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give `new` the very Parameter objects of `old` (optimizer state, PEFT, tied weights survive)."""
    for pname in ("weight", "bias"):
        p = getattr(old, pname, None)
        if isinstance(p, torch.nn.Parameter):
            setattr(new, pname, p)
    return new


def _tolerance(outputs) -> float:
    dtypes = {t.dtype for t in _tensors(outputs)}
    return 5e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-3


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _run(model, inputs):
    """One deterministic forward: eval mode (no dropout), no grad; training flags restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for m, training in modes.items():
            m.train(training)


def _difference(a, b) -> float:
    diffs = [((x.float() - y.float()).abs() / (1 + y.float().abs())).max().item()
             for x, y in zip(_tensors(a), _tensors(b)) if x.is_floating_point() and x.numel()]
    return max(diffs, default=0.0)


def _align_lora_dtypes(model: torch.nn.Module, report: Report) -> None:
    """PEFT keeps LoRA adapters in float32 by default and casts the input for each adapter: three
    float32 copies of one bf16 activation for q, k and v, none of them shared with the norm before.
    Put each adapter in its base layer's dtype, so nothing is cast."""
    for path, module in model.named_modules():
        lora_a, base = getattr(module, "lora_A", None), getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or weight is None or not weight.is_floating_point():
            continue
        adapters = [m for name in ("lora_A", "lora_B") for m in getattr(module, name).values()]
        dtypes = {p.dtype for m in adapters for p in m.parameters()}
        if dtypes and dtypes != {weight.dtype}:
            for m in adapters:
                m.to(weight.dtype)
            before = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            report.changes.append(Change(path, f"LoRA adapters in {before}", f"in {str(weight.dtype).removeprefix('torch.')}"))


def convert(model: torch.nn.Module, example_inputs=None, *, activations: bool = True, norms: bool = True,
            gated: bool = True, gated_mode: str = "auto", fold: bool = True, lora_dtype: bool = True,
            measure_memory: bool = True) -> Report:
    """Swap, in place, what stores less; verify on example_inputs (a tensor, tuple or dict of kwargs).

    fold: fold a norm's gamma/beta into its consumers when, on the example inputs, every consumer is a
    plain nn.Linear or GPT-2 Conv1D (untied weight; a bias wherever beta is non-zero) and the output
    is not returned; other norms use inverse mode.
    lora_dtype: put PEFT LoRA adapters in their base layer's dtype (they then train in that dtype;
    keep float32 master weights in the optimizer if you need them, or pass False)."""
    if gated_mode not in MODES:
        raise ValueError(f"lowmem_ops.convert: gated_mode must be one of {', '.join(MODES)}, got {gated_mode!r}")
    report = Report()
    reference = _run(model, example_inputs) if example_inputs is not None else None
    if example_inputs is not None and measure_memory:
        report.memory_before = _measure(model, example_inputs, "before")
    if lora_dtype:
        _align_lora_dtypes(model, report)

    consumers = _observe_norm_consumers(model, example_inputs) if norms and fold and example_inputs is not None else {}
    planned: list[_Swap] = []
    claimed: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue  # inside a module we already replace (a gated MLP's projections)
        targets = _fold_targets(model, module, consumers.get(path))
        new, why = _replacement(module, activations, norms, gated, gated_mode, folded=bool(targets))
        if new is None:
            if why:
                report.skipped.append((path, why))
            continue
        if not path:
            report.skipped.append(("(model)", "the model itself is one of ours to swap: convert a model that holds it"))
            continue
        parent_path, _, attr = path.rpartition(".")
        after = type(new).__name__ + (f" (affine folded into {', '.join(p for p, _ in targets)})" if targets else "")
        planned.append(_Swap(model.get_submodule(parent_path), attr, module, new,
                             Change(path, type(module).__name__, after), targets or []))
        claimed.add(path)
    originals, folded = _originals(model), _folded(model)
    for swap in planned:
        swap.apply()
        originals[swap.change.path] = swap.old  # for lowmem_ops.export; it shares the very Parameters
        if swap.folds:
            folded.add(swap.change.path)
        report.changes.append(swap.change)

    if reference is not None and planned:
        tol = report.tolerance = _tolerance(reference)
        diff = _difference(_run(model, example_inputs), reference)
        if diff > tol:  # find the culprits: keep each change only if the model still agrees with it
            for swap in reversed(planned):
                swap.undo()
            for swap in planned:
                swap.apply()
                one = _difference(_run(model, example_inputs), reference)
                if one > tol:
                    swap.undo()
                    originals.pop(swap.change.path)
                    folded.discard(swap.change.path)
                    swap.change.status, swap.change.reason = "undone", f"outputs moved by {one:.3g} > {tol:.3g}"
            diff = _difference(_run(model, example_inputs), reference)
        report.max_difference = diff
    if example_inputs is not None and measure_memory:
        report.memory_after = _measure(model, example_inputs, "after")
    return report


def _measure(model, inputs, label):
    if isinstance(inputs, dict):
        return memory.measure(model, label=label, **inputs)
    return memory.measure(model, *(inputs if isinstance(inputs, tuple) else (inputs,)), label=label)


@dataclass
class _Swap:
    """One planned change, which can be applied and undone (module swap, plus folded weights)."""

    parent: torch.nn.Module
    attr: str
    old: torch.nn.Module
    new: torch.nn.Module
    change: Change
    folds: list  # (path, nn.Linear) consumers the old norm's affine goes into
    _saved: list = field(default_factory=list)

    def apply(self) -> None:
        setattr(self.parent, self.attr, self.new)
        gamma = getattr(self.old, "weight", None)
        beta = getattr(self.old, "bias", None)
        self._saved = []
        with torch.no_grad():
            for _, linear in self.folds:
                w, b = linear.weight, linear.bias
                self._saved.append((w.detach().clone(), None if b is None else b.detach().clone()))
                # nn.Linear's weight is (out, in); GPT-2's Conv1D keeps it transposed, (in, out)
                w32 = w.float() if type(linear) is torch.nn.Linear else w.float().t()
                if beta is not None and b is not None:  # b' = b + W beta, with W before scaling
                    b.copy_((b.float() + w32 @ beta.float().reshape(-1)).to(b.dtype))
                scaled = w32 * gamma.float().reshape(1, -1)  # W' = W diag(gamma)
                w.copy_((scaled if type(linear) is torch.nn.Linear else scaled.t()).to(w.dtype))

    def undo(self) -> None:
        setattr(self.parent, self.attr, self.old)
        with torch.no_grad():
            for (_, linear), (w, b) in zip(self.folds, self._saved):
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
        self._saved = []


class _UseRecorder(torch.overrides.TorchFunctionMode):
    """Records every torch function that takes one of the watched tensors, and the module running."""

    def __init__(self, watched: dict, stack: list, uses: dict):
        super().__init__()
        self.watched, self.stack, self.uses = watched, stack, uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched:
                self.uses[self.watched[id(leaf)]].append((getattr(func, "__name__", str(func)), self.stack[-1]))
        return func(*args, **kwargs)


def _observe_norm_consumers(model: torch.nn.Module, inputs) -> dict[str, list | None]:
    """norm path -> [(function, module path)] of every use of its output on these inputs; None for a
    norm whose output is also returned by the model (folding would change the output)."""
    norms = {p: m for p, m in model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(m).__name__.endswith("RMSNorm")}
    watched: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps outputs alive, so their ids are not reused
    uses: dict[str, list] = {p: [] for p in norms}
    stack = [""]
    handles = memory.track_modules(model, stack)
    for path, module in norms.items():
        def grab(m, a, out, path=path):
            if isinstance(out, torch.Tensor):
                watched[id(out)] = path
                keep.append(out)
        handles.append(module.register_forward_hook(grab))
    try:
        with _UseRecorder(watched, stack, uses):
            out = _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    returned = {watched[id(t)] for t in _tensors(out) if id(t) in watched}
    return {p: (None if p in returned else u) for p, u in uses.items()}


def _fold_targets(model: torch.nn.Module, norm: torch.nn.Module, uses) -> list:
    """The nn.Linear consumers to fold `norm`'s affine into, or [] when folding is not safe."""
    gamma = getattr(norm, "weight", None)
    if not uses or not isinstance(gamma, torch.nn.Parameter):
        return []
    beta = getattr(norm, "bias", None)
    tied = _tied_parameters(model)
    targets = {}
    for func, path in uses:
        if func in _METADATA:
            continue
        module = model.get_submodule(path) if path else model
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        linear = func == "linear" and type(module) is torch.nn.Linear
        conv1d = func == "view" and type(module).__name__ == "Conv1D"  # GPT-2's: x.view(-1, nx) @ W + b
        if not (linear or conv1d) or hasattr(parent, "lora_A"):
            return []  # a non-linear use (residual, dropout, reshape), or a LoRA layer's adapters
        if id(module.weight) in tied or (beta is not None and module.bias is None and bool(beta.detach().ne(0).any())):
            return []
        targets[path] = module
    return sorted(targets.items())


# Uses that read only a tensor's metadata (x.shape, x.size(), ...), never its values.
_METADATA = {"__get__", "size", "dim", "numel", "ndimension", "stride", "is_contiguous", "element_size"}


def _tied_parameters(model: torch.nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


_ORIGINALS = "_lowmem_ops_originals"
_FOLDED = "_lowmem_ops_folded"


def _folded(model: torch.nn.Module) -> set:
    if not hasattr(model, _FOLDED):
        object.__setattr__(model, _FOLDED, set())
    return getattr(model, _FOLDED)


def _originals(model: torch.nn.Module) -> dict:
    if not hasattr(model, _ORIGINALS):
        # A plain attribute, not a submodule: it must not add keys to state_dict or parameters().
        object.__setattr__(model, _ORIGINALS, {})
    return getattr(model, _ORIGINALS)


_STOCK_ACTIVATIONS = {
    "regelu": lambda: torch.nn.GELU(), "resilu": lambda: torch.nn.SiLU(),
    "tanh_gelu": lambda: torch.nn.GELU(approximate="tanh"), "mish": lambda: torch.nn.Mish(),
    "softplus": lambda: torch.nn.Softplus(), "elu": lambda: torch.nn.ELU(),
}


def export(model: torch.nn.Module) -> torch.nn.Module:
    """Put standard modules back, in place, and return the model: what convert() swapped gets its
    original module again (which holds the same, trained, Parameters; a norm whose affine was folded
    gets gamma = 1, beta = 0, the folded linear weights stay); ops built by hand become their torch
    equivalents. state_dict / save_pretrained then load into the stock architecture."""
    originals, folded = _originals(model), _folded(model)
    for path in sorted(originals, key=len, reverse=True):
        parent_path, _, attr = path.rpartition(".")
        original = originals.pop(path)
        if path in folded:  # its affine lives in the linear layers now: identity here
            folded.discard(path)
            with torch.no_grad():
                original.weight.fill_(1.0)
                if getattr(original, "bias", None) is not None:
                    original.bias.zero_()
        setattr(model.get_submodule(parent_path), attr, original)
    for path, module in list(model.named_modules()):
        if not path:
            continue
        stock = _stock(module)
        if stock is not None:
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, stock)
    return model


def _stock(module: torch.nn.Module):
    if isinstance(module, MSLayerNorm):
        if module.affine == "plain":
            return None
        new = torch.nn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                                 bias=module.bias is not None)
        return _adopt(new, module)
    if isinstance(module, MSRMSNorm):
        new = torch.nn.RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine)
        return _adopt(new, module)
    if isinstance(module, Approx):
        family = module.op_name.rstrip("0123456789")
        return _STOCK_ACTIVATIONS[family]() if family in _STOCK_ACTIVATIONS else None
    return None
