"""The counter-based random stream behind stochastic rounding.

Stochastic rounding needs one uniform number per (step, row, element). Instead of a
stateful generator we hash the coordinates, so the C++ kernels, the CUDA kernels and
this pure-PyTorch reference produce *the same* numbers in any order, on any number of
threads, and a resumed run continues the same stream. The hash is Chris Wellons'
"lowbias32" integer mixer applied in a chain:

    h0 = mix32(seed ^ 0x9E3779B9)
    h1 = mix32(h0 ^ step)                      step: the backend's update counter
    h2 = mix32(h1 ^ row)                       row: global row (table offset + id)
    h3 = mix32(h2 ^ (col | purpose << 16))     col < 65536; purpose: UPDATE or WRITEBACK
    u  = (h3 >> 8) * 2**-24                    uniform in [0, 1), 24 bits

Integer rounding uses q = floor(v + u) (unbiased: E[q] = v); FP16 rounding adds the
top 13 bits of h3 to the low mantissa bits of the float32 value and truncates.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
PURPOSE_UPDATE = 0     # re-quantizing a row after its SGD update
PURPOSE_WRITEBACK = 1  # re-quantizing a cached row on eviction or flush


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (for per-call constants)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def step_key(seed: int, step: int) -> int:
    """h1 of the chain: depends only on the seed and the step."""
    return mix32_int(mix32_int((seed ^ GOLDEN) & MASK32) ^ (step & MASK32))


def element_hash(seed: int, step: int, rows: torch.Tensor, dim: int, purpose: int) -> torch.Tensor:
    """h3 for every (row, col): int64 tensor (len(rows), dim) of uint32 values."""
    h1 = step_key(seed, step)
    h2 = mix32((rows.to(torch.int64) & MASK32) ^ h1)
    cols = torch.arange(dim, dtype=torch.int64, device=rows.device) | (purpose << 16)
    return mix32(h2[:, None] ^ cols[None, :])


def uniform(seed: int, step: int, rows: torch.Tensor, dim: int, purpose: int) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers, shape (len(rows), dim)."""
    return (element_hash(seed, step, rows, dim, purpose) >> 8).to(torch.float32) * (2.0 ** -24)
