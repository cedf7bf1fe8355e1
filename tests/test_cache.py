"""The cached backend (mpc.embedding.cache) against its emulator, step by step.

Fast path = C++ policy kernel (kernels/cache_cpu.cpp) + the table-batched row kernels;
emulator = mpc.embedding.cache_reference (plain loops). They must make the same
decisions (slots, write-backs, fills, counters) and leave the same bytes.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpc.embedding import build_embedding
from mpc.embedding.cache import CachedQuantizedEmbeddingBag, FP32Cache
from mpc.embedding.cache_reference import ReferenceCachedEmbeddingBag, ReferenceCachePolicy
from mpc.embedding.config import CacheConfig, EmbeddingConfig
from mpc.embedding.lowp import QuantizedEmbeddingBag
from mpc.embedding.ops import global_rows
from mpc.kernels import KERNEL_DIR
from mpc.model import DLRM, DLRMConfig


def jagged(cards, B: int, rnd: random.Random):
    """Table-major bags of 0-3 ids (empty bags, repeats within and across bags), skewed."""
    indices, offsets = [], [0]
    for n in cards:
        for _ in range(B):
            for _ in range(rnd.choice([0, 1, 1, 2, 3])):
                indices.append(min(int(rnd.paretovariate(0.7)) - 1, n - 1))
            offsets.append(len(indices))
    return torch.tensor(indices, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def make_pair(cfg: EmbeddingConfig):
    fast = CachedQuantizedEmbeddingBag(cfg)
    ref = ReferenceCachedEmbeddingBag(cfg, fast.weights)
    fast.set_learning_rate(0.5)
    ref.set_learning_rate(0.5)
    return fast, ref


def assert_same_state(fast: CachedQuantizedEmbeddingBag, ref: ReferenceCachedEmbeddingBag):
    assert torch.equal(fast.weights.view(torch.uint8), ref.storage.view(torch.uint8))
    assert fast.cache.tags.tolist() == ref.policy.tags
    assert fast.cache.times.tolist() == ref.policy.times
    for slot, row in enumerate(ref.policy.tags):
        if row >= 0:
            assert torch.equal(fast.cache.weights[slot], ref.values[row])
    assert fast.cache.counters.tolist() == [list(c.values()) for c in ref.policy.counters]


def run_against_emulator(cfg: EmbeddingConfig, steps: int, seed: int, max_batch: int = 5):
    rnd = random.Random(seed)
    fast, ref = make_pair(cfg)
    for _ in range(steps):
        B = rnd.randint(1, max_batch)
        ind, off = jagged(cfg.cardinalities, B, rnd)
        traffic = fast.cache.traffic.clone()
        fast.prepare(ind, off)
        slots = ref.prepare(ind, off)
        assert fast.slots_for(ind, off).tolist() == slots
        rows = global_rows(ind, off, fast.cache.table_starts).tolist()
        uncached = len({r for r, slot in zip(rows, slots) if slot < 0})  # distinct rows left uncached
        assert (fast.cache.traffic - traffic).tolist() == [1, uncached, ref.last_prepare.touched]
        torch.testing.assert_close(fast.lookup(ind, off), ref.lookup(ind, off), rtol=1e-6, atol=1e-7)
        grad = torch.randn(B, cfg.num_tables, cfg.dim, generator=torch.Generator().manual_seed(rnd.randrange(1 << 30)))
        fast.backward_update(ind, off, grad)
        ref.backward_update(ind, off, grad)
        assert_same_state(fast, ref)
    fast.flush()
    ref.flush()
    assert_same_state(fast, ref)
    assert torch.equal(fast.to_float(), ref.to_float())
    return fast, ref


EDGE_CASES = {
    "fraction 1, fully associative": dict(cache=CacheConfig(1.0, "lru", 0)),
    "fraction 1, 2-way (sets overflow)": dict(cache=CacheConfig(1.0, "lru", 2)),
    "tables smaller than one set": dict(cardinalities=(3, 5, 2), cache=CacheConfig(0.5, "lfu", 32)),
    "dim 1": dict(dim=1, cache=CacheConfig(0.3, "lru", 2)),
    "dim 13, int4": dict(dim=13, kind="int4", cache=CacheConfig(0.3, "lfu", 0)),
    "dim 17, int2, nearest": dict(dim=17, kind="int2", rounding="nearest", cache=CacheConfig(0.2, "lru", 4)),
    "fp16": dict(kind="fp16", cache=CacheConfig(0.25, "lfu", 2)),
    "lru, direct-mapped": dict(cache=CacheConfig(0.3, "lru", 1)),
    "lfu, direct-mapped": dict(cache=CacheConfig(0.3, "lfu", 1)),
    "lru shared": dict(cache=CacheConfig(0.1, "lru", 0, shared=True)),
    "lfu shared, 4-way": dict(cache=CacheConfig(0.2, "lfu", 4, shared=True)),
}


@pytest.mark.parametrize("case", range(len(EDGE_CASES)), ids=list(EDGE_CASES))
def test_matches_emulator_on_edge_cases(case):
    kw = dict(cardinalities=(40, 7, 90), dim=6, kind="int8", seed=11)
    kw.update(list(EDGE_CASES.values())[case])
    run_against_emulator(EmbeddingConfig(**kw), steps=8, seed=case)


def test_lru_header_sets_of_every_simd_width_match_the_emulator():
    """LRU set headers of 1-7 ways (scalar compares), 8-15 (16-byte) and 16-32 (32-byte)."""
    from mpc.embedding.cache_reference import cache_layout

    cfg = EmbeddingConfig(cardinalities=(10, 18, 30, 32, 48, 62, 64, 200), dim=4, kind="int8", seed=3,
                          cache=CacheConfig(0.5, "lru", 32))
    ways = {g.ways for g in cache_layout(cfg.cardinalities, cfg.cache).groups}
    assert {5, 9, 15, 16, 24, 31, 32} <= ways
    run_against_emulator(cfg, steps=12, seed=5, max_batch=40)


@pytest.mark.parametrize("seed", range(12))
def test_matches_emulator_on_random_configs(seed):
    rnd = random.Random(1000 + seed)
    cards = tuple(rnd.choice([1, 2, 5, 30, 120]) for _ in range(rnd.randint(1, 4)))
    cache = CacheConfig(fraction=rnd.choice([0.05, 0.2, 0.5, 1.0]), policy=rnd.choice(["lru", "lfu"]),
                        ways=rnd.choice([0, 1, 3, 8]), shared=rnd.random() < 0.3)
    cfg = EmbeddingConfig(cardinalities=cards, dim=rnd.choice([1, 4, 9, 16]), cache=cache, seed=seed,
                          kind=rnd.choice(["fp16", "int8", "int4", "int2"]),
                          rounding=rnd.choice(["stochastic", "nearest"]))
    run_against_emulator(cfg, steps=6, seed=seed)


# A per-table cache with at least 8 tables per thread (kGroupsPerThread in
# kernels/cache_cpu.cpp) is walked table by table, each thread locating the ids of the
# tables it takes; otherwise by shards of sets. These 20 tables are walked by table with
# 1 or 2 threads and by shard with 3 (or shared).
MANY_TABLES = (3, 1, 40, 7, 90, 250, 12, 2, 60, 33, 5, 18, 120, 9, 1000, 4, 27, 70, 15, 300)


# The same with three tables whose cache state (> 32 KB: kNearBytes) counts as far, so
# that their walks ask for lines ahead.
MANY_TABLES_SOME_FAR = MANY_TABLES[:-3] + (9000, 12000, 10000)


@pytest.mark.parametrize("policy,ways,cards,fraction", [
    ("lru", 4, MANY_TABLES, 0.2), ("lru", 32, MANY_TABLES, 0.2), ("lfu", 2, MANY_TABLES, 0.2),
    ("lru", 0, MANY_TABLES, 0.2), ("lfu", 0, MANY_TABLES, 0.2),
    ("lru", 32, MANY_TABLES_SOME_FAR, 0.5), ("lfu", 8, MANY_TABLES_SOME_FAR, 0.5)])
def test_many_tables_walked_by_table_match_the_emulator(policy, ways, cards, fraction):
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cfg = EmbeddingConfig(cardinalities=cards, dim=8, kind="int8", seed=7,
                                  cache=CacheConfig(fraction, policy, ways))
            run_against_emulator(cfg, steps=6, seed=n, max_batch=12)
    finally:
        torch.set_num_threads(threads)


def test_build_embedding_picks_the_cached_backend():
    cfg = EmbeddingConfig(cardinalities=(10, 20), dim=4, kind="int4", cache=CacheConfig(0.1))
    assert type(build_embedding(cfg)) is CachedQuantizedEmbeddingBag
    assert type(build_embedding(cfg.replace(cache=CacheConfig(0.0)))) is QuantizedEmbeddingBag


def test_fraction_zero_is_exactly_the_uncached_backend():
    cfg = EmbeddingConfig(cardinalities=(30, 12), dim=5, kind="int8", cache=CacheConfig(0.0), seed=4)
    cached, plain = CachedQuantizedEmbeddingBag(cfg), QuantizedEmbeddingBag(cfg)
    assert cached.cache.slots == 0
    rnd = random.Random(0)
    for m in (cached, plain):
        m.set_learning_rate(0.7)
    for _ in range(5):
        ind, off = jagged(cfg.cardinalities, 4, rnd)
        grad = torch.randn(4, 2, 5)
        outs = []
        for m in (cached, plain):
            out = m(ind, off)
            (out * grad).sum().backward()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
    assert torch.equal(cached.weights, plain.weights) and int(cached.step) == 5


def test_training_changes_cached_rows_in_fp32_and_others_in_storage():
    cfg = EmbeddingConfig(cardinalities=(50,), dim=4, kind="int8", cache=CacheConfig(0.04, "lru", 0))
    emb = CachedQuantizedEmbeddingBag(cfg)  # 2 slots
    emb.set_learning_rate(0.1)
    ind, off = torch.tensor([3, 3, 8, 9]), torch.tensor([0, 2, 4])  # B=2; row 9 finds no free slot
    before, cached_before = emb.weights.clone(), emb.cache.weights.clone()
    out = emb(ind, off)
    assert emb.slots_for(ind, off).tolist() == [0, 0, 1, -1]
    out.sum().backward()
    changed = (emb.weights != before).any(1).nonzero().flatten().tolist()
    assert changed == [9]                      # only the uncached row's bytes moved
    assert not torch.equal(emb.cache.weights, cached_before)
    assert torch.allclose(emb.cache.weights[0], emb.to_float()[3]) and emb.stats()["totals"]["fills"] == 2


def test_state_dict_resume_gives_the_same_bytes():
    cfg = EmbeddingConfig(cardinalities=(60, 9, 25), dim=4, kind="int4", seed=2,
                          cache=CacheConfig(0.3, "lfu", 0))
    rnd = random.Random(5)
    batches = [jagged(cfg.cardinalities, 4, rnd) for _ in range(8)]
    grads = [torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(k)) for k in range(8)]

    def train(m, steps):
        m.set_learning_rate(0.3)
        for (ind, off), g in steps:
            (m(ind, off) * g).sum().backward()

    straight = build_embedding(cfg)
    train(straight, zip(batches, grads))
    first = build_embedding(cfg)
    train(first, zip(batches[:4], grads[:4]))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = build_embedding(cfg)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    train(resumed, zip(batches[4:], grads[4:]))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"cache.tags", "cache.lfu_counts", "cache.clocks", "step"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def small_dlrm(kind="int8", cache=CacheConfig(0.2, "lru", 4)):
    emb = EmbeddingConfig(cardinalities=(40, 15, 70, 6), dim=8, kind=kind, cache=cache, seed=1)
    return DLRM(DLRMConfig.for_embedding(emb, bottom_mlp=(13, 16, 8), top_mlp=(8 + 10, 16, 1)))


def dlrm_batches(n, B=16):
    g = torch.Generator().manual_seed(9)
    cards = torch.tensor([40, 15, 70, 6])
    for _ in range(n):
        u = torch.rand(B, 4, generator=g)
        cat = (cards.float() * u ** 3).long()  # skewed ids
        yield torch.randn(B, 13, generator=g), cat, (torch.rand(B, generator=g) < 0.3).float()


def dlrm_train(model, opt, batches):
    model.train()
    model.embedding.set_learning_rate(0.1)
    for dense, cat, label in batches:
        loss = F.binary_cross_entropy_with_logits(model.forward_onehot(dense, cat), label)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dlrm_training_resumes_exactly():
    batches = list(dlrm_batches(10))
    straight = small_dlrm()
    dlrm_train(straight, torch.optim.SGD(straight.dense_parameters(), lr=0.1), batches)
    part = small_dlrm()
    opt = torch.optim.SGD(part.dense_parameters(), lr=0.1)
    dlrm_train(part, opt, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    resumed = small_dlrm()
    opt2 = torch.optim.SGD(resumed.dense_parameters(), lr=0.1)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    dlrm_train(resumed, opt2, batches[6:])
    a, b = straight.state_dict(), resumed.state_dict()
    assert straight.embedding.stats()["totals"]["evictions"] > 0  # the cache really worked
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_lookups_read_the_cache_and_change_nothing():
    model = small_dlrm(cache=CacheConfig(0.3, "lfu", 0))
    batches = list(dlrm_batches(4))
    dlrm_train(model, torch.optim.SGD(model.dense_parameters(), lr=0.1), batches[:3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, cat, _ = batches[3]
    model.eval()
    out_eval = model.forward_onehot(dense, cat)
    model.train()
    with torch.no_grad():
        out_nograd = model.forward_onehot(dense, cat)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(out_eval, out_nograd)
    emb = model.embedding
    from mpc.embedding.base import jagged_from_dense

    ind, off = jagged_from_dense(cat)
    slots = emb.slots_for(ind, off)
    assert (slots >= 0).any() and (slots < 0).any()
    full = emb.to_float()                      # FP32 for cached rows, dequantized for others
    rows = global_rows(ind, off, emb.table_offsets)
    expect = full[rows].view(4, -1, 8).transpose(0, 1)
    torch.testing.assert_close(emb.lookup(ind, off), expect, rtol=0, atol=0)


def test_flush_and_export_agree():
    cfg = EmbeddingConfig(cardinalities=(30, 40), dim=8, kind="int8", cache=CacheConfig(0.3, "lru", 0))
    emb = build_embedding(cfg)
    emb.set_learning_rate(0.5)
    rnd = random.Random(3)
    for _ in range(4):
        ind, off = jagged(cfg.cardinalities, 6, rnd)
        (emb(ind, off) * 0.2 * torch.randn(6, 2, 8)).sum().backward()
    exported = emb.export_torch_quantized()
    fp32 = emb.to_float()
    tags = emb.cache.tags.clone()
    emb.flush()
    assert torch.equal(emb.cache.tags, tags)  # still cached
    assert torch.equal(torch.cat(exported), emb.weights)
    assert torch.equal(emb.to_float(), fp32)  # to_float reads the FP32 rows
    # PyTorch's own op reads the exported bytes: within one INT8 step of the FP32 rows.
    from mpc.embedding.quant import torch_pool

    ids = torch.arange(30)
    pooled = torch_pool(exported[0], cfg.precision, ids, torch.arange(31))
    assert torch.allclose(pooled, fp32[:30], atol=0.02)


def test_kernel_and_python_fallback_decide_alike():
    cfg = EmbeddingConfig(cardinalities=(300, 50, 4), dim=4, kind="int8", cache=CacheConfig(0.1, "lfu", 4))
    kernel, python = FP32Cache(cfg), FP32Cache(cfg.replace(use_kernels=False))
    assert kernel._kernel() is not None and python._kernel() is None
    rnd = random.Random(2)
    for step in range(6):
        ind, off = jagged(cfg.cardinalities, 20, rnd)
        a, b = kernel.prepare(ind, off), python.prepare(ind, off)
        for name, x, y in zip(a._fields, a, b):
            assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), (step, name)
        if step == 3:  # hand the Python state to the kernel: it rebuilds its index
            kernel.load_state_dict(python.state_dict())
    for name in ("tags", "times", "lfu_counts", "clocks", "counters"):
        assert torch.equal(getattr(kernel, name), getattr(python, name)), name


@pytest.mark.parametrize("dim,fraction,kind", [(16, 0.1, "int4"), (13, 1.0, "int8"), (5, 1.0, "int2")])
def test_backend_without_kernels_gives_the_same_bytes(dim, fraction, kind):
    """Also with every row cached at odd dims: the reference update then sees no uncached row."""
    cfg = EmbeddingConfig(cardinalities=(200, 30, 3), dim=dim, kind=kind, cache=CacheConfig(fraction, "lru", 2))
    fast, slow = build_embedding(cfg), build_embedding(cfg.replace(use_kernels=False))
    assert slow.cache._kernel() is None
    rnd = random.Random(8)
    for m in (fast, slow):
        m.set_learning_rate(0.3)
    for _ in range(5):
        ind, off = jagged(cfg.cardinalities, 12, rnd)
        grad = torch.randn(12, 3, dim)
        for m in (fast, slow):
            (m(ind, off) * grad).sum().backward()
    a, b = fast.state_dict(), slow.state_dict()
    assert fast.stats()["totals"]["evictions" if fraction < 1 else "hits"] > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_id_per_bag(cards, B, g, skew):
    """B bags per table, one id each, id ~ card * U^skew (low ids hot)."""
    ids = [(n * torch.rand(B, generator=g) ** skew).long() for n in cards]
    return torch.cat(ids), torch.arange(len(cards) * B + 1)


def test_large_sets_many_evictions_match_the_reference_policy():
    """Fully associative sets of hundreds of ways: the hash index deletes and re-inserts."""
    for policy in ("lru", "lfu"):
        cfg = EmbeddingConfig(cardinalities=(4000, 900), dim=4, kind="int8", cache=CacheConfig(0.15, policy, 0))
        fast, ref = FP32Cache(cfg), ReferenceCachePolicy.for_config(cfg)
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            ind, off = one_id_per_bag(cfg.cardinalities, 500, g, 4)
            slots = fast.prepare(ind, off).slots
            assert slots.tolist() == ref.prepare(global_rows(ind, off, fast.table_starts).tolist()).slots
        assert fast.counters[:, 4].sum() > 300  # many evictions
        assert fast.tags.tolist() == ref.tags


@pytest.mark.parametrize("cards,policy", [((5000, 3000, 20), "lru"), (tuple(40 * n for n in MANY_TABLES), "lru"),
                                         (tuple(40 * n for n in MANY_TABLES), "lfu")])
def test_results_do_not_depend_on_the_thread_count(cards, policy):
    """Three tables: shards at every thread count. Twenty: by table (1, 2 threads), by shard (3)."""
    cfg = EmbeddingConfig(cardinalities=cards, dim=4, kind="int8", cache=CacheConfig(0.05, policy, 8))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            emb = build_embedding(cfg)
            emb.set_learning_rate(0.1)
            g = torch.Generator().manual_seed(1)
            out = []
            for _ in range(5):
                ind, off = one_id_per_bag(cfg.cardinalities, 700, g, 3)
                (emb(ind, off) * torch.randn(700, len(cards), 4, generator=g)).sum().backward()
                out.append(emb.slots_for(ind, off))
            runs.append((torch.stack(out), emb.state_dict()))
    finally:
        torch.set_num_threads(threads)
    for slots, state in runs[1:]:
        assert torch.equal(slots, runs[0][0])
        assert all(torch.equal(state[k], runs[0][1][k]) for k in state)


def test_bad_ids_raise_and_leave_the_cache_untouched():
    cfg = EmbeddingConfig(cardinalities=(10, 20), dim=4, kind="int8", cache=CacheConfig(0.3, "lru", 0, shared=True))
    emb = build_embedding(cfg)
    emb(torch.tensor([1, 2]), torch.tensor([0, 1, 2])).sum().backward()
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    for ids in ([10, 2], [1, -1], [1, 20]):
        with pytest.raises(ValueError, match="out of range for table"):
            emb(torch.tensor(ids), torch.tensor([0, 1, 2]))
    for k, v in emb.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The kernel itself refuses them (no memory is touched out of bounds).
    with pytest.raises(RuntimeError, match="id 20 out of range for table 1"):
        emb.cache.prepare(torch.tensor([1, 20]), torch.tensor([0, 1, 2]), emb.weights)


def test_bad_ids_raise_in_a_walk_by_table_and_leave_the_cache_untouched():
    cfg = EmbeddingConfig(cardinalities=MANY_TABLES, dim=4, kind="int8", cache=CacheConfig(0.3, "lru", 2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 20 tables: walked by table
        emb = build_embedding(cfg)
        offsets = torch.arange(len(MANY_TABLES) + 1)
        good = torch.tensor([n - 1 for n in MANY_TABLES])
        emb(good, offsets).sum().backward()
        before = {k: v.clone() for k, v in emb.state_dict().items()}
        for table, bad in ((7, 2), (0, -1), (19, 300)):
            ids = good.clone()
            ids[table] = bad
            with pytest.raises(ValueError, match=f"out of range for table {table}"):
                emb(ids, offsets)
            with pytest.raises(RuntimeError, match=f"id {bad} out of range for table {table} "):
                emb.cache.prepare(ids, offsets, emb.weights)
        for k, v in emb.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        torch.set_num_threads(threads)


def test_a_corrupt_state_is_refused():
    cfg = EmbeddingConfig(cardinalities=(40,), dim=4, kind="int8", cache=CacheConfig(0.2, "lru", 0))
    emb = build_embedding(cfg)
    state = emb.state_dict()
    state["cache.tags"][0] = -1
    state["cache.tags"][1] = 5  # a filled way after an empty one
    emb.load_state_dict(state)
    with pytest.raises(RuntimeError, match="filled way after an empty one"):
        emb(torch.tensor([1]), torch.tensor([0, 1]))


def test_stats_count_hits_and_model_the_traffic():
    cfg = EmbeddingConfig(cardinalities=(10,), dim=8, kind="int8", cache=CacheConfig(0.2, "lru", 0))
    emb = build_embedding(cfg)  # 2 slots, INT8 rows of 16 bytes
    emb.set_learning_rate(0.1)
    for ids in ([1, 2], [1, 3, 4], [5, 5]):  # one bag per id (B = len(ids))
        ind = torch.tensor(ids)
        emb(ind, torch.arange(len(ids) + 1)).sum().backward()
    s = emb.stats()
    # step 1: fill 1, 2. step 2: hit 1; 3 evicts 2; 4 cannot evict 1 or 3 (used this step).
    # step 3: 5 evicts 1, then hits. Distinct uncached rows: step 2 {4}. Cached: 2, 2, 1.
    assert s["totals"] == {"lookups": 7, "hits": 2, "misses": 5, "fills": 4, "evictions": 2}
    assert s["iterations"] == 3 and s["hit_rate"] == pytest.approx(2 / 7)
    t = s["traffic"]
    assert (t["fill_bytes"], t["writeback_bytes"], t["uncached_bytes"]) == (4 * 16, 2 * 16, 2 * 1 * 16)
    assert t["no_cache_bytes"] == 2 * (2 + 3 + 1) * 16
    assert t["total_bytes_per_iteration"] == pytest.approx((64 + 32 + 32) / 3)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles(tmp_path):
    """kernels/cache.cu has no torch headers: it must compile on its own."""
    src = KERNEL_DIR / "cache.cu"
    res = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-I", str(KERNEL_DIR), str(src), "-o",
                          str(tmp_path / "cache.o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    cfg = EmbeddingConfig(cardinalities=(300, 50, 4), dim=8, kind="int8", cache=CacheConfig(0.2, "lfu", 4))
    cpu, gpu = build_embedding(cfg), build_embedding(cfg).cuda()
    rnd = random.Random(4)
    for m in (cpu, gpu):
        m.set_learning_rate(0.2)
    for _ in range(6):
        ind, off = jagged(cfg.cardinalities, 32, rnd)
        grad = torch.randn(32, 3, 8)
        a = cpu(ind, off)
        (a * grad).sum().backward()
        b = gpu(ind.cuda(), off.cuda())
        (b * grad.cuda()).sum().backward()
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)
    for k, v in cpu.state_dict().items():
        assert torch.equal(v, gpu.state_dict()[k].cpu()), k
