"""The generated Triton kernels, run through Triton's interpreter on CPU tensors, agree with the
torch path bit for bit: the same codes, the same outputs, the same gradients."""

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops import _configs
from lowmem_ops._tree import builtin_tree, kernel_module, lowest_arch
from lowmem_ops.activations import approx_act_bwd, approx_act_fwd

from . import reference as ref

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _block(name, dtype):
    """Elements per program of the config the interpreter runs for small tensors (the lowest built
    arch's smallest size bucket)."""
    tree, arch = builtin_tree(), lowest_arch(builtin_tree())
    module = kernel_module(name, arch, interpret=True)
    cfg = _configs.lookup(tree, arch, "ACTIVATION", (name, "forward", _configs.DTYPE_NAMES[dtype]), (1,))
    return cfg["BLOCK_BYTES"] * module.CODES_PER_BYTE


def _both(name, x, dy):
    out = {}
    for backend in ("torch", "triton-interpret"):
        with ref.backend(backend):
            y, codes = approx_act_fwd(x, name, True)
            y_nograd, empty = approx_act_fwd(x, name, False)
            dx = approx_act_bwd(dy, codes, name)
        assert empty.numel() == 0 and torch.equal(y_nograd, y)
        out[backend] = (y, codes, dx)
    return out["torch"], out["triton-interpret"]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", ["regelu2", "resilu2"])
def test_interpreter_matches_torch_path_across_block_edges(name, dtype):
    block = _block(name, dtype)
    # Full blocks only, a partial last block, a last block of one element, a single element, odd sizes.
    for n in (1, 3, block - 1, block, block + 1, 2 * block + 5):
        torch.manual_seed(n)
        x = (torch.randn(n, dtype=torch.float64) * 4).to(dtype)
        dy = torch.randn(n, dtype=torch.float64).to(dtype)
        (y_t, c_t, dx_t), (y_i, c_i, dx_i) = _both(name, x, dy)
        assert torch.equal(c_t, c_i), f"codes differ at n={n}"
        if dtype == torch.bfloat16:
            # The interpreter rounds float32 -> bfloat16 toward zero (numpy has no bfloat16); GPUs and
            # torch round to nearest even. One bfloat16 ulp apart, never more.
            torch.testing.assert_close(dx_i, dx_t, rtol=ref.ulp(dtype), atol=0)
        else:
            assert torch.equal(dx_t, dx_i), f"gradients differ at n={n}"
        # exp/erf come from numpy in the interpreter and from torch in the torch path: a float32 ulp
        # apart, which can move the final rounding to a half-precision type by one ulp. In GELU's far
        # negative tail 1 + erf(.) cancels (as in torch's own GELU), so errors are absolute there:
        # about |x| * eps(float32), and |x| reaches about 20 here.
        torch.testing.assert_close(y_i, y_t, rtol=ref.ulp(dtype), atol=4e-6)
        assert y_i.dtype == dtype and dx_i.dtype == dtype


@pytest.mark.parametrize("name", ["regelu2", "resilu2"])
def test_interpreter_through_autograd_on_3d_noncontiguous(name):
    x = torch.randn(4, 7, 9, dtype=torch.bfloat16).transpose(0, 2).requires_grad_(True)
    dy = torch.randn(9, 7, 4, dtype=torch.bfloat16)
    with ref.backend("triton-interpret"):
        y = lo.approx_activation(x, name)
        y.backward(dy)
    torch.testing.assert_close(y.double(), ref.forward(name, x), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref.grad(name, x, dy), rtol=8e-3, atol=0)
