// Table-batched embedding kernels on the CPU (threads of at::parallel_for): one
// call pools the bags of all T tables for FP32/FP16/INT8/INT4/INT2 rows (like FBGEMM's
// TBE), one call applies the fused backward + SGD update with nearest or stochastic
// re-quantization, and two batched row converters. MPC's core (PAPERS.md §1, §5); the
// pure-PyTorch twin and the exact semantics are in mpc/embedding/ops.py.
//
// Determinism: pooling is parallel over bags, each summed in bag order; the update
// groups indices by row with a stable sort, then runs parallel over distinct rows,
// each summing its gradients in index order. No result depends on the thread count.
//
// export: tbe_pool tbe_sgd_update tbe_quantize_rows tbe_dequantize_rows
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define MPC_TBE_AVX2 1
#endif

#include "rowformat.h"
#include "rowformat_cpu.h"

namespace mpc_tbe {
using namespace mpc_rowformat;
using torch::Tensor;

constexpr int kPurposeUpdate = 0;  // rng.PURPOSE_UPDATE

// ---- input checks ----------------------------------------------------------------------
struct Batch {
  const int64_t* table_offsets;
  const int64_t* indices;
  const int64_t* offsets;
  int64_t T, B, N, rows;
};

torch::ScalarType storage_dtype(int p) {
  return p == kFP32 ? torch::kFloat32 : p == kFP16 ? torch::kFloat16 : torch::kUInt8;
}

void check_storage(int p, const Tensor& w, int64_t dim, const char* what) {
  TORCH_CHECK(valid_precision(p), "unknown precision code ", p);
  TORCH_CHECK(dim >= 1, "dim must be >= 1, got ", dim);
  int64_t width = is_integer(p) ? row_bytes(p, dim) : dim;
  TORCH_CHECK(w.dim() == 2 && w.size(1) == width && w.scalar_type() == storage_dtype(p),
              what, ": expected ", c10::toString(storage_dtype(p)), " (rows, ", width, "), got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), what, " must be a contiguous CPU tensor");
}

void check_int64(const Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == torch::kInt64 && t.is_contiguous() &&
                  t.device().is_cpu(),
              what, " must be a contiguous 1-D int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes());
}

Batch check_batch(const Tensor& table_offsets, const Tensor& indices, const Tensor& offsets,
                  int64_t rows) {
  check_int64(table_offsets, "table_offsets");
  check_int64(indices, "indices");
  check_int64(offsets, "offsets");
  Batch b;
  b.table_offsets = table_offsets.data_ptr<int64_t>();
  b.indices = indices.data_ptr<int64_t>();
  b.offsets = offsets.data_ptr<int64_t>();
  b.T = table_offsets.numel() - 1;
  b.N = indices.numel();
  b.rows = rows;
  TORCH_CHECK(b.T >= 1, "table_offsets needs T+1 >= 2 entries");
  TORCH_CHECK(b.table_offsets[0] == 0 && b.table_offsets[b.T] == rows,
              "table_offsets must run from 0 to the storage's ", rows, " rows");
  for (int64_t t = 0; t < b.T; ++t)
    TORCH_CHECK(b.table_offsets[t + 1] > b.table_offsets[t], "table ", t, " has no rows");
  int64_t nbags = offsets.numel() - 1;
  TORCH_CHECK(nbags >= 0 && nbags % b.T == 0, "offsets has ", offsets.numel(),
              " entries; expected T*B+1 with T=", b.T);
  b.B = nbags / b.T;
  TORCH_CHECK(b.offsets[0] == 0 && b.offsets[nbags] == b.N,
              "offsets must start at 0 and end at len(indices)=", b.N);
  return b;
}

// Index range [lo, hi) of bag k; false when offsets are not non-decreasing in [0, N]
// (checked bag by bag inside the parallel loops rather than in a serial pass).
inline bool bag_range(const Batch& b, int64_t k, int64_t* lo, int64_t* hi) {
  *lo = b.offsets[k];
  *hi = b.offsets[k + 1];
  return *lo >= 0 && *lo <= *hi && *hi <= b.N;
}

// Calls body(begin, end) on chunks of `chunk` items of [0, n), handed out one at a time
// to the intra-op threads (a dynamic schedule: when another process takes a core, the
// remaining threads take over its chunks instead of waiting at the barrier). Chunks
// write disjoint outputs, so no result depends on which thread ran which chunk.
template <typename Body>
void parallel_chunks(int64_t n, int64_t chunk, const Body& body) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), nchunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1))
      body(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Smallest bad position seen by any thread (deterministic error message).
struct FirstError {
  std::atomic<int64_t> pos;
  explicit FirstError(int64_t none) : pos(none) {}
  void note(int64_t p) {
    int64_t cur = pos.load();
    while (p < cur && !pos.compare_exchange_weak(cur, p)) {}
  }
};

void raise_bad_offsets(const Batch& b, const FirstError& bad_bag) {
  const int64_t k = bad_bag.pos.load();
  TORCH_CHECK_VALUE(k >= b.T * b.B, "offsets must be non-decreasing within [0, len(indices)]: bag ", k,
                    " spans [", b.offsets[k], ", ", b.offsets[k + 1], ")");
}

[[noreturn]] void raise_bad_id(const Batch& b, int64_t p) {
  // The last bag starting at or before p is the (non-empty) bag holding p.
  int64_t k = std::upper_bound(b.offsets, b.offsets + b.T * b.B + 1, p) - b.offsets - 1;
  int64_t t = k / b.B;
  int64_t card = b.table_offsets[t + 1] - b.table_offsets[t];
  TORCH_CHECK_VALUE(false, "id ", b.indices[p], " out of range for table ", t, " (C", t + 1, ", ",
                    card, " rows)");
  abort();  // unreachable
}

struct Cache {
  const float* weights = nullptr;  // (S, dim)
  float* mutable_weights = nullptr;
  const int64_t* slots64 = nullptr;
  const int32_t* slots32 = nullptr;
  int64_t size = 0;
  int64_t slot(int64_t p) const {
    return slots64 ? slots64[p] : slots32 ? (int64_t)slots32[p] : -1;
  }
};

Cache check_cache(const std::optional<Tensor>& cache_weights, const std::optional<Tensor>& slots,
                  int64_t dim, int64_t n) {
  Cache c;
  TORCH_CHECK(cache_weights.has_value() == slots.has_value(),
              "cache_weights and slots go together (both or neither)");
  if (!slots.has_value()) return c;
  const Tensor& w = *cache_weights;
  const Tensor& s = *slots;
  TORCH_CHECK(w.dim() == 2 && w.size(1) == dim && w.scalar_type() == torch::kFloat32 &&
                  w.is_contiguous() && w.device().is_cpu(),
              "cache_weights must be contiguous float32 CPU (slots, ", dim, "), got ", w.scalar_type(),
              " ", w.sizes());
  TORCH_CHECK(s.dim() == 1 && s.numel() == n && s.is_contiguous() && s.device().is_cpu() &&
                  (s.scalar_type() == torch::kInt64 || s.scalar_type() == torch::kInt32),
              "slots must be contiguous int32/int64 CPU with one entry per index (", n, "), got ",
              s.scalar_type(), " ", s.sizes());
  c.weights = w.data_ptr<float>();
  c.mutable_weights = w.data_ptr<float>();
  if (s.scalar_type() == torch::kInt64) c.slots64 = s.data_ptr<int64_t>();
  else c.slots32 = s.data_ptr<int32_t>();
  c.size = w.size(0);
  // One branch-free min/max pass (vectorized), then the first bad slot for the message.
  int64_t lo = -1, hi = -1;
  if (c.slots64) {
    for (int64_t p = 0; p < n; ++p) lo = std::min(lo, c.slots64[p]), hi = std::max(hi, c.slots64[p]);
  } else {
    int32_t lo32 = -1, hi32 = -1;
    for (int64_t p = 0; p < n; ++p) lo32 = std::min(lo32, c.slots32[p]), hi32 = std::max(hi32, c.slots32[p]);
    lo = lo32, hi = hi32;
  }
  if (lo < -1 || hi >= c.size) {
    for (int64_t p = 0; p < n; ++p) {
      int64_t v = c.slot(p);
      TORCH_CHECK(v >= -1 && v < c.size, "slot ", v, " at index ", p, " out of range [-1, ", c.size, ")");
    }
  }
  return c;
}

// ---- pooling ---------------------------------------------------------------------------
// acc[0:dim] += row (dequantized): per element one multiply and one add (scale * q +
// bias), then the add into the sum; the AVX2 path performs the same IEEE operations.
template <int P>
inline void add_row_scalar(const uint8_t* row, int dim, int from, float* __restrict acc) {
  if constexpr (P == kFP32) {
    const float* r = reinterpret_cast<const float*>(row);
    for (int c = from; c < dim; ++c) acc[c] += r[c];
  } else if constexpr (P == kFP16) {
    for (int c = from; c < dim; ++c) acc[c] += half_to_float(load_u16(row + 2 * c));
  } else {
    float scale, bias;
    load_qparams(P, row, dim, &scale, &bias);
    for (int c = from; c < dim; ++c) acc[c] += (float)load_code(P, row, c) * scale + bias;
  }
}

#ifdef MPC_TBE_AVX2
// Columns [8j, 8j+8) of a row as floats.
template <int P>
inline __m256 load8(const uint8_t* row, int j, __m256 scale, __m256 bias) {
  if constexpr (P == kFP32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * j);
  } else if constexpr (P == kFP16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
  } else {
    __m256i q;
    if constexpr (P == kINT8) {
      uint64_t b;
      memcpy(&b, row + 8 * j, 8);
      q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)b));
    } else if constexpr (P == kINT4) {
      uint32_t b;
      memcpy(&b, row + 4 * j, 4);
      __m128i v = _mm_cvtsi32_si128((int)b);
      __m128i nib = _mm_set1_epi8(0x0F);
      __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
      q = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));  // low nibble first
    } else {
      uint16_t b;
      memcpy(&b, row + 2 * j, 2);
      __m256i bytes = _mm256_set_epi32(b >> 8, b >> 8, b >> 8, b >> 8, b & 0xFF, b & 0xFF, b & 0xFF, b & 0xFF);
      q = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_set_epi32(6, 4, 2, 0, 6, 4, 2, 0)),
                           _mm256_set1_epi32(3));
    }
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), bias);
  }
}

