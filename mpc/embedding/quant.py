"""Low-precision row formats and their rounding, in pure PyTorch (the reference twin).

MPC (PAPERS.md §1) stores every embedding row in low precision; this module defines the
bytes of one row exactly as the ecosystem's fused row-wise formats (PAPERS.md §5), so a
trained table serves in PyTorch's quantized EmbeddingBag ops unchanged:

    INT8   [ q_0 .. q_{D-1} : uint8 ][ scale : fp32 ][ bias : fp32 ]      D + 8 bytes
    INT4   [ packed q, 2 per byte, low nibble first ][ scale : fp16 ][ bias : fp16 ]
    INT2   [ packed q, 4 per byte, lowest bits first ][ scale : fp16 ][ bias : fp16 ]
    FP16   D halves          FP32   D floats                  x ~= scale * q + bias

Round-to-nearest reproduces FBGEMM's quantizers bit for bit (tests compare bytes with
`torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_prepack`):
  - INT8 (FloatToFused8BitRowwiseQuantized): scale = (max - min) / 255, bias = min,
    q = rint((x - min) * (255 / (max - min + 1e-8))).
  - INT4/INT2 (FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf): bias = fp16(min);
    scale = fp16((max - bias) / (2^b - 1)), 1 when the range or the rounded scale is 0
    or its reciprocal overflows; q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1).
Stochastic rounding replaces rint(v) by floor(v + u), u uniform in [0, 1) from the
counter-based stream of mpc.embedding.rng, so E[q] = v (unbiased). Every float
operation here is one IEEE operation in float32, in the order the C++/CUDA kernels
(kernels/rowformat.h) perform it, so the two agree to the byte.

Edge cases (as FBGEMM where it defines them): a constant row stores scale 0 (INT8) or
1 (INT4/INT2) and decodes to its exact value (INT8) or to its fp16 rounding (INT4/INT2,
for |x| < 1024, where that rounding error is below half a unit); values
beyond the fp16 range cannot be stored in the 4/2-bit formats (scale/bias are fp16);
a NaN weight quantizes to code 0. FP16 stochastic rounding: see stochastic_round_fp16.
"""

from __future__ import annotations

import sys

import torch

from mpc.embedding.config import Precision, Rounding
from mpc.errors import UserError

STORAGE_DTYPE = {
    Precision.FP32: torch.float32,
    Precision.FP16: torch.float16,
    Precision.INT8: torch.uint8,
    Precision.INT4: torch.uint8,
    Precision.INT2: torch.uint8,
}

# FBGEMM adds this to the INT8 range before inverting it (a zero range stays finite).
INT8_RANGE_EPS = 1e-8
_FP16_MAX_BITS = 0x477FE000      # 65504.0 as float32 bits
_MASK32 = 0xFFFFFFFF


