"""The FP32 cache of MPC, written for clarity: its geometry, its policy, a whole cached table.

Mixed-Precision Embedding Using a Cache (Yang et al., 2020; PAPERS.md §1) keeps every
table in low precision and the hottest rows in an FP32 cache. This module *defines*
the cache exactly; the fast backend (mpc.embedding.cache, C++ kernels/cache_policy.h)
must agree with it step by step, and the tests check that it does.

Geometry. Each cache group (one per table, or one over all tables when `shared`) has
capacity ceil(fraction x rows) rows, `ways` ways per set (0 or >= capacity: one set,
fully associative) and nsets = ceil(capacity / ways) sets; global row r (table offset
+ id) lives in set mix32(r) % nsets (mpc.embedding.rng.mix32 of r mod 2**32).

Policy. `prepare` walks the batch's ids in order (table-major, bag order). Each access
ticks its group's clock; under LFU it also counts the row (counts kept for every row,
saturating at 2**31 - 1). A cached row is a hit: its slot's time becomes the clock. A
miss takes the lowest empty way of its set, or else the way with the smallest key
(LRU: last-access time; LFU: (count of its row, last-access time)); the row is not
admitted (it trains in low precision this step) when that victim was accessed in this
same `prepare` call or, under LFU, when the victim's count exceeds the row's. Otherwise
the victim is written back (re-quantized from FP32 with the configured rounding,
stream (seed, step, row, PURPOSE_WRITEBACK)) and the row is filled from its
dequantized stored row. All write-backs of a call happen before its fills (a row may
be evicted and re-admitted in one call; it is then refilled from the written-back
bytes). Every index then uses its row's slot at the end of the walk: a row rejected
on an early access may be admitted on a later one (under LFU its count grows with each
access), and it is then cached for all its occurrences (the fill copies the very
stored row the early occurrences would have read, so no value changes, and the row's
summed gradient goes to one place). A row admitted in a call is never evicted in the
same call, so the slots equal what a read-only probe gives afterwards. Eval lookups
only read: they change no state.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from fractions import Fraction

import torch

from mpc.embedding import rng
from mpc.embedding.base import EmbeddingBackend, bag_table_ids
from mpc.embedding.config import CacheConfig, CachePolicy, EmbeddingConfig, Precision

COUNT_MAX = 2**31 - 1  # LFU counts are int32 in the fast path; both saturate here
COUNTER_NAMES = ("lookups", "hits", "misses", "fills", "evictions")


# --- geometry ---------------------------------------------------------------------------
def cache_capacity(fraction: float, rows: int) -> int:
    """ceil(fraction x rows), with the fraction read as the decimal it prints as.

    (0.07 * 100 is 7.000000000000001 in binary floating point; the user meant 7.)
    """
    return math.ceil(Fraction(repr(float(fraction))) * rows)


@dataclass(frozen=True)
class CacheGroup:
    """One cache budget: a contiguous range of global rows and its sets of slots."""

    tables: tuple[int, ...]
    first_row: int
    rows: int
    capacity: int
    ways: int
    nsets: int
    slot_offset: int  # first slot of this group in the flat slot arrays
    set_offset: int   # first set of this group in the flat per-set arrays

    @property
    def slots(self) -> int:
        return self.nsets * self.ways

    def set_of(self, row: int) -> int:
        """Set (local to the group) of a global row."""
        return rng.mix32_int(row) % self.nsets

    def slot(self, set_: int, way: int) -> int:
        return self.slot_offset + set_ * self.ways + way


@dataclass(frozen=True)
class CacheLayout:
    groups: tuple[CacheGroup, ...]
    group_of_table: tuple[int, ...]  # -1 for every table when there is no cache

    @property
    def slots(self) -> int:
        return sum(g.slots for g in self.groups)

    @property
    def nsets(self) -> int:
        return sum(g.nsets for g in self.groups)


def _group(tables, first_row, rows, cache: CacheConfig, slot_offset, set_offset) -> CacheGroup:
    capacity = cache_capacity(cache.fraction, rows)
    ways = capacity if cache.ways == 0 or cache.ways >= capacity else cache.ways
    nsets = -(-capacity // ways)
    return CacheGroup(tuple(tables), first_row, rows, capacity, ways, nsets, slot_offset, set_offset)


def cache_layout(cardinalities, cache: CacheConfig) -> CacheLayout:
    """Groups, capacities, ways and sets for tables of these sizes (no allocation)."""
    cards = [int(c) for c in cardinalities]
    if cache.fraction == 0:
        return CacheLayout((), (-1,) * len(cards))
    spans = [(tuple(range(len(cards))), 0, sum(cards))] if cache.shared else \
        [((t,), sum(cards[:t]), n) for t, n in enumerate(cards)]
    groups, slot_offset, set_offset = [], 0, 0
    for tables, first_row, rows in spans:
        g = _group(tables, first_row, rows, cache, slot_offset, set_offset)
        groups.append(g)
        slot_offset += g.slots
        set_offset += g.nsets
    group_of_table = tuple(0 if cache.shared else t for t in range(len(cards)))
    return CacheLayout(tuple(groups), group_of_table)


# --- policy -----------------------------------------------------------------------------
@dataclass
class PrepareResult:
    """What one `prepare` call decided, in access order."""

    slots: list[int]                     # per index: its row's final slot, or -1 (low precision)
    writebacks: list[tuple[int, int]]    # (slot, row evicted from it)
    fills: list[tuple[int, int]]         # (slot, row admitted to it)
    touched: int                         # distinct cached rows accessed by this call


class ReferenceCachePolicy:
    """Admission and eviction, as plain Python: lists per slot, dicts per row.

    State: `tags[slot]` (global row or -1), `times[slot]` (clock of its last access),
    `counts[row]` (LFU access counts), `clocks[group]`, `counters[table][name]`.
    """

    def __init__(self, layout: CacheLayout, policy: CachePolicy, cardinalities):
        self.layout = layout
        self.policy = CachePolicy(policy)
        self.table_starts = [0]
        for n in cardinalities:
            self.table_starts.append(self.table_starts[-1] + int(n))
        self.tags = [-1] * layout.slots
        self.times = [0] * layout.slots
        self.counts: Counter[int] = Counter()
        self.clocks = [0] * len(layout.groups)
        self.counters = [dict.fromkeys(COUNTER_NAMES, 0) for _ in cardinalities]
        self.where: dict[int, int] = {}  # row -> slot, for every cached row

    @classmethod
    def for_config(cls, config: EmbeddingConfig) -> "ReferenceCachePolicy":
        return cls(cache_layout(config.cardinalities, config.cache), config.cache.policy,
                   config.cardinalities)

    # The fast backend keeps the same state in tensors; these two convert.
    def load_tensors(self, tags, times, counts, clocks, counters) -> None:
        self.tags, self.times = tags.tolist(), times.tolist()
        rows = counts.nonzero().flatten()
        self.counts = Counter(dict(zip(rows.tolist(), counts[rows].tolist())))
        self.clocks = clocks.tolist()
        self.counters = [dict(zip(COUNTER_NAMES, row)) for row in counters.tolist()]
        self.where = {r: s for s, r in enumerate(self.tags) if r >= 0}

    def store_tensors(self, tags, times, counts, clocks, counters) -> None:
        def put(dst, values):
            dst.copy_(torch.tensor(values, dtype=dst.dtype).view(dst.shape))

        put(tags, self.tags)
        put(times, self.times)
        if counts.numel():
            counts.zero_()
            rows = torch.tensor(list(self.counts), dtype=torch.int64, device=counts.device)
            counts[rows] = torch.tensor(list(self.counts.values()), dtype=counts.dtype, device=counts.device)
        put(clocks, self.clocks)
        put(counters, [[c[n] for n in COUNTER_NAMES] for c in self.counters])

    def key(self, slot: int):
        """Victim order: the smallest key is evicted first."""
        if self.policy is CachePolicy.LFU:
            return (self.counts[self.tags[slot]], self.times[slot])
        return self.times[slot]

    def table_of(self, row: int) -> int:
        return next(t for t in range(len(self.counters)) if row < self.table_starts[t + 1])

    def probe(self, rows) -> list[int]:
        """Slot of each row, or -1; changes nothing (eval lookups)."""
        return [self.where.get(int(r), -1) for r in rows]

    def prepare(self, rows) -> PrepareResult:
        """Walk the accesses (global rows) in order; admit, evict, count (module docstring)."""
        start = list(self.clocks)  # a slot with time > start[g] was accessed in this call
        result = PrepareResult([], [], [], 0)
        for row in map(int, rows):
            table = self.table_of(row)
            g = self.layout.group_of_table[table]
            if g >= 0:
                self._access(row, table, g, start[g], result)
        result.slots = self.probe(rows)  # each index: its row's slot after the walk
        return result

    def _access(self, row: int, table: int, g: int, start: int, result: PrepareResult) -> int:
        group = self.layout.groups[g]
        self.clocks[g] += 1
        now = self.clocks[g]
        if self.policy is CachePolicy.LFU:
            self.counts[row] = min(self.counts[row] + 1, COUNT_MAX)
        counters = self.counters[table]
        counters["lookups"] += 1
        if row in self.where:
            slot = self.where[row]
            counters["hits"] += 1
            result.touched += self.times[slot] <= start
            self.times[slot] = now
            return slot
        counters["misses"] += 1
        set_ = group.set_of(row)
        ways = [group.slot(set_, w) for w in range(group.ways)]
        empty = [s for s in ways if self.tags[s] < 0]
        if empty:
            slot = empty[0]
        else:
            slot = min(ways, key=self.key)
            victim = self.tags[slot]
            if self.times[slot] > start:
                return -1  # would evict a row this step still needs
            if self.policy is CachePolicy.LFU and self.counts[victim] > self.counts[row]:
                return -1  # the victim is used more often than the newcomer
            del self.where[victim]
            result.writebacks.append((slot, victim))
            self.counters[self.table_of(victim)]["evictions"] += 1
        self.tags[slot], self.times[slot], self.where[row] = row, now, slot
        result.fills.append((slot, row))
        result.touched += 1
        counters["fills"] += 1
        return slot


# --- the whole cached table -------------------------------------------------------------
class ReferenceCachedEmbeddingBag(EmbeddingBackend):
    """Low-precision tables + FP32 cache, in plain loops over small tables.

    Storage rows use the reference row formats (mpc.embedding.ops.ReferenceOps);
    cached rows live in an OrderedDict row -> FP32 vector. Slow: for tests and for
    reading. Not registered as a backend kind.
    """

    def __init__(self, config: EmbeddingConfig, storage: torch.Tensor):
        super().__init__(config)
        if not config.precision.is_integer and config.precision is not Precision.FP16:
            raise ValueError(f"the cache sits in front of fp16/int tables, not {config.kind!r}")
        self.storage = storage.clone()
        self.policy = ReferenceCachePolicy.for_config(config)
        self.values: OrderedDict[int, torch.Tensor] = OrderedDict()  # row -> FP32 (D,)
        self.step = 0

    @staticmethod
    def _ref():
        from mpc.embedding.ops import ReferenceOps

        return ReferenceOps

    def _global(self, indices, offsets) -> tuple[list[int], list[int]]:
        tables = bag_table_ids(offsets, self.num_tables).tolist()
        base = self.table_offsets.tolist()
        return [int(i) + base[t] for i, t in zip(indices.tolist(), tables)], tables

    def _stored_row(self, row: int) -> torch.Tensor:
        """A row as stored, in FP32 (dequantizes the whole table: small tables only)."""
        return self._ref().dequantize_rows(self.config.precision, self.storage, self.dim)[row]

    def _write_back(self, row: int, value: torch.Tensor) -> None:
        c = self.config
        q = self._ref().quantize_rows(c.precision, value[None], c.rounding, c.seed, self.step,
                                      torch.tensor([row]), rng.PURPOSE_WRITEBACK)
        self.storage[row] = q[0]

    def prepare(self, indices, offsets) -> list[int]:
        rows, _ = self._global(indices, offsets)
        result = self.policy.prepare(rows)
        evicted = [(row, self.values.pop(row)) for _, row in result.writebacks]
        for row, value in evicted:
            self._write_back(row, value)
        for _, row in result.fills:
            self.values[row] = self._stored_row(row)
        self.last_prepare = result
        return result.slots

    def row_value(self, row: int) -> torch.Tensor:
        """What a lookup reads for a global row: its FP32 cache entry or its stored row."""
        return self.values[row] if row in self.values else self._stored_row(row)

    def lookup(self, indices, offsets):
        T, D = self.num_tables, self.dim
        B = (len(offsets) - 1) // T
        rows, _ = self._global(indices, offsets)
        out = torch.zeros(B, T, D)
        for bag in range(T * B):
            t, b = divmod(bag, B)
            for k in range(int(offsets[bag]), int(offsets[bag + 1])):
                out[b, t] += self.row_value(rows[k])
        return out

    def backward_update(self, indices, offsets, grad_out):
        T, D = self.num_tables, self.dim
        B = (len(offsets) - 1) // T
        rows, _ = self._global(indices, offsets)
        grads: dict[int, torch.Tensor] = {}
        for bag in range(T * B):
            t, b = divmod(bag, B)
            for k in range(int(offsets[bag]), int(offsets[bag + 1])):
                grads[rows[k]] = grads.get(rows[k], torch.zeros(D)) + grad_out[b, t]
        lr = torch.tensor(self.learning_rate, dtype=torch.float32)
        uncached = [r for r in sorted(grads) if r not in self.values]
        for r in sorted(grads):
            if r in self.values:
                self.values[r] = self.values[r] - lr * grads[r]
        if uncached:
            c = self.config
            ref = self._ref()
            x = ref.dequantize_rows(c.precision, self.storage, D)[uncached]
            x = x - lr * torch.stack([grads[r] for r in uncached])
            self.storage[uncached] = ref.quantize_rows(c.precision, x, c.rounding, c.seed, self.step,
                                                       torch.tensor(uncached), rng.PURPOSE_UPDATE)
        self.step += 1

    def flush(self) -> None:
        for row, value in self.values.items():
            self._write_back(row, value)

    def to_float(self):
        w = self._ref().dequantize_rows(self.config.precision, self.storage, self.dim).clone()
        for row, value in self.values.items():
            w[row] = value
        return w

    def stats(self) -> dict:
        return {"counters": [dict(c) for c in self.policy.counters]}
