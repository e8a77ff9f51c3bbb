"""A norm's affine folded into the linear layers that read its output, and state_dict kept in the
stock form across the fold (used by lowmem_ops.convert / export).

A folded norm has no gamma/beta of its own: W' = W diag(gamma), b' = b + W beta live in its
consumers. So that checkpoints move between a converted model and the stock architecture:
- the converted model's state_dict is the stock one: each folded norm is written with gamma = 1,
  beta = 0 (exactly what lowmem_ops.export leaves), the linear layers with their folded weights;
- loading a state_dict that holds a folded norm's gamma/beta folds them, on the way in, into that
  state_dict's weights of the consumers (a stock checkpoint loads right, strict or not); a norm key
  given without its consumers' keys is an error naming both, a norm key absent is a missing key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_FOLDED = "_lowmem_ops_folded"
_HOOKS = "_lowmem_ops_state_dict_hooks"


@dataclass
class Fold:
    norm: torch.nn.Module       # the norm in the model now, without affine
    original: torch.nn.Module   # the norm it replaced (its gamma/beta as they were at conversion)
    consumers: list             # the nn.Linear / Conv1D layers that hold gamma and beta now


class ConsumersInPlace:
    """Run by a folded norm at each forward (nn._MSNorm._normalise): the layers holding its gamma/beta
    must not have been wrapped in PEFT tuner layers since convert. An adapter added around one reads
    the norm's output without gamma/beta, so it trains for this model's folded weights and does not
    fit the stock model it is saved for (LLaMA, norm weights in [0.5, 1.5]: outputs 0.22 off on the
    stock base); an error then, before any step. homes: (parent, attribute, consumer, its path)."""

    def __init__(self, norm_path: str, homes: list):
        self.norm_path, self.homes = norm_path, homes

    def __call__(self) -> None:
        for parent, attr, consumer, path in self.homes:
            now = parent._modules.get(attr)
            if now is not consumer and now is not None and _peft_layer(now) and any(m is consumer for m in now.modules()):
                raise RuntimeError(
                    f"lowmem_ops: a PEFT adapter ({type(now).__name__}) was added around {path} after lo.convert "
                    f"folded the scale of {self.norm_path} into it: the adapter reads the norm's output without that "
                    "scale, so what it "
                    "learns would not fit the stock model it is saved for. Add the adapters before lo.convert (it "
                    "then also makes them compute in the model's dtype), or convert with fold=False.")


def _peft_layer(module: torch.nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, DoRA, IA3, LoHa, OFT, ...): each one changes what its base layer does
    with its input, so none fits the stock base once trained around a folded layer."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # such a layer exists only once PEFT is imported
    base = getattr(tuners, "BaseTunerLayer", None)
    return base is not None and isinstance(module, base)


def folded(model: torch.nn.Module) -> dict:
    """path of each folded norm (as converted) -> Fold; a plain attribute, not part of state_dict. The
    model's own: never the one of a model inside it that a wrapper's __getattr__ forwards to (a PeftModel
    around a converted model), whose paths are relative to that inner model."""
    if _FOLDED not in vars(model):
        object.__setattr__(model, _FOLDED, {})
    return vars(model)[_FOLDED]


def transposed(linear: torch.nn.Module) -> bool:
    """nn.Linear keeps W as (out, in); GPT-2's Conv1D keeps it as (in, out)."""
    return type(linear) is not torch.nn.Linear


def in_features(linear: torch.nn.Module) -> int:
    return linear.weight.shape[0 if transposed(linear) else 1]


