// FP32 cache management on the GPU (MPC, PAPERS.md §1): the same per-set policy as the
// CPU kernel (kernels/cache_policy.h), with plain C launchers and no torch headers
// (`nvcc -c -arch=sm_90 kernels/cache.cu` compiles it alone). Host bindings:
// kernels/cache_cuda.cpp. Reference twin: mpc/embedding/cache_reference.py.
//
// A set's accesses must be applied in batch order, so one thread owns one set: the
// host groups the batch's accesses by set (a stable sort of their set ids) and
// launches one thread per non-empty set. Sets are independent, so results do not
// depend on scheduling; counters use integer atomics (order-free sums). A fully
// associative cache has one set per group and is therefore walked by one thread:
// correct but sequential (use a set-associative cache on GPUs, as FBGEMM does).

#include <cuda_runtime.h>
#include <stdint.h>

#include "cache_policy.h"
#include "rowformat.h"

namespace mpc_cache {

struct LocateArgs {
  const int64_t* indices;       // table-local ids, table-major
  const int64_t* table_bounds;  // (T+1) positions of each table's ids
  const int64_t* table_offsets; // (T+1) first row of each table
  const int64_t* bounds;        // (G+1) positions of each group's ids
  const int64_t* geo;
  int64_t n, T, G;
  int64_t* row;
  int64_t* set_key;             // global set id
  int32_t* group;
  unsigned long long* first_bad;    // first id outside its table (n if none)
  unsigned long long* first_stray;  // first row outside its group (n if none)
};

__global__ void locate_kernel(LocateArgs p) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  p.row[i] = 0;
  p.set_key[i] = 0;
  p.group[i] = 0;
  const int64_t t = group_of(p.table_bounds, p.T, i), id = p.indices[i];
  if (id < 0 || id >= p.table_offsets[t + 1] - p.table_offsets[t]) {
    atomicMin(p.first_bad, (unsigned long long)i);
    return;
  }
  const int64_t row = p.table_offsets[t] + id, g = group_of(p.bounds, p.G, i);
  const int64_t* r = p.geo + g * kGeomFields;
  if (row < r[kFirstRow] || row >= r[kFirstRow] + r[kRows]) {
    atomicMin(p.first_stray, (unsigned long long)i);
    return;
  }
  p.row[i] = row;
  p.group[i] = (int32_t)g;
  p.set_key[i] = r[kSetOffset] + (int64_t)set_of(row, r[kNSets]);
}

// The rows to move at each event (storage == nullptr: decisions only).
struct RowData {
  uint8_t* storage;
  float* cache;
  int p, dim, purpose;
  int64_t rb;
  bool stochastic;
  uint32_t step_key;
};

struct ProcessArgs {
  const int64_t* rows;
  const int64_t* order;      // access positions grouped by set, batch order within a set
  const int64_t* seg_start;  // per non-empty set: first entry in `order`
  const int64_t* seg_len;
  int64_t nseg;
  const int32_t* group;
  const int64_t* set_key;
  const int64_t* bounds;
  const int64_t* geo;
  const int64_t* toff;
  int64_t T;
  int32_t policy;
  const int64_t* clocks;     // before this call
  int64_t* slot_out;
  int64_t* evicted;
  uint8_t* filled;
  unsigned long long* counters;  // (T, kCounterFields)
  unsigned long long* touched;
  RowData rd;
};

__global__ void process_kernel(CacheArrays a, ProcessArgs p) {
  int64_t seg = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (seg >= p.nseg) return;
  const int64_t lo = p.seg_start[seg], hi = lo + p.seg_len[seg];
  unsigned long long touched = 0;
  for (int64_t k = lo; k < hi; ++k) {
    const int64_t i = p.order[k];
    const int32_t gi = p.group[i];
    const int64_t* g = p.geo + (int64_t)gi * kGeomFields;
    const int64_t local = p.set_key[i] - g[kSetOffset];
    SetRef s = set_ref(a, g, local);
    const int64_t start = p.clocks[gi], now = start + (i - p.bounds[gi]) + 1;
    AccessResult res = p.policy == kLRU ? access<kLRU>(s, a.row_counts, p.rows[i], now, start)
                                        : access<kLFU>(s, a.row_counts, p.rows[i], now, start);
    unsigned long long* ct = p.counters + table_of(p.toff, p.T, p.rows[i]) * kCounterFields;
    atomicAdd(ct + kLookups, 1ull);
    atomicAdd(ct + (res.hit ? kHits : kMisses), 1ull);
    if (res.filled) atomicAdd(ct + kFills, 1ull);
    touched += res.first_touch;
    const int64_t slot = res.way < 0 ? -1 : g[kSlotOffset] + local * g[kWays] + res.way;
    if (res.filled && p.rd.storage) {  // write back the evicted row, then fill the slot
      float* value = p.rd.cache + slot * p.rd.dim;
      if (res.evicted >= 0) {
        mpc_rowformat::quantize_row(p.rd.p, value, p.rd.dim, p.rd.storage + res.evicted * p.rd.rb, p.rd.stochastic,
                                    mpc_rowformat::row_key(p.rd.step_key, res.evicted), p.rd.purpose);
      }
      mpc_rowformat::dequantize_row(p.rd.p, p.rd.storage + p.rows[i] * p.rd.rb, p.rd.dim, value);
    }
    p.slot_out[i] = slot;
    p.evicted[i] = res.evicted;
    p.filled[i] = res.filled;
    if (res.evicted >= 0) {
      atomicAdd(p.counters + table_of(p.toff, p.T, res.evicted) * kCounterFields + kEvictions, 1ull);
    }
  }
  // Every index uses its row's slot after the walk (a row rejected early may be admitted
  // by a later access of the same set).
  for (int64_t k = lo; k < hi; ++k) {
    const int64_t i = p.order[k];
    if (p.slot_out[i] >= 0) continue;
    const int64_t* g = p.geo + (int64_t)p.group[i] * kGeomFields;
    const int64_t local = p.set_key[i] - g[kSetOffset];
    int32_t w = find(set_ref(a, g, local), p.rows[i]);
    if (w >= 0) p.slot_out[i] = g[kSlotOffset] + local * g[kWays] + w;
  }
  if (touched) atomicAdd(p.touched, touched);
}

