// FP32 cache management on the CPU (MPC, PAPERS.md §1): admission, eviction and
// lookup of cached rows for a batch, with the per-set policy of kernels/cache_policy.h,
// and the data movement of each event (write-back: re-quantize the evicted FP32 row
// into storage; fill: dequantize the admitted row into its slot) with the row formats
// of kernels/rowformat.h, i.e. exactly as tbe_quantize_rows/tbe_dequantize_rows.
// Reference twin: mpc/embedding/cache_reference.py.
//
// Each shard moves the rows of its own events in event order, after deciding them
// (decisions read only tags/times/counts), which equals "all write-backs, then all
// fills": a row filled in a call is accessed in it and so cannot be evicted in it, a
// slot filled in a call cannot be emptied again in it, and a row evicted and refilled
// in one call has both events in its set's thread, in that order.
//
// Determinism with threads: sets are independent (a row belongs to one set, so do its
// LFU count, its slot and its stored row), and each access's clock value is its
// position in its group's sequence, known up front. The sets are dealt into shards;
// a shard's accesses are listed in batch order and walked by whichever thread takes the
// shard, so every set sees its accesses in batch order whatever the thread count or
// schedule. When every group is one table and there are enough tables (walk_order), a
// whole group is the unit instead: its ids are already contiguous and in batch order,
// so the thread that takes it reads them straight from the batch and the shard sort
// (locate) is skipped (measured on the Kaggle tables, batch 2048, 2 threads: prepare
// 0.87-0.90x the time). Counters are summed per thread (integers: the order does not
// matter).
//
// export: cache_prepare cache_probe cache_rebuild

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include <omp.h>

#include "cache_policy.h"
#include "rowformat.h"
#include "rowformat_cpu.h"

namespace mpc_cache {

inline void check_i64(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.is_contiguous(),
              name, " must be a contiguous CPU int64 tensor");
}

inline void check_i32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt32 && t.is_contiguous(),
              name, " must be a contiguous CPU int32 tensor");
}

// Validates the state/derived tensors against the geometry; returns raw pointers.
// state = [tags, times, row_counts, ...], derived = [order, set_state, index, slot_counts].
CacheArrays arrays(const torch::Tensor& geometry, int64_t policy, const std::vector<torch::Tensor>& state,
                   const std::vector<torch::Tensor>& derived) {
  TORCH_CHECK(policy == kLRU || policy == kLFU, "cache policy must be 0 (LRU) or 1 (LFU), got ", policy);
  TORCH_CHECK(state.size() >= 3 && derived.size() == 5, "cache: expected [tags, times, lfu_counts, ...] and "
              "[order, set_state, index, slot_counts, header]");
  check_i64(geometry, "geometry");
  TORCH_CHECK(geometry.dim() == 2 && geometry.size(1) == kGeomFields, "geometry must be (G, ", (int)kGeomFields,
              ")");
  const int64_t G = geometry.size(0);
  const int64_t* geo = geometry.data_ptr<int64_t>();
  int64_t slots = 0, sets = 0, index = 0, ordered = 0, states = 0, rows_end = 0, header = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t* r = geo + g * kGeomFields;
    const bool scan = r[kIndexSize] == 0;
    TORCH_CHECK(r[kWays] >= 1 && r[kNSets] >= 1 && r[kNSets] <= 0xFFFFFFFFll && r[kSlotOffset] == slots && r[kSetOffset] == sets &&
                    r[kIndexOffset] == index && r[kOrderOffset] == ordered && r[kStateOffset] == states &&
                    (scan ? r[kWays] <= kScanWays
                          : r[kIndexSize] >= 2 * r[kWays] && (r[kIndexSize] & (r[kIndexSize] - 1)) == 0) &&
                    (r[kHeaderOffset] == -1 || (scan && policy == kLRU && r[kHeaderOffset] == header)),
                "cache geometry row ", g, " is inconsistent");
    if (r[kHeaderOffset] >= 0) header += 2 * r[kWays] * r[kNSets];
    slots += r[kWays] * r[kNSets];
    sets += r[kNSets];
    index += r[kIndexSize] * r[kNSets];
    ordered += scan ? 0 : r[kWays] * r[kNSets];
    states += scan ? 0 : r[kNSets];
    rows_end = std::max(rows_end, r[kFirstRow] + r[kRows]);
  }
  const int64_t stride = policy == kLRU ? 3 : 1;
  check_i64(state[0], "tags");
  check_i64(state[1], "times");
  check_i32(state[2], "lfu_counts");
  check_i32(derived[0], "order");
  check_i32(derived[1], "set_state");
  check_i32(derived[2], "index");
  check_i32(derived[3], "slot_counts");
  TORCH_CHECK(derived[4].device().is_cpu() && derived[4].scalar_type() == torch::kUInt8 &&
                  derived[4].is_contiguous() && derived[4].numel() == header,
              "cache header must be a contiguous CPU uint8 tensor of ", header, " bytes");
  TORCH_CHECK(state[0].numel() == slots && state[1].numel() == slots, "tags/times must have ", slots, " slots");
  TORCH_CHECK(policy == kLRU || state[2].numel() >= rows_end, "lfu_counts must cover ", rows_end, " rows");
  TORCH_CHECK(derived[0].numel() == 2 * ordered && derived[1].numel() == stride * states &&
                  derived[2].numel() == index && derived[3].numel() == (policy == kLFU ? slots : 0),
              "cache order/set_state/index/slot_counts have the wrong sizes");
  return CacheArrays{state[0].data_ptr<int64_t>(), state[1].data_ptr<int64_t>(), state[2].data_ptr<int32_t>(),
                     policy == kLFU ? derived[3].data_ptr<int32_t>() : nullptr, derived[0].data_ptr<int32_t>(),
                     derived[1].data_ptr<int32_t>(), derived[2].data_ptr<int32_t>(), stride,
                     header ? derived[4].data_ptr<uint8_t>() : nullptr};
}

