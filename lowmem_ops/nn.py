"""nn.Module wrappers: drop-ins for torch.nn.GELU / SiLU / LayerNorm / RMSNorm, and any built op by name."""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES
from ._tree import get_op
from .activations import approx_activation
from .add_norm import add_ms_layernorm, add_ms_rmsnorm
from .dropout import Dropout, check_p
from .gated import MODES, gated, gated_halves, gated_op
from .norms import AFFINE_MODES, ms_layernorm, ms_rmsnorm


class Approx(torch.nn.Module):
    """Any approximate activation built into a loaded kernel tree, by name (lowmem_ops.available())."""

    def __init__(self, name: str):
        super().__init__()
        self.op_name = get_op(name).name  # fails early, naming the ops that exist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_activation(x, self.op_name)

    def extra_repr(self) -> str:
        op = get_op(self.op_name)
        return f"{op.name!r}, bits={op.bits}"


class ReGELU2(Approx):
    """Drop-in for torch.nn.GELU() (erf form): same forward, 2-bit derivative in backward."""

    def __init__(self, approximate: str = "none"):
        if approximate != "none":
            raise ValueError(f"ReGELU2 approximates the erf GELU (approximate='none'), got approximate={approximate!r}")
        super().__init__("regelu2")


class ReSiLU2(Approx):
    """Drop-in for torch.nn.SiLU(): same forward, 2-bit derivative in backward.

    `inplace` is accepted for signature compatibility; the output is always a new tensor. That costs
    nothing in saved memory: only the 2-bit codes are kept, so the input can be freed anyway.
    """

    def __init__(self, inplace: bool = False):
        super().__init__("resilu2")
        self.inplace = inplace


