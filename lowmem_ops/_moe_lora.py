"""transformers 5's experts under PEFT's `target_parameters` LoRA: the grouped matmuls take the frozen
experts and the adapters' factors apart, so no merged expert stack is made or saved.

PEFT (0.17 on) puts a LoRA adapter on an experts module's 3-D Parameter (`gate_up_proj`, `down_proj`)
with a ParamWrapper. While the wrapper runs, a parametrization (`_LoraFactorsProxy`, for one adapter
on several experts) gives the module `W + scaling * lhs @ rhs` through one `baddbmm` in place of W:
a new tensor the size of the whole expert stack. The grouped matmul that reads it saves it for its
input's gradient, so every adapted layer keeps a second copy of its experts' weights until backward
(OLMoE-1B-7B: 0.75 GiB a layer in bf16; gpt-oss-20b: 1.5 GiB), whatever the batch, and backward
makes that stack's full-size gradient only to project it onto the two factors.

`grouped_forward` is transformers' grouped_mm experts forward with each such matmul computed as
LoRA computes a linear layer: `x @ W + scaling * (x @ lhs) @ rhs`, each product a grouped matmul.
Autograd then saves x (which the stock path saves too), the frozen W (a Parameter: no new storage),
the two factors and `x @ lhs` (pairs x rank), and backward makes no full-size gradient. It is the
same function; the rounding differs (in bf16 the stock path rounds the small delta into W, this one
keeps it apart, as PEFT does for nn.Linear). It runs only where it applies: the grouped_mm
implementation, no expert parallelism, PEFT's factor proxy on at least one weight; any other call is
the class's own forward, unchanged.
"""

from __future__ import annotations

import sys

import torch

_MOE = "transformers.integrations.moe"
_PROXY = "_LoraFactorsProxy"  # peft.tuners.lora.layer: W + scaling * lhs @ rhs as one baddbmm


def factors(module: torch.nn.Module, name: str):
    """(W, lhs, rhs, scaling) where PEFT's factor proxy alone parametrizes `module.<name>` now, else None
    (not parametrized, several adapters, or PEFT's merged-delta parametrization)."""
    parametrizations = getattr(module, "parametrizations", None)
    if not isinstance(parametrizations, torch.nn.ModuleDict) or name not in parametrizations:
        return None
    chain = parametrizations[name]
    if len(chain) != 1 or type(chain[0]).__name__ != _PROXY:
        return None
    proxy = chain[0]
    return chain.original, proxy.lhs, proxy.rhs, proxy.scaling


def _rank_operands(lhs: torch.Tensor, rhs: torch.Tensor, is_transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second), (experts, in, r) and (experts, r, out): x @ stack's delta = (x @ first) @ second.
    The proxy's delta lhs @ rhs is stored as W is, (experts, in, out) when is_transposed, else (experts,
    out, in). Contiguous, r zero-padded to 16 bytes: CUDA's grouped matmul needs aligned strides, and
    zero columns add exact zeros."""
    first, second = (lhs, rhs) if is_transposed else (rhs.mT, lhs.mT)
    pad = -first.shape[-1] % max(1, 16 // first.element_size())
    return (torch.nn.functional.pad(first, (0, pad)).contiguous(),
            torch.nn.functional.pad(second, (0, 0, 0, pad)).contiguous())


def _linear(module: torch.nn.Module, name: str, parts, x: torch.Tensor, offsets: torch.Tensor,
            expert_ids: torch.Tensor) -> torch.Tensor:
    """transformers' _grouped_linear of `module.<name>` (and its bias), with the adapter's delta as its
    own two grouped matmuls where PEFT's proxy is on it (parts: factors(module, name))."""
    moe = sys.modules[_MOE]
    bias = getattr(module, f"{name}_bias")[expert_ids] if module.has_bias else None
    if parts is None:
        return moe._grouped_linear(x, getattr(module, name), offsets, bias=bias, is_transposed=module.is_transposed)
    weight, lhs, rhs, scaling = parts
    first, second = _rank_operands(lhs, rhs, module.is_transposed)
    out = moe._grouped_linear(x, weight, offsets, is_transposed=module.is_transposed)
    out = out + scaling * moe._grouped_mm(moe._grouped_mm(x, first, offs=offsets), second, offs=offsets)
    if bias is not None:
        out = out + bias
    return out


def _factored_weights(module: torch.nn.Module) -> dict | None:
    """name -> factors(module, name) of its weights where grouped_forward computes this call of `module`
    (grouped_mm, no expert parallelism, PEFT's proxy on a weight), else None."""
    if (getattr(getattr(module, "config", None), "_experts_implementation", None) != "grouped_mm"
            or getattr(module, "_is_expert_parallel", True)):
        return None
    found = {name: factors(module, name) for name in ("gate_up_proj", "up_proj", "down_proj")}
    return found if any(parts is not None for parts in found.values()) else None


def applies(module: torch.nn.Module) -> bool:
    """Whether grouped_forward, not the class's forward, computes this call of `module`."""
    return _factored_weights(module) is not None


def grouped_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts' forward (module doc): transformers' grouped_mm_experts_forward, step by step, with
    factored matmuls where PEFT's proxy parametrizes a weight; the class's own forward otherwise."""
    found = None if args or kwargs else _factored_weights(module)
    if found is None:
        return type(module).forward(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    num_top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))  # (token, expert) pairs grouped by expert
    x = hidden_states[perm // num_top_k]
    weights = top_k_weights.reshape(-1)[perm]
    counted = expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int()  # as transformers
    offsets = torch.cumsum(torch.histc(counted, bins=module.num_experts, min=0, max=module.num_experts - 1),
                           dim=0, dtype=torch.int32)
    if module.has_gate:
        h = module._apply_gate(_linear(module, "gate_up_proj", found["gate_up_proj"], x, offsets, expert_ids))
    else:
        h = module.act_fn(_linear(module, "up_proj", found["up_proj"], x, offsets, expert_ids))
    out = _linear(module, "down_proj", found["down_proj"], h, offsets, expert_ids)
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    out = out * weights.unsqueeze(-1)
    unperm = torch.empty_like(perm)
    unperm[perm] = torch.arange(perm.size(0), device=perm.device)
    return out[unperm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


__all__ = ["applies", "factors", "grouped_forward"]
