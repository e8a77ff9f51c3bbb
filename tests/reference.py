"""Independent references for the tests. Nothing here imports lowmem_ops or kernelgen: the specs are
read straight from their TOML files and every quantity is recomputed in float64 with numpy/torch."""

from __future__ import annotations

import contextlib
import os
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPEC_DIR = Path(__file__).resolve().parent.parent / "kernelgen" / "specs"

# The exact functions each built-in op must reproduce in its forward pass, from torch itself.
EXACT_FORWARD = {
    **{f"regelu{k}": F.gelu for k in (1, 2, 3, 4)},
    **{f"resilu{k}": F.silu for k in (1, 2, 3, 4)},
    **{f"tanh_gelu{k}": (lambda x: F.gelu(x, approximate="tanh")) for k in (2, 3, 4)},
    **{f"quick_gelu{k}": (lambda x: x * torch.sigmoid(1.702 * x)) for k in (2, 3, 4)},
    "mish2": F.mish,
    "softplus2": lambda x: F.softplus(x, threshold=1000.0),  # the exact function, no linear cut-off
    "elu2": F.elu,
    "relu1": F.relu,
    "leaky_relu1": F.leaky_relu,  # negative slope 0.01
}

# The published coefficients (reference section 1), thresholds ascending.
PUBLISHED = {
    "regelu2": {
        "c": [-3.1858810036855245, -0.001178821281161997, 3.190832613414926],
        "a": [-0.04922261145617846, 1.0979632065417297, -0.048740595085551286],
        "levels": [0.0, -0.0492226, 1.0487406, 1.0],
    },
    "resilu2": {
        "c": [-6.3050461001646445, -0.0008684942046214787, 6.325815242089708],
        "a": [-0.04060357190528599, 1.080925428529668, -0.040321856624382146],
        # approx-bp.md lists L_2 = 1.0401219, a typo: a_1 + a_2 = 1.0403219 (and L_3 = L_2 + a_3 = 1).
        "levels": [0.0, -0.0406036, 1.0403219, 1.0],
    },
}


EXTRA_SPECS: dict[str, Path] = {}  # specs that tests write elsewhere, by op name


def spec_data(name: str) -> dict:
    return tomllib.loads(EXTRA_SPECS.get(name, SPEC_DIR / f"{name}.toml").read_text())


def thresholds_f32(name: str) -> np.ndarray:
    return np.asarray(spec_data(name)["approx"]["thresholds"], dtype=np.float64).astype(np.float32)


def levels_f64(name: str) -> np.ndarray:
    ap = spec_data(name)["approx"]
    if "levels" in ap:
        return np.asarray(ap["levels"], dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.asarray(ap["coefficients"], dtype=np.float64))])


def bits(name: str) -> int:
    return spec_data(name)["approx"]["bits"]


def codes(name: str, x: torch.Tensor) -> np.ndarray:
    """Level index per element: thresholds strictly below x (boundary 'lower'), compared in float32."""
    xs = x.detach().reshape(-1).to(torch.float32).numpy()
    c = thresholds_f32(name)
    if spec_data(name)["approx"]["boundary"] == "lower":
        return (xs[:, None] > c[None, :]).sum(axis=1)
    return (xs[:, None] >= c[None, :]).sum(axis=1)


def unpack(packed: torch.Tensor, k: int, n: int) -> np.ndarray:
    """Undo the documented layouts. k = 1, 2, 4: element i at bits [k*(i % (8//k)), +k) of byte
    i // (8//k). k = 3: three bit planes of ceil(n/8) bytes; bit p of code i is bit i % 8 of byte
    i // 8 of plane p."""
    raw = packed.numpy().astype(np.uint8)
    if k == 3:
        planes = np.unpackbits(raw, bitorder="little").reshape(3, -1)
        return (planes * (1 << np.arange(3))[:, None]).sum(axis=0)[:n]
    b = np.unpackbits(raw, bitorder="little").reshape(-1, k)
    weights = 1 << np.arange(k)
    return (b * weights).sum(axis=1)[:n]


def grad(name: str, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = dy * L[code] in float64, from the spec's own levels."""
    level = torch.from_numpy(levels_f64(name)[codes(name, x)]).view(x.shape)
    return dy.detach().double() * level


def forward(name: str, x: torch.Tensor) -> torch.Tensor:
    return EXACT_FORWARD[name](x.detach().double())


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@contextlib.contextmanager
def backend(name: str):
    """Run lowmem_ops with LOWMEM_OPS_BACKEND=name inside the block (safe inside hypothesis tests)."""
    before = os.environ.get("LOWMEM_OPS_BACKEND")
    os.environ["LOWMEM_OPS_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOWMEM_OPS_BACKEND")
        else:
            os.environ["LOWMEM_OPS_BACKEND"] = before