__global__ void probe_kernel(CacheArrays a, const int64_t* rows, const int64_t* set_key, const int32_t* group,
                             const int64_t* geo, int64_t n, int64_t* slot_out) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t* g = geo + (int64_t)group[i] * kGeomFields;
  const int64_t local = set_key[i] - g[kSetOffset];
  int32_t w = find(set_ref(a, g, local), rows[i]);
  slot_out[i] = w < 0 ? -1 : g[kSlotOffset] + local * g[kWays] + w;
}

inline unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

}  // namespace mpc_cache

// --- plain C launchers (called by kernels/cache_cuda.cpp) --------------------------------
// first_bad/first_stray must hold n on entry.
extern "C" cudaError_t mpc_cache_locate_cuda(const int64_t* indices, const int64_t* table_bounds,
                                             const int64_t* table_offsets, const int64_t* bounds,
                                             const int64_t* geometry, int64_t n, int64_t T, int64_t G, int64_t* row,
                                             int64_t* set_key, int32_t* group, unsigned long long* first_bad,
                                             unsigned long long* first_stray, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  mpc_cache::LocateArgs p{indices, table_bounds, table_offsets, bounds, geometry, n, T, G, row, set_key, group,
                          first_bad, first_stray};
  const int threads = 256;
  mpc_cache::locate_kernel<<<mpc_cache::blocks_for(n, threads), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// storage == nullptr: decisions only; else the events' rows are moved (precision code p,
// rows of rb bytes, FP32 cache rows of dim floats, rounding stream step_key/purpose).
extern "C" cudaError_t mpc_cache_process_cuda(
    int64_t* tags, int64_t* times, int32_t* row_counts, int32_t* slot_counts, int32_t* order_state,
    int32_t* set_state, int32_t* index, int64_t state_stride, const int64_t* rows, const int64_t* order,
    const int64_t* seg_start,
    const int64_t* seg_len, int64_t nseg, const int32_t* group, const int64_t* set_key, const int64_t* bounds,
    const int64_t* geometry, const int64_t* table_offsets, int64_t T, int32_t policy, const int64_t* clocks,
    int64_t* slot_out, int64_t* evicted, uint8_t* filled, unsigned long long* counters,
    unsigned long long* touched, uint8_t* storage, float* cache, int32_t p, int32_t dim, int64_t rb,
    bool stochastic, uint32_t step_key, int32_t purpose, cudaStream_t stream) {
  if (nseg == 0) return cudaSuccess;
  mpc_cache::CacheArrays a{tags, times, row_counts, slot_counts, order_state, set_state, index, state_stride};
  mpc_cache::RowData rd{storage, cache, p, dim, purpose, rb, stochastic, step_key};
  mpc_cache::ProcessArgs args{rows, order, seg_start, seg_len, nseg, group, set_key, bounds, geometry,
                              table_offsets, T, policy, clocks, slot_out, evicted, filled, counters, touched, rd};
  const int threads = 128;
  mpc_cache::process_kernel<<<mpc_cache::blocks_for(nseg, threads), threads, 0, stream>>>(a, args);
  return cudaGetLastError();
}

extern "C" cudaError_t mpc_cache_probe_cuda(int64_t* tags, int64_t* times, int32_t* order_state,
                                            int32_t* set_state, int32_t* index, int64_t state_stride,
                                            const int64_t* rows, const int64_t* set_key, const int32_t* group,
                                            const int64_t* geometry, int64_t n, int64_t* slot_out,
                                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // Read only: find() touches tags and the index.
  mpc_cache::CacheArrays a{tags, times, nullptr, nullptr, order_state, set_state, index, state_stride};
  const int threads = 256;
  mpc_cache::probe_kernel<<<mpc_cache::blocks_for(n, threads), threads, 0, stream>>>(
      a, rows, set_key, group, geometry, n, slot_out);
  return cudaGetLastError();
}
