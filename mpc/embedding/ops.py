"""The table-batched embedding ops, compiled kernels and their pure-PyTorch twins.

MPC's core (PAPERS.md §1, §5) needs four operations on the flat storage of all T tables
(rows of every table concatenated; `table_offsets` (T+1,) are the tables' first rows):

    pool(precision, weights, table_offsets, indices, offsets, dim,
         cache_weights=None, slots=None)                          -> (B, T, D) float32
    sgd_update(precision, weights, table_offsets, indices, offsets, grad_out, lr, dim,
               rounding, seed, step, cache_weights=None, slots=None) -> None (in place)
    quantize_rows(precision, x, rounding, seed, step, rows, purpose) -> storage rows
    dequantize_rows(precision, storage, dim)                      -> (n, D) float32

indices/offsets are the table-major jagged batch of mpc.embedding.base. `slots` (one
per index, -1 = not cached) redirects an index to FP32 row cache_weights[slot]: pool
reads it, sgd_update updates it in FP32 instead of the stored row (the cache of
mpc.embedding.cache). All occurrences of one row must carry the same slot, and distinct
rows distinct slots.

Exact semantics, shared by both implementations (tests compare them to the byte):
  - pool: each bag sums its rows in bag order, starting from 0.0 (float32 adds).
  - sgd_update: every distinct looked-up row r gets g_r = sum of the gradients of the
    bags it occurs in, added in index order starting from 0.0; then row -= lr * g_r
    (one multiply, one subtract, in float32). Low-precision rows are dequantized,
    updated, given a fresh scale/bias and re-quantized with `rounding`; stochastic
    rounding draws from mpc.embedding.rng's stream (seed, step, global row,
    PURPOSE_UPDATE). Rows not looked up keep their bytes.
  - an id outside its table raises ValueError naming table and id, before anything
    is written.
`for_config(config)` returns KernelOps when config.use_kernels and the kernels build
(mpc.kernels.load()), else ReferenceOps.
"""

from __future__ import annotations

import torch

from mpc.embedding import quant, rng
from mpc.embedding.base import check_indices
from mpc.embedding.config import Precision, Rounding

PRECISION_CODE = {Precision.FP32: 0, Precision.FP16: 1, Precision.INT8: 2, Precision.INT4: 3,
                  Precision.INT2: 4}


def global_rows(indices: torch.Tensor, offsets: torch.Tensor, table_offsets: torch.Tensor) -> torch.Tensor:
    """Table-local ids -> rows of the flat storage (on the tensors' device)."""
    T = len(table_offsets) - 1
    B = (len(offsets) - 1) // T
    lengths = offsets[1:] - offsets[:-1]
    tables = torch.arange(T, device=offsets.device).repeat_interleave(B).repeat_interleave(lengths)
    return indices + table_offsets[:-1][tables]


def _check_batch(table_offsets, indices, offsets) -> None:
    """ValueError naming the table and id for out-of-range ids (negative ids included)."""
    table_offsets, indices, offsets = table_offsets.cpu(), indices.cpu(), offsets.cpu()
    cards = (table_offsets[1:] - table_offsets[:-1]).tolist()
    if len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(indices):
        raise ValueError(f"offsets must start at 0 and end at len(indices)={len(indices)}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must be non-decreasing")
    check_indices(indices, offsets, cards)


