// The FP32 cache's admission/eviction policy for one access to one cache set (MPC,
// PAPERS.md §1; semantics defined in mpc/embedding/cache_reference.py). Shared by the
// C++ kernel (kernels/cache_cpu.cpp) and the CUDA kernel (kernels/cache.cu): no torch
// headers, plain pointers, __host__ __device__ under nvcc.
//
// Per set (W ways, slots base..base+W-1): tags (row or -1) and times (last access);
// under LFU also slot_counts, the count of each way's row (a copy of counts[row] kept
// in step, so that choosing a victim never reads the per-row array). Ways fill in
// order 0, 1, 2, ... and are never emptied, so the lowest empty way is the first -1.
// Two regimes, chosen per group by its associativity:
//   scan (W <= kScanWays, e.g. the default 32 ways): lookup and victim search scan the
//          set's few adjacent cache lines; nothing else is stored.
//   structured (larger W, e.g. a fully associative table): O(1) lookup through a hash
//          index (H = pow2 >= 2W int32 entries, linear probing, holding ways), and
//          order = 2 int32 per way: LRU: [prev, next] of a most-recent-first list
//          (victim = tail); LFU: [heap[k], pos[way]] of a binary min-heap on (count,
//          time) (victim = heap[0]); state = [fill, head, tail] (LRU) or [fill] (LFU).
// Keys never tie (times are unique per group), so the victim does not depend on how a
// structure was built: a rebuilt set behaves exactly as the original.
// Header (CPU, LRU scan sets; derived like the index): per set 2W bytes, fp[W] then
// mru[W]. fp[w] is an 8-bit fingerprint of way w's row, mru lists the filled ways most
// recent first (0xFF after the last). Lookup compares the fingerprints (one cache line)
// and checks the tag of a matching way only; the LRU victim is mru[W-1]. An access thus
// touches about 3 cache lines instead of the 8 of scanning 32 tags and 32 times. Every
// access sets its way's time to the group's newest, so move-to-front keeps mru sorted
// by time: its last way is the way of smallest time, the scan's victim.
#pragma once

#if !defined(__CUDACC__) && defined(__AVX2__)
#include <immintrin.h>
#define MPC_CACHE_AVX2 1
#endif

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MPC_CACHE_HD __host__ __device__ __forceinline__
#else
#define MPC_CACHE_HD inline
#endif

