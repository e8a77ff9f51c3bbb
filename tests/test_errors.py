"""Bad input gets a clear error that says what and where."""

import os
import subprocess
import sys

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops.activations import approx_act_bwd, approx_act_fwd

from . import reference as ref


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input(dtype):
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match=r"lowmem_ops.regelu2: input must be float16, bfloat16, float32 or float64, got torch\."):
        lo.regelu2(x)
    with pytest.raises(TypeError, match="must be float16"):
        approx_act_fwd(x, "resilu2", False)  # the op itself checks too, for direct callers


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        lo.regelu2([1.0, 2.0])


def test_unknown_op():
    with pytest.raises(ValueError, match=r"unknown lowmem_ops activation 'gelu3'; available: .*regelu2, .*resilu2"):
        lo.approx_activation(torch.zeros(2), "gelu3")
    with pytest.raises(ValueError, match="unknown lowmem_ops activation"):
        lo.nn.Approx("gelu3")


def test_codes_on_another_device():
    dy = torch.zeros(8)
    codes = torch.zeros(2, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="grad_output is on cpu but the saved codes are on meta"):
        approx_act_bwd(dy, codes, "regelu2")


def test_codes_of_the_wrong_size_or_type():
    with pytest.raises(ValueError, match="grad_output has 9 elements, which need 3 code bytes at 2 bits, but 2 were given"):
        approx_act_bwd(torch.zeros(9), torch.zeros(2, dtype=torch.uint8), "regelu2")
    with pytest.raises(TypeError, match="codes must be a 1-D uint8 tensor"):
        approx_act_bwd(torch.zeros(8), torch.zeros(2, dtype=torch.int32), "regelu2")


def test_bad_backend_names():
    with ref.backend("cuda-please"), pytest.raises(ValueError, match="LOWMEM_OPS_BACKEND='cuda-please' is not one of"):
        lo.regelu2(torch.zeros(3))
    with ref.backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors, got a cpu tensor"):
        lo.regelu2(torch.zeros(3))


def test_module_arguments():
    with pytest.raises(ValueError, match="approximate='tanh'"):
        lo.nn.ReGELU2(approximate="tanh")


def test_backward_without_codes_is_explained():
    x = torch.randn(4, requires_grad=True)
    y, _ = approx_act_fwd(x, "regelu2", False)  # a direct caller that asked for no codes
    with pytest.raises(RuntimeError, match="ran with save_codes=False"):
        y.sum().backward()


BLOCK_TRITON = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'triton' or name.startswith('triton.'):\n"
    "            raise ImportError('triton blocked for this test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run_without_triton(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where `import triton` fails."""
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_OPS_BACKEND"}
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + code], capture_output=True, text=True, env=env, timeout=120)


def test_import_works_without_triton():
    """The CPU path needs torch only: block triton and use the ops."""
    out = run_without_triton(
        "import torch, lowmem_ops as lo\n"
        "x = torch.randn(10, requires_grad=True)\n"
        "lo.regelu2(x).sum().backward()\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok', x.grad.shape)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_kernels_without_triton_say_so():
    out = run_without_triton(
        "import os, torch, lowmem_ops as lo\n"
        "os.environ['LOWMEM_OPS_BACKEND'] = 'triton-interpret'\n"
        "try:\n"
        "    lo.regelu2(torch.randn(4))\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    assert "lowmem_ops needs triton to run its kernels" in out.stdout, out.stderr