template <int P>
inline void add_row(const uint8_t* row, int dim, float* __restrict acc) {
  __m256 scale = _mm256_setzero_ps(), bias = _mm256_setzero_ps();
  if constexpr (P >= kINT8) {
    float s, b;
    load_qparams(P, row, dim, &s, &b);
    scale = _mm256_set1_ps(s);
    bias = _mm256_set1_ps(b);
  }
  const int chunks = dim / 8;
  for (int j = 0; j < chunks; ++j)
    _mm256_storeu_ps(acc + 8 * j, _mm256_add_ps(_mm256_loadu_ps(acc + 8 * j), load8<P>(row, j, scale, bias)));
  if (chunks * 8 < dim) add_row_scalar<P>(row, dim, chunks * 8, acc);
}
#else
template <int P>
inline void add_row(const uint8_t* row, int dim, float* __restrict acc) {
  add_row_scalar<P>(row, dim, 0, acc);
}
#endif

// Work is cut into blocks of kBlockSamples samples. Within a block, bags are summed table
// by table (a table's hot rows stay cached while its ids are read), and the block's
// (S, T, dim) output slab is small enough to stay in L2 for its strided writes. A first
// pass over the block resolves every id to its row address; the second pass sums,
// requesting rows kPrefetch ids ahead: a random row of a large table is a DRAM access,
// so its load must start early. (Tuned on a 2-core AMD EPYC VM with Kaggle-size tables.)
// Small batches get smaller blocks, at least kBlocksPerThread per thread: with one block
// of 128 samples, a batch of 128 would be pooled by one thread while the others wait.
constexpr int64_t kBlockSamples = 128;
constexpr int64_t kMinBlockSamples = 8;
constexpr int64_t kBlocksPerThread = 4;

