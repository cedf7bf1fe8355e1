"""The FP32 cache in front of low-precision tables: MPC's fast backend (PAPERS.md §1).

`CachedQuantizedEmbeddingBag` stores every table in low precision (fp16/int8/int4/int2,
as mpc.embedding.lowp) and keeps the hottest rows in an FP32 cache: cached rows are read
and trained in FP32, the others in low precision; evicted rows are re-quantized and
written back. The semantics are defined by mpc.embedding.cache_reference (read its
docstring); this module must agree with it step by step (tests/test_cache.py).

Split of the work:
  - `FP32Cache` holds the cache (FP32 rows, tags, times, LFU counts, clocks, counters)
    and, for a training batch, decides admission/eviction and moves the rows of each
    event (write-back with stream PURPOSE_WRITEBACK, fill) in one C++ call
    (kernels/cache_cpu.cpp, policy in kernels/cache_policy.h; CUDA: kernels/cache.cu).
    Without kernels it runs the reference policy and moves rows with the row ops.
  - the backend then pools and trains through mpc.embedding.ops with `cache_weights`
    and `slots` (cached rows in FP32, the others in low precision).
The kernel keeps per-set structures for large sets (hash index, LRU list / LFU heap),
per-slot LFU counts, and for LRU scan sets a 2-byte-per-slot header (fingerprints and
recency order, so that an access touches ~3 cache lines instead of scanning 32 tags and
times); they are derived from tags/times/counts, left out of the state_dict and rebuilt
after a load, so the state_dict holds exactly the semantic state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mpc.embedding import ops, quant, rng
from mpc.embedding.base import check_indices, table_offsets
from mpc.embedding.cache_reference import (COUNTER_NAMES, CacheLayout, ReferenceCachePolicy,
                                           cache_layout)
from mpc.embedding.config import CachePolicy, EmbeddingConfig, Precision, Rounding
from mpc.embedding.lowp import CHUNK_ROWS, QuantizedEmbeddingBag
from mpc.embedding.ops import PRECISION_CODE, global_rows

log = logging.getLogger(__name__)

GEOMETRY_FIELDS = ("first_row", "rows", "ways", "nsets", "slot_offset", "set_offset", "index_offset",
                   "index_size", "order_offset", "state_offset", "header_offset")  # = cache_policy.h GeomField
POLICY_CODE = {CachePolicy.LRU: 0, CachePolicy.LFU: 1}
TRAFFIC_FIELDS = ("iterations", "uncached_rows", "cached_rows")  # distinct rows per step, summed
# Sets of at most this many ways are scanned (a few adjacent cache lines); larger ones
# (e.g. fully associative tables) get a hash index and an LRU list / LFU heap.
SCAN_WAYS = 32  # = kScanWays in kernels/cache_policy.h


class PrepareOutput(NamedTuple):
    """What one training batch's `prepare` decided (events in access order; the event
    tensors are empty when `prepare` was given the storage and moved the rows itself)."""

    slots: torch.Tensor            # per id: its row's slot, or -1 (trained in low precision)
    writeback_slots: torch.Tensor
    writeback_rows: torch.Tensor
    fill_slots: torch.Tensor
    fill_rows: torch.Tensor
    touched: int                   # distinct cached rows the batch accessed
    uncached: int                  # distinct rows the batch left uncached


def index_size(ways: int) -> int:
    """Hash-index entries per set: 0 for a scanned set, else the power of two >= 2 x ways."""
    return 0 if ways <= SCAN_WAYS else 1 << (2 * ways - 1).bit_length()


def set_state_width(policy: CachePolicy) -> int:
    """int32 per structured set: [fill, head, tail] for LRU's list, [fill] for LFU's heap."""
    return 3 if CachePolicy(policy) is CachePolicy.LRU else 1


@dataclass(frozen=True)
class KernelLayout:
    """Sizes of the kernel's derived structures (see kernels/cache_policy.h)."""

    geometry: tuple[tuple[int, ...], ...]
    index_entries: int      # int32 hash-index entries of the structured sets
    ordered_slots: int      # slots of structured sets (2 int32 each: list links / heap)
    structured_sets: int    # sets with a state row
    header_bytes: int       # uint8 set headers of LRU scan sets (2 bytes per slot)

    @classmethod
    def of(cls, layout: CacheLayout, policy: CachePolicy | str = CachePolicy.LRU) -> "KernelLayout":
        lru = CachePolicy(policy) is CachePolicy.LRU
        rows, index, ordered, states, header = [], 0, 0, 0, 0
        for g in layout.groups:
            h = index_size(g.ways)
            with_header = lru and h == 0
            rows.append((g.first_row, g.rows, g.ways, g.nsets, g.slot_offset, g.set_offset, index, h, ordered,
                         states, header if with_header else -1))
            index += h * g.nsets
            if h:
                ordered += g.slots
                states += g.nsets
            if with_header:
                header += 2 * g.ways * g.nsets
        return cls(tuple(rows), index, ordered, states, header)


