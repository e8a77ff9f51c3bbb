"""Attention-probability dropout that keeps no mask, for Hugging Face attention modules on sdpa.

Hugging Face's "sdpa" attention calls torch.nn.functional.scaled_dot_product_attention(...,
dropout_p=p). On CUDA, torch's flash and memory-efficient kernels draw that dropout from a Philox
seed and offset and keep no mask: nothing to gain there, and those calls are left to torch. Elsewhere
(CPU) torch runs its math path, whose dropout saves a mask of the probabilities' size (a float per
element on CPU). `regenerated_sdpa` is the "sdpa" attention function with only that case changed:
while it runs, a scoped TorchFunctionMode computes each scaled_dot_product_attention call with
dropout_p > 0 on a non-CUDA tensor as softmax(q k^T * scale + mask) followed by lowmem_ops.dropout
(whose mask is regenerated in backward from its seed) and @ v. Every other call, eval mode
included, is torch's own scaled_dot_product_attention, unchanged.

convert gives an attention module (the innermost module that ran scaled_dot_product_attention on
the example inputs) this function by giving it its own copy of the model's config with
`_attn_implementation = "lowmem_sdpa"` (registered in transformers' AttentionInterface); the model's
config, and so save_pretrained, keeps "sdpa", and lowmem_ops.export puts the original module back.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .dropout import dropout

NAME = "lowmem_sdpa"


def sdpa_with_regenerated_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False):
    """scaled_dot_product_attention's definition (torch's documented reference computation), with the
    probabilities' dropout done by lowmem_ops.dropout."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    return dropout(probs, dropout_p) @ value


class _RegenerateDropout(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            query = args[0] if args else kwargs["query"]
            if p > 0.0 and query.device.type != "cuda":
                return sdpa_with_regenerated_dropout(*args, **kwargs)
        return func(*args, **kwargs)


def regenerated_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention function, its dropout's mask regenerated off CUDA (module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if not module.training or query.device.type == "cuda":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with _RegenerateDropout():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, regenerated_sdpa)


def candidate(module: torch.nn.Module) -> bool:
    """Whether `module`, seen by convert to be the innermost module running scaled_dot_product_attention
    on the example inputs, can take regenerated_sdpa: a Hugging Face module holding the model's config
    on "sdpa" and an nn.Dropout child with p > 0 (what HF passes as `dropout=self.dropout.p`). That
    its forward dispatches through the config is shown by convert's memory measurement: a module this
    does not change saves no memory and is undone."""
    config = getattr(module, "config", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa" and type(module).__module__.startswith("transformers")
            and any(type(c) is torch.nn.Dropout and c.p > 0 for c in module.children()))


def with_regenerated_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` (the same Parameters, children and state_dict keys) whose own config
    copy selects regenerated_sdpa."""
    _register()
    new = copy.copy(module)
    config = copy.copy(module.config)
    config._attn_implementation_internal = NAME  # this copy only: the setter would reach shared sub-configs
    new.config = config
    return new


__all__ = ["sdpa_with_regenerated_dropout", "regenerated_sdpa", "candidate", "with_regenerated_dropout"]