// A bounds argument: parts + 1 non-decreasing positions from 0 to n, passed as such or
// as the batch's offsets (parts * k + 1 entries, k = bags per part), whose every k-th
// entry they are: the table-major offsets give each table's and each group's positions
// without a strided copy on the Python side.
std::vector<int64_t> read_bounds(const torch::Tensor& bounds, int64_t parts, int64_t n, const char* name) {
  check_i64(bounds, name);
  const int64_t m = bounds.numel();
  TORCH_CHECK(parts >= 1 && m >= 1 && (m - 1) % parts == 0, name, " must have ", parts,
              " * k + 1 entries (k = 1: the bounds; else the batch's offsets), got ", m);
  const int64_t stride = (m - 1) / parts;
  const int64_t* p = bounds.data_ptr<int64_t>();
  std::vector<int64_t> b(parts + 1);
  for (int64_t k = 0; k <= parts; ++k) b[k] = p[k * stride];
  TORCH_CHECK(b[0] == 0 && b[parts] == n, name, " must start at 0 and end at the number of ids");
  for (int64_t k = 0; k < parts; ++k) TORCH_CHECK(b[k] <= b[k + 1], name, " must be non-decreasing");
  return b;
}

// Sets are dealt into kShards shards by blocks of consecutive sets (neighbouring sets'
// state shares cache lines, so a block stays on one core); threads take whole shards
// dynamically, so a shard of hot small tables does not hold the others up.
constexpr int64_t kSetsPerBlock = 16;
constexpr int64_t kShards = 64;
constexpr int64_t kPrefetchAhead = 16;  // accesses of the shard: enough to overlap DRAM latency
constexpr int64_t kPrefetchHeader = 32; // header sets: the header this far ahead, the way at kPrefetchAhead
inline int32_t shard_of(int64_t set) { return (int32_t)((set / kSetsPerBlock) % kShards); }

// An array of n trivially constructible values left uninitialized (every entry is
// written before it is read): a batch's scratch without std::vector's zero fill.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  void resize(int64_t n) { p.reset(new T[n]); }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

// The batch located: global row, set (local to the group), group and table of every
// id, in batch order (`at`); with by_shard instead the ids grouped by shard:
// order[shard_start[s] .. shard_start[s+1]) are shard s's positions, ascending (batch
// order), and seq[k] is the access at position order[k]: the walk reads one sequential
// array (16 bytes an access; `at` is not built).
struct Access {
  int64_t row;
  int32_t set;  // < nsets < 2^31 (slots < 2^31, checked)
  uint16_t group, table;
};

struct Located {
  std::vector<int64_t> table_bounds, bounds;  // each table's / group's positions (T+1, G+1)
  Scratch<Access> at, seq;
  Scratch<int32_t> order;
  int64_t shard_start[kShards + 1];
};

// indices: table-local ids, table t's at positions [table_bounds[t], table_bounds[t+1]);
// bounds: each group's positions (groups are runs of whole tables). Raises on an id
// outside its table. kAt builds `at`, kByShard the shard order (seq, order), kCheckOnly
// nothing: it only checks the ids (a walk by group locates its own).
enum class Locate { kAt, kByShard, kCheckOnly };