def packed_bytes(precision: Precision, dim: int) -> int:
    """Bytes of a row's values, without its scale/bias."""
    precision = Precision(precision)
    return -(-dim * precision.bits // 8)


def storage_shape(precision: Precision, rows: int, dim: int) -> tuple[int, int]:
    """Shape of the storage tensor of `rows` rows (dtype STORAGE_DTYPE[precision])."""
    precision = Precision(precision)
    return (rows, precision.row_bytes(dim) if precision.is_integer else dim)


def values_bytes(precision: Precision, rows: int, dim: int) -> dict[str, int]:
    """Exact bytes of `rows` stored rows by component: values and scale/bias."""
    precision = Precision(precision)
    total = rows * precision.row_bytes(dim)
    values = rows * packed_bytes(precision, dim)
    return {"values": values, "scale_bias": total - values}


def empty_storage(precision: Precision, rows: int, dim: int, device="cpu") -> torch.Tensor:
    """Uninitialised storage for `rows` rows, backed by huge pages where the OS allows.

    Lookups and updates touch random rows of tables of up to gigabytes: with 4 KiB
    pages nearly every access also misses the TLB (costly, above all in a VM). Asking
    for transparent huge pages before the memory is first written makes them 2 MiB.
    """
    precision = Precision(precision)
    return empty_huge(storage_shape(precision, rows, dim), STORAGE_DTYPE[precision], device)


def empty_huge(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty, asked for huge pages (CPU) before anything writes it."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type == "cpu":
        advise_huge_pages(out)
    return out


def full_huge(shape, value, dtype: torch.dtype) -> torch.Tensor:
    """torch.full on the CPU, in huge pages where the OS allows (see empty_storage)."""
    return empty_huge(shape, dtype).fill_(value)


_HUGE = 2 << 20


def advise_huge_pages(t: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a CPU tensor; False if unsupported."""
    if sys.platform != "linux" or t.nbytes < 2 * _HUGE:
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    start = -(-t.data_ptr() // _HUGE) * _HUGE
    stop = (t.data_ptr() + t.nbytes) // _HUGE * _HUGE
    madv_hugepage = 14
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), madv_hugepage) == 0


def _as_f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def int8_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (scale, bias, inverse scale) of the INT8 format, float32 (n,) each."""
    lo, hi = x.amin(1), x.amax(1)
    rng = hi - lo
    scale = rng / 255.0
    # `255.0 / t` in torch is reciprocal(t) * 255 (two roundings): divide explicitly.
    inv = torch.full_like(rng, 255.0).div(rng + INT8_RANGE_EPS)
    return scale, lo, inv


def nbit_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (scale, bias, inverse scale) of the INT4/INT2 format (values fp16-exact)."""
    lo = x.amin(1).half().float()
    rng = x.amax(1) - lo
    one = torch.ones_like(rng)
    scale = torch.where(rng == 0, one, rng / float((1 << bits) - 1)).half().float()
    scale = torch.where(scale == 0, one, scale)
    inv = one.div(scale)
    overflow = torch.isinf(inv)
    return torch.where(overflow, one, scale), lo, torch.where(overflow, one, inv)


def qparams(x: torch.Tensor, precision: Precision):
    precision = Precision(precision)
    if precision is Precision.INT8:
        return int8_qparams(x)
    return nbit_qparams(x, precision.bits)


def round_codes(v: torch.Tensor, levels: int, rounding: Rounding, u: torch.Tensor | None) -> torch.Tensor:
    """Integer codes in [0, levels] from real codes v: rint (half to even) or floor(v + u)."""
    r = torch.round(v) if Rounding(rounding) is Rounding.NEAREST else torch.floor(v + u)
    # NaN (from a NaN weight) becomes code 0, as in the kernels.
    return torch.nan_to_num(r.clamp(0, levels), nan=0.0).to(torch.int32)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, D) int codes < 2^bits -> (n, ceil(D*bits/8)) uint8, lowest bits first."""
    n, dim = q.shape
    per_byte = 8 // bits
    nbytes = -(-dim // per_byte)
    padded = torch.zeros(n, nbytes * per_byte, dtype=torch.int32, device=q.device)
    padded[:, :dim] = q
    padded = padded.view(n, nbytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    return (padded << shifts).sum(2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_codes: (n, nbytes) uint8 -> (n, dim) int32."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    q = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(len(packed), packed.shape[1] * per_byte)[:, :dim]


def _float_bytes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,) floats -> (n, itemsize) uint8, little-endian as stored in memory."""
    return x.to(dtype).contiguous().view(torch.uint8).view(len(x), -1)


def stochastic_round_fp16(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unbiased rounding of float32 to float16, driven by u (the top bits of the hash).

    Normal fp16 range: add the top 13 random bits to the 13 float32 mantissa bits that
    fp16 drops, then truncate them (round toward zero of the dithered value: rounds up
    with probability equal to the dropped fraction). fp16-subnormal range
    (2^-24 <= |x| < 2^-14): fp16 keeps fewer bits, so 13 + (14 + e) bits are dithered
    and dropped the same way (still unbiased). |x| < 2^-24 (incl. float32 subnormals):
    +-2^-24 with probability |x| / 2^-24, else +-0. Overflow: as a truncating
    conversion, finite values saturate at +-65504 (never inf); inf and NaN pass through.
    """
    x = _as_f32(x)
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    expo = mag >> 23
    h24 = (u * 2.0 ** 24).to(torch.int64)  # = element hash >> 8, exactly
    drop = torch.clamp(126 - expo, min=13, max=23)
    dithered = (mag + (h24 >> (24 - drop))) & ~((1 << drop) - 1)
    dithered = torch.clamp(dithered, max=_FP16_MAX_BITS)
    tiny = torch.where(u < x.abs() * 2.0 ** 24, 0x33800000, 0)  # 2^-24 or 0
    mag_out = torch.where(expo <= 102, tiny, dithered)
    out = torch.where(expo == 255, x, _bits_to_f32(sign | mag_out))
    return out.half()


def _bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 bit patterns -> float32 with those bits."""
    signed = bits - ((bits >> 31) << 32)
    return signed.to(torch.int32).view(torch.float32)


def quantize_rows(x: torch.Tensor, precision: Precision, rounding: Rounding = Rounding.NEAREST,
                  u: torch.Tensor | None = None) -> torch.Tensor:
    """(n, D) float32 rows -> storage rows (see the module docstring for the layout).

    rounding=STOCHASTIC needs u: (n, D) uniform [0, 1) numbers with 24 random bits
    (mpc.embedding.rng.uniform), one per element.
    """
    precision, rounding = Precision(precision), Rounding(rounding)
    x = _as_f32(x)
    if x.dim() != 2:
        raise ValueError(f"expected (rows, dim) float rows, got shape {tuple(x.shape)}")
    stochastic = rounding is Rounding.STOCHASTIC and precision is not Precision.FP32
    if stochastic and (u is None or u.shape != x.shape):
        raise ValueError("stochastic rounding needs u with the shape of x")
    if precision is Precision.FP32:
        return x.clone()
    if precision is Precision.FP16:
        return stochastic_round_fp16(x, u) if stochastic else x.half()
    if len(x) == 0:
        return torch.empty(storage_shape(precision, 0, x.shape[1]), dtype=STORAGE_DTYPE[precision])
    scale, bias, inv = qparams(x, precision)
    v = (x - bias[:, None]) * inv[:, None]
    q = round_codes(v, (1 << precision.bits) - 1, rounding, u)
    if precision is Precision.INT8:
        values = q.to(torch.uint8)
        sb = torch.cat([_float_bytes(scale, torch.float32), _float_bytes(bias, torch.float32)], 1)
    else:
        values = pack_codes(q, precision.bits)
        sb = torch.cat([_float_bytes(scale, torch.float16), _float_bytes(bias, torch.float16)], 1)
    return torch.cat([values, sb], 1)


def split_rows(storage: torch.Tensor, precision: Precision, dim: int):
    """Integer storage rows -> (values bytes, scale (n,), bias (n,)) as float32."""
    precision = Precision(precision)
    nb = packed_bytes(precision, dim)
    values = storage[:, :nb]
    # A fresh, packed copy: a row slice may sit at an unaligned offset or keep odd strides.
    tail = torch.empty((storage.shape[0], storage.shape[1] - nb), dtype=storage.dtype, device=storage.device)
    tail.copy_(storage[:, nb:])
    dtype = torch.float32 if precision is Precision.INT8 else torch.float16
    sb = tail.view(dtype).float()
    return values, sb[:, 0].contiguous(), sb[:, 1].contiguous()


def dequantize_rows(storage: torch.Tensor, precision: Precision, dim: int) -> torch.Tensor:
    """Storage rows -> (n, dim) float32: scale * q + bias (one multiply, one add)."""
    precision = Precision(precision)
    expect = storage_shape(precision, len(storage), dim)
    if tuple(storage.shape) != expect or storage.dtype != STORAGE_DTYPE[precision]:
        raise ValueError(f"{precision.value} storage must be {STORAGE_DTYPE[precision]} {expect}, "
                         f"got {storage.dtype} {tuple(storage.shape)}")
    if not precision.is_integer:
        return storage.to(torch.float32, copy=True)
    values, scale, bias = split_rows(storage, precision, dim)
    if precision is Precision.INT8:
        q = values.float()
    else:
        q = unpack_codes(values, precision.bits, dim).float()
    return q * scale[:, None] + bias[:, None]


# --- PyTorch's quantized EmbeddingBag format ------------------------------------------

def _check_torch_format(precision: Precision) -> Precision:
    precision = Precision(precision)
    if not precision.is_integer:
        raise UserError(f"PyTorch's quantized EmbeddingBag ops read INT8/INT4/INT2 rows, "
                        f"not {precision.value}")
    return precision


def export_torch_quantized(storage: torch.Tensor, precision: Precision,
                           table_offsets: torch.Tensor) -> list[torch.Tensor]:
    """Per-table uint8 tensors that torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_
    rowwise_offsets read as they are (the fused row format is the same bytes)."""
    _check_torch_format(precision)
    bounds = [int(b) for b in table_offsets]
    return [storage[lo:hi].clone() for lo, hi in zip(bounds[:-1], bounds[1:])]


def import_torch_quantized(tables: list[torch.Tensor], precision: Precision, dim: int) -> torch.Tensor:
    """Inverse of export_torch_quantized: one flat storage tensor from per-table tensors."""
    precision = _check_torch_format(precision)
    width = precision.row_bytes(dim)
    for t, table in enumerate(tables):
        if table.dtype != torch.uint8 or table.dim() != 2 or table.shape[1] != width:
            raise UserError(f"table {t}: expected uint8 rows of {width} bytes "
                            f"({precision.value}, dim {dim}), got {table.dtype} {tuple(table.shape)}")
    return torch.cat([t.contiguous() for t in tables], 0)


_TORCH_POOL_OPS = {
    Precision.INT8: "embedding_bag_byte_rowwise_offsets",
    Precision.INT4: "embedding_bag_4bit_rowwise_offsets",
    Precision.INT2: "embedding_bag_2bit_rowwise_offsets",
}


def torch_pool(table: torch.Tensor, precision: Precision, indices: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
    """Sum-pool one exported table with PyTorch's own quantized op (offsets: B + 1)."""
    op = getattr(torch.ops.quantized, _TORCH_POOL_OPS[_check_torch_format(precision)])
    return op(table, indices, offsets, mode=0, pruned_weights=False, include_last_offset=True)