inline int64_t block_samples(int64_t B) {
  const int64_t blocks = kBlocksPerThread * at::get_num_threads();
  const int64_t want = (B + blocks - 1) / blocks;
  return std::max(kMinBlockSamples, std::min(kBlockSamples, want));
}
constexpr size_t kPrefetch = 32;

struct RowRef {
  const uint8_t* row;  // nullptr: bad id (reported, skipped)
  bool cached;         // an FP32 cache row
};

// Sum(dim, out row) starts a bag, add(ref) adds its rows in bag order, end(out row) stores it.
template <typename Sum>
void pool_blocks(const Batch& b, const uint8_t* weights, int64_t rbytes, int dim, const Cache& cache,
                 float* out, FirstError& bad_id, FirstError& bad_bag) {
  const int64_t S = block_samples(b.B), nblocks = (b.B + S - 1) / S;
  const bool cached = cache.slots64 || cache.slots32;
  parallel_chunks(nblocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<RowRef> refs;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t s0 = blk * S, s1 = std::min(b.B, s0 + S);
      refs.clear();
      for (int64_t t = 0; t < b.T; ++t) {  // pass 1: addresses
        const int64_t base = b.table_offsets[t], card = b.table_offsets[t + 1] - base;
        for (int64_t s = s0; s < s1; ++s) {
          int64_t lo, hi;
          if (!bag_range(b, t * b.B + s, &lo, &hi)) { bad_bag.note(t * b.B + s); continue; }
          for (int64_t p = lo; p < hi; ++p) {
            const int64_t id = b.indices[p];
            const int64_t slot = cached ? cache.slot(p) : -1;
            if (id < 0 || id >= card) {
              bad_id.note(p);
              refs.push_back({nullptr, false});
            } else if (slot >= 0) {
              refs.push_back({reinterpret_cast<const uint8_t*>(cache.weights + slot * dim), true});
            } else {
              refs.push_back({weights + (base + id) * rbytes, false});
            }
          }
        }
      }
      const size_t n = refs.size();
      for (size_t i = 0; i < std::min<size_t>(n, kPrefetch); ++i)
        if (refs[i].row) prefetch_row(refs[i].row, rbytes);
      size_t i = 0;
      for (int64_t t = 0; t < b.T; ++t) {  // pass 2: sums, in bag order
        for (int64_t s = s0; s < s1; ++s) {
          int64_t lo, hi;
          if (!bag_range(b, t * b.B + s, &lo, &hi)) lo = hi = 0;
          float* o = out + (s * b.T + t) * dim;
          Sum sum(dim, o);
          for (int64_t p = lo; p < hi; ++p, ++i) {
            if (i + kPrefetch < n && refs[i + kPrefetch].row) prefetch_row(refs[i + kPrefetch].row, rbytes);
            const RowRef& r = refs[i];
            if (r.row) sum.add(r);
          }
          sum.end(o);
        }
      }
    }
  });
}