Located locate(const torch::Tensor& indices, const torch::Tensor& table_bounds,
               const torch::Tensor& table_offsets, const torch::Tensor& bounds, const torch::Tensor& geometry,
               Locate mode = Locate::kAt) {
  const bool by_shard = mode == Locate::kByShard, at = mode == Locate::kAt;
  check_i64(indices, "indices");
  check_i64(table_offsets, "table_offsets");
  const int64_t n = indices.numel(), T = table_offsets.numel() - 1, G = geometry.size(0);
  Located loc;
  loc.table_bounds = read_bounds(table_bounds, T, n, "table_bounds");
  loc.bounds = read_bounds(bounds, G, n, "bounds");
  TORCH_CHECK(n < (int64_t(1) << 31), "cache: at most 2^31 - 1 ids per batch");
  TORCH_CHECK(T <= 65535 && G <= 65535, "cache: at most 65535 tables");
  if (G > 0) {
    const int64_t* last = geometry.data_ptr<int64_t>() + (G - 1) * kGeomFields;
    TORCH_CHECK(last[kSlotOffset] + last[kWays] * last[kNSets] < (int64_t(1) << 31),
                "cache: at most 2^31 - 1 slots");
  }
  const int64_t *ids = indices.data_ptr<int64_t>(), *tb = loc.table_bounds.data();
  const int64_t *toff = table_offsets.data_ptr<int64_t>(), *b = loc.bounds.data();
  const int64_t* geo = geometry.data_ptr<int64_t>();
  Scratch<uint8_t> shard;
  Scratch<int32_t> sets;  // by_shard: each position's set (local to its group)
  if (by_shard) {
    shard.resize(n);
    sets.resize(n);
    loc.order.resize(n);
    loc.seq.resize(n);
  } else if (at) {
    loc.at.resize(n);
  }
  // by_shard: a stable counting sort of the positions by shard, in parallel: each
  // thread counts the shards of its own range of positions, then places them after the
  // same shard's positions of the threads before it (so each shard stays in batch order).
  const int nt = omp_get_max_threads();
  std::vector<int64_t> hist(by_shard ? (size_t)nt * kShards : 0, 0);
  int64_t first_bad = n, first_stray = n;
#pragma omp parallel num_threads(nt) reduction(min : first_bad, first_stray)
  {
    for (int64_t t = 0; t < T; ++t) {
      if (tb[t] == tb[t + 1]) continue;
      const int64_t g = group_of(b, G, tb[t]), rows = toff[t + 1] - toff[t];
      const int64_t* r = geo + g * kGeomFields;
#pragma omp for schedule(static) nowait
      for (int64_t i = tb[t]; i < tb[t + 1]; ++i) {
        const int64_t id = ids[i], row = toff[t] + id;
        const bool bad = id < 0 || id >= rows;
        if (bad || i >= b[g + 1] || row < r[kFirstRow] || row >= r[kFirstRow] + r[kRows]) {  // or bounds disagree
          if (bad) first_bad = std::min(first_bad, i);
          else first_stray = std::min(first_stray, i);
          if (by_shard) shard[i] = 0, sets[i] = 0;  // placed (shard 0), then the call raises
          else if (at) loc.at[i] = Access{0, 0, 0, 0};
          continue;
        }
        if (mode == Locate::kCheckOnly) continue;  // checked only: each group's walk locates its own ids
        const int32_t set = (int32_t)set_of(row, r[kNSets]);
        if (by_shard) {
          shard[i] = (uint8_t)shard_of(r[kSetOffset] + set);
          sets[i] = set;
        } else {
          loc.at[i] = Access{row, set, (uint16_t)g, (uint16_t)t};
        }
      }
    }
    if (by_shard) {
      const int tid = omp_get_thread_num(), used = omp_get_num_threads();
      const int64_t lo = n * tid / used, hi = n * (tid + 1) / used;
#pragma omp barrier
      int64_t* mine = hist.data() + (size_t)tid * kShards;
      for (int64_t i = lo; i < hi; ++i) ++mine[shard[i]];
#pragma omp barrier
#pragma omp single
      {
        int64_t next = 0;
        for (int64_t s = 0; s < kShards; ++s) {
          loc.shard_start[s] = next;
          for (int u = 0; u < used; ++u) {
            const int64_t c = hist[(size_t)u * kShards + s];
            hist[(size_t)u * kShards + s] = next;  // thread u's first place in shard s
            next += c;
          }
        }
        loc.shard_start[kShards] = next;
      }
      // the accesses rebuilt from the ids, walking this range's tables and groups
      int64_t t = group_of(tb, T, lo), g = group_of(b, G, lo);
      for (int64_t i = lo; i < hi; ++i) {
        while (i >= tb[t + 1]) ++t;
        while (i >= b[g + 1]) ++g;
        const int64_t k = mine[shard[i]]++;
        loc.order[k] = (int32_t)i;
        loc.seq[k] = Access{toff[t] + ids[i], sets[i], (uint16_t)g, (uint16_t)t};
      }
    }
  }
  if (first_bad < n) {
    const int64_t t = group_of(tb, T, first_bad);
    TORCH_CHECK(false, "id ", ids[first_bad], " out of range for table ", t, " (", toff[t + 1] - toff[t], " rows)");
  }
  TORCH_CHECK(first_stray == n, "cache: id at position ", first_stray, " is outside the rows of its cache group");
  return loc;
}

// The rows to move at each event: storage (all rows) and the FP32 cache rows.
struct RowData {
  uint8_t* storage = nullptr;
  float* cache = nullptr;
  int p = 0, dim = 0, purpose = 0;
  int64_t rb = 0;
  bool stochastic = false;
  uint32_t step_key = 0;

  // The lines move() will read and write.
  void prefetch(int64_t slot, int64_t evicted, int64_t row) const {
    using mpc_rowformat::prefetch_row;
    prefetch_row<true>(cache + slot * dim, dim * 4);
    prefetch_row(storage + row * rb, rb);
    if (evicted >= 0) prefetch_row<true>(storage + evicted * rb, rb);
  }

  // Write back the row evicted from `slot` (if any), then fill `slot` from `row`.
  void move(int64_t slot, int64_t evicted, int64_t row) const {
    using namespace mpc_rowformat;
    float* value = cache + slot * dim;
    if (evicted >= 0) {
      quantize_row_cpu(p, value, dim, storage + evicted * rb, stochastic, row_key(step_key, evicted), purpose);
    }
    dequantize_row_cpu(p, storage + row * rb, dim, value);
  }
};