namespace mpc_cache {

constexpr int32_t kLRU = 0;
constexpr int32_t kLFU = 1;
constexpr int32_t kCountMax = 2147483647;
constexpr int32_t kScanWays = 32;  // = mpc.embedding.cache.SCAN_WAYS

// Columns of the (G, kGeomFields) int64 geometry tensor, one row per cache group.
// index_size 0 marks a scan group; order/state offsets count structured slots/sets.
enum GeomField : int {
  kFirstRow = 0, kRows, kWays, kNSets, kSlotOffset, kSetOffset, kIndexOffset, kIndexSize, kOrderOffset,
  kStateOffset, kHeaderOffset, kGeomFields
};
constexpr uint8_t kNoWay = 0xFF;  // an empty mru entry
// Columns of the (T, kCounterFields) int64 counters tensor.
enum CounterField : int { kLookups = 0, kHits, kMisses, kFills, kEvictions, kCounterFields };

// lowbias32, identical to mpc.embedding.rng.mix32: the set of row r is mix32(r) % nsets.
MPC_CACHE_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Set (local to its group) of global row `row` in a group of `nsets` sets.
MPC_CACHE_HD uint32_t set_of(int64_t row, int64_t nsets) { return mix32((uint32_t)row) % (uint32_t)nsets; }

// splitmix64's finalizer: the home bucket in a set's index (independent of the set hash).
MPC_CACHE_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// One set's arrays, already offset to the set.
struct SetRef {
  int64_t* tags;    // [W]
  int64_t* times;   // [W]
  int32_t* counts;  // [W] slot_counts (LFU), else nullptr
  int32_t* order;   // [2W] structured only
  int32_t* state;   // [3] LRU or [1] LFU, structured only
  int32_t* index;   // [H] structured only
  uint8_t* fp;      // [W] fingerprints, then mru [W]; nullptr: scan the tags
  uint8_t* mru;
  int32_t ways;
  int32_t mask;     // H - 1; -1 for a scan set
};

// All sets' arrays (flat, every group) and the per-set state width (3 LRU, 1 LFU).
struct CacheArrays {
  int64_t* tags;
  int64_t* times;
  int32_t* row_counts;   // LFU counts per global row (unused under LRU)
  int32_t* slot_counts;  // LFU counts per slot (nullptr under LRU)
  int32_t* order;
  int32_t* state;
  int32_t* index;
  int64_t state_stride;
  uint8_t* header = nullptr;  // nullptr: no headers (CUDA, or an LFU cache)
};

// The arrays of set `local_set` of the group whose geometry row is `g`.
#ifdef __CUDACC__
MPC_CACHE_HD
#else
inline __attribute__((always_inline))
#endif
SetRef set_ref(const CacheArrays& a, const int64_t* g, int64_t local_set) {
  const int64_t W = g[kWays], base = g[kSlotOffset] + local_set * W;
  SetRef s;
  s.tags = a.tags + base;
  s.times = a.times + base;
  s.counts = a.slot_counts ? a.slot_counts + base : nullptr;
  s.ways = (int32_t)W;
  s.fp = s.mru = nullptr;
  if (g[kIndexSize] == 0) {
    s.order = s.state = s.index = nullptr;
    s.mask = -1;
    if (a.header && g[kHeaderOffset] >= 0) {
      s.fp = a.header + g[kHeaderOffset] + local_set * 2 * W;
      s.mru = s.fp + W;
    }
  } else {
    s.order = a.order + 2 * (g[kOrderOffset] + local_set * W);
    s.state = a.state + (g[kStateOffset] + local_set) * a.state_stride;
    s.index = a.index + g[kIndexOffset] + local_set * g[kIndexSize];
    s.mask = (int32_t)(g[kIndexSize] - 1);
  }
  return s;
}

// --- headers ----------------------------------------------------------------------------
MPC_CACHE_HD uint8_t fingerprint(int64_t row) { return (uint8_t)(mix64((uint64_t)row) >> 56); }

MPC_CACHE_HD int32_t ctz32(uint32_t m) {
#ifdef __CUDA_ARCH__
  return __ffs((int)m) - 1;
#else
  return __builtin_ctz(m);
#endif
}

// Byte compares over a set's header (2W bytes: fp[W] then mru[W]). With AVX2 a set of
// 8 or more ways takes one 16- or 32-byte compare, reading only its own header bytes:
// fingerprints from fp[0] forward, mru entries backward from mru[W] (the bytes
// before mru[0] are the set's fingerprints, shifted out).
#ifdef MPC_CACHE_AVX2
inline uint32_t eq_mask32(const uint8_t* p, uint8_t f) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_set1_epi8((char)f)));
}
inline uint32_t eq_mask16(const uint8_t* p, uint8_t f) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8((char)f)));
}
#endif

MPC_CACHE_HD uint32_t low_bits(int32_t W) { return W >= 32 ? 0xFFFFFFFFu : (1u << W) - 1; }

// Bit k set where p[k] == v (k < W): the portable compare.
MPC_CACHE_HD uint32_t bytes_equal(const uint8_t* p, int32_t W, uint8_t v) {
  uint32_t m = 0;
  for (int32_t k = 0; k < W; ++k) m |= (uint32_t)(p[k] == v) << k;
  return m;
}

// Bit w set where fp[w] == f (w < W).
MPC_CACHE_HD uint32_t fp_matches(const uint8_t* fp, int32_t W, uint8_t f) {
#ifdef MPC_CACHE_AVX2
  if (W >= 16) return eq_mask32(fp, f) & low_bits(W);  // 32 <= 2W header bytes
  if (W >= 8) return eq_mask16(fp, f) & low_bits(W);
#endif
  return bytes_equal(fp, W, f);
}

// Bit k set where mru[k] == v (k < W).
MPC_CACHE_HD uint32_t mru_matches(const uint8_t* mru, int32_t W, uint8_t v) {
#ifdef MPC_CACHE_AVX2
  if (W >= 16) return eq_mask32(mru + W - 32, v) >> (32 - W);
  if (W >= 8) return eq_mask16(mru + W - 16, v) >> (16 - W);
#endif
  return bytes_equal(mru, W, v);
}

// Filled ways of a header set: the position of the first empty mru entry.
MPC_CACHE_HD int32_t mru_fill(const uint8_t* mru, int32_t W) {
  const uint32_t m = mru_matches(mru, W, kNoWay);
  return m ? ctz32(m) : W;
}

