"""Mini-batches from a memory-mapped split, shuffled per epoch, checked as they go.

The order of epoch e is a permutation drawn from (seed, e), so a run resumed at batch k
of epoch e sees exactly the batches an uninterrupted run would. Every batch is checked:
non-finite dense values and ids outside their table raise a DataError naming the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mpc.criteo import field_name, NUM_DENSE
from mpc.data.format import Split
from mpc.errors import DataError


@dataclass
class Batch:
    dense: torch.Tensor   # (B, 13) float32
    cat: torch.Tensor     # (B, 26) int64
    label: torch.Tensor   # (B,) float32

    def __len__(self) -> int:
        return len(self.label)


class BatchLoader:
    """Iterates a split in batches; `shuffle` permutes rows per epoch from the seed."""

    def __init__(self, split: Split, cardinalities, batch_size: int, *, shuffle: bool,
                 seed: int = 0, limit: int | None = None, source: str = ""):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.split = split
        self.cards = np.asarray(cardinalities, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_rows = len(split) if limit is None else min(len(split), limit)
        self.source = source

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)

    def order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        rng = np.random.default_rng([self.seed, epoch])
        # Shuffle all rows, then keep the first `num_rows`: a limit takes a random subset.
        return rng.permutation(len(self.split))[: self.num_rows]

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        order = self.order(epoch)
        for k in range(start, len(self)):
            lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, self.num_rows)
            if order is None:
                rows = slice(lo, hi)
            else:
                rows = np.sort(order[lo:hi])  # sorted reads are kinder to the page cache
            yield self._make(rows, lo)

    __iter__ = batches

    def _make(self, rows, first: int) -> Batch:
        dense = np.array(self.split.dense[rows], dtype=np.float32)  # a private, writable copy
        cat = np.asarray(self.split.cat[rows])
        label = np.asarray(self.split.label[rows])
        self._check(dense, cat, label, rows, first)
        return Batch(torch.from_numpy(dense), torch.from_numpy(cat.astype(np.int64)),
                     torch.from_numpy(label.astype(np.float32)))

    def _row_number(self, rows, k: int, first: int) -> int:
        return int(rows[k]) if not isinstance(rows, slice) else first + k

    def _check(self, dense, cat, label, rows, first) -> None:
        where = f"{self.source} {self.split.name}".strip()
        if not np.isfinite(dense).all():
            k, j = np.argwhere(~np.isfinite(dense))[0]
            raise DataError("dense value is not finite", path=where,
                            row=self._row_number(rows, k, first),
                            field=field_name(1 + j), value=float(dense[k, j]))
        bad = (cat < 0) | (cat >= self.cards)
        if bad.any():
            k, t = np.argwhere(bad)[0]
            raise DataError(f"id out of range for a table of {self.cards[t]} rows", path=where,
                            row=self._row_number(rows, k, first), field=field_name(1 + NUM_DENSE + t),
                            value=int(cat[k, t]))
        if label.size and label.max() > 1:
            k = int(np.argmax(label > 1))
            raise DataError("label is not 0 or 1", path=where,
                            row=self._row_number(rows, k, first), field="label", value=int(label[k]))