RowData row_data(const std::vector<torch::Tensor>& rowdata, int64_t precision, bool stochastic, int64_t step_key,
                 int64_t purpose, int64_t slots, int64_t rows) {
  RowData rd;
  if (rowdata.empty()) return rd;  // decisions only (the caller moves the rows)
  TORCH_CHECK(rowdata.size() == 2, "rowdata is [] or [storage, cache_weights]");
  const torch::Tensor &storage = rowdata[0], &cache = rowdata[1];
  const int p = (int)precision;
  TORCH_CHECK(mpc_rowformat::valid_precision(p) && p != mpc_rowformat::kFP32, "bad cached precision code ", p);
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == torch::kFloat32 && cache.is_contiguous() &&
                  cache.dim() == 2 && cache.size(0) == slots,
              "cache_weights must be contiguous CPU float32 (", slots, ", dim)");
  const int64_t dim = cache.size(1), rb = mpc_rowformat::row_bytes(p, dim);
  auto want = p == mpc_rowformat::kFP16 ? torch::kFloat16 : torch::kUInt8;
  TORCH_CHECK(storage.device().is_cpu() && storage.is_contiguous() && storage.scalar_type() == want &&
                  storage.dim() == 2 && storage.size(0) >= rows &&
                  storage.nbytes() == (size_t)(storage.size(0) * rb),
              "storage must be contiguous CPU ", c10::toString(want), " rows of ", rb, " bytes");
  rd.storage = reinterpret_cast<uint8_t*>(storage.data_ptr());
  rd.cache = cache.data_ptr<float>();
  rd.p = p;
  rd.dim = (int)dim;
  rd.rb = rb;
  rd.stochastic = stochastic;
  rd.step_key = (uint32_t)step_key;
  rd.purpose = (int)purpose;
  return rd;
}

// Each access's outcome, stored at its place k in loc.order: a shard's entries are
// contiguous, so threads working on different shards never write the same cache line.
struct Outcomes {
  Scratch<int32_t> slot;  // slots < 2^31 (checked)
  int64_t* evicted = nullptr;  // batch order, only when the events are returned
  uint8_t* filled = nullptr;
};

// What one thread adds up over the shards it took.
struct ThreadTotals {
  std::vector<int64_t> counters;
  int64_t touched = 0, uncached = 0;
  std::vector<int32_t> events, rejected;  // scratch (places k), reused run after run
  std::vector<int64_t> event_evicted;     // per event: the row written back, or -1
  std::vector<int64_t> uncached_rows, distinct;  // scratch: a run's uncached rows, their open-addressing set
  std::vector<Access> located;                   // scratch: a group's accesses (walks by group)
  std::vector<int8_t> way_of;                    // scratch of Frozen: row -> way in a frozen set, or -1
  std::vector<uint8_t> frozen;                   // scratch of Frozen: per set, 1 once frozen
  std::vector<int32_t> frozen_sets, frozen_rejected;
};

struct Walk {
  const Located& loc;
  CacheArrays a;
  const RowData& rd;
  const int64_t *geo, *bnd, *toff, *clk;
  int64_t n, G, T;
  const uint8_t* far;  // per group: its policy state is too large to stay in the CPU caches
};

// A group whose tags, times and header fit in this many bytes stays in the CPU caches
// (its sets are hit again and again): asking for its lines ahead only costs time. Larger
// ones leave the caches between calls, while the rest of a training step runs (measured,
// walks by group on the Kaggle tables, AMD EPYC with 1 MB L2 a core: 32 KB rather than
// 256 KB, prepare 0.96x; 4 KB, 1.02x).
constexpr int64_t kNearBytes = 32 << 10;

std::vector<uint8_t> far_groups(const int64_t* geo, int64_t G) {
  std::vector<uint8_t> far(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t* r = geo + g * kGeomFields;
    far[g] = r[kWays] * r[kNSets] * 18 > kNearBytes;  // 8 + 8 bytes of tag and time, 2 of header
  }
  return far;
}

// Distinct rows among `rows` (a shard's uncached rows; few): an open-addressing set.
int64_t count_distinct(const std::vector<int64_t>& rows, std::vector<int64_t>& table) {
  if (rows.empty()) return 0;
  size_t cap = 16;
  while (cap < 2 * rows.size()) cap <<= 1;
  table.assign(cap, -1);
  int64_t distinct = 0;
  for (int64_t r : rows) {
    size_t j = (size_t)(mix64((uint64_t)r) & (cap - 1));
    while (table[j] >= 0 && table[j] != r) j = (j + 1) & (cap - 1);
    if (table[j] < 0) {
      table[j] = r;
      ++distinct;
    }
  }
  return distinct;
}

// The accesses of one walk (a shard's, or a group's), in batch order: places k in
// [lo, hi), each with its access and its position in the batch.
struct Run {
  const Access* seq;     // the access at place k is seq[k - base]
  const int32_t* order;  // the position of place k, or nullptr: k itself
  int64_t base, lo, hi;
  int64_t group = -1;    // the one group of every access (a walk by group), or -1
  const Access& at(int64_t k) const { return seq[k - base]; }
  int64_t pos(int64_t k) const { return order ? order[k] : k; }
};

