"""What every op shares: the dtypes it takes, the dtype it computes in, which backend runs it, and which
strided views the kernels read in place (row_stride)."""

from __future__ import annotations

import os
import warnings

import torch

from . import _tree

BACKENDS = ("auto", "torch", "cpp", "triton", "triton-interpret")
# ROCm builds of torch name AMD GPUs "cuda" too: such a GPU runs the kernels of its own gfx folder
# only (never an sm folder's); where its tree has none, ops take the torch path.
_warned_rocm: set = set()
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_tensor(x, where: str, what: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lowmem_ops.{where}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowmem_ops.{where}: {what} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def backend(t: torch.Tensor, has_cpp: bool = False, tree=None) -> str:
    """'torch', 'cpp', 'triton' or 'triton-interpret' for this tensor, per LOWMEM_OPS_BACKEND (read per
    call). has_cpp: the op has C++ CPU kernels (the approximate activations; the others answer 'torch'
    on CPU tensors, whatever the mode). tree: the op's generated tree (default: the built-in one), which
    must hold a folder for an AMD GPU's gfx arch for the Triton kernels to run there.

    float64 always takes the torch path. auto: CUDA tensors -> Triton kernels, CPU -> C++ kernels
    where the op has them, else torch. cpp: CPU tensors -> C++ kernels (an error on CUDA tensors)."""
    mode = os.environ.get("LOWMEM_OPS_BACKEND", "auto")
    if mode not in BACKENDS:
        raise ValueError(f"LOWMEM_OPS_BACKEND={mode!r} is not one of {', '.join(BACKENDS)}")
    if t.dtype == torch.float64 or mode == "torch":
        return "torch"
    if mode == "triton-interpret":
        return mode
    # is_cuda / is_cpu: flag reads (t.device builds a device object per call)
    if t.is_cuda:
        if mode == "cpp":
            raise RuntimeError("LOWMEM_OPS_BACKEND=cpp runs CPU tensors only, got a CUDA tensor (use auto, which "
                               "takes the Triton kernels there)")
        if torch.version.hip is not None:
            tree = tree or _tree.builtin_tree()
            if _tree.folder_for(t.device, tree, interpret=False) is None:
                return _rocm_fallback(mode, _tree.gpu_arch(t.device), tree)
        return "triton"
    if mode == "triton":
        raise RuntimeError(f"LOWMEM_OPS_BACKEND=triton needs CUDA tensors, got a {t.device} tensor "
                           "(use triton-interpret to run the kernels on CPU tensors)")
    return "cpp" if has_cpp and t.is_cpu else "torch"


def _rocm_fallback(mode: str, gpu: str, tree) -> str:
    build = f"`kernelgen build --arch {gpu} --out {tree}`"
    if mode == "triton":
        raise RuntimeError(f"LOWMEM_OPS_BACKEND=triton: this torch is a ROCm build, and {tree} has no kernels built "
                           f"for this {gpu} GPU; build them with {build}, or use LOWMEM_OPS_BACKEND=torch (or auto, "
                           "which does so)")
    if (gpu, tree) not in _warned_rocm:
        _warned_rocm.add((gpu, tree))
        warnings.warn(f"lowmem_ops: no kernels are built for this {gpu} GPU in {tree}; ops on this ROCm device take "
                      f"the torch path (same results and memory, slower). Build them with {build}.", stacklevel=4)
    return "torch"


def row_stride(t: torch.Tensor) -> int:
    """The stride between the rows of t read in place as [numel / cols, cols] (cols: its last dim): the
    last dim dense and the leading dims collapsing into one, as the halves of proj(x).chunk(2, -1) are;
    -1 for any other layout. The C++ and Triton gated kernels read such views in place; the rule of
    row_stride in templates/cpu_autograd.cpp.j2 too."""
    if t.dim() == 0:
        return -1
    cols = t.shape[-1]
    if cols > 1 and t.stride(-1) != 1:
        return -1
    ld = nxt = -1
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            continue
        if ld < 0:
            ld, nxt = t.stride(i), t.stride(i) * t.shape[i]
        elif t.stride(i) != nxt:
            return -1
        else:
            nxt *= t.shape[i]
    if ld < 0:
        return cols
    return ld if ld >= cols else -1