class _MSNorm(torch.nn.Module):
    """Shared by MSLayerNorm and MSRMSNorm: parameters and state_dict as torch's own modules."""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, affine, device, dtype,
                 weight_offset=0.0, channels_first=False, out_dtype=None):
        super().__init__()
        # weight_offset: the scale is weight + offset (Gemma's RMSNorm: 1 + weight, weight starting at 0).
        # channels_first: normalise dim 1 of an (N, C, ...) input (ConvNeXt's LayerNorm), not the last.
        # out_dtype: the output's (and so the saved tensor's) dtype, None for the input's (T5LayerNorm
        # returns its bf16 weight's dtype for the float32 residual stream of a bf16 T5 whose `wo` is float32).
        self.weight_offset, self.channels_first = float(weight_offset), bool(channels_first)
        if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: out_dtype must be a floating dtype or None, got {out_dtype!r}")
        self.out_dtype = out_dtype
        if self.channels_first and len((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape) != 1:
            raise ValueError(f"{type(self).__name__}: channels_first normalises one dimension (dim 1); "
                             f"normalized_shape must have one element, got {normalized_shape!r}")
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.affine = affine if affine is not None else ("inverse" if elementwise_affine else "none")
        if self.affine not in AFFINE_MODES:
            raise ValueError(f"{type(self).__name__}: affine must be one of {', '.join(AFFINE_MODES)}, got {self.affine!r}")
        self.elementwise_affine = self.affine != "none"
        factory = {"device": device, "dtype": dtype}
        if self.elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        extra = f", weight_offset={self.weight_offset:g}" if self.weight_offset else ""
        extra += ", channels_first=True" if self.channels_first else ""
        extra += f", out_dtype={self.out_dtype}" if self.out_dtype is not None else ""
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.affine!r}{extra}"

    def _scale(self):
        """The weight the norm multiplies by: weight + weight_offset (autograd reaches weight through it)."""
        if self.weight is None or not self.weight_offset:
            return self.weight
        return self.weight + self.weight_offset

    _fold_guard = None  # set by convert on a norm whose affine it folded (lowmem_ops._folding.ConsumersInPlace)

    def _normalise(self, x: torch.Tensor, norm) -> torch.Tensor:
        """norm(x) over the last dimension, or over dim 1 when channels_first: the norm runs on the
        channels-last view and the result is returned as a view of that same output (no copy), so the
        tensor the next layer receives and saves is the one the norm saved."""
        if self._fold_guard is not None:
            self._fold_guard()
        if not self.channels_first:
            return norm(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: channels_first needs an (N, C, ...) input, got shape {list(x.shape)}")
        return norm(x.movedim(1, -1)).movedim(-1, 1)


class MSLayerNorm(_MSNorm):
    """Drop-in for torch.nn.LayerNorm that saves its output, shared with the next linear layer.

    affine: 'inverse' (default with elementwise_affine) keeps gamma/beta trainable and inverts them in
    backward; 'none' has no parameters (fold them into the next linear); 'plain' is torch's LayerNorm.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 affine: str | None = None, device=None, dtype=None, weight_offset: float = 0.0,
                 channels_first: bool = False, out_dtype: torch.dtype | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, affine, device, dtype, weight_offset,
                         channels_first, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(x, lambda v: ms_layernorm(v, self.normalized_shape, self._scale(), self.bias, self.eps,
                                                         self.out_dtype,
                                                         affine="plain" if self.affine == "plain" else "inverse"))


class MSRMSNorm(_MSNorm):
    """Drop-in for torch.nn.RMSNorm that saves its output (see MSLayerNorm). eps=None: finfo(dtype).eps."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 affine: str | None = None, device=None, dtype=None, weight_offset: float = 0.0,
                 channels_first: bool = False, out_dtype: torch.dtype | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, False, affine, device, dtype, weight_offset,
                         channels_first, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(x, lambda v: ms_rmsnorm(v, self.normalized_shape, self._scale(), self.eps, self.out_dtype,
                                                       affine="plain" if self.affine == "plain" else "inverse"))


def _one_dim(module) -> None:
    if len(module.normalized_shape) != 1:
        raise ValueError(f"{type(module).__name__} normalises the last dimension: normalized_shape must have one "
                         f"element, got {module.normalized_shape}")


class AddMSLayerNorm(MSLayerNorm):
    """dropout + residual add + MSLayerNorm in one op: forward(x, residual) -> (y, new_residual) with
    new_residual = dropout(x, p) + residual and y = LayerNorm(new_residual) (lowmem_ops.add_norm).
    Parameters and state_dict as nn.LayerNorm; the dropout follows the module's training flag."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, p: float = 0.0, elementwise_affine: bool = True,
                 bias: bool = True, affine: str | None = None, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, affine, device, dtype)
        self.p = check_p(p, "nn.AddMSLayerNorm")
        _one_dim(self)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_ms_layernorm(x, residual, self.weight, self.bias, self.eps, self.p, self.training,
                                affine="plain" if self.affine == "plain" else "inverse")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class AddMSRMSNorm(MSRMSNorm):
    """dropout + residual add + MSRMSNorm (see AddMSLayerNorm). eps=None: finfo(dtype).eps."""

    def __init__(self, normalized_shape: int, eps: float | None = None, p: float = 0.0,
                 elementwise_affine: bool = True, affine: str | None = None, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, affine, device, dtype)
        self.p = check_p(p, "nn.AddMSRMSNorm")
        _one_dim(self)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_ms_rmsnorm(x, residual, self.weight, self.eps, self.p, self.training,
                              affine="plain" if self.affine == "plain" else "inverse")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class GatedActivation(torch.nn.Module):
    """act(gate) * up as one fused op: forward(gate, up). name: resilu2 (SwiGLU), regelu2 or
    tanh_gelu2 (GeGLU); mode: auto | exact | approx (see lowmem_ops.gated)."""

    def __init__(self, name: str = "resilu2", mode: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"GatedActivation: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.op_name, self.mode = gated_op(name).name, mode

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return gated(gate, up, self.op_name, self.mode)

    def extra_repr(self) -> str:
        return f"{self.op_name!r}, mode={self.mode!r}"


def _hold(owner: torch.nn.Module, roles: tuple, names: tuple, children: tuple) -> tuple:
    """Register a gated MLP's children under the original module's names (the last role, the
    dropout, optional: its name None without one); returns the names."""
    what = type(owner).__name__
    if (len(names) != len(roles) or not all(isinstance(n, str) for n in names[:-1]) or "act" in names
            or (children[-1] is None) != (names[-1] is None)):
        raise ValueError(f"{what}: names must be the ({', '.join(roles)}) attribute names, other than 'act' (the "
                         f"fused activation's), the dropout's None exactly when no dropout is given; got {names!r}")
    for name, child in zip(names, children):
        if name is not None:
            owner.add_module(name, child)
    return tuple(names)


def _in_dtype_of(down: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h in the floating dtype of down's weight, where that differs: T5 casts so into `wo`, which
    transformers keeps in float32 in a bf16 model (_keep_in_fp32_modules)."""
    w = getattr(down, "weight", None)
    return h.to(w.dtype) if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != h.dtype else h


class GatedMLP(torch.nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), the MLP of LLaMA / Qwen2 / Mistral / Gemma, with the
    gated activation fused. Keeps the given projection modules, so PEFT adapters on them and
    state_dict keys stay as they were: under the names gate_proj / up_proj / down_proj, or those
    `names` gives, (gate, up, down, dropout or None). dropout: a module applied to the product before
    down_proj (T5 v1.1 / FLAN-T5's gated feed-forward: wi_0, wi_1, wo, dropout)."""

    def __init__(self, gate_proj, up_proj, down_proj, act: str = "resilu2", mode: str = "auto", *,
                 dropout: torch.nn.Module | None = None, names: tuple = ("gate_proj", "up_proj", "down_proj", None)):
        super().__init__()
        self.names = _hold(self, ("gate", "up", "down", "dropout"), names, (gate_proj, up_proj, down_proj, dropout))
        self.act = GatedActivation(act, mode)

    @classmethod
    def from_mlp(cls, mlp: torch.nn.Module, act: str = "resilu2", mode: str = "auto") -> "GatedMLP":
        """From any module with gate_proj, up_proj and down_proj (e.g. transformers' LlamaMLP)."""
        missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"GatedMLP.from_mlp: {type(mlp).__name__} has no {', '.join(missing)}")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down, drop = (getattr(self, n) if n is not None else None for n in self.names)
        h = self.act(gate(x), up(x))
        return down(_in_dtype_of(down, drop(h) if drop is not None else h))

    def extra_repr(self) -> str:
        gate, up, down, drop = self.names
        inner = f"act({gate}(x)) * {up}(x)"
        return f"{down}({f'{drop}({inner})' if drop else inner}), fused"


class FusedGatedMLP(torch.nn.Module):
    """down(dropout(act(a) * b)) with a, b = proj(x).chunk(2, -1): a gated MLP with one projection for
    both halves (Phi-3's gate_up_proj / down_proj, ModernBERT's Wi / drop / Wo), the gated activation
    fused. torch keeps proj's output and act(a); this keeps proj's output only (its two halves, one
    storage), exactly. The children stay under the names given (proj, down, dropout or None), so PEFT
    adapters and state_dict keys are those of the original module.

    act_half: which half goes through the activation (0: the first, as in Phi-3; 1: the second, as
    in Moonshine's decoder). mode: as GatedActivation's; "auto" is "exact" here, since the two halves
    always share one requires_grad (approx would keep the storage through `b`, and h(a) and the codes
    besides)."""

    def __init__(self, names: tuple, proj: torch.nn.Module, down: torch.nn.Module, dropout: torch.nn.Module | None = None,
                 act: str = "resilu2", mode: str = "auto", act_half: int = 0):
        super().__init__()
        if act_half not in (0, 1):
            raise ValueError(f"FusedGatedMLP: act_half must be 0 or 1 (the half of proj's output the activation "
                             f"takes), got {act_half!r}")
        self.names, self.act_half = _hold(self, ("proj", "down", "dropout"), names, (proj, down, dropout)), act_half
        self.act = GatedActivation(act, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj, down, drop = (getattr(self, n) if n is not None else None for n in self.names)
        h = gated_halves(proj(x), self.act.op_name, self.act.mode, self.act_half)
        return down(_in_dtype_of(down, drop(h) if drop is not None else h))

    def extra_repr(self) -> str:
        proj, down, drop = self.names
        inner = f"act(a) * b for {'a, b' if self.act_half == 0 else 'b, a'} = {proj}(x).chunk(2)"
        return f"{down}({f'{drop}({inner})' if drop else inner}), fused"


__all__ = ["Approx", "ReGELU2", "ReSiLU2", "MSLayerNorm", "MSRMSNorm", "GatedActivation", "GatedMLP", "FusedGatedMLP",
           "Dropout", "AddMSLayerNorm", "AddMSRMSNorm"]