// LRU sets that cannot change again in this call. A set that rejects a miss had its
// least recent way accessed in this call, so all its ways were: it rejects every later
// miss, keeps its rows, and its later accesses only set the time of a hit way. In a walk
// by group of few rows, those accesses take a row -> way table instead of the set's
// header, and each frozen set's recency list is rebuilt at the end of the walk as its
// ways by time, newest first (what the moves to front give: each access's time is the
// group's newest). No way of a frozen set is touched first in this call.
constexpr int64_t kFreezeRows = 16384;  // the table: one byte per row of the group

struct Frozen {
  int8_t* way_of = nullptr;  // nullptr: not in use for this run
  uint8_t* frozen = nullptr;
  int32_t* rejected = nullptr;  // places of the misses in frozen sets (room for the whole run)
  int64_t nrejected = 0, sink = 0;

  Frozen(const Walk& w, const Run& run, int32_t policy, ThreadTotals& acc) {
    if (policy != kLRU || run.group < 0 || !w.a.header) return;
    const int64_t* g = w.geo + run.group * kGeomFields;
    if (g[kHeaderOffset] < 0 || g[kRows] > kFreezeRows) return;
    acc.way_of.assign(g[kRows], -1);
    acc.frozen.assign(g[kNSets], 0);
    acc.frozen_sets.clear();
    acc.frozen_rejected.resize(run.hi - run.lo);
    way_of = acc.way_of.data();
    frozen = acc.frozen.data();
    rejected = acc.frozen_rejected.data();
  }
  bool has(int32_t set) const { return way_of && frozen[set]; }
  // After a rejection in set `set` (its ways all filled).
  void freeze(const CacheArrays& a, const int64_t* g, int32_t set, ThreadTotals& acc) {
    frozen[set] = 1;
    acc.frozen_sets.push_back(set);
    const int64_t* tags = a.tags + g[kSlotOffset] + set * g[kWays];
    for (int64_t x = 0; x < g[kWays]; ++x) way_of[tags[x] - g[kFirstRow]] = (int8_t)x;
  }
  void rebuild_recency(const CacheArrays& a, const int64_t* g, const ThreadTotals& acc) const {
    for (int32_t set : acc.frozen_sets) {
      const SetRef s = set_ref(a, g, set);
      uint8_t ways[kScanWays];
      std::iota(ways, ways + s.ways, (uint8_t)0);
      std::sort(ways, ways + s.ways, [&](uint8_t x, uint8_t y) { return s.times[x] > s.times[y]; });
      std::copy(ways, ways + s.ways, s.mru);
    }
  }
};

