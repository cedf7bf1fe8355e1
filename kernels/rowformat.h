// Row formats of low-precision embedding tables and the stochastic-rounding hash,
// shared by the CPU (tbe_cpu.cpp) and CUDA (tbe.cu) kernels. Plain C++ with no torch
// headers, so `nvcc -c` checks the CUDA side anywhere.
//
// The formats are PyTorch/FBGEMM's fused row-wise ones (PAPERS.md §5); the pure-PyTorch
// twin is mpc/embedding/quant.py and the hash is mpc/embedding/rng.py. Every float
// operation is written as one IEEE operation in the twin's order (the build disables
// FP contraction), so kernels and reference agree to the byte:
//   INT8  [D x uint8][fp32 scale][fp32 bias]         scale=(max-min)/255, bias=min
//   INT4  [ceil(D/2) bytes, low nibble first][fp16 scale][fp16 bias]
//   INT2  [ceil(D/4) bytes, lowest bits first][fp16 scale][fp16 bias]
//   FP16  D halves;  FP32  D floats.             value = scale * q + bias
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MPC_HD __host__ __device__ __forceinline__
#else
#define MPC_HD static inline
#endif

namespace mpc_rowformat {

// Codes shared with mpc/embedding/ops.py (PRECISION_CODE).
enum Precision : int { kFP32 = 0, kFP16 = 1, kINT8 = 2, kINT4 = 3, kINT2 = 4 };

MPC_HD bool valid_precision(int p) { return p >= kFP32 && p <= kINT2; }

MPC_HD int bits_of(int p) {
  return p == kFP32 ? 32 : p == kFP16 ? 16 : p == kINT8 ? 8 : p == kINT4 ? 4 : 2;
}

MPC_HD bool is_integer(int p) { return p >= kINT8; }

// Bytes of a row's values (without scale/bias).
MPC_HD int64_t packed_bytes(int p, int64_t dim) { return (dim * bits_of(p) + 7) / 8; }

// Bytes of one stored row.
MPC_HD int64_t row_bytes(int p, int64_t dim) {
  return packed_bytes(p, dim) + (p == kINT8 ? 8 : is_integer(p) ? 4 : 0);
}

// ---- bit casts and unaligned loads/stores (rows of D+8 bytes are not aligned) --------
MPC_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

MPC_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

MPC_HD uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

MPC_HD uint16_t load_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

MPC_HD void store_u32(uint8_t* p, uint32_t v) {
  p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

MPC_HD void store_u16(uint8_t* p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

MPC_HD bool is_inf(float f) { return (f2u(f) & 0x7FFFFFFFu) == 0x7F800000u; }

// ---- IEEE half <-> float, in software (identical on host and device) -----------------
MPC_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return u2f(sign | 0x7F800000u | (m << 13));
  if (e != 0) return u2f(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return u2f(sign);
  uint32_t exp = 113;  // subnormal: normalise the mantissa
  while (!(m & 0x400u)) { m <<= 1; --exp; }
  return u2f(sign | (exp << 23) | ((m & 0x3FFu) << 13));
}

// Round to nearest, ties to even; |x| >= 65520 -> inf (as torch's .half()).
MPC_HD uint16_t float_to_half_rne(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u | ((a >> 13) & 0x3FFu) : 0u));
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);
  if (a >= 0x38800000u) {  // normal half
    a += 0xFFFu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((a - 0x38000000u) >> 13));
  }
  if (a < 0x33000000u) return (uint16_t)sign;  // below half the smallest subnormal
  uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - e;  // value in units of 2^-24 is m >> shift
  uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
}

MPC_HD float round_to_half(float f) { return half_to_float(float_to_half_rne(f)); }

