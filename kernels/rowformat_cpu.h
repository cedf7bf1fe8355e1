// CPU fast paths of the row formats in kernels/rowformat.h: INT8 and INT4 rows of a
// dimension that is a multiple of 8 are quantized and dequantized 8 columns at a time
// with AVX2. Every float operation is the one the scalar code performs, in the same
// order (no FMA: the build disables contraction), and the stochastic stream is the same
// hash, so the bytes are identical to quantize_row / dequantize_row (tests compare the
// kernels with the pure-PyTorch twin to the byte). Anything else takes the scalar code.
// CPU only: not included by the CUDA sources.
#pragma once

#include "rowformat.h"

#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#define MPC_ROWFORMAT_AVX2 1
#endif

namespace mpc_rowformat {

// Ask for the cache lines of a row of `bytes` bytes at `a` (two when it straddles a
// line boundary, as 24-byte INT8 rows of dim 16 often do): rows are sparse and random.
template <bool Write = false>
inline void prefetch_row(const void* a, int64_t bytes) {
  const char* p = static_cast<const char*>(a);
  __builtin_prefetch(p, Write, 3);
  if ((int64_t)(reinterpret_cast<uintptr_t>(p) & 63) + bytes > 64) __builtin_prefetch(p + bytes - 1, Write, 3);
}

#ifdef MPC_ROWFORMAT_AVX2
// mix32 on 8 lanes (the same integer operations as the scalar lowbias32).
inline __m256i mix32_x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352Du));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}

// Codes of columns [c, c+8): quantize_code on 8 lanes.
inline __m256i quantize_codes_x8(const float* x, int c, const QParams& qp, int maxq, bool stochastic,
                                 uint32_t rowkey, int purpose) {
  __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_set1_ps(qp.bias)),
                           _mm256_set1_ps(qp.inv));
  __m256 r;
  if (stochastic) {
    const __m256i cols = _mm256_or_si256(_mm256_add_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                         _mm256_set1_epi32(purpose << 16));
    const __m256i h = mix32_x8(_mm256_xor_si256(_mm256_set1_epi32((int)rowkey), cols));
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(5.9604644775390625e-8f));
    r = _mm256_floor_ps(_mm256_add_ps(v, u));
  } else {
    r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  r = _mm256_and_ps(r, _mm256_cmp_ps(r, _mm256_setzero_ps(), _CMP_GE_OQ));  // !(r >= 0) (NaN too) -> 0
  r = _mm256_min_ps(r, _mm256_set1_ps((float)maxq));
  return _mm256_cvttps_epi32(r);
}

// row_min_max for dim % 8 == 0: lane-wise min/max, then the scalar rules for the two
// cases where lanes could disagree with a left-to-right scan: a NaN anywhere (scalar
// scan), and a zero extreme (+0 and -0 compare equal: the first zero in the row wins).
inline void row_min_max_x8(const float* x, int dim, float* lo_out, float* hi_out) {
  __m256 lo = _mm256_loadu_ps(x), hi = lo, nan = _mm256_cmp_ps(lo, lo, _CMP_UNORD_Q);
  for (int c = 8; c < dim; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) {
    row_min_max(x, dim, lo_out, hi_out);
    return;
  }
  float l[8], h[8];
  _mm256_storeu_ps(l, lo);
  _mm256_storeu_ps(h, hi);
  float a = l[0], b = h[0];
  for (int j = 1; j < 8; ++j) {
    a = l[j] < a ? l[j] : a;
    b = h[j] > b ? h[j] : b;
  }
  if (a == 0.0f || b == 0.0f) {  // take the zero's sign from its first occurrence
    int c = 0;
    while (x[c] != 0.0f) ++c;
    if (a == 0.0f) a = x[c];
    if (b == 0.0f) b = x[c];
  }
  *lo_out = a;
  *hi_out = b;
}

// 8 int32 codes in [0, 255] -> 8 bytes.
inline uint64_t pack_bytes_x8(__m256i q) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i w = _mm_packus_epi32(lo, hi);   // 8 x u16
  const __m128i b = _mm_packus_epi16(w, w);     // 8 x u8 (twice)
  return (uint64_t)_mm_cvtsi128_si64(b);
}
#endif

// quantize_row, with the fast path where it applies.
inline void quantize_row_cpu(int p, const float* x, int dim, uint8_t* row, bool stochastic, uint32_t rowkey,
                             int purpose) {
#ifdef MPC_ROWFORMAT_AVX2
  if ((p == kINT8 || p == kINT4) && dim % 8 == 0 && dim > 0) {
    float lo, hi;
    row_min_max_x8(x, dim, &lo, &hi);
    const QParams qp = row_qparams(p, lo, hi);
    const int nb = (int)packed_bytes(p, dim);
    for (int c = 0; c < dim; c += 8) {
      const __m256i q = quantize_codes_x8(x, c, qp, p == kINT8 ? 255 : 15, stochastic, rowkey, purpose);
      uint64_t bytes = pack_bytes_x8(q);
      if (p == kINT8) {
        memcpy(row + c, &bytes, 8);
      } else {  // low nibble first: byte j = q[2j] | q[2j+1] << 4
        uint32_t packed = 0;
        for (int j = 0; j < 4; ++j) {
          const uint32_t a = (uint32_t)(bytes >> (16 * j)) & 0xFFu, b = (uint32_t)(bytes >> (16 * j + 8)) & 0xFFu;
          packed |= (a | (b << 4)) << (8 * j);
        }
        memcpy(row + c / 2, &packed, 4);
      }
    }
    store_qparams(p, qp, row + nb);
    return;
  }
#endif
  quantize_row(p, x, dim, row, stochastic, rowkey, purpose);
}

// dequantize_row, with the fast path where it applies.
inline void dequantize_row_cpu(int p, const uint8_t* row, int dim, float* out) {
#ifdef MPC_ROWFORMAT_AVX2
  if ((p == kINT8 || p == kINT4) && dim % 8 == 0 && dim > 0) {
    float s, b;
    load_qparams(p, row, dim, &s, &b);
    const __m256 scale = _mm256_set1_ps(s), bias = _mm256_set1_ps(b);
    for (int c = 0; c < dim; c += 8) {
      __m256i q;
      if (p == kINT8) {
        uint64_t bytes;
        memcpy(&bytes, row + c, 8);
        q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes));
      } else {
        uint32_t bytes;
        memcpy(&bytes, row + c / 2, 4);
        const __m128i v = _mm_cvtsi32_si128((int)bytes), nib = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        q = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
      }
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), bias));
    }
    return;
  }
#endif
  dequantize_row(p, row, dim, out);
}

}  // namespace mpc_rowformat