// Move way w from mru[pos] (pos = fill: not yet listed) to the front of a W-way list.
MPC_CACHE_HD void mru_to_front(uint8_t* mru, int32_t W, int32_t pos, int32_t w) {
#ifdef __CUDA_ARCH__
  for (int32_t k = pos; k > 0; --k) mru[k] = mru[k - 1];
#else
#ifdef MPC_CACHE_AVX2
  if (W >= 17 && pos > 0) {  // one 32-byte blend over the set's own header bytes
    // The window mru[W-32 .. W) (fingerprints first when W < 32, written back as they
    // are); its byte j is mru[j - off]. Bytes 1..pos take their left neighbour's value.
    const int32_t off = 32 - W;
    uint8_t* q = mru - off;
    const __m256i cur = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i left = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q - 1));  // W >= 17: in the header
    const __m256i k = _mm256_sub_epi8(_mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
                                                       18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31),
                                      _mm256_set1_epi8((char)off));
    const __m256i shift = _mm256_and_si256(_mm256_cmpgt_epi8(k, _mm256_setzero_si256()),
                                           _mm256_cmpgt_epi8(_mm256_set1_epi8((char)(pos + 1)), k));
    __m256i v = _mm256_blendv_epi8(cur, left, shift);
    v = _mm256_blendv_epi8(v, _mm256_set1_epi8((char)w), _mm256_cmpeq_epi8(k, _mm256_setzero_si256()));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), v);
    return;
  }
#endif
  memmove(mru + 1, mru, (size_t)pos);
#endif
  mru[0] = (uint8_t)w;
}

MPC_CACHE_HD int32_t mru_pos(const uint8_t* mru, int32_t W, int32_t w) {
  return ctz32(mru_matches(mru, W, (uint8_t)w));  // w is listed exactly once
}

// Way holding `row` in a header set, or -1 (empty ways hold tag -1: never a match).
MPC_CACHE_HD int32_t header_find(const SetRef& s, int64_t row) {
  for (uint32_t m = fp_matches(s.fp, s.ways, fingerprint(row)); m; m &= m - 1) {
    const int32_t w = ctz32(m);
    if (s.tags[w] == row) return w;
  }
  return -1;
}

// Ask for the cache lines an access to `row` in set s will touch (CPU only): the set's
// tags and times (and slot counts), or the index bucket of a structured set, and the
// row's LFU count. The batch is known up front, so prefetching a few accesses ahead
// overlaps their memory latency.
MPC_CACHE_HD void prefetch_set(const SetRef& s, const int32_t* row_counts, int64_t row) {
#if !defined(__CUDA_ARCH__) && (defined(__GNUC__) || defined(__clang__))
  const int64_t bytes = (int64_t)s.ways * 8;
  if (s.fp) {  // the header now; the way's tag and time later (prefetch_way)
    __builtin_prefetch(s.fp, 1, 3);
    __builtin_prefetch(s.fp + 2 * s.ways - 1, 1, 3);
  } else if (s.mask < 0) {
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(s.tags) + b, 0, 3);
      __builtin_prefetch(reinterpret_cast<const char*>(s.times) + b, 1, 3);
    }
    if (s.counts) __builtin_prefetch(s.counts, 1, 3);
  } else {
    __builtin_prefetch(s.index + ((int32_t)(mix64((uint64_t)row) >> 32) & s.mask), 0, 3);
  }
  if (row_counts) __builtin_prefetch(row_counts + row, 1, 3);
#endif
}

// Once the header is in cache: the tag and time of the way an access will use (the
// matching way, else the way it would fill or evict). A guess (earlier accesses may
// change the set first); only what is fetched depends on it.
MPC_CACHE_HD void prefetch_way(const SetRef& s, int64_t row) {
#if !defined(__CUDA_ARCH__) && (defined(__GNUC__) || defined(__clang__))
  const uint32_t m = fp_matches(s.fp, s.ways, fingerprint(row));
  int32_t w;
  if (m) {
    w = ctz32(m);
  } else {
    const int32_t fill = mru_fill(s.mru, s.ways);
    w = fill < s.ways ? fill : s.mru[s.ways - 1];
  }
  __builtin_prefetch(s.tags + w, 1, 3);
  __builtin_prefetch(s.times + w, 1, 3);
#endif
}