// ---- the counter-based stream (mpc/embedding/rng.py) ----------------------------------
MPC_HD uint32_t mix32(uint32_t x) {  // Chris Wellons' lowbias32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// h2 of the chain from h1 = rng.step_key(seed, step) (computed once per call in Python).
MPC_HD uint32_t row_key(uint32_t step_key, int64_t row) { return mix32(step_key ^ (uint32_t)row); }

MPC_HD uint32_t element_hash(uint32_t rowkey, int col, int purpose) {
  return mix32(rowkey ^ ((uint32_t)col | ((uint32_t)purpose << 16)));
}

MPC_HD float uniform24(uint32_t h) { return (float)(h >> 8) * 5.9604644775390625e-8f; }  // 2^-24

// Stochastic float -> half (see quant.stochastic_round_fp16): dither the bits fp16
// drops with the hash's top bits and truncate; |x| < 2^-24 rounds to 0 or 2^-24;
// finite values saturate at 65504; inf/NaN convert as they are.
MPC_HD uint16_t float_to_half_sr(float f, uint32_t h) {
  uint32_t x = f2u(f);
  uint32_t sign = x & 0x80000000u, a = x & 0x7FFFFFFFu, e = a >> 23;
  if (e == 255) return float_to_half_rne(f);
  uint32_t mag;
  if (e <= 102) {
    mag = uniform24(h) < u2f(a) * 16777216.0f ? 0x33800000u : 0u;
  } else {
    uint32_t drop = e >= 113 ? 13u : 126u - e;
    mag = (a + (h >> (32u - drop))) & ~((1u << drop) - 1u);
    if (mag > 0x477FE000u) mag = 0x477FE000u;
  }
  return float_to_half_rne(u2f(sign | mag));  // exact: the value is representable
}

// ---- row-wise quantization parameters --------------------------------------------------
struct QParams {
  float scale, bias, inv;
};

MPC_HD QParams int8_qparams(float lo, float hi) {
  float range = hi - lo;
  QParams q;
  q.scale = range / 255.0f;
  q.bias = lo;
  q.inv = 255.0f / (range + 1e-8f);
  return q;
}

MPC_HD QParams nbit_qparams(float lo, float hi, int bits) {
  QParams q;
  q.bias = round_to_half(lo);
  float range = hi - q.bias;
  float scale = range == 0.0f ? 1.0f : range / (float)((1 << bits) - 1);
  scale = round_to_half(scale);
  if (scale == 0.0f) scale = 1.0f;
  float inv = 1.0f / scale;
  if (is_inf(inv)) { scale = 1.0f; inv = 1.0f; }
  q.scale = scale;
  q.inv = inv;
  return q;
}

MPC_HD QParams row_qparams(int p, float lo, float hi) {
  return p == kINT8 ? int8_qparams(lo, hi) : nbit_qparams(lo, hi, bits_of(p));
}

// Integer code: rint(v) (ties to even) or floor(v + u); clamped to [0, maxq]; NaN -> 0.
MPC_HD int quantize_code(float x, const QParams& qp, int maxq, bool stochastic, uint32_t h) {
  float v = (x - qp.bias) * qp.inv;
  float r = stochastic ? floorf(v + uniform24(h)) : rintf(v);
  if (!(r >= 0.0f)) return 0;
  return r >= (float)maxq ? maxq : (int)r;
}

// A row's min and max as torch.aminmax gives them: NaN if the row holds a NaN (then
// every code is 0); of equal values (+0 and -0) the first is kept.
MPC_HD void row_min_max(const float* x, int dim, float* lo_out, float* hi_out) {
  float lo = x[0], hi = x[0];
  for (int c = 1; c < dim; ++c) {
    const bool nan = x[c] != x[c];
    lo = (x[c] < lo || nan) ? x[c] : lo;
    hi = (x[c] > hi || nan) ? x[c] : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

// Scale and bias of an integer row.
MPC_HD void load_qparams(int p, const uint8_t* row, int dim, float* scale, float* bias) {
  const uint8_t* sb = row + packed_bytes(p, dim);
  if (p == kINT8) {
    *scale = u2f(load_u32(sb));
    *bias = u2f(load_u32(sb + 4));
  } else {
    *scale = half_to_float(load_u16(sb));
    *bias = half_to_float(load_u16(sb + 2));
  }
}

MPC_HD int load_code(int p, const uint8_t* row, int col) {
  if (p == kINT8) return row[col];
  int bits = bits_of(p), per = 8 / bits;
  return (row[col / per] >> ((col % per) * bits)) & ((1 << bits) - 1);
}

// One element of a stored row as float (row points at the row's first byte).
MPC_HD float load_value(int p, const uint8_t* row, int col, float scale, float bias) {
  if (p == kFP32) return u2f(load_u32(row + 4 * col));
  if (p == kFP16) return half_to_float(load_u16(row + 2 * col));
  return (float)load_code(p, row, col) * scale + bias;
}

MPC_HD void dequantize_row(int p, const uint8_t* row, int dim, float* out) {
  float scale = 0.0f, bias = 0.0f;
  if (is_integer(p)) load_qparams(p, row, dim, &scale, &bias);
  for (int c = 0; c < dim; ++c) out[c] = load_value(p, row, c, scale, bias);
}

// A row's scale and bias after its nb packed bytes: fp32 for INT8, fp16 for INT4/INT2.
MPC_HD void store_qparams(int p, const QParams& qp, uint8_t* sb) {
  if (p == kINT8) {
    store_u32(sb, f2u(qp.scale));
    store_u32(sb + 4, f2u(qp.bias));
  } else {
    store_u16(sb, float_to_half_rne(qp.scale));
    store_u16(sb + 2, float_to_half_rne(qp.bias));
  }
}

// Quantize one float row into `row`. rowkey/purpose feed the stochastic stream.
MPC_HD void quantize_row(int p, const float* x, int dim, uint8_t* row, bool stochastic,
                         uint32_t rowkey, int purpose) {
  if (p == kFP32) {
    for (int c = 0; c < dim; ++c) store_u32(row + 4 * c, f2u(x[c]));
    return;
  }
  if (p == kFP16) {
    for (int c = 0; c < dim; ++c) {
      uint16_t h = stochastic ? float_to_half_sr(x[c], element_hash(rowkey, c, purpose))
                              : float_to_half_rne(x[c]);
      store_u16(row + 2 * c, h);
    }
    return;
  }
  float lo, hi;
  row_min_max(x, dim, &lo, &hi);
  QParams qp = row_qparams(p, lo, hi);
  int bits = bits_of(p), per = 8 / bits, maxq = (1 << bits) - 1;
  int64_t nb = packed_bytes(p, dim);
  for (int64_t j = 0; j < nb; ++j) row[j] = 0;
  for (int c = 0; c < dim; ++c) {
    uint32_t h = stochastic ? element_hash(rowkey, c, purpose) : 0u;
    int q = quantize_code(x[c], qp, maxq, stochastic, h);
    row[c / per] |= (uint8_t)(q << ((c % per) * bits));
  }
  store_qparams(p, qp, row + nb);
}

}  // namespace mpc_rowformat
