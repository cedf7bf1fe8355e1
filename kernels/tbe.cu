// Table-batched embedding kernels on CUDA: the GPU twins of kernels/tbe_cpu.cpp (MPC,
// PAPERS.md §1, §5; semantics in mpc/embedding/ops.py). Plain C launchers and no torch
// headers, so `nvcc -c -arch=sm_90 kernels/tbe.cu` checks this file on any machine; the
// host bindings are in kernels/tbe_cuda.cpp.
//
// Exactness: every value is computed by the same rowformat.h code and in the same
// order as on the CPU (bags summed in bag order; a row's gradients summed in index
// order), and the build passes --fmad=false, so results equal the CPU kernels' bytes.
#include <cuda_runtime.h>
#include <stdint.h>

#include "rowformat.h"

namespace mpc_tbe_cuda {
using namespace mpc_rowformat;

constexpr int kWarp = 32;
constexpr int kPoolThreads = 256;  // 8 bags per block, one warp per bag
constexpr int kPurposeUpdate = 0;  // rng.PURPOSE_UPDATE

struct DeviceBatch {
  const int64_t* table_offsets;
  const int64_t* indices;
  const int64_t* offsets;
  int64_t T, B, N, rows;
};

__device__ __forceinline__ int64_t slot_of(const int64_t* s64, const int32_t* s32, int64_t p) {
  return s64 ? s64[p] : s32 ? (int64_t)s32[p] : -1;
}

// errors[0]: smallest bad index position; errors[1]: smallest bad bag (offsets).
__device__ __forceinline__ void note(unsigned long long* slot, int64_t v) {
  atomicMin(slot, (unsigned long long)v);
}

__global__ void pool_kernel(int prec, const uint8_t* __restrict__ weights, int64_t rbytes,
                            DeviceBatch b, int dim, const float* __restrict__ cache,
                            const int64_t* slots64, const int32_t* slots32, float* __restrict__ out,
                            unsigned long long* errors) {
  const int64_t k = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= b.T * b.B) return;
  const int64_t t = k / b.B, s = k - t * b.B;
  const int64_t base = b.table_offsets[t], card = b.table_offsets[t + 1] - base;
  int64_t lo = b.offsets[k], hi = b.offsets[k + 1];
  if (!(lo >= 0 && lo <= hi && hi <= b.N)) {
    if (lane == 0) note(&errors[1], k);
    lo = hi = 0;
  }
  float* o = out + (s * b.T + t) * dim;
  for (int c0 = 0; c0 < dim; c0 += kWarp) {
    const int c = c0 + lane;
    float acc = 0.0f;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t id = b.indices[p];
      if (id < 0 || id >= card) {
        if (lane == 0 && c0 == 0) note(&errors[0], p);
        continue;
      }
      if (c >= dim) continue;
      const int64_t slot = slot_of(slots64, slots32, p);
      if (slot >= 0) {
        acc += cache[slot * dim + c];
      } else {
        const uint8_t* row = weights + (base + id) * rbytes;
        float scale = 0.0f, bias = 0.0f;
        if (is_integer(prec)) load_qparams(prec, row, dim, &scale, &bias);
        acc += load_value(prec, row, c, scale, bias);
      }
    }
    if (c < dim) o[c] = acc;
  }
}

// Global row and bag of every index; validates ids and offsets (nothing is written
// to the tables before the host has checked `errors`).
__global__ void rows_kernel(DeviceBatch b, int64_t* rows, int64_t* bag_of, unsigned long long* errors) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= b.T * b.B) return;
  const int64_t t = k / b.B;
  const int64_t base = b.table_offsets[t], card = b.table_offsets[t + 1] - base;
  const int64_t lo = b.offsets[k], hi = b.offsets[k + 1];
  if (!(lo >= 0 && lo <= hi && hi <= b.N)) {
    note(&errors[1], k);
    return;
  }
  for (int64_t p = lo; p < hi; ++p) {
    const int64_t id = b.indices[p];
    if (id < 0 || id >= card) {
      note(&errors[0], p);
      rows[p] = 0;
    } else {
      rows[p] = base + id;
    }
    bag_of[p] = k;
  }
}