// Largest g < G with bounds[g] <= i: the group of access i (bounds: G+1, last = n > i).
MPC_CACHE_HD int64_t group_of(const int64_t* bounds, int64_t G, int64_t i) {
  int64_t lo = 0, hi = G;
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (bounds[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

// Table of a global row (table_offsets: T+1 row offsets).
MPC_CACHE_HD int64_t table_of(const int64_t* toff, int64_t T, int64_t row) {
  int64_t lo = 0, hi = T;
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (toff[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

struct AccessResult {
  int32_t way;       // -1: not cached (not admitted)
  int64_t evicted;   // row written back, or -1
  bool hit;
  bool filled;
  bool first_touch;  // first access to this slot in this prepare call
};

MPC_CACHE_HD int32_t home(const SetRef& s, int64_t row) {
  return (int32_t)(mix64((uint64_t)row) >> 32) & s.mask;
}

// Way holding `row`, or -1. A scan stops at the first empty way (the rest are empty).
MPC_CACHE_HD int32_t find(const SetRef& s, int64_t row) {
  if (s.fp) return header_find(s, row);
  if (s.mask < 0) {
    for (int32_t w = 0; w < s.ways; ++w) {
      if (s.tags[w] == row) return w;
      if (s.tags[w] < 0) return -1;
    }
    return -1;
  }
  // Terminates: H >= 2W > fill, so some entry is empty.
  for (int32_t j = home(s, row);; j = (j + 1) & s.mask) {
    int32_t w = s.index[j];
    if (w < 0) return -1;
    if (s.tags[w] == row) return w;
  }
}

MPC_CACHE_HD void index_insert(const SetRef& s, int32_t way) {
  int32_t j = home(s, s.tags[way]);
  while (s.index[j] >= 0) j = (j + 1) & s.mask;
  s.index[j] = way;
}

// Backward-shift deletion (no tombstones): entries after the hole move back when their
// home is not cyclically within (hole, j]. tags[] must still hold every key, `row` too.
MPC_CACHE_HD void index_erase(const SetRef& s, int64_t row) {
  int32_t i = home(s, row);
  while (s.tags[s.index[i]] != row) i = (i + 1) & s.mask;
  for (int32_t j = (i + 1) & s.mask; s.index[j] >= 0; j = (j + 1) & s.mask) {
    int32_t k = home(s, s.tags[s.index[j]]);
    bool stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
    if (!stays) {
      s.index[i] = s.index[j];
      i = j;
    }
  }
  s.index[i] = -1;
}

// --- LRU: doubly linked list, most recent first --------------------------------------
MPC_CACHE_HD void lru_unlink(const SetRef& s, int32_t w) {
  int32_t p = s.order[2 * w], n = s.order[2 * w + 1];
  if (p >= 0) s.order[2 * p + 1] = n; else s.state[1] = n;
  if (n >= 0) s.order[2 * n] = p; else s.state[2] = p;
}

MPC_CACHE_HD void lru_push_front(const SetRef& s, int32_t w) {
  int32_t h = s.state[1];
  s.order[2 * w] = -1;
  s.order[2 * w + 1] = h;
  if (h >= 0) s.order[2 * h] = w; else s.state[2] = w;
  s.state[1] = w;
}

// --- LFU: victim order on (count of the way's row, last-access time) ------------------
MPC_CACHE_HD bool lfu_less(const SetRef& s, int32_t a, int32_t b) {
  int32_t ca = s.counts[a], cb = s.counts[b];
  return ca < cb || (ca == cb && s.times[a] < s.times[b]);
}

MPC_CACHE_HD void heap_place(const SetRef& s, int32_t k, int32_t w) {
  s.order[2 * k] = w;
  s.order[2 * w + 1] = k;
}

MPC_CACHE_HD void heap_sift_down(const SetRef& s, int32_t k) {
  int32_t n = s.state[0], w = s.order[2 * k];
  for (;;) {
    int32_t c = 2 * k + 1;
    if (c >= n) break;
    if (c + 1 < n && lfu_less(s, s.order[2 * (c + 1)], s.order[2 * c])) ++c;
    if (!lfu_less(s, s.order[2 * c], w)) break;
    heap_place(s, k, s.order[2 * c]);
    k = c;
  }
  heap_place(s, k, w);
}

MPC_CACHE_HD void heap_sift_up(const SetRef& s, int32_t k) {
  int32_t w = s.order[2 * k];
  while (k > 0) {
    int32_t p = (k - 1) / 2;
    if (!lfu_less(s, w, s.order[2 * p])) break;
    heap_place(s, k, s.order[2 * p]);
    k = p;
  }
  heap_place(s, k, w);
}

// Key of way w went up (it was accessed): restore the order of a structured set.
template <int32_t Policy>
MPC_CACHE_HD void touch(const SetRef& s, int32_t w) {
  if (s.mask < 0) return;  // a scan set has no order to keep
  if (Policy == kLRU) {
    lru_unlink(s, w);
    lru_push_front(s, w);
  } else {
    heap_sift_down(s, s.order[2 * w + 1]);
  }
}

// Lowest empty way (-1 if the set is full).
MPC_CACHE_HD int32_t empty_way(const SetRef& s) {
  if (s.mask >= 0) return s.state[0] < s.ways ? s.state[0] : -1;
  for (int32_t w = 0; w < s.ways; ++w) {
    if (s.tags[w] < 0) return w;
  }
  return -1;
}

// The way with the smallest key of a full set.
template <int32_t Policy>
MPC_CACHE_HD int32_t victim(const SetRef& s) {
  if (s.mask >= 0) return Policy == kLRU ? s.state[2] : s.order[0];
  int32_t best = 0;
  for (int32_t w = 1; w < s.ways; ++w) {
    const bool less = Policy == kLRU ? s.times[w] < s.times[best] : lfu_less(s, w, best);
    best = less ? w : best;
  }
  return best;
}

// Put `row` in way w (empty, or just emptied of its victim) at clock `now`.
template <int32_t Policy>
MPC_CACHE_HD void install(const SetRef& s, int32_t w, int64_t row, int64_t now, int32_t count, bool was_empty) {
  s.tags[w] = row;
  s.times[w] = now;
  if (Policy == kLFU) s.counts[w] = count;
  if (s.mask < 0) return;
  index_insert(s, w);
  if (!was_empty) {
    touch<Policy>(s, w);  // its key grew: count >= the victim's, newest time
    return;
  }
  int32_t k = s.state[0]++;
  if (Policy == kLRU) {
    lru_push_front(s, w);
  } else {
    heap_place(s, k, w);
    heap_sift_up(s, k);
  }
}

// One access of `row` at clock `now`; `start` is the group's clock before this prepare
// call (a way with time > start was accessed in this call and must not be evicted).
// row_counts: LFU counts of every row (unused under LRU).
// access() for an LRU set with a header (see the top of this file): the same decisions.
MPC_CACHE_HD AccessResult access_header_lru(const SetRef& s, int64_t row, int64_t now, int64_t start) {
  AccessResult res = {-1, -1, false, false, false};
  const int32_t W = s.ways;
  int32_t w = header_find(s, row);
  if (w >= 0) {
    res.first_touch = s.times[w] <= start;
    s.times[w] = now;
    mru_to_front(s.mru, W, mru_pos(s.mru, W, w), w);
    res.way = w;
    res.hit = true;
    return res;
  }
  const int32_t fill = mru_fill(s.mru, W);  // a miss: fill or evict
  if (fill < W) {
    w = fill;  // the lowest empty way
    mru_to_front(s.mru, W, fill, w);
  } else {
    w = s.mru[W - 1];                    // least recently used
    if (s.times[w] > start) return res;  // needed this step
    res.evicted = s.tags[w];
    mru_to_front(s.mru, W, W - 1, w);
  }
  s.tags[w] = row;
  s.times[w] = now;
  s.fp[w] = fingerprint(row);
  res.way = w;
  res.filled = true;
  res.first_touch = true;
  return res;
}

template <int32_t Policy>
MPC_CACHE_HD AccessResult access(const SetRef& s, int32_t* row_counts, int64_t row, int64_t now, int64_t start) {
  if (Policy == kLRU && s.fp) return access_header_lru(s, row, now, start);
  AccessResult res = {-1, -1, false, false, false};
  int32_t count = 0;
  if (Policy == kLFU) {
    if (row_counts[row] < kCountMax) ++row_counts[row];
    count = row_counts[row];
  }
  int32_t w = find(s, row);
  if (w >= 0) {
    res.first_touch = s.times[w] <= start;
    s.times[w] = now;
    if (Policy == kLFU) s.counts[w] = count;
    touch<Policy>(s, w);
    res.way = w;
    res.hit = true;
    return res;
  }
  w = empty_way(s);
  const bool was_empty = w >= 0;
  if (!was_empty) {
    w = victim<Policy>(s);
    if (s.times[w] > start) return res;                          // needed this step
    if (Policy == kLFU && s.counts[w] > count) return res;      // hotter than row
    res.evicted = s.tags[w];
    if (s.mask >= 0) index_erase(s, res.evicted);
  }
  install<Policy>(s, w, row, now, count, was_empty);
  res.way = w;
  res.filled = true;
  res.first_touch = true;
  return res;
}

}  // namespace mpc_cache