def fold_affine(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor | None,
                is_transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W diag(gamma), b + W beta) for W in (out, in) layout (or (in, out) when is_transposed), computed
    in float32 and returned in the dtypes of weight and bias."""
    w = weight.detach().float()
    w = w.t() if is_transposed else w
    if gamma.numel() != w.shape[1] or (beta is not None and beta.numel() != w.shape[1]):
        raise ValueError(f"a norm over {gamma.numel()} elements cannot be folded into a linear layer that reads "
                         f"{w.shape[1]} features")
    gamma = gamma.detach().to(w.device).float().reshape(-1)
    new_bias = None
    if beta is not None:
        beta = beta.detach().to(w.device).float().reshape(-1)
        if bias is None and bool(beta.ne(0).any()):
            raise ValueError("a non-zero beta cannot be folded into a linear layer without a bias")
    if bias is not None:
        new_bias = bias.detach().float() + (w @ beta if beta is not None else 0.0)
        new_bias = new_bias.to(bias.dtype)
    scaled = w * gamma.reshape(1, -1)
    return (scaled.t() if is_transposed else scaled).to(weight.dtype), new_bias


def install_state_dict_hooks(model: torch.nn.Module) -> None:
    """Once per model: state_dict in the stock form, load_state_dict folding a stock norm's affine."""
    if vars(model).get(_HOOKS) is None:
        handles = (model.register_state_dict_post_hook(_write_identity_affine),
                   model.register_load_state_dict_pre_hook(_fold_on_load))
        object.__setattr__(model, _HOOKS, handles)


def remove_state_dict_hooks(model: torch.nn.Module) -> None:
    for handle in vars(model).get(_HOOKS) or ():
        handle.remove()
    if _HOOKS in vars(model):
        object.__delattr__(model, _HOOKS)


def _names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), path)
    return names


def _key(prefix: str, path: str, name: str) -> str:
    return f"{prefix}{path}.{name}" if path else f"{prefix}{name}"


def _affine_keys(prefix: str, path: str, original: torch.nn.Module) -> list[tuple[str, torch.Tensor, float]]:
    """(key, the original's parameter, its identity value) for gamma and, where it has one, beta."""
    keys = [(_key(prefix, path, "weight"), original.weight, 1.0)]
    if getattr(original, "bias", None) is not None:
        keys.append((_key(prefix, path, "bias"), original.bias, 0.0))
    return keys


def _write_identity_affine(model, state_dict, prefix, local_metadata) -> None:
    names = _names(model)
    for fold in folded(model).values():
        path = names.get(id(fold.norm))
        if path is None:
            continue  # no longer in this model
        device = fold.consumers[0].weight.device
        for key, param, identity in _affine_keys(prefix, path, fold.original):
            state_dict[key] = torch.full(param.shape, identity, dtype=param.dtype, device=device)


def _fold_on_load(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    names = _names(model)
    for fold in folded(model).values():
        path = names.get(id(fold.norm))
        if path is None:
            continue
        norm_keys = [key for key, _, _ in _affine_keys(prefix, path, fold.original)]
        given = [key for key in norm_keys if key in state_dict]
        if not given:
            missing_keys.extend(norm_keys)  # as the stock model would report them
            continue
        affine = [state_dict.pop(key) for key in given]  # popped: never reported as unexpected
        if len(given) < len(norm_keys):
            error_msgs.append(f"{', '.join(given)} without {', '.join(sorted(set(norm_keys) - set(given)))}: "
                              "this norm's gamma and beta are folded into linear layers and load together")
            continue
        targets, absent = [], []
        for consumer in fold.consumers:
            cpath = names.get(id(consumer))
            if cpath is None:
                absent.append(f"a {type(consumer).__name__} no longer in this model")
                continue
            wkey = _key(prefix, cpath, "weight")
            bkey = _key(prefix, cpath, "bias") if consumer.bias is not None else None
            absent += [k for k in (wkey, bkey) if k is not None and k not in state_dict]
            targets.append((consumer, wkey, bkey))
        if absent:
            error_msgs.append(f"{', '.join(given)}: in this converted model that norm's affine is folded into "
                              f"linear layers; load it together with {', '.join(absent)} (or load into the stock "
                              "model after lowmem_ops.export)")
            continue
        gamma, beta = affine[0], affine[1] if len(affine) > 1 else None
        try:
            new = [fold_affine(state_dict[wkey], state_dict.get(bkey), gamma, beta, transposed(consumer))
                   for consumer, wkey, bkey in targets]
        except ValueError as e:
            error_msgs.append(f"{', '.join(given)}: {e}")
            continue
        for (_, wkey, bkey), (w, b) in zip(targets, new):
            state_dict[wkey] = w
            if bkey is not None:
                state_dict[bkey] = b