// Any dim: sums in the output row.
template <int P>
struct MemorySum {
  int dim;
  float* acc;
  MemorySum(int d, float* o) : dim(d), acc(o) {
    for (int c = 0; c < dim; ++c) acc[c] = 0.0f;
  }
  void add(const RowRef& r) {
    if (r.cached) add_row<kFP32>(r.row, dim, acc);
    else add_row<P>(r.row, dim, acc);
  }
  void end(float*) {}
};

#ifdef MPC_TBE_AVX2
// dim = 8 * NC: the sum stays in NC registers and is stored once.
template <int P, int NC>
struct RegisterSum {
  __m256 acc[NC];
  RegisterSum(int, float*) {
    for (int j = 0; j < NC; ++j) acc[j] = _mm256_setzero_ps();
  }
  void add(const RowRef& r) {
    const __m256 zero = _mm256_setzero_ps();
    if (r.cached) {
      for (int j = 0; j < NC; ++j) acc[j] = _mm256_add_ps(acc[j], load8<kFP32>(r.row, j, zero, zero));
      return;
    }
    __m256 scale = zero, bias = zero;
    if constexpr (P >= kINT8) {
      float sc, bi;
      load_qparams(P, r.row, 8 * NC, &sc, &bi);
      scale = _mm256_set1_ps(sc);
      bias = _mm256_set1_ps(bi);
    }
    for (int j = 0; j < NC; ++j) acc[j] = _mm256_add_ps(acc[j], load8<P>(r.row, j, scale, bias));
  }
  void end(float* o) {
    for (int j = 0; j < NC; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
  }
};
#endif

template <int P>
void pool_impl(const Batch& b, const uint8_t* weights, int64_t rbytes, int dim, const Cache& cache,
               float* out, FirstError& bad_id, FirstError& bad_bag) {
#ifdef MPC_TBE_AVX2
  switch (dim) {
    case 8: return pool_blocks<RegisterSum<P, 1>>(b, weights, rbytes, dim, cache, out, bad_id, bad_bag);
    case 16: return pool_blocks<RegisterSum<P, 2>>(b, weights, rbytes, dim, cache, out, bad_id, bad_bag);
    case 32: return pool_blocks<RegisterSum<P, 4>>(b, weights, rbytes, dim, cache, out, bad_id, bad_bag);
    case 64: return pool_blocks<RegisterSum<P, 8>>(b, weights, rbytes, dim, cache, out, bad_id, bad_bag);
    default: break;
  }
#endif
  pool_blocks<MemorySum<P>>(b, weights, rbytes, dim, cache, out, bad_id, bad_bag);
}

}  // namespace mpc_tbe