// One block per distinct row. order: index positions sorted by (row, position);
// seg_starts[u] .. seg_starts[u+1]: the positions of distinct row u.
__global__ void sgd_kernel(int prec, uint8_t* __restrict__ weights, int64_t rbytes, DeviceBatch b,
                           int dim, const float* __restrict__ grad_out, const int64_t* __restrict__ rows,
                           const int64_t* __restrict__ order, const int64_t* __restrict__ bag_of,
                           const int64_t* __restrict__ seg_starts, float lr, int stochastic,
                           uint32_t step_key, float* cache, const int64_t* slots64,
                           const int32_t* slots32) {
  extern __shared__ float row_values[];  // dim floats
  const int64_t u = blockIdx.x;
  const int64_t first = seg_starts[u], last = seg_starts[u + 1];
  const int64_t r = rows[order[first]];
  const int64_t slot = slot_of(slots64, slots32, order[first]);
  uint8_t* stored = weights + r * rbytes;
  float scale = 0.0f, bias = 0.0f;
  if (slot < 0 && is_integer(prec)) load_qparams(prec, stored, dim, &scale, &bias);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float g = 0.0f;
    for (int64_t i = first; i < last; ++i) {
      const int64_t k = bag_of[order[i]];
      const int64_t t = k / b.B, s = k - t * b.B;
      g += grad_out[(s * b.T + t) * dim + c];
    }
    const float step = lr * g;
    if (slot >= 0) {
      cache[slot * dim + c] = cache[slot * dim + c] - step;
    } else if (prec == kFP32) {
      float* w = reinterpret_cast<float*>(stored);
      w[c] = w[c] - step;
    } else {
      row_values[c] = load_value(prec, stored, c, scale, bias) - step;
    }
  }
  if (slot >= 0 || prec == kFP32) return;
  __syncthreads();  // every column read before the row is rewritten
  if (threadIdx.x == 0)
    quantize_row(prec, row_values, dim, stored, stochastic != 0, row_key(step_key, r), kPurposeUpdate);
}

__global__ void quantize_rows_kernel(int prec, const float* __restrict__ x, int64_t n, int dim,
                                     uint8_t* __restrict__ out, int64_t rbytes, int stochastic,
                                     uint32_t step_key, const int64_t* __restrict__ ids, int purpose) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  quantize_row(prec, x + i * dim, dim, out + i * rbytes, stochastic != 0, row_key(step_key, ids[i]),
               purpose);
}

__global__ void dequantize_rows_kernel(int prec, const uint8_t* __restrict__ storage, int64_t n,
                                       int dim, int64_t rbytes, float* __restrict__ out) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n * dim) return;
  const int64_t i = e / dim;
  const int c = (int)(e - i * dim);
  const uint8_t* row = storage + i * rbytes;
  float scale = 0.0f, bias = 0.0f;
  if (is_integer(prec)) load_qparams(prec, row, dim, &scale, &bias);
  out[e] = load_value(prec, row, c, scale, bias);
}

inline unsigned int blocks_for(int64_t work, int threads) {
  return (unsigned int)((work + threads - 1) / threads);
}

inline DeviceBatch make_batch(const int64_t* table_offsets, const int64_t* indices, const int64_t* offsets,
                              int64_t T, int64_t B, int64_t N, int64_t rows) {
  DeviceBatch b;
  b.table_offsets = table_offsets;
  b.indices = indices;
  b.offsets = offsets;
  b.T = T;
  b.B = B;
  b.N = N;
  b.rows = rows;
  return b;
}

}  // namespace mpc_tbe_cuda

