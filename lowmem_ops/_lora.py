"""PEFT LoRA adapters that compute in their base layer's dtype while their Parameters stay float32.

PEFT keeps adapters in float32 and casts each adapter's input to float32 first: on a bf16 model, a
float32 copy of the activation, saved for backward, for each of q, k and v, shared with nothing. Putting
the adapters in bf16 removes the copies but makes them train in bf16, where an AdamW step under half
an ulp of the weight is rounded away (measured on tiny models: a step changed 20 % of lora_A's
elements instead of 100 %; at fan-in 4096 and lr 2e-5, half of them).

So convert turns PEFT's input cast off (`cast_input_dtype_enabled`, PEFT's own switch) and gives the
layer adapters that cast their weights to the input's dtype instead (same Parameter objects, same
state_dict keys), held in an AdapterDict, so that an adapter PEFT adds later (add_adapter,
load_adapter) is made one too. The optimizer updates float32 weights; what a linear adapter saves
for backward is its input, which is the base layer's input, and its float32 weight, a Parameter. A
conv adapter saves the cast copy of its weight (r x C x k x k elements), its input the same."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _hooks


class _LinearInInputDtype(torch.autograd.Function):
    """F.linear(x, weight, bias) computed in x's dtype; saves x and the weight itself (not its cast
    copy, which plain autograd would keep for the input's gradient). Gradients come back in the
    Parameters' dtype, computed in x's (as autograd through weight.to(x.dtype) gives them). The backward
    is made of differentiable ops, so a second derivative works (and once_differentiable's wrapper cost
    11 us of a 84 us call, forward and backward, on the 2-core CI machine)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t().matmul(x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def _plain(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's own forward does it: same dtype, or autocast picks the dtype for both."""
    return x.dtype == weight.dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type)


class AdapterLinear(torch.nn.Linear):
    """nn.Linear computing in its input's dtype; its Parameters keep their own (float32 master weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain(x, self.weight):
            return super().forward(x)
        return _LinearInInputDtype.apply(x, self.weight, self.bias)


class _ConvInInputDtype:
    def _conv_forward(self, x, weight, bias):
        if not _plain(x, weight):
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return super()._conv_forward(x, weight, bias)


class AdapterConv1d(_ConvInInputDtype, torch.nn.Conv1d):
    """nn.Conv1d computing in its input's dtype; its Parameters keep their own."""


class AdapterConv2d(_ConvInInputDtype, torch.nn.Conv2d):
    """nn.Conv2d computing in its input's dtype; its Parameters keep their own."""


class AdapterConv3d(_ConvInInputDtype, torch.nn.Conv3d):
    """nn.Conv3d computing in its input's dtype; its Parameters keep their own."""


_IN_INPUT_DTYPE = {torch.nn.Linear: AdapterLinear, torch.nn.Conv1d: AdapterConv1d, torch.nn.Conv2d: AdapterConv2d,
                   torch.nn.Conv3d: AdapterConv3d}


_PLAIN = {twin: plain for plain, twin in _IN_INPUT_DTYPE.items()}


def in_input_dtype(adapter: torch.nn.Module) -> torch.nn.Module | None:
    """The adapter as one computing in its input's dtype (the same Parameters, buffers, hooks and
    flags; registries of its own), or None for a type with no such twin (exact types only: a subclass
    may compute otherwise)."""
    twin = _IN_INPUT_DTYPE.get(type(adapter))
    return None if twin is None else _as(twin, adapter)


def plain(adapter: torch.nn.Module) -> torch.nn.Module:
    """The torch module an adapter computing in its input's dtype came from (the same Parameters and
    hooks); any other module as it is."""
    cls = _PLAIN.get(type(adapter))
    return adapter if cls is None else _as(cls, adapter)


def _as(cls: type, module: torch.nn.Module) -> torch.nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        new.__dict__[registry] = dict(module.__dict__[registry])
    return new


class AdapterDict(torch.nn.ModuleDict):
    """A converted LoRA layer's lora_A / lora_B. PEFT no longer casts that layer's input, so every
    adapter in it must compute in the input's dtype: one put in later (PEFT's add_adapter,
    load_adapter) is made so as it is put in, and one that cannot be is refused here, with what to
    do, instead of failing in its first forward on a dtype mismatch."""

    def __init__(self, layer_name: str, adapters: dict):
        super().__init__()
        self.layer_name = layer_name
        for key, adapter in adapters.items():
            self.add_module(key, adapter)

    def __setitem__(self, key: str, module: torch.nn.Module) -> None:
        twin = module if type(module) in _PLAIN else in_input_dtype(module)
        if twin is None:
            raise TypeError(f"lowmem_ops: {self.layer_name} was converted (PEFT's float32 cast of its input is off), "
                            f"and a {type(module).__name__} adapter {key!r} cannot compute in its input's dtype: call "
                            "lowmem_ops.export(model) before adding it, then lowmem_ops.convert(model) again")
        super().__setitem__(key, twin)

    def stock(self) -> torch.nn.ModuleDict:
        """A plain ModuleDict of PEFT's own adapter types (for lowmem_ops.export)."""
        return torch.nn.ModuleDict({key: plain(adapter) for key, adapter in self.items()})


def param_wrapper(layer: torch.nn.Module) -> bool:
    """PEFT's ParamWrapper: LoRA on a bare Parameter of its base layer (target_parameters)."""
    return callable(getattr(layer, "get_param", None)) and hasattr(layer, "parameter_name")


def left_alone(lora_layer: torch.nn.Module) -> str | None:
    """Why this LoRA layer's adapters (of another dtype than its input) are left as they are, or None
    where PEFT casts the input to them with its switch to stop it (PEFT 0.15 on)."""
    if param_wrapper(lora_layer):
        # ParamWrapper (MoE experts' fused weights, routers): no input cast to remove
        return ("LoRA adapters on a bare parameter left in their dtype: PEFT casts them to the parameter's for "
                "its weight delta each forward and those copies are saved (the adapters' size, whatever the "
                "batch); in the parameter's dtype they would not be, but AdamW would round away small steps")
    if not isinstance(getattr(lora_layer, "cast_input_dtype_enabled", None), bool):
        return ("PEFT casts this layer's input to its adapters' dtype with no switch to stop it (PEFT 0.15 has "
                "one): left as it is")
    return None


def give_back(model: torch.nn.Module) -> None:
    """PEFT's own adapters (plain ModuleDicts of its types, the same Parameters and hooks) and its input
    cast, on every LoRA layer convert changed: those holding an AdapterDict (for lowmem_ops.export)."""
    for layer in model.modules():
        changed = False
        for name in ("lora_A", "lora_B"):
            adapters = layer._modules.get(name)
            if isinstance(adapters, AdapterDict):
                stock = adapters.stock()
                _hooks.carry(adapters, stock)
                setattr(layer, name, stock)
                changed = True
        if changed:
            layer.cast_input_dtype_enabled = True
