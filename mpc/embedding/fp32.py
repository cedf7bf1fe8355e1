"""FP32 embedding tables: the baseline, trained with a fused sparse SGD update.

All T tables live in one flat (total_rows, D) tensor; a lookup is one pooled gather
over it and an update touches only the rows the batch looked up, each once, with the
sum of its gradients (the same result as PyTorch's sparse SGD after coalescing). Both
go through the table-batched ops of mpc.embedding.ops with precision FP32.
"""

from __future__ import annotations

import math

import torch

from mpc.embedding import ops, quant, register
from mpc.embedding.base import EmbeddingBackend
from mpc.embedding.config import EmbeddingConfig, Precision
from mpc.embedding.ops import global_rows  # noqa: F401  (re-exported: table ids -> flat rows)


def reference_init(cardinalities, dim: int, seed: int) -> torch.Tensor:
    """DLRM reference initialisation: table of n rows ~ U(-sqrt(1/n), sqrt(1/n))."""
    g = torch.Generator().manual_seed(seed)
    total = sum(cardinalities)
    w = quant.empty_storage(Precision.FP32, total, dim)  # huge pages where available
    start = 0
    for n in cardinalities:
        bound = math.sqrt(1.0 / n)
        w[start:start + n].uniform_(-bound, bound, generator=g)
        start += n
    return w


@register("fp32")
class FP32EmbeddingBag(EmbeddingBackend):
    """T FP32 tables in one (total_rows, D) tensor, pooled by sum."""

    def __init__(self, config: EmbeddingConfig, weights: torch.Tensor | None = None):
        super().__init__(config)
        if config.cache.fraction > 0:
            raise ValueError(f"{config.kind} tables have no FP32 cache (cache fraction {config.cache.fraction}); "
                             "a cache needs a low-precision kind (fp16, int8, int4, int2)")
        if weights is None:
            weights = reference_init(config.cardinalities, config.dim, config.seed)
        if weights.shape != (config.total_rows, config.dim):
            raise ValueError(f"weights {tuple(weights.shape)} != ({config.total_rows}, {config.dim})")
        self.register_buffer("weights", weights.contiguous())

    def _ops(self):
        return ops.for_config(self.config)

    def lookup(self, indices, offsets):
        return self._ops().pool(Precision.FP32, self.weights, self.table_offsets, indices, offsets,
                                self.dim)

    def backward_update(self, indices, offsets, grad_out):
        # FP32 rows need no rounding: the rounding stream arguments are unused.
        self._ops().sgd_update(Precision.FP32, self.weights, self.table_offsets, indices, offsets,
                               grad_out, self.learning_rate, self.dim, self.config.rounding,
                               self.config.seed, 0)

    def memory_bytes(self):
        return {"weights": self.weights.nbytes}

    def to_float(self):
        return self.weights

    @classmethod
    def from_float(cls, weights: torch.Tensor, config: EmbeddingConfig) -> "FP32EmbeddingBag":
        return cls(config.replace(kind="fp32"), weights.float().clone())