// ---- C launchers (called from kernels/tbe_cuda.cpp); return a cudaError_t ------------
extern "C" {

int mpc_tbe_pool_cuda(int precision, const void* weights, int64_t dim, const int64_t* table_offsets,
                      int64_t T, int64_t B, int64_t N, int64_t rows, const int64_t* indices,
                      const int64_t* offsets, const float* cache, const int64_t* slots64,
                      const int32_t* slots32, float* out, unsigned long long* errors, void* stream) {
  using namespace mpc_tbe_cuda;
  const int64_t bags = T * B;
  if (bags == 0) return (int)cudaSuccess;
  DeviceBatch b = make_batch(table_offsets, indices, offsets, T, B, N, rows);
  pool_kernel<<<blocks_for(bags * kWarp, kPoolThreads), kPoolThreads, 0, (cudaStream_t)stream>>>(
      precision, (const uint8_t*)weights, row_bytes(precision, dim), b, (int)dim, cache, slots64, slots32,
      out, errors);
  return (int)cudaGetLastError();
}

int mpc_tbe_rows_cuda(const int64_t* table_offsets, int64_t T, int64_t B, int64_t N, int64_t rows,
                      const int64_t* indices, const int64_t* offsets, int64_t* global_rows,
                      int64_t* bag_of, unsigned long long* errors, void* stream) {
  using namespace mpc_tbe_cuda;
  const int64_t bags = T * B;
  if (bags == 0) return (int)cudaSuccess;
  DeviceBatch b = make_batch(table_offsets, indices, offsets, T, B, N, rows);
  rows_kernel<<<blocks_for(bags, 256), 256, 0, (cudaStream_t)stream>>>(b, global_rows, bag_of, errors);
  return (int)cudaGetLastError();
}

int mpc_tbe_sgd_cuda(int precision, void* weights, int64_t dim, int64_t T, int64_t B, int64_t rows,
                     const float* grad_out, const int64_t* global_rows, const int64_t* order,
                     const int64_t* bag_of, const int64_t* seg_starts, int64_t segments, float lr,
                     int stochastic, uint32_t step_key, float* cache, const int64_t* slots64,
                     const int32_t* slots32, void* stream) {
  using namespace mpc_tbe_cuda;
  if (segments == 0) return (int)cudaSuccess;
  DeviceBatch b = make_batch(nullptr, nullptr, nullptr, T, B, 0, rows);
  const int threads = dim >= 256 ? 256 : (int)((dim + kWarp - 1) / kWarp) * kWarp;
  sgd_kernel<<<(unsigned int)segments, threads, dim * sizeof(float), (cudaStream_t)stream>>>(
      precision, (uint8_t*)weights, row_bytes(precision, dim), b, (int)dim, grad_out, global_rows, order,
      bag_of, seg_starts, lr, stochastic, step_key, cache, slots64, slots32);
  return (int)cudaGetLastError();
}

int mpc_tbe_quantize_rows_cuda(int precision, const float* x, int64_t n, int64_t dim, void* out,
                               int stochastic, uint32_t step_key, const int64_t* ids, int purpose,
                               void* stream) {
  using namespace mpc_tbe_cuda;
  if (n == 0) return (int)cudaSuccess;
  quantize_rows_kernel<<<blocks_for(n, 128), 128, 0, (cudaStream_t)stream>>>(
      precision, x, n, (int)dim, (uint8_t*)out, row_bytes(precision, dim), stochastic, step_key, ids,
      purpose);
  return (int)cudaGetLastError();
}

int mpc_tbe_dequantize_rows_cuda(int precision, const void* storage, int64_t n, int64_t dim, float* out,
                                 void* stream) {
  using namespace mpc_tbe_cuda;
  if (n == 0) return (int)cudaSuccess;
  dequantize_rows_kernel<<<blocks_for(n * dim, 256), 256, 0, (cudaStream_t)stream>>>(
      precision, (const uint8_t*)storage, n, (int)dim, row_bytes(precision, dim), out);
  return (int)cudaGetLastError();
}

}  // extern "C"
