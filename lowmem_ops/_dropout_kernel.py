"""The Triton dropout kernel (hand-written until the kernel families generate it).

y[i] = x[i] * scale where tl.rand(seed, offset + i) >= threshold, else 0, for the flat row-major
index i. The same kernel is dropout's forward (x) and its backward (dy): the mask is regenerated
from the seed, never stored. lowmem_ops._philox computes the same tl.rand for the torch path.

`rand` is Triton's own tl.rand. Under the interpreter every @triton.jit function the kernel calls
must be an interpreted one too, and tl.rand is not (triton was imported without TRITON_INTERPRET):
the interpreted copy of this module gets an interpreted copy of Triton's random module's `rand`
(lowmem_ops.dropout._kernel_module).
"""

import triton
import triton.language as tl
from triton.language.random import rand

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def dropout_kernel(x_ptr, y_ptr, seed_ptr, offset, n, threshold, scale, BLOCK: tl.constexpr):
    # int64 indices: tensors past 2**31 elements, and the counter is offset + i as a 64-bit integer
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    seed = tl.load(seed_ptr)  # int64 on the device: drawing the seed needs no host sync
    keep = rand(seed, offset + i) >= threshold
    x = tl.load(x_ptr + i, mask=inside).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=inside)
