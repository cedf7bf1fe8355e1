"""The one interface every embedding backend implements, and the fused-update plumbing.

A backend holds T tables of one dimension D and pools bags of rows (sum), like T
`nn.EmbeddingBag(mode="sum")` but in one call (table-batched, as FBGEMM's TBE).

Input is jagged, table-major::

    indices  [i0 i1 | i2 | | i3 i4 i5 | ...]   int64, ids local to their table
    offsets  [0, 2, 3, 3, 6, ...]              int64, length T*B + 1
    bag (t, b) = indices[offsets[t*B + b] : offsets[t*B + b + 1]]   (may be empty)

Output is (B, T, D): out[b, t] = sum of table t's rows in bag (t, b).

Training is fused, as in FBGEMM: backward does not produce a gradient for the tables;
it applies the SGD update to the looked-up rows right there (`backward_update`) with
the backend's `learning_rate`. Rows are touched only where the batch looked them up.
"""

from __future__ import annotations

import torch
from torch import nn

from mpc.embedding.config import EmbeddingConfig, Precision


def jagged_from_dense(cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids, one per table per sample (Criteo) -> table-major (indices, offsets)."""
    B, T = cat.shape
    indices = cat.t().reshape(-1).to(torch.int64)
    offsets = torch.arange(T * B + 1, dtype=torch.int64)
    return indices, offsets


def table_offsets(cardinalities) -> torch.Tensor:
    """Row offsets of each table in one flat tensor: [0, c0, c0+c1, ..., total]."""
    out = torch.zeros(len(cardinalities) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.as_tensor(list(cardinalities), dtype=torch.int64), 0)
    return out


def bag_table_ids(offsets: torch.Tensor, num_tables: int) -> torch.Tensor:
    """For each index, the table it belongs to (from the table-major offsets)."""
    B = (len(offsets) - 1) // num_tables
    lengths = offsets[1:] - offsets[:-1]
    tables = torch.arange(num_tables, dtype=torch.int64, device=offsets.device).repeat_interleave(B)
    return tables.repeat_interleave(lengths)


def check_indices(indices: torch.Tensor, offsets: torch.Tensor, cardinalities) -> None:
    """Raise ValueError naming the table and id when an id is out of range."""
    T = len(cardinalities)
    if (len(offsets) - 1) % T:
        raise ValueError(f"offsets has {len(offsets)} entries; expected T*B+1 with T={T}")
    if indices.numel() == 0:
        return
    tables = bag_table_ids(offsets, T)
    limits = torch.as_tensor(list(cardinalities), dtype=torch.int64, device=indices.device)[tables]
    bad = (indices < 0) | (indices >= limits)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        t = int(tables[k])
        raise ValueError(f"id {int(indices[k])} out of range for table {t} "
                         f"(C{t + 1}, {cardinalities[t]} rows)")


class _FusedLookup(torch.autograd.Function):
    """Pooled lookup whose backward applies the backend's SGD update in place."""

    @staticmethod
    def forward(ctx, anchor, backend, indices, offsets):
        ctx.backend = backend
        ctx.save_for_backward(indices, offsets)
        return backend.lookup(indices, offsets)

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets = ctx.saved_tensors
        ctx.backend.backward_update(indices, offsets, grad_out.contiguous())
        return None, None, None, None


class EmbeddingBackend(nn.Module):
    """Base class: subclasses implement `lookup`, `backward_update`, `memory_bytes`.

    Optional hooks: `prepare(indices, offsets)` runs before a training lookup (the
    cache uses it to admit and evict rows); `stats()` reports counters; `flush()`
    writes any cached state back to storage; `inference_tables()` gives the tables
    evaluation reads, for export (mpc.inference.module).
    """

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        self.config = config
        self.learning_rate = 0.0
        self.register_buffer("table_offsets", table_offsets(config.cardinalities), persistent=False)
        # Gives the fused lookup's output a grad_fn so that backward reaches us.
        self._anchor = torch.zeros((), requires_grad=True)

    @property
    def num_tables(self) -> int:
        return self.config.num_tables

    @property
    def dim(self) -> int:
        return self.config.dim

    def set_learning_rate(self, lr: float) -> None:
        self.learning_rate = float(lr)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.prepare(indices, offsets)
            return _FusedLookup.apply(self._anchor, self, indices, offsets)
        with torch.no_grad():
            return self.lookup(indices, offsets)

    # --- to implement ---------------------------------------------------------------
    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pooled rows, (B, T, D) float32. Must not change any state."""
        raise NotImplementedError

    def backward_update(self, indices: torch.Tensor, offsets: torch.Tensor,
                        grad_out: torch.Tensor) -> None:
        """Apply row -= learning_rate * (sum of the gradients of its bags), in place."""
        raise NotImplementedError

    def memory_bytes(self) -> dict[str, int]:
        """Exact bytes by component (e.g. {"weights": ..., "scale_bias": ...})."""
        raise NotImplementedError

    # --- optional hooks -------------------------------------------------------------
    def prepare(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def flush(self) -> None:
        pass

    def inference_tables(self) -> tuple[Precision, torch.Tensor] | None:
        """The exact tables evaluation (eval mode) reads, in one storage format, without
        changing the backend: (precision, flat storage rows as mpc.embedding.quant lays
        them out for it, a tensor the caller may keep). None (the default): the backend's
        stored buffer or `to_float()` is what evaluation reads; use the generic path.

        Override it where evaluation reads something else: fake-quantized tables (QAT,
        PTQ) or rows held elsewhere (a cache)."""
        return None

    def to_float(self) -> torch.Tensor:
        """All tables as one flat FP32 tensor (total_rows, D), rows in table order."""
        raise NotImplementedError

    def table_weights(self, t: int) -> torch.Tensor:
        """Table t as an FP32 (rows, D) tensor (dequantized where needed)."""
        lo, hi = int(self.table_offsets[t]), int(self.table_offsets[t + 1])
        return self.to_float()[lo:hi]

    def total_bytes(self) -> int:
        return sum(self.memory_bytes().values())
