"""bitsandbytes bases for planning: a model's linear layers swapped for bitsandbytes 4-bit / 8-bit ones,
on whatever device the model is (meta included: nothing is quantised or allocated).

    model = quantize_linears(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16)

What transformers' BitsAndBytesConfig does on loading, without the weights: every nn.Linear but the
skipped ones (the head) becomes bnb.nn.Linear4bit (or Linear8bitLt), and its weight is quantised by
bitsandbytes' own code (Params4bit._quantize / Int8Params._quantize). On meta tensors bitsandbytes'
registered shape functions run instead of its kernels, so the packed weight and every tensor of its
quant state have the layout a real quantisation gives them (tests/test_plan_quant.py checks it against
a model quantised on CPU): 4-bit, a uint8 tensor of n/2 bytes, per 64-block absmax (float32, or with
double quant uint8 plus a float32 absmax per 256 of them, a 256-entry code and an offset) and the
16-entry code; 8-bit, int8 weights and a float32 scale per output row.
"""

from __future__ import annotations

import torch

QUANTS = ("nf4", "fp4", "int8")


def quantize_linears(model: torch.nn.Module, quant: str, *, double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """model with every nn.Linear (but those whose qualified name ends with one of `skip`) replaced in
    place by a bitsandbytes layer holding the quantised weight (quant: "nf4" or "fp4", 4-bit with 64-blocks,
    double_quant quantising the absmax again; "int8", LLM.int8 with threshold 6, as transformers'
    default). The model is returned, in training mode as the layers were."""
    if quant not in QUANTS:
        raise ValueError(f"lowmem_ops.quantized: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("lowmem_ops.quantized: 4-bit / 8-bit bases need bitsandbytes (pip install bitsandbytes)") from e

    import bitsandbytes.functional

    # bitsandbytes caches its 8-bit code map (double quant) on the device of the first tensor it
    # quantises: made on meta here, it would break every real quantisation after in this process
    cached = dict(bitsandbytes.functional.name2qmap)
    try:
        return _swap(model, quant, double_quant, compute_dtype, skip, bnb)
    finally:
        bitsandbytes.functional.name2qmap.clear()
        bitsandbytes.functional.name2qmap.update(cached)


def _swap(model, quant, double_quant, compute_dtype, skip, bnb):
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and not name.endswith(tuple(skip))]
    if not targets:
        raise ValueError("lowmem_ops.quantized: the model has no nn.Linear to quantise (outside the skipped ones)")
    for name, linear in targets:
        device = linear.weight.device
        bias = linear.bias is not None
        if quant == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=6.0, device=device)
            weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                      compress_statistics=double_quant, quant_type=quant, device=device)
            weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double_quant,
                                       quant_type=quant, module=layer)
        layer.weight = weight._quantize(device)
        if bias:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        layer.train(linear.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model