// Pooled lookup of all tables: (B, T, dim) float32.
torch::Tensor tbe_pool(int64_t precision, torch::Tensor weights, torch::Tensor table_offsets,
                       torch::Tensor indices, torch::Tensor offsets, int64_t dim,
                       std::optional<torch::Tensor> cache_weights, std::optional<torch::Tensor> slots) {
  using namespace mpc_tbe;
  const int p = (int)precision;
  check_storage(p, weights, dim, "weights");
  Batch b = check_batch(table_offsets, indices, offsets, weights.size(0));
  Cache cache = check_cache(cache_weights, slots, dim, b.N);
  Tensor out = torch::empty({b.B, b.T, dim}, torch::kFloat32);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(weights.data_ptr());
  const int64_t rb = row_bytes(p, dim);
  FirstError bad_id(b.N), bad_bag(b.T * b.B);
  float* o = out.data_ptr<float>();
  switch (p) {
    case kFP32: pool_impl<kFP32>(b, w, rb, (int)dim, cache, o, bad_id, bad_bag); break;
    case kFP16: pool_impl<kFP16>(b, w, rb, (int)dim, cache, o, bad_id, bad_bag); break;
    case kINT8: pool_impl<kINT8>(b, w, rb, (int)dim, cache, o, bad_id, bad_bag); break;
    case kINT4: pool_impl<kINT4>(b, w, rb, (int)dim, cache, o, bad_id, bad_bag); break;
    default: pool_impl<kINT2>(b, w, rb, (int)dim, cache, o, bad_id, bad_bag); break;
  }
  raise_bad_offsets(b, bad_bag);
  if (bad_id.pos.load() < b.N) raise_bad_id(b, bad_id.pos.load());
  return out;
}

namespace mpc_tbe {

// Stable LSD radix sort of keys[lo, hi) = (row << 32 | position), rows in [base,
// base + rows), by row: positions stay in index order within a row. Keys arrive in
// position order. `tmp` is scratch of at least hi - lo entries.
void sort_by_row(uint64_t* keys, int64_t n, int64_t base, int64_t rows, uint64_t* tmp) {
  constexpr int kBits = 11;
  constexpr uint64_t kMask = (1u << kBits) - 1;
  int row_bits = 0;
  while (row_bits < 32 && (int64_t(1) << row_bits) < rows) ++row_bits;
  int64_t count[kMask + 2];
  uint64_t *src = keys, *dst = tmp;
  for (int shift = 0; shift < row_bits; shift += kBits) {
    std::fill(count, count + kMask + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++count[((((src[i] >> 32) - base) >> shift) & kMask) + 1];
    for (uint64_t d = 1; d <= kMask + 1; ++d) count[d] += count[d - 1];
    for (int64_t i = 0; i < n; ++i) dst[count[(((src[i] >> 32) - base) >> shift) & kMask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + n, keys);
}

struct Groups {
  std::vector<uint64_t> keys;   // (row << 32 | position), sorted by (row, position)
  std::vector<int64_t> starts;  // segment boundaries in keys, one segment per distinct row
  std::vector<int64_t> grad_of; // row of grad_out (sample * T + table) of each position's bag
};

Groups group_by_row(const Batch& b) {
  TORCH_CHECK(b.N < (int64_t(1) << 32) && b.rows < (int64_t(1) << 32),
              "sgd_update supports < 2^32 indices and rows");
  Groups g;
  g.keys.resize(b.N);
  g.grad_of.resize(b.N);
  FirstError bad_id(b.N), bad_bag(b.T * b.B);
  parallel_chunks(b.T * b.B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t t = k / b.B, base = b.table_offsets[t], card = b.table_offsets[t + 1] - base;
      int64_t lo, hi;
      if (!bag_range(b, k, &lo, &hi)) { bad_bag.note(k); continue; }
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t id = b.indices[p];
        if (id < 0 || id >= card) { bad_id.note(p); continue; }
        g.keys[p] = (uint64_t(base + id) << 32) | uint64_t(p);
        g.grad_of[p] = (k - t * b.B) * b.T + t;
      }
    }
  });
  raise_bad_offsets(b, bad_bag);
  if (bad_id.pos.load() < b.N) raise_bad_id(b, bad_id.pos.load());
  // Table t's positions are one range and its rows another, above table t-1's: sorting
  // each table's range by row sorts the whole (tables in parallel).
  std::vector<std::vector<int64_t>> starts(b.T);
  std::vector<uint64_t> tmp(b.N);
  parallel_chunks(b.T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = b.offsets[t * b.B], hi = b.offsets[(t + 1) * b.B];
      const int64_t base = b.table_offsets[t];
      sort_by_row(g.keys.data() + lo, hi - lo, base, b.table_offsets[t + 1] - base, tmp.data() + lo);
      for (int64_t i = lo; i < hi; ++i)
        if (i == lo || (g.keys[i] >> 32) != (g.keys[i - 1] >> 32)) starts[t].push_back(i);
    }
  });
  for (const auto& st : starts) g.starts.insert(g.starts.end(), st.begin(), st.end());
  g.starts.push_back(b.N);
  return g;
}

