"""The cache's semantics, on hand-worked sequences (mpc.embedding.cache_reference).

The reference policy defines what the fast path must do, so these tests pin it down
with small cases whose answers were worked out by hand from the rules in its docstring.
"""

from __future__ import annotations

import pytest
import torch

from mpc.embedding import rng
from mpc.embedding.cache_reference import (COUNTER_NAMES, ReferenceCachedEmbeddingBag, ReferenceCachePolicy,
                                           cache_capacity, cache_layout)
from mpc.embedding.config import CacheConfig, EmbeddingConfig
from mpc.embedding.lowp import QuantizedEmbeddingBag


def policy(cards, fraction, kind="lru", ways=0, shared=False) -> ReferenceCachePolicy:
    cfg = EmbeddingConfig(cardinalities=cards, dim=4, kind="int8",
                          cache=CacheConfig(fraction=fraction, policy=kind, ways=ways, shared=shared))
    return ReferenceCachePolicy.for_config(cfg)


def rows_in_set(nsets: int, want: int, count: int, start: int = 0, stop: int = 10_000) -> list[int]:
    return [r for r in range(start, stop) if rng.mix32_int(r) % nsets == want][:count]


# --- geometry ---------------------------------------------------------------------------
def test_capacity_reads_the_fraction_as_written():
    assert 0.07 * 100 > 7  # binary floating point; the user meant 7
    assert cache_capacity(0.07, 100) == 7 and cache_capacity(0.07, 101) == 8
    assert cache_capacity(0.05, 1460) == 73 and cache_capacity(0.05, 1461) == 74
    assert cache_capacity(0.01, 3) == 1 and cache_capacity(1.0, 7) == 7 and cache_capacity(0.0, 9) == 0


def test_layout_per_table_shared_and_fully_associative():
    lay = cache_layout((1460, 3, 100), CacheConfig(fraction=0.05, ways=32))
    assert [(g.capacity, g.ways, g.nsets, g.slots) for g in lay.groups] == [(73, 32, 3, 96), (1, 1, 1, 1),
                                                                           (5, 5, 1, 5)]
    assert [g.slot_offset for g in lay.groups] == [0, 96, 97] and [g.set_offset for g in lay.groups] == [0, 3, 4]
    assert [g.first_row for g in lay.groups] == [0, 1460, 1463]
    shared = cache_layout((1460, 3, 100), CacheConfig(fraction=0.05, ways=32, shared=True))
    (g,) = shared.groups
    assert (g.capacity, g.ways, g.nsets, g.rows, shared.group_of_table) == (79, 32, 3, 1563, (0, 0, 0))
    full = cache_layout((1460,), CacheConfig(fraction=0.05, ways=0))
    assert (full.groups[0].ways, full.groups[0].nsets) == (73, 1)
    assert cache_layout((1460, 3), CacheConfig(fraction=0.0)).groups == ()


def test_set_of_a_row_is_mix32_mod_nsets():
    lay = cache_layout((1000,), CacheConfig(fraction=0.4, ways=8))
    g = lay.groups[0]
    assert g.nsets == 50
    rows = torch.arange(1000)
    expect = (rng.mix32(rows) % 50).tolist()
    assert [g.set_of(r) for r in range(1000)] == expect
    assert len(set(expect)) == 50  # all sets used


# --- LRU ---------------------------------------------------------------------------------
def test_lru_evicts_least_recent_and_never_a_row_of_this_step():
    p = policy((10,), 0.2)  # 2 slots, one set
    r = p.prepare([1, 2])
    assert r.slots == [0, 1] and r.fills == [(0, 1), (1, 2)] and r.writebacks == []
    assert p.prepare([1]).slots == [0]                     # hit: row 1 is now the most recent
    r = p.prepare([3])
    assert r.slots == [1] and r.writebacks == [(1, 2)]     # row 2 was least recent
    r = p.prepare([6, 7, 8, 6])
    assert r.writebacks == [(0, 1), (1, 3)] and r.fills == [(0, 6), (1, 7)]
    assert r.slots == [0, 1, -1, 0]                        # 8 would evict a row of this step
    assert p.times == [8, 6] and p.clocks == [8]
    c = p.counters[0]
    assert [c[k] for k in COUNTER_NAMES] == [8, 2, 6, 5, 3]  # lookups hits misses fills evictions


def test_sets_compete_only_within_themselves():
    p = policy((64,), 0.25, ways=4)  # capacity 16: 4 sets of 4 ways
    g = p.layout.groups[0]
    a = rows_in_set(4, 0, 5, stop=64)
    b = rows_in_set(4, 1, 1, stop=64)
    r = p.prepare(a[:4])
    assert r.slots == [0, 1, 2, 3]                         # set 0's ways, lowest empty first
    r = p.prepare(b)
    assert r.slots == [g.slot(1, 0)] and r.writebacks == []
    r = p.prepare([a[4]])
    assert r.slots == [0] and r.writebacks == [(0, a[0])]  # a[0] is set 0's least recent


# --- LFU ---------------------------------------------------------------------------------
def test_lfu_admits_only_rows_at_least_as_frequent_as_the_victim():
    p = policy((10,), 0.1, kind="lfu")  # one slot
    assert p.prepare([1, 1, 1, 2, 2]).slots == [0, 0, 0, -1, -1]  # victim (row 1) used this step
    assert p.counts[1] == 3 and p.counts[2] == 2
    r = p.prepare([2])                                     # counts 3 vs 3: not higher, admitted
    assert r.slots == [0] and r.writebacks == [(0, 1)]
    assert p.prepare([1]).slots == [0]                     # 4 vs 3: admitted again
    assert p.prepare([3]).slots == [-1]                    # 1 vs 4: rejected ...
    lru = policy((10,), 0.1, kind="lru")
    for batch in ([1, 1, 1, 2, 2], [2], [1]):
        lru.prepare(batch)
    assert lru.prepare([3]).slots == [0]                   # ... where LRU admits it