// One run: every access, in batch order; then the rows of its events, in event order (a
// row's write-back precedes its refill), requested when decided and again a few events
// ahead.
template <int32_t Policy>
void walk(const Walk& w, const Run& run, Outcomes& out, ThreadTotals& acc) {
  const int64_t lo = run.lo, hi = run.hi;
  acc.events.clear();
  acc.event_evicted.clear();
  acc.rejected.clear();
  Frozen fz(w, run, Policy, acc);
  const bool any_far = run.group < 0 || w.far[run.group];  // a walk by group: near throughout, or far
  for (int64_t k = lo; k < hi; ++k) {
    if (any_far) {
      if (k + kPrefetchHeader < hi && w.far[run.at(k + kPrefetchHeader).group]) {
        const Access& aj = run.at(k + kPrefetchHeader);
        const SetRef sj = set_ref(w.a, w.geo + aj.group * kGeomFields, aj.set);
        if (sj.fp) prefetch_set(sj, nullptr, aj.row);
      }
      if (k + kPrefetchAhead < hi && w.far[run.at(k + kPrefetchAhead).group]) {
        const Access& aj = run.at(k + kPrefetchAhead);
        const SetRef sj = set_ref(w.a, w.geo + aj.group * kGeomFields, aj.set);
        if (sj.fp) prefetch_way(sj, aj.row);
        else prefetch_set(sj, Policy == kLFU ? w.a.row_counts : nullptr, aj.row);
      }
    }
    const Access& ak = run.at(k);
    const int64_t i = run.pos(k);
    const int32_t gi = ak.group;
    const int64_t* g = w.geo + gi * kGeomFields;
    const int64_t row = ak.row, start = w.clk[gi], now = start + (i - w.bnd[gi]) + 1;
    int64_t* ct = acc.counters.data() + ak.table * kCounterFields;
    if (fz.has(ak.set)) {  // without branches: hits and misses of tiny tables alternate at random
      const int32_t way = fz.way_of[row - g[kFirstRow]];
      const bool hit = way >= 0;
      const int64_t slot = g[kSlotOffset] + ak.set * g[kWays] + way;
      ct[kLookups] += 1;
      ct[kHits] += hit;
      ct[kMisses] += !hit;
      *(hit ? w.a.times + slot : &fz.sink) = now;
      out.slot[k] = hit ? (int32_t)slot : -1;
      fz.rejected[fz.nrejected] = (int32_t)k;
      fz.nrejected += !hit;
      continue;
    }
    AccessResult res = access<Policy>(set_ref(w.a, g, ak.set), w.a.row_counts, row, now, start);
    if (fz.way_of && res.way < 0) fz.freeze(w.a, g, ak.set, acc);
    ct[kLookups] += 1;
    ct[res.hit ? kHits : kMisses] += 1;
    ct[kFills] += res.filled;
    acc.touched += res.first_touch;
    if (res.way < 0) acc.rejected.push_back((int32_t)k);
    const int32_t slot = res.way < 0 ? -1 : (int32_t)(g[kSlotOffset] + ak.set * g[kWays] + res.way);
    out.slot[k] = slot;
    if (res.filled) {
      acc.events.push_back((int32_t)k);
      acc.event_evicted.push_back(res.evicted);
      // The event's rows are moved after the walk: ask for their lines now, so that
      // they arrive while the walk goes on (measured: prepare 0.97x the time).
      if (w.rd.storage) w.rd.prefetch(slot, res.evicted, row);
    }
    if (res.evicted >= 0) {  // the victim's table: the group's own unless the group is shared
      const int64_t vt = w.G == w.T ? ak.table : table_of(w.toff, w.T, res.evicted);
      acc.counters[vt * kCounterFields + kEvictions] += 1;
    }
  }
  if (fz.way_of) {
    fz.rebuild_recency(w.a, w.geo + run.group * kGeomFields, acc);
    acc.rejected.insert(acc.rejected.end(), fz.rejected, fz.rejected + fz.nrejected);
  }
  const RowData& rd = w.rd;
  if (rd.storage) {
    constexpr size_t kAhead = 8;
    const size_t ne = acc.events.size();
    for (size_t e = 0; e < ne; ++e) {
      if (e + kAhead < ne) {  // and again a few events ahead (measured: without it, 1.17x the time)
        const int64_t k = acc.events[e + kAhead];
        rd.prefetch(out.slot[k], acc.event_evicted[e + kAhead], run.at(k).row);
      }
      const int64_t k = acc.events[e];
      rd.move(out.slot[k], acc.event_evicted[e], run.at(k).row);
    }
  } else {  // the events in batch order, for the caller
    for (size_t e = 0; e < acc.events.size(); ++e) {
      const int64_t i = run.pos(acc.events[e]);
      out.evicted[i] = acc.event_evicted[e];
      out.filled[i] = 1;
    }
  }
  // Under LFU a row rejected early may be admitted by a later access (counts grow):
  // every id uses its row's final slot. Only this shard touches these sets. Under LRU a
  // rejection means the set's least recent way was used in this call, so all its ways
  // were, and stay so: the set rejects every later miss and the row stays uncached.
  std::vector<int64_t>& uncached = acc.uncached_rows;
  uncached.clear();
  for (int32_t k : acc.rejected) {
    const Access& ak = run.at(k);
    if (Policy == kLFU) {
      const int64_t* g = w.geo + ak.group * kGeomFields;
      int32_t way = find(set_ref(w.a, g, ak.set), ak.row);
      if (way >= 0) {
        out.slot[k] = (int32_t)(g[kSlotOffset] + ak.set * g[kWays] + way);
        continue;
      }
    }
    uncached.push_back(ak.row);
  }
  acc.uncached += count_distinct(uncached, acc.distinct);  // a row lives in one shard
}

// The runs of a walk: whole groups when every group is one table (its ids a contiguous
// range of the batch) and there are enough of them to share among the threads (each
// thread then locates the ids of the groups it takes: no shard sort); else the shards.
// Returns the groups in the order they are handed out, far ones (slowest per access)
// and then large ones first, so that no long walk is left for the end; empty: shards.
constexpr int64_t kGroupsPerThread = 8;
std::vector<int64_t> walk_order(const torch::Tensor& table_bounds, const torch::Tensor& bounds,
                                const torch::Tensor& geometry, const torch::Tensor& table_offsets, int64_t n, int nt,
                                const std::vector<uint8_t>& far) {
  const int64_t G = geometry.size(0), T = table_offsets.numel() - 1;
  if (G != T || G < kGroupsPerThread * nt) return {};
  const std::vector<int64_t> tb = read_bounds(table_bounds, T, n, "table_bounds"), b = read_bounds(bounds, G, n, "bounds");
  const int64_t *geo = geometry.data_ptr<int64_t>(), *toff = table_offsets.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t* r = geo + g * kGeomFields;
    if (b[g] != tb[g] || r[kFirstRow] != toff[g] || r[kRows] != toff[g + 1] - toff[g]) return {};
  }
  std::vector<int64_t> order(G);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return far[x] != far[y] ? far[x] > far[y] : b[x + 1] - b[x] > b[y + 1] - b[y];
  });
  return order;
}

torch::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto t = torch::empty({(int64_t)v.size()}, torch::kInt64);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

}  // namespace mpc_cache