// Before anything is written: every occurrence of a row names the same slot.
void check_slots_per_row(const Groups& g, const Cache& cache) {
  if (!cache.slots64 && !cache.slots32) return;
  const int64_t nseg = (int64_t)g.starts.size() - 1, none = (int64_t)g.keys.size();
  FirstError bad(none);  // sorted position of the first disagreeing occurrence
  parallel_chunks(nseg, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = cache.slot(int64_t(g.keys[g.starts[s]] & 0xFFFFFFFFu));
      for (int64_t i = g.starts[s] + 1; i < g.starts[s + 1]; ++i) {
        if (cache.slot(int64_t(g.keys[i] & 0xFFFFFFFFu)) != first) {
          bad.note(i);
          break;
        }
      }
    }
  });
  const int64_t i = bad.pos.load();
  TORCH_CHECK_VALUE(i == none, "slots: all occurrences of a row must have the same slot (row ",
                    i == none ? 0 : int64_t(g.keys[i] >> 32), ")");
}

// Ids and rows ahead of the one being updated are requested early (the rows are sparse
// and random: DRAM accesses).
constexpr int64_t kUpdatePrefetch = 8;

// Applies the update to every distinct row (segment of g), parallel over rows. p is a
// template argument so that the row format's branches fold away.
template <int p>
void update_rows(const Batch& b, const Groups& g, const Cache& cache, uint8_t* weights, int D,
                 const float* grads, float lr, bool stochastic, uint32_t step_key) {
  const int64_t rb = row_bytes(p, D), nseg = (int64_t)g.starts.size() - 1, n = b.N;
  auto grad_of = [&](int64_t i) {  // gradient row of sorted key i
    return grads + g.grad_of[g.keys[i] & 0xFFFFFFFFu] * D;
  };
  auto target_of = [&](int64_t s, int64_t* slot) {  // row written by segment s
    const uint64_t key = g.keys[g.starts[s]];
    *slot = cache.slot(int64_t(key & 0xFFFFFFFFu));
    return *slot >= 0 ? reinterpret_cast<uint8_t*>(cache.mutable_weights + *slot * D)
                      : weights + int64_t(key >> 32) * rb;
  };
  parallel_chunks(nseg, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> gsum(D), row(D);
    for (int64_t s = begin; s < end; ++s) {
      int64_t slot;
      if (s + kUpdatePrefetch < end) {
        const uint8_t* ahead = target_of(s + kUpdatePrefetch, &slot);
        prefetch_row<true>(ahead, slot >= 0 ? D * 4 : rb);
      }
      std::fill(gsum.begin(), gsum.end(), 0.0f);
      for (int64_t i = g.starts[s]; i < g.starts[s + 1]; ++i) {
        if (i + 2 * kUpdatePrefetch < n) __builtin_prefetch(grad_of(i + 2 * kUpdatePrefetch));
        const float* gr = grad_of(i);
        for (int c = 0; c < D; ++c) gsum[c] += gr[c];
      }
      uint8_t* target = target_of(s, &slot);
      if (slot >= 0 || p == kFP32) {
        float* x = reinterpret_cast<float*>(target);
        for (int c = 0; c < D; ++c) x[c] = x[c] - lr * gsum[c];
        continue;
      }
      const int64_t r = int64_t(g.keys[g.starts[s]] >> 32);
      dequantize_row_cpu(p, target, D, row.data());
      for (int c = 0; c < D; ++c) row[c] = row[c] - lr * gsum[c];
      quantize_row_cpu(p, row.data(), D, target, stochastic, row_key(step_key, r), kPurposeUpdate);
    }
  });
}

}  // namespace mpc_tbe