class FP32Cache(nn.Module):
    """FP32 rows of the cached slots and the policy state (see the module docstring)."""

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        self.config = config
        self.layout = cache_layout(config.cardinalities, config.cache)
        self.policy = config.cache.policy
        S, D, G, T = self.layout.slots, config.dim, len(self.layout.groups), config.num_tables
        lfu_rows = config.total_rows if self.policy is CachePolicy.LFU else 0
        # The state (persistent: a resumed run continues exactly). The large arrays are
        # read at random every step: huge pages where the OS allows (quant.empty_storage).
        self.register_buffer("weights", quant.full_huge((S, D), 0.0, torch.float32))
        self.register_buffer("tags", quant.full_huge((S,), -1, torch.int64))
        self.register_buffer("times", quant.full_huge((S,), 0, torch.int64))
        self.register_buffer("lfu_counts", quant.full_huge((lfu_rows,), 0, torch.int32))
        self.register_buffer("clocks", torch.zeros(G, dtype=torch.int64))
        self.register_buffer("counters", torch.zeros(T, len(COUNTER_NAMES), dtype=torch.int64))
        self.register_buffer("traffic", torch.zeros(len(TRAFFIC_FIELDS), dtype=torch.int64))
        # Derived from the state and the config; rebuilt, never saved.
        kl = KernelLayout.of(self.layout, self.policy)
        set_state = torch.full((kl.structured_sets, set_state_width(self.policy)), -1, dtype=torch.int32)
        set_state[:, 0] = 0
        geometry = torch.tensor(kl.geometry, dtype=torch.int64).reshape(-1, len(GEOMETRY_FIELDS))
        self.register_buffer("geometry", geometry, persistent=False)
        self.register_buffer("table_starts", table_offsets(config.cardinalities), persistent=False)
        self.register_buffer("order", quant.full_huge((kl.ordered_slots, 2), -1, torch.int32), persistent=False)
        self.register_buffer("set_state", set_state, persistent=False)
        self.register_buffer("index", quant.full_huge((kl.index_entries,), -1, torch.int32), persistent=False)
        self.register_buffer("slot_counts", quant.full_huge((S if lfu_rows else 0,), 0, torch.int32), persistent=False)
        # LRU scan sets' fingerprints and recency lists (kernels/cache_policy.h): all empty
        self.register_buffer("header", quant.full_huge((kl.header_bytes,), 0xFF, torch.uint8), persistent=False)
        self._derived_valid = True
        self._derived_device = self.tags.device
        self._slot_count = self.layout.slots
        self._fns = None  # (device, kernels) of the last _kernel() call
        self.register_load_state_dict_post_hook(lambda module, _keys: module._invalidate())

    @property
    def slots(self) -> int:
        return self._slot_count

    def _invalidate(self) -> None:
        self._derived_valid = False

    def _state(self) -> list[torch.Tensor]:
        return [self.tags, self.times, self.lfu_counts, self.clocks, self.counters]

    def _derived(self) -> list[torch.Tensor]:
        return [self.order, self.set_state, self.index, self.slot_counts, self.header]

    def _kernel(self):
        """(prepare, probe, rebuild) kernels for the state's device, or None (reference)."""
        device = self.tags.device
        cached = self._fns
        if cached is not None and cached[0] == device and self._derived_valid:
            return cached[1]  # every training step asks: the checks below ran already
        if not self.config.use_kernels:
            return None
        from mpc import kernels

        module = kernels.load()
        suffix = "_cuda" if self.tags.is_cuda else ""
        fns = [getattr(module, f"cache_{name}{suffix}", None) for name in ("prepare", "probe", "rebuild")]
        if module is None or None in fns:
            return None
        if self.tags.device != self._derived_device:  # the GPU kernel keeps no headers: rebuild
            self._derived_valid = False
            self._derived_device = self.tags.device
        if not self._derived_valid:
            fns[2](self.geometry, POLICY_CODE[self.policy], self._state()[:3], self._derived())
            self._derived_valid = True
        self._fns = (device, fns)
        return fns

    def bounds(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of each table's ids and of each group's in a table-major batch."""
        T = self.config.num_tables
        B = (len(offsets) - 1) // T
        if B == 0:
            tables = torch.zeros(T + 1, dtype=torch.int64, device=offsets.device)
        else:
            tables = offsets[::B].to(torch.int64).contiguous()
        if self.config.cache.shared:
            return tables, tables[[0, -1]].contiguous()
        return tables, tables

    def _kernel_bounds(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds arguments of the kernels: the CPU kernels read each table's and
        group's positions from the offsets themselves (every B-th entry); the CUDA ones
        take them computed (`bounds`)."""
        if self.tags.is_cuda:
            return self.bounds(offsets)
        offsets = offsets if offsets.dtype == torch.int64 and offsets.is_contiguous() else \
            offsets.to(torch.int64).contiguous()
        return offsets, offsets

    def prepare(self, indices: torch.Tensor, offsets: torch.Tensor, storage: torch.Tensor | None = None,
                step: int = 0, count_traffic: bool = False) -> PrepareOutput:
        """Admit/evict for one training batch (table-local ids, table-major bags).

        With `storage` (the backend's stored rows) the evicted rows are written back to
        it (stream (seed, step, row, PURPOSE_WRITEBACK)) and the admitted rows filled
        from it; without, only the decisions are made, and the events (write-backs, then
        fills) are returned for the caller to move. `count_traffic`: also add the
        batch to the traffic counters (as `count_traffic(out)`).
        """
        if indices.dtype != torch.int64 or not indices.is_contiguous():
            indices = indices.to(torch.int64).contiguous()
        kernel = self._kernel()
        in_kernel = count_traffic and kernel is not None and not self.tags.is_cuda  # the CPU kernel adds it up
        if kernel is None:
            out = self._prepare_reference(indices, offsets, storage, step)
        else:
            c = self.config
            rowdata = [] if storage is None else [storage, self.weights]
            state = self._state() + ([self.traffic] if in_kernel else [])
            res = kernel[0](indices, *self._kernel_bounds(offsets), self.geometry, self.table_starts,
                            POLICY_CODE[self.policy], state, self._derived(), rowdata, PRECISION_CODE[c.precision],
                            c.rounding is Rounding.STOCHASTIC, rng.step_key(c.seed, step), rng.PURPOSE_WRITEBACK)
            out = PrepareOutput(*res[:5], *res[5].tolist())
        if count_traffic and not in_kernel:
            self.count_traffic(out)
        return out

    def count_traffic(self, out: PrepareOutput) -> None:
        """Add one iteration's distinct uncached / cached rows to the traffic counters."""
        self.traffic += torch.tensor([1, out.uncached, out.touched], dtype=torch.int64, device=self.traffic.device)

    def _prepare_reference(self, indices, offsets, storage, step) -> PrepareOutput:
        check_indices(indices, offsets, self.config.cardinalities)
        rows = global_rows(indices, offsets, self.table_starts)
        policy = ReferenceCachePolicy.for_config(self.config)
        policy.load_tensors(*self._state())
        result = policy.prepare(rows.tolist())
        policy.store_tensors(*self._state())
        self._invalidate()

        def tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=rows.device).view(-1)

        wb_slots, wb_rows = tensor([e[0] for e in result.writebacks]), tensor([e[1] for e in result.writebacks])
        fill_slots, fill_rows = tensor([e[0] for e in result.fills]), tensor([e[1] for e in result.fills])
        if storage is not None:
            c = self.config
            o = ops.for_config(c)
            if len(wb_slots):  # all write-backs before any fill: a row may leave and come back
                storage[wb_rows] = o.quantize_rows(c.precision, self.weights[wb_slots], c.rounding, c.seed, step,
                                                   wb_rows, rng.PURPOSE_WRITEBACK)
            if len(fill_slots):
                self.weights[fill_slots] = o.dequantize_rows(c.precision, storage[fill_rows], c.dim)
            wb_slots = wb_rows = fill_slots = fill_rows = tensor([])  # moved: not returned
        slots = tensor(result.slots)
        uncached = len(set(rows[slots < 0].tolist()))
        return PrepareOutput(slots, wb_slots, wb_rows, fill_slots, fill_rows, result.touched, uncached)

    def probe(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Slot of each id's row or -1; changes no state (eval lookups)."""
        indices = indices.to(torch.int64).contiguous()
        kernel = self._kernel()
        if kernel is not None:
            return kernel[1](indices, *self._kernel_bounds(offsets), self.geometry, self.table_starts,
                             POLICY_CODE[self.policy], self._state()[:3], self._derived())
        check_indices(indices, offsets, self.config.cardinalities)
        rows = global_rows(indices, offsets, self.table_starts)
        where = {r: s for s, r in enumerate(self.tags.tolist()) if r >= 0}
        return torch.tensor([where.get(r, -1) for r in rows.tolist()], dtype=torch.int64, device=rows.device)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes by component; they sum to every tensor this module allocated."""
        return {
            "cache_values": self.weights.nbytes,
            "cache_tags": self.tags.nbytes + self.index.nbytes,
            "cache_policy_state": (self.times.nbytes + self.slot_counts.nbytes + self.order.nbytes
                                   + self.set_state.nbytes + self.header.nbytes),
            "lfu_counts": self.lfu_counts.nbytes,
            "cache_bookkeeping": (self.clocks.nbytes + self.counters.nbytes + self.traffic.nbytes
                                  + self.geometry.nbytes + self.table_starts.nbytes),
        }


class CachedQuantizedEmbeddingBag(QuantizedEmbeddingBag):
    """Low-precision tables (as QuantizedEmbeddingBag) behind an FP32 cache (`self.cache`).

    Built by build_embedding for kinds fp16/int8/int4/int2 when config.cache.fraction > 0.
    state_dict: `weights` and `step` (the stored rows, as the uncached backend) and
    `cache.*` (FP32 rows, tags, times, LFU counts, clocks, counters, traffic).
    """

    def __init__(self, config: EmbeddingConfig, storage: torch.Tensor | None = None):
        super().__init__(config, storage)
        self.cache = FP32Cache(config)
        self._prepared = None  # (indices, offsets, versions, slots) of the last prepare
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_prepared())

    def _forget_prepared(self) -> None:
        self._prepared = None

    @property
    def row_bytes(self) -> int:
        return self.precision.row_bytes(self.dim)

    # --- the cache's hooks --------------------------------------------------------------
    def prepare(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        """Admit/evict for a training batch: write back the evicted rows, fill the new."""
        if self.cache.slots == 0:
            return
        try:
            out = self.cache.prepare(indices, offsets, self.weights, int(self.step), count_traffic=True)
        except RuntimeError:
            check_indices(indices, offsets, self.config.cardinalities)  # a ValueError naming the id
            raise
        self._prepared = (indices, offsets, indices._version, offsets._version, out.slots)

    def slots_for(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
        """Slot of each index (-1: read the stored row); None when there is no cache."""
        if self.cache.slots == 0:
            return None
        p = self._prepared
        if p is not None and p[0] is indices and p[1] is offsets and \
                (p[2], p[3]) == (indices._version, offsets._version):
            return p[4]
        # Same answer as the last prepare gave for its batch: admitted rows stay cached
        # until the next prepare (a row accessed in a call is never evicted in it).
        try:
            return self.cache.probe(indices, offsets)
        except RuntimeError:
            check_indices(indices, offsets, self.config.cardinalities)
            raise

    # --- the EmbeddingBackend interface -----------------------------------------------
    def lookup(self, indices, offsets):
        slots = self.slots_for(indices, offsets)
        return self._ops().pool(self.precision, self.weights, self.table_offsets, indices, offsets, self.dim,
                                self.cache.weights if slots is not None else None, slots)

    def backward_update(self, indices, offsets, grad_out):
        slots = self.slots_for(indices, offsets)
        self._ops().sgd_update(self.precision, self.weights, self.table_offsets, indices, offsets, grad_out,
                               self.learning_rate, self.dim, self.config.rounding, self.config.seed,
                               int(self.step), self.cache.weights if slots is not None else None, slots)
        self.step += 1

    def _cached_slots(self) -> torch.Tensor:
        return (self.cache.tags >= 0).nonzero().flatten()

    def _requantized_cache(self):
        """(rows, storage rows) of every cached row re-quantized as a write-back would."""
        slots = self._cached_slots()
        rows = self.cache.tags[slots]
        out = torch.empty((len(slots),) + tuple(self.weights.shape[1:]), dtype=self.weights.dtype,
                          device=self.weights.device)
        o, c = self._ops(), self.config
        for lo in range(0, len(slots), CHUNK_ROWS):
            s, r = slots[lo:lo + CHUNK_ROWS], rows[lo:lo + CHUNK_ROWS]
            out[lo:lo + CHUNK_ROWS] = o.quantize_rows(self.precision, self.cache.weights[s], c.rounding, c.seed,
                                                      int(self.step), r, rng.PURPOSE_WRITEBACK)
        return rows, out

    def flush(self) -> None:
        """Write every cached row back to storage (re-quantized); they stay cached."""
        rows, stored = self._requantized_cache()
        self.weights[rows] = stored

    def to_float(self) -> torch.Tensor:
        """All rows in FP32: cached rows from the cache, the others dequantized."""
        out = super().to_float()
        slots = self._cached_slots()
        out[self.cache.tags[slots]] = self.cache.weights[slots]
        return out

    def export_torch_quantized(self) -> list[torch.Tensor]:
        """As QuantizedEmbeddingBag's, with the cached rows as flush() would write them."""
        _, weights = self.inference_tables()
        return quant.export_torch_quantized(weights, self.precision, self.table_offsets)

    def inference_tables(self) -> tuple[Precision, torch.Tensor]:
        """The stored rows with every cached row as flush() would write it back
        (re-quantized, as export_torch_quantized), in a copy: nothing here changes."""
        rows, stored = self._requantized_cache()
        weights = self.weights.clone()
        weights[rows] = stored
        return self.precision, weights

    def memory_bytes(self) -> dict[str, int]:
        """Exact bytes: stored rows, cache rows and every piece of cache state."""
        out = dict(super().memory_bytes())
        out.update(self.cache.memory_bytes())
        return out

    def stats(self) -> dict:
        return cache_stats(self.cache, self.row_bytes)


def cache_stats(cache: FP32Cache, row_bytes: int) -> dict:
    """Counters per table and in total, hit rate, and the host<->device traffic model.

    Traffic model (the paper's 16% speed-up): tables in host memory, cache on the
    device. Per iteration the cache moves fills (host->device) and write-backs
    (device->host), one low-precision row each; rows trained in low precision are read
    and written back once each (distinct rows). Without a cache every distinct row of
    the batch would be read and written: `no_cache_bytes`.
    """
    names = COUNTER_NAMES
    per_table = [dict(zip(names, row)) for row in cache.counters.tolist()]
    total = dict(zip(names, cache.counters.sum(0).tolist()))
    it, uncached, cached = cache.traffic.tolist()
    traffic = {
        "fill_bytes": total["fills"] * row_bytes,
        "writeback_bytes": total["evictions"] * row_bytes,
        "uncached_bytes": 2 * uncached * row_bytes,
        "no_cache_bytes": 2 * (uncached + cached) * row_bytes,
    }
    traffic["cache_bytes"] = traffic["fill_bytes"] + traffic["writeback_bytes"]
    traffic["total_bytes"] = traffic["cache_bytes"] + traffic["uncached_bytes"]
    per_iter = {k.replace("_bytes", "_bytes_per_iteration"): v / it for k, v in traffic.items()} if it else {}
    return {
        "iterations": it,
        "hit_rate": total["hits"] / total["lookups"] if total["lookups"] else 0.0,
        "totals": total,
        "tables": per_table,
        "traffic": {**traffic, **per_iter, "row_bytes": row_bytes},
    }