// Admission/eviction for one training batch (ids and bounds as in locate(); each bounds
// argument may be the batch's offsets, see read_bounds). Updates tags/times/counts/
// clocks/counters (and, given state[5], the traffic counters: +1 iteration and the
// stats below) and the derived structures in place and, when
// rowdata = [storage, cache_weights], moves the rows of each event. Returns [slots (n):
// each id's row's slot after the walk, or -1; writeback_slots, writeback_rows,
// fill_slots, fill_rows (access order; empty when the rows were moved here); stats (2):
// distinct cached rows accessed, distinct rows left uncached].
std::vector<torch::Tensor> cache_prepare(torch::Tensor indices, torch::Tensor table_bounds, torch::Tensor bounds,
                                         torch::Tensor geometry, torch::Tensor table_offsets, int64_t policy,
                                         std::vector<torch::Tensor> state, std::vector<torch::Tensor> derived,
                                         std::vector<torch::Tensor> rowdata, int64_t precision, bool stochastic,
                                         int64_t step_key, int64_t purpose) {
  using namespace mpc_cache;
  CacheArrays a = arrays(geometry, policy, state, derived);
  TORCH_CHECK(state.size() == 5 || state.size() == 6,
              "cache_prepare: state is [tags, times, lfu_counts, clocks, counters] (+ [traffic])");
  const int64_t n = indices.numel(), G = geometry.size(0), T = table_offsets.numel() - 1;
  torch::Tensor clocks = state[3], counters = state[4];
  check_i64(clocks, "clocks");
  check_i64(counters, "counters");
  TORCH_CHECK(clocks.numel() == G && counters.numel() == T * kCounterFields,
              "clocks/counters have the wrong sizes");
  const int nt = omp_get_max_threads();
  const std::vector<uint8_t> far = far_groups(geometry.data_ptr<int64_t>(), G);
  const std::vector<int64_t> group_order = walk_order(table_bounds, bounds, geometry, table_offsets, n, nt, far);
  const bool by_group = !group_order.empty();
  Located loc = locate(indices, table_bounds, table_offsets, bounds, geometry,
                       by_group ? Locate::kCheckOnly : Locate::kByShard);
  RowData rd = row_data(rowdata, precision, stochastic, step_key, purpose, state[0].numel(),
                        table_offsets.data_ptr<int64_t>()[T]);
  int64_t* clk = clocks.data_ptr<int64_t>();
  Walk w{loc, a, rd, geometry.data_ptr<int64_t>(), loc.bounds.data(), table_offsets.data_ptr<int64_t>(),
         clk, n, G, T, far.data()};
  Outcomes out;
  out.slot.resize(n);
  auto slots = torch::empty({n}, torch::kInt64);
  int64_t* slot = slots.data_ptr<int64_t>();
  // The events are returned for the caller to move the rows; moved here, they are not.
  const bool events = !rd.storage;
  std::vector<int64_t> evicted(events ? n : 0, -1);
  std::vector<uint8_t> filled(events ? n : 0, 0);
  out.evicted = evicted.data();
  out.filled = filled.data();
  std::vector<ThreadTotals> totals(nt);
  const int64_t* ids = indices.data_ptr<int64_t>();
  int used = 1;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
#pragma omp single
    used = omp_get_num_threads();
    ThreadTotals& acc = totals[tid];
    acc.counters.assign(T * kCounterFields, 0);
    if (by_group) {  // each group's ids located here, by the thread that walks them
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < G; ++k) {
        const int64_t g = group_order[k], lo = w.bnd[g], hi = w.bnd[g + 1];
        if (lo == hi) continue;
        const int64_t nsets = w.geo[g * kGeomFields + kNSets];
        acc.located.resize(hi - lo);
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t row = w.toff[g] + ids[i];
          acc.located[i - lo] = Access{row, (int32_t)set_of(row, nsets), (uint16_t)g, (uint16_t)g};
        }
        const Run run{acc.located.data(), nullptr, lo, lo, hi, g};
        if (policy == kLRU) walk<kLRU>(w, run, out, acc);
        else walk<kLFU>(w, run, out, acc);
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) slot[i] = out.slot[i];
    } else {
      const int32_t* order = loc.order.data();
#pragma omp for schedule(dynamic, 1)
      for (int64_t s = 0; s < kShards; ++s) {
        const Run run{loc.seq.data(), order, 0, loc.shard_start[s], loc.shard_start[s + 1]};
        if (policy == kLRU) walk<kLRU>(w, run, out, acc);
        else walk<kLFU>(w, run, out, acc);
      }
      // back to batch order (each position written once)
#pragma omp for schedule(static)
      for (int64_t k = 0; k < n; ++k) slot[order[k]] = out.slot[k];
    }
  }
  int64_t* cnt = counters.data_ptr<int64_t>();
  int64_t touched = 0, uncached = 0;
  for (int t = 0; t < used; ++t) {
    for (int64_t k = 0; k < T * kCounterFields; ++k) cnt[k] += totals[t].counters[k];
    touched += totals[t].touched;
    uncached += totals[t].uncached;
  }
  for (int64_t g = 0; g < G; ++g) clk[g] += w.bnd[g + 1] - w.bnd[g];
  // the events in access order
  std::vector<int64_t> wb_slots, wb_rows, fill_slots, fill_rows;
  const int64_t* toff = table_offsets.data_ptr<int64_t>();
  for (int64_t i = 0, t = 0; i < (events ? n : 0); ++i) {
    while (i >= loc.table_bounds[t + 1]) ++t;
    if (evicted[i] >= 0) {
      wb_slots.push_back(slot[i]);
      wb_rows.push_back(evicted[i]);
    }
    if (filled[i]) {
      fill_slots.push_back(slot[i]);
      fill_rows.push_back(toff[t] + ids[i]);
    }
  }
  if (state.size() == 6) {  // the traffic counters: iterations, uncached rows, cached rows
    check_i64(state[5], "traffic");
    TORCH_CHECK(state[5].numel() == 3, "traffic must have 3 entries");
    int64_t* tr = state[5].data_ptr<int64_t>();
    tr[0] += 1;
    tr[1] += uncached;
    tr[2] += touched;
  }
  auto stats = torch::empty({2}, torch::kInt64);
  stats.data_ptr<int64_t>()[0] = touched;
  stats.data_ptr<int64_t>()[1] = uncached;
  return {slots, to_tensor(wb_slots), to_tensor(wb_rows), to_tensor(fill_slots), to_tensor(fill_rows), stats};
}

