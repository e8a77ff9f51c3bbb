"""Triton's counter-based random numbers (`tl.randint` / `tl.rand`), computed with torch ops.

The Triton kernels draw dropout masks with `tl.rand(seed, offsets)`; the torch path must draw the
same numbers bit for bit, on any device, so a mask can be regenerated in backward from its seed and
offset alone, whichever path made it. This module is that torch twin, for 32-bit Philox4x32 with
10 rounds (Triton's default), as triton/language/random.py defines it:

- key: the seed as an unsigned 64-bit integer (a negative seed is taken modulo 2**64, which is what
  Triton's `seed.to(tl.uint64)` does to a signed seed), split into k0 = low 32 bits, k1 = high 32 bits.
- counter: (c0, c1, c2, c3) = (low 32 bits of the offset, high 32 bits, 0, 0). Int64 offsets give
  both halves; int32 offsets have c1 = 0 (Triton does not sign-extend them).
- each round: c0, c2 <- hi(B*c2) ^ c1 ^ k0, hi(A*c0) ^ c3 ^ k1; c1, c3 <- lo(B*c2), lo(A*c0);
  then k0 += KEY_A, k1 += KEY_B (all modulo 2**32). `randint` is c0 after the rounds.
- `rand`: the uint32 read as int32, negative values flipped (~x), converted to float32 and
  multiplied by the float32 constant 4.6566127342e-10: a float in [0, 1).

torch has no unsigned 32-bit multiply, so the words are held in int64 tensors. A 32x32-bit product
can overflow int64, so each Philox constant is split into 16-bit halves and the product is formed
from two products below 2**48 (no overflow, nothing relies on wrap-around)."""

from __future__ import annotations

import torch

ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# largest scale with (2**31 - 1) * scale < 1 in float32, as Triton's uint_to_uniform_float spells it
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(const: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const * c, for a 32-bit constant and int64 words in [0, 2**32)."""
    hi16, lo16 = const >> 16, const & 0xFFFF
    upper = c * hi16  # < 2**48
    lower = c * lo16  # < 2**48
    high = (upper + (lower >> 16)) >> 16
    low = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return high, low


def _key(seed: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    """(k0, k1): the low and high 32-bit words of the seed modulo 2**64."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"lowmem_ops philox: a seed tensor must hold one int64, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)}")
        seed = seed.reshape(())
        # an arithmetic shift then a mask gives the high word of the two's-complement pattern
        return seed & _MASK32, (seed >> 32) & _MASK32
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"lowmem_ops philox: seed must be an int or an int64 tensor, got {type(seed).__name__}")
    if not -(2 ** 63) <= seed < 2 ** 64:
        raise ValueError(f"lowmem_ops philox: seed {seed} is outside [-2**63, 2**64), the integers Triton passes")
    seed %= 2 ** 64
    return seed & _MASK32, seed >> 32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32 on counter words (c0, c1, c2, c3) and key words (k0, k1), each an int64 tensor or int
    in [0, 2**32); returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def randint4x(seed: int | torch.Tensor, offsets: torch.Tensor, rounds: int = ROUNDS):
    """tl.randint4x(seed, offsets): four uint32 per offset, each returned as int64 in [0, 2**32).

    seed: an int in [-2**63, 2**64) or a one-element int64 tensor (on offsets' device; no host sync).
    offsets: an int32 or int64 tensor of any shape."""
    if offsets.dtype == torch.int64:
        c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    elif offsets.dtype == torch.int32:
        c0 = offsets.to(torch.int64) & _MASK32
        c1 = torch.zeros_like(c0)
    else:
        raise TypeError(f"lowmem_ops philox: offsets must be int32 or int64, got {offsets.dtype}")
    zero = torch.zeros_like(c0)
    return philox4x32(c0, c1, zero, zero, *_key(seed), rounds)


def randint(seed: int | torch.Tensor, offsets: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """tl.randint(seed, offsets): the first of randint4x's words."""
    return randint4x(seed, offsets, rounds)[0]


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 words held in int64: float32 in [0, 1)."""
    # as int32, a word >= 2**31 is negative and ~x of it is 2**32 - 1 - x: both below 2**31, exact in
    # the int64 -> float32 conversion's input, which rounds to nearest like Triton's int32 -> float32
    folded = torch.where(bits >= 2 ** 31, _MASK32 - bits, bits)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=bits.device)
    return folded.to(torch.float32) * scale


def rand(seed: int | torch.Tensor, offsets: torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """tl.rand(seed, offsets): one float32 in [0, 1) per offset, bit for bit."""
    return uniform(randint(seed, offsets, rounds))
