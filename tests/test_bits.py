"""1-, 2-, 3- and 4-bit codes through the whole pipeline: spec -> build -> kernels -> autograd."""

import math

import numpy as np
import pytest
import torch

import lowmem_ops as lo
from kernelgen import cli

from . import reference as ref
from .test_memory import saved_tensors

SPECS = {
    1: ("step1", [0.0], "levels = [0.0, 1.0]"),
    3: ("step3", [-1.5 + 0.5 * i for i in range(7)], "levels = [" + ", ".join(str(i / 7) for i in range(8)) + "]"),
    4: ("step4", [-3.5 + 0.5 * i for i in range(15)], "levels = [" + ", ".join(str(i / 15) for i in range(16)) + "]"),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def built_op(request, tmp_path_factory):
    bits = request.param
    name, thresholds, levels = SPECS[bits]
    folder = tmp_path_factory.mktemp(f"bits{bits}")
    path = folder / f"{name}.toml"
    path.write_text(
        f'[op]\nname = "{name}"\nforward = "x * sigmoid(x)"\n\n[approx]\nbits = {bits}\nboundary = "lower"\n'
        f"thresholds = {thresholds}\n{levels}\nfit_error = 0.1\n"
    )
    ref.EXTRA_SPECS[name] = path
    assert cli.main(["build", "--arch", "sm80", "--spec", str(path), "--out", str(folder / "tree")]) == 0
    lo.load(folder / "tree")
    return name, bits


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton-interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 1000, 4099])
def test_codes_gradient_and_saved_bytes(built_op, backend, dtype, n):
    name, bits = built_op
    torch.manual_seed(n)
    x = (torch.randn(n, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    x.data[:2] = 0.0  # on a threshold (all specs here have one at 0 or at -0.5 + 0.5 = 0)
    dy = torch.randn(n, dtype=torch.float64).to(dtype)
    with ref.backend(backend):
        y, saved = saved_tensors(lo.approx_activation, x, name)
        (packed,) = saved
        y.backward(dy)
    # 3 bits: three planes of ceil(n / 8) bytes (3 bits per element, padding to a byte per plane)
    assert packed.numel() == (3 * math.ceil(n / 8) if bits == 3 else math.ceil(n * bits / 8))
    np.testing.assert_array_equal(ref.unpack(packed, bits, n), ref.codes(name, x))
    torch.testing.assert_close(x.grad.double(), ref.grad(name, x, dy), rtol=ref.ulp(dtype), atol=0)
    torch.testing.assert_close(y.double(), torch.nn.functional.silu(x.detach().double()), rtol=ref.ulp(dtype), atol=1e-6)