def test_a_row_admitted_late_in_a_step_is_cached_for_all_its_occurrences():
    p = policy((10,), 0.1, kind="lfu")
    p.prepare([5, 5, 5])
    r = p.prepare([6, 6, 6, 6])  # counts of 6 reach 3 = count of 5 on the third access
    assert r.slots == [0, 0, 0, 0] and r.writebacks == [(0, 5)] and r.fills == [(0, 6)]
    c = p.counters[0]
    assert (c["misses"], c["hits"], c["fills"]) == (3 + 1, 2 + 1, 2)


def test_shared_budget_counts_evictions_for_the_victims_table():
    p = policy((4, 6), 0.2, shared=True)  # 2 slots over 10 rows
    p.prepare([0, 1])                     # rows 0, 1 of table 0
    r = p.prepare([4 + 2])                # table 1's id 2 = global row 6
    assert r.writebacks == [(0, 0)]
    assert p.counters[0]["evictions"] == 1 and p.counters[1]["evictions"] == 0
    assert p.counters[1]["fills"] == 1 and p.counters[0]["fills"] == 2


def test_probe_reads_only():
    p = policy((10,), 0.2)
    p.prepare([3, 4])
    before = (list(p.tags), list(p.times), list(p.clocks), [dict(c) for c in p.counters])
    assert p.probe([4, 3, 9]) == [1, 0, -1]
    assert (p.tags, p.times, p.clocks, p.counters) == before


# --- the whole cached table --------------------------------------------------------------
def emulator(kind="int8", rounding="nearest", **cache) -> ReferenceCachedEmbeddingBag:
    cfg = EmbeddingConfig(cardinalities=(6, 4), dim=5, kind=kind, rounding=rounding, seed=3,
                          cache=CacheConfig(**cache), use_kernels=False)
    storage = QuantizedEmbeddingBag(cfg.replace(cache=CacheConfig())).weights
    return ReferenceCachedEmbeddingBag(cfg, storage)


def one_hot(ids):
    """One id per table (batch of 1): table-major indices/offsets."""
    return torch.tensor(ids), torch.arange(len(ids) + 1)


def test_cached_rows_keep_updates_smaller_than_a_quantization_step():
    ind, off = one_hot([2, 1])
    rows = [2, 6 + 1]
    start = emulator(fraction=0.0).to_float()
    # Nudge each row's median element (not its min or max, which set scale and bias) by
    # far less than half an INT8 step of these rows (~1e-3).
    cols = start[rows].argsort(1)[:, 2]
    grad = torch.zeros(1, 2, 5)
    grad[0, [0, 1], cols] = 1e-4
    trained = {}
    for fraction in (0.5, 0.0):
        emb = emulator(fraction=fraction, ways=0)
        emb.set_learning_rate(1.0)
        for _ in range(10):
            emb.prepare(ind, off)
            emb.backward_update(ind, off, grad)
        trained[fraction] = emb.to_float()[rows, cols] - start[rows, cols]
    assert torch.allclose(trained[0.5], torch.full((2,), -1e-3), atol=1e-6)  # kept in FP32
    assert trained[0.0].abs().max() < 1e-4  # nearest rounding loses every one of them


def test_eviction_writes_back_with_the_writeback_stream():
    emb = emulator(rounding="stochastic", fraction=0.2, ways=0)  # table 0: 2 slots
    emb.set_learning_rate(0.3)
    g = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(0))
    for ids in ([0, 0], [1, 0]):                                 # steps 0 and 1
        emb.prepare(*one_hot(ids))
        emb.backward_update(*one_hot(ids), g)
    value = emb.values[0].clone()                                # row 0, trained in FP32
    emb.prepare(*one_hot([2, 0]))                                # row 2 evicts row 0 at step 2
    assert 0 not in emb.values and 2 in emb.values
    ref = emb._ref()
    expect = ref.quantize_rows(emb.config.precision, value[None], "stochastic", 3, 2, torch.tensor([0]),
                               rng.PURPOSE_WRITEBACK)
    assert torch.equal(emb.storage[0], expect[0])
    other = ref.quantize_rows(emb.config.precision, value[None], "stochastic", 3, 2, torch.tensor([0]),
                              rng.PURPOSE_UPDATE)
    assert not torch.equal(expect, other)  # the purpose matters


def test_flush_writes_back_and_keeps_rows_cached():
    emb = emulator(rounding="stochastic", fraction=0.5, ways=0)
    emb.set_learning_rate(0.5)
    ind, off = one_hot([1, 3])
    emb.prepare(ind, off)
    emb.backward_update(ind, off, torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(1)))
    before = emb.storage.clone()
    cached = dict(emb.values)
    emb.flush()
    assert dict(emb.values).keys() == cached.keys()
    changed = (emb.storage != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 6 + 3]
    dq = emb._ref().dequantize_rows(emb.config.precision, emb.storage, 5)
    assert torch.allclose(dq[1], cached[1], atol=0.02) and not torch.equal(dq[1], cached[1])