def sequential_bag_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum the rows of each bag in bag order from 0.0: (N, D) -> (len(offsets)-1, D).

    Round k adds the k-th row of every bag that has one, so each bag's sum is the
    left-to-right float sum a loop would give (what the kernels do).
    """
    nbags = len(offsets) - 1
    lengths = offsets[1:] - offsets[:-1]
    out = torch.zeros(nbags, values.shape[1], dtype=torch.float32, device=values.device)
    if len(values) == 0:
        return out
    bags = torch.arange(nbags, device=values.device).repeat_interleave(lengths)
    rank = torch.arange(len(values), device=values.device) - offsets[:-1].repeat_interleave(lengths)
    for k in range(int(lengths.max())):
        sel = rank == k
        b = bags[sel]
        out[b] = out[b] + values[sel]
    return out


def row_gradients(grad_out: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor):
    """Per distinct row: (rows (U,), first index position (U,), summed gradient (U, D)).

    Each row's gradients are added in index order starting from 0.0 (as the kernels).
    """
    B, T, D = grad_out.shape
    device = grad_out.device
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.arange(T * B, device=device).repeat_interleave(lengths)
    per_index = grad_out[bags % B, bags // B]                        # (N, D)
    uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)   # indices grouped by row, in index order
    starts = torch.cumsum(counts, 0) - counts
    seg = torch.arange(len(uniq), device=device).repeat_interleave(counts)
    rank = torch.arange(len(rows), device=device) - starts[seg]
    grads = torch.zeros(len(uniq), D, dtype=torch.float32, device=device)
    # Round k adds every row's k-th occurrence: a left-to-right sum per row.
    by_rank = torch.argsort(rank, stable=True)
    bounds = torch.cumsum(torch.bincount(rank), 0).tolist()
    lo = 0
    for hi in bounds:
        pick = by_rank[lo:hi]
        s = seg[pick]
        grads[s] = grads[s] + per_index[order[pick]]
        lo = hi
    return uniq, order[starts], grads


class ReferenceOps:
    """Pure PyTorch, written for clarity; any device."""

    name = "reference"

    @staticmethod
    def pool(precision, weights, table_offsets, indices, offsets, dim, cache_weights=None, slots=None):
        precision = Precision(precision)
        T = len(table_offsets) - 1
        _check_batch(table_offsets, indices, offsets)
        rows = global_rows(indices, offsets, table_offsets)
        values = quant.dequantize_rows(weights[rows], precision, dim)
        if slots is not None:
            cached = slots >= 0
            values[cached] = cache_weights[slots[cached].long()]
        B = (len(offsets) - 1) // T
        return sequential_bag_sum(values, offsets).view(T, B, dim).transpose(0, 1).contiguous()

    @staticmethod
    def sgd_update(precision, weights, table_offsets, indices, offsets, grad_out, lr, dim,
                   rounding, seed, step, cache_weights=None, slots=None):
        precision, rounding = Precision(precision), Rounding(rounding)
        _check_batch(table_offsets, indices, offsets)
        rows = global_rows(indices, offsets, table_offsets)
        uniq, first, grads = row_gradients(grad_out.float(), rows, offsets)
        delta = grads * lr                              # float32 lr, as the kernels
        if slots is not None:
            slot = _row_slots(slots.long(), rows, uniq, first)
            cached = slot >= 0
            s = slot[cached]
            cache_weights[s] = cache_weights[s] - delta[cached]
            uniq, delta = uniq[~cached], delta[~cached]
        if precision is Precision.FP32:
            weights[uniq] = weights[uniq] - delta
            return
        updated = quant.dequantize_rows(weights[uniq], precision, dim) - delta
        weights[uniq] = ReferenceOps.quantize_rows(precision, updated, rounding, seed, step, uniq,
                                                   rng.PURPOSE_UPDATE)

    @staticmethod
    def quantize_rows(precision, x, rounding, seed, step, rows, purpose):
        precision, rounding = Precision(precision), Rounding(rounding)
        u = None
        if rounding is Rounding.STOCHASTIC and precision is not Precision.FP32:
            u = rng.uniform(seed, step, rows, x.shape[1], purpose)
        return quant.quantize_rows(x, precision, rounding, u)

    @staticmethod
    def dequantize_rows(precision, storage, dim):
        return quant.dequantize_rows(storage, precision, dim)


def _row_slots(slots, rows, uniq, first):
    """The slot of each distinct row; ValueError if a row's occurrences disagree."""
    slot = slots[first]
    inverse = torch.searchsorted(uniq, rows)
    if bool((slots != slot[inverse]).any()):
        raise ValueError("slots: all occurrences of a row must have the same slot")
    taken = slot[slot >= 0]
    if len(torch.unique(taken)) != len(taken):
        raise ValueError("slots: two distinct rows share a cache slot")
    return slot


class KernelOps:
    """The compiled kernels (kernels/tbe_cpu.cpp, kernels/tbe.cu); same contract."""

    name = "kernels"

    def __init__(self, module):
        self.module = module

    def _fn(self, name, tensor):
        """The kernel for the tensor's device, or None (then the reference runs)."""
        return getattr(self.module, name + ("_cuda" if tensor.is_cuda else ""), None)

    def pool(self, precision, weights, table_offsets, indices, offsets, dim, cache_weights=None,
             slots=None):
        fn = self._fn("tbe_pool", weights)
        if fn is None:
            return ReferenceOps.pool(precision, weights, table_offsets, indices, offsets, dim,
                                     cache_weights, slots)
        return fn(PRECISION_CODE[Precision(precision)], weights, table_offsets, indices, offsets,
                  int(dim), cache_weights, slots)

    def sgd_update(self, precision, weights, table_offsets, indices, offsets, grad_out, lr, dim,
                   rounding, seed, step, cache_weights=None, slots=None):
        fn = self._fn("tbe_sgd_update", weights)
        if fn is None:
            return ReferenceOps.sgd_update(precision, weights, table_offsets, indices, offsets,
                                           grad_out, lr, dim, rounding, seed, step, cache_weights, slots)
        fn(PRECISION_CODE[Precision(precision)], weights, table_offsets, indices, offsets,
           grad_out.float().contiguous(), float(lr), int(dim),
           Rounding(rounding) is Rounding.STOCHASTIC, rng.step_key(seed, step), cache_weights, slots)

    def quantize_rows(self, precision, x, rounding, seed, step, rows, purpose):
        fn = self._fn("tbe_quantize_rows", x)
        if fn is None:
            return ReferenceOps.quantize_rows(precision, x, rounding, seed, step, rows, purpose)
        return fn(PRECISION_CODE[Precision(precision)], x.float().contiguous(),
                  Rounding(rounding) is Rounding.STOCHASTIC, rng.step_key(seed, step),
                  rows.to(torch.int64).contiguous(), int(purpose))

    def dequantize_rows(self, precision, storage, dim):
        fn = self._fn("tbe_dequantize_rows", storage)
        if fn is None:
            return ReferenceOps.dequantize_rows(precision, storage, dim)
        return fn(PRECISION_CODE[Precision(precision)], storage.contiguous(), int(dim))


def for_config(config) -> ReferenceOps | KernelOps:
    """KernelOps when config.use_kernels and the kernels build, else ReferenceOps."""
    if getattr(config, "use_kernels", True):
        from mpc import kernels

        module = kernels.load()
        if module is not None:
            return KernelOps(module)
    return ReferenceOps()
