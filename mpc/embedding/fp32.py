"""FP32 embedding tables: the baseline, trained with a fused sparse SGD update.

All T tables live in one flat (total_rows, D) tensor; a lookup is one pooled gather
over it and an update touches only the rows the batch looked up, each once, with the
sum of its gradients (the same result as PyTorch's sparse SGD after coalescing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpc.embedding import register
from mpc.embedding.base import EmbeddingBackend, bag_table_ids
from mpc.embedding.config import EmbeddingConfig


def reference_init(cardinalities, dim: int, seed: int) -> torch.Tensor:
    """DLRM reference initialisation: table of n rows ~ U(-sqrt(1/n), sqrt(1/n))."""
    g = torch.Generator().manual_seed(seed)
    total = sum(cardinalities)
    w = torch.empty(total, dim, dtype=torch.float32)
    start = 0
    for n in cardinalities:
        bound = math.sqrt(1.0 / n)
        w[start:start + n].uniform_(-bound, bound, generator=g)
        start += n
    return w


def global_rows(indices: torch.Tensor, offsets: torch.Tensor, table_offsets: torch.Tensor) -> torch.Tensor:
    """Table-local ids -> rows of the flat tensor."""
    T = len(table_offsets) - 1
    return indices + table_offsets[:-1][bag_table_ids(offsets, T)]


def reference_pool(weights: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                   num_tables: int) -> torch.Tensor:
    """Sum-pool rows of an FP32 (N, D) tensor per bag -> (B, T, D)."""
    TB = len(offsets) - 1
    B = TB // num_tables
    pooled = F.embedding_bag(rows, weights, offsets, mode="sum", include_last_offset=True)
    return pooled.view(num_tables, B, -1).transpose(0, 1).contiguous()


def reference_row_grads(grad_out: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                        num_tables: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each distinct looked-up row: (unique rows, summed grads (U, D))."""
    B, T, D = grad_out.shape
    bag_grads = grad_out.transpose(0, 1).reshape(T * B, D)
    lengths = offsets[1:] - offsets[:-1]
    per_index = bag_grads.repeat_interleave(lengths, dim=0)
    uniq, inverse = torch.unique(rows, return_inverse=True)
    summed = torch.zeros(len(uniq), D, dtype=grad_out.dtype).index_add_(0, inverse, per_index)
    return uniq, summed


@register("fp32")
class FP32EmbeddingBag(EmbeddingBackend):
    """T FP32 tables in one (total_rows, D) tensor, pooled by sum."""

    def __init__(self, config: EmbeddingConfig, weights: torch.Tensor | None = None):
        super().__init__(config)
        if weights is None:
            weights = reference_init(config.cardinalities, config.dim, config.seed)
        if weights.shape != (config.total_rows, config.dim):
            raise ValueError(f"weights {tuple(weights.shape)} != ({config.total_rows}, {config.dim})")
        self.register_buffer("weights", weights.contiguous())

    def _ops(self):
        from mpc.embedding import ops

        return ops.for_config(self.config)

    def lookup(self, indices, offsets):
        return self._ops().pool_fp32(self.weights, self.table_offsets, indices, offsets)

    def backward_update(self, indices, offsets, grad_out):
        self._ops().sgd_fp32(self.weights, self.table_offsets, indices, offsets, grad_out,
                             self.learning_rate)

    def memory_bytes(self):
        return {"weights": self.weights.nbytes}

    def to_float(self):
        return self.weights

    @classmethod
    def from_float(cls, weights: torch.Tensor, config: EmbeddingConfig) -> "FP32EmbeddingBag":
        return cls(config.replace(kind="fp32"), weights.float().clone())