// Fused backward + SGD: row -= lr * (sum of its bags' gradients), re-quantized.
void tbe_sgd_update(int64_t precision, torch::Tensor weights, torch::Tensor table_offsets,
                    torch::Tensor indices, torch::Tensor offsets, torch::Tensor grad_out, double lr,
                    int64_t dim, bool stochastic, int64_t step_key,
                    std::optional<torch::Tensor> cache_weights, std::optional<torch::Tensor> slots) {
  using namespace mpc_tbe;
  const int p = (int)precision;
  check_storage(p, weights, dim, "weights");
  Batch b = check_batch(table_offsets, indices, offsets, weights.size(0));
  Cache cache = check_cache(cache_weights, slots, dim, b.N);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == b.B && grad_out.size(1) == b.T &&
                  grad_out.size(2) == dim && grad_out.scalar_type() == torch::kFloat32 &&
                  grad_out.is_contiguous() && grad_out.device().is_cpu(),
              "grad_out must be contiguous float32 CPU (", b.B, ", ", b.T, ", ", dim, "), got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  if (b.N == 0) return;
  Groups g = group_by_row(b);
  check_slots_per_row(g, cache);
  uint8_t* w = reinterpret_cast<uint8_t*>(weights.data_ptr());
  const float* gr = grad_out.data_ptr<float>();
  const float lr_f = (float)lr;
  const uint32_t key = (uint32_t)step_key;
  switch (p) {
    case kFP32: update_rows<kFP32>(b, g, cache, w, (int)dim, gr, lr_f, stochastic, key); break;
    case kFP16: update_rows<kFP16>(b, g, cache, w, (int)dim, gr, lr_f, stochastic, key); break;
    case kINT8: update_rows<kINT8>(b, g, cache, w, (int)dim, gr, lr_f, stochastic, key); break;
    case kINT4: update_rows<kINT4>(b, g, cache, w, (int)dim, gr, lr_f, stochastic, key); break;
    default: update_rows<kINT2>(b, g, cache, w, (int)dim, gr, lr_f, stochastic, key); break;
  }
}

// Rows (n, dim) float32 -> storage rows; `rows` (global row ids) key the stream.
torch::Tensor tbe_quantize_rows(int64_t precision, torch::Tensor x, bool stochastic, int64_t step_key,
                                torch::Tensor rows, int64_t purpose) {
  using namespace mpc_tbe;
  const int p = (int)precision;
  TORCH_CHECK(valid_precision(p), "unknown precision code ", p);
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1 && x.scalar_type() == torch::kFloat32 &&
                  x.is_contiguous() && x.device().is_cpu(),
              "x must be contiguous float32 CPU (n, dim), got ", x.scalar_type(), " ", x.sizes());
  check_int64(rows, "rows");
  TORCH_CHECK(rows.numel() == x.size(0), "rows must have one id per row of x");
  const int64_t n = x.size(0), dim = x.size(1);
  const int64_t width = is_integer(p) ? row_bytes(p, dim) : dim;
  Tensor out = torch::empty({n, width}, storage_dtype(p));
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  const float* xs = x.data_ptr<float>();
  const int64_t* ids = rows.data_ptr<int64_t>();
  const int64_t rb = row_bytes(p, dim);
  parallel_chunks(n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row_cpu(p, xs + i * dim, (int)dim, o + i * rb, stochastic,
                   row_key((uint32_t)step_key, ids[i]), (int)purpose);
  });
  return out;
}

// Storage rows -> (n, dim) float32.
torch::Tensor tbe_dequantize_rows(int64_t precision, torch::Tensor storage, int64_t dim) {
  using namespace mpc_tbe;
  const int p = (int)precision;
  check_storage(p, storage, dim, "storage");
  const int64_t n = storage.size(0), rb = row_bytes(p, dim);
  Tensor out = torch::empty({n, dim}, torch::kFloat32);
  const uint8_t* s = reinterpret_cast<const uint8_t*>(storage.data_ptr());
  float* o = out.data_ptr<float>();
  parallel_chunks(n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dequantize_row_cpu(p, s + i * rb, (int)dim, o + i * dim);
  });
  return out;
}