// Slot of each id's row, or -1 (eval lookups). Reads only.
torch::Tensor cache_probe(torch::Tensor indices, torch::Tensor table_bounds, torch::Tensor bounds,
                          torch::Tensor geometry, torch::Tensor table_offsets, int64_t policy,
                          std::vector<torch::Tensor> state, std::vector<torch::Tensor> derived) {
  using namespace mpc_cache;
  CacheArrays a = arrays(geometry, policy, state, derived);
  Located loc = locate(indices, table_bounds, table_offsets, bounds, geometry);
  const int64_t n = indices.numel();
  const int64_t* geo = geometry.data_ptr<int64_t>();
  auto slots = torch::empty({n}, torch::kInt64);
  int64_t* out = slots.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const Access& ai = loc.at[i];
    const int64_t* g = geo + ai.group * kGeomFields;
    int32_t w = find(set_ref(a, g, ai.set), ai.row);
    out[i] = w < 0 ? -1 : g[kSlotOffset] + ai.set * g[kWays] + w;
  }
  return slots;
}

// Rebuilds the derived structures (slot counts; index, order and set state of the
// structured sets) from tags, times and counts, after a state_dict load or after the
// Python fallback ran. Checks that every set's filled ways are a prefix.
void cache_rebuild(torch::Tensor geometry, int64_t policy, std::vector<torch::Tensor> state,
                   std::vector<torch::Tensor> derived) {
  using namespace mpc_cache;
  CacheArrays a = arrays(geometry, policy, state, derived);
  const int64_t G = geometry.size(0);
  const int64_t* geo = geometry.data_ptr<int64_t>();
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t* g = geo + gi * kGeomFields;
    int64_t bad_set = -1;
#pragma omp parallel for schedule(dynamic, 64) reduction(max : bad_set)
    for (int64_t k = 0; k < g[kNSets]; ++k) {
      SetRef s = set_ref(a, g, k);
      int32_t fill = 0;
      while (fill < s.ways && s.tags[fill] >= 0) ++fill;
      for (int32_t w = fill; w < s.ways; ++w) {
        if (s.tags[w] >= 0) bad_set = std::max(bad_set, k);
      }
      if (s.counts) {
        for (int32_t w = 0; w < s.ways; ++w) s.counts[w] = w < fill ? a.row_counts[s.tags[w]] : 0;
      }
      if (s.fp) {  // fingerprints, and the filled ways by time, newest first
        std::vector<int32_t> ways(fill);
        std::iota(ways.begin(), ways.end(), 0);
        std::sort(ways.begin(), ways.end(), [&](int32_t x, int32_t y) { return s.times[x] > s.times[y]; });
        for (int32_t w = 0; w < s.ways; ++w) {
          s.fp[w] = w < fill ? fingerprint(s.tags[w]) : kNoWay;
          s.mru[w] = w < fill ? (uint8_t)ways[w] : kNoWay;
        }
      }
      if (s.mask < 0) continue;  // a scan set keeps nothing else
      s.state[0] = fill;
      std::fill(s.index, s.index + s.mask + 1, -1);
      for (int32_t w = 0; w < fill; ++w) index_insert(s, w);
      std::vector<int32_t> ways(fill);
      std::iota(ways.begin(), ways.end(), 0);
      for (int32_t w = 0; w < s.ways; ++w) s.order[2 * w] = s.order[2 * w + 1] = -1;
      if (policy == kLRU) {
        std::sort(ways.begin(), ways.end(), [&](int32_t x, int32_t y) { return s.times[x] > s.times[y]; });
        s.state[1] = s.state[2] = -1;
        for (int32_t i = fill - 1; i >= 0; --i) lru_push_front(s, ways[i]);
      } else {
        // A sorted array is a valid min-heap.
        std::sort(ways.begin(), ways.end(), [&](int32_t x, int32_t y) { return lfu_less(s, x, y); });
        for (int32_t i = 0; i < fill; ++i) heap_place(s, i, ways[i]);
      }
    }
    TORCH_CHECK(bad_set < 0, "cache state: set ", bad_set, " of group ", gi,
                " has a filled way after an empty one");
  }
}
