"""Uncached low-precision embedding tables: FP16, INT8, INT4, INT2 rows, trained in place.

MPC without its cache (PAPERS.md §1 with cache fraction 0, and the row formats of §5):
every row lives only in low precision. A lookup dequantizes and sum-pools the rows of
all tables in one table-batched call; the fused backward dequantizes each looked-up
row, applies its SGD step in FP32, recomputes the row's scale/bias and re-quantizes it
with the configured rounding (stochastic by default; the stream is keyed by
(config.seed, step, global row), so a resumed run rounds exactly as an unbroken one).

Kinds "fp16", "int8", "int4", "int2" build this backend; with config.cache.fraction > 0
they build mpc.embedding.cache.CachedQuantizedEmbeddingBag instead (the FP32 cache).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from mpc.embedding import ops, quant, register, rng
from mpc.embedding.base import EmbeddingBackend
from mpc.embedding.config import EmbeddingConfig, Precision, Rounding
from mpc.embedding.fp32 import reference_init
from mpc.errors import UserError

log = logging.getLogger(__name__)

LOW_PRECISIONS = (Precision.FP16, Precision.INT8, Precision.INT4, Precision.INT2)
CHUNK_ROWS = 1 << 20   # rows converted per call when quantizing/dequantizing whole tables


def _chunks(total: int, what: str):
    """Row ranges of CHUNK_ROWS, with a progress bar when there are many."""
    starts = range(0, total, CHUNK_ROWS)
    return tqdm(starts, desc=what, unit="Mrows", disable=len(starts) < 8, leave=False)


class QuantizedEmbeddingBag(EmbeddingBackend):
    """T tables of one low precision in one flat storage tensor.

    Buffers (all in the state_dict): `weights`, the storage rows (uint8 (rows, row
    bytes) for INT8/INT4/INT2, float16 (rows, D) for FP16, see mpc.embedding.quant);
    `step`, the number of updates applied so far (keys the rounding stream).
    """

    def __init__(self, config: EmbeddingConfig, storage: torch.Tensor | None = None):
        super().__init__(config)
        self.precision = config.precision
        if self.precision not in LOW_PRECISIONS:
            raise UserError(f"QuantizedEmbeddingBag stores fp16/int8/int4/int2 rows, not kind {config.kind!r}")
        if storage is None:
            weights = reference_init(config.cardinalities, config.dim, config.seed)
            storage = quantize_table(weights, self.precision, ops.for_config(config))
            del weights
        expect = quant.storage_shape(self.precision, config.total_rows, config.dim)
        if tuple(storage.shape) != expect or storage.dtype != quant.STORAGE_DTYPE[self.precision]:
            raise UserError(f"{self.precision.value} storage must be {quant.STORAGE_DTYPE[self.precision]} "
                            f"{expect}, got {storage.dtype} {tuple(storage.shape)}")
        self.register_buffer("weights", storage.contiguous())
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def _ops(self):
        return ops.for_config(self.config)

    # --- the EmbeddingBackend interface -----------------------------------------------
    def lookup(self, indices, offsets):
        return self._ops().pool(self.precision, self.weights, self.table_offsets, indices, offsets,
                                self.dim)

    def backward_update(self, indices, offsets, grad_out):
        self._ops().sgd_update(self.precision, self.weights, self.table_offsets, indices, offsets,
                               grad_out, self.learning_rate, self.dim, self.config.rounding,
                               self.config.seed, int(self.step))
        self.step += 1

    def memory_bytes(self) -> dict[str, int]:
        """{"values": packed values, "scale_bias": per-row scale and bias, "step_counter"} in bytes."""
        return {**quant.values_bytes(self.precision, len(self.weights), self.dim), "step_counter": self.step.nbytes}

    def to_float(self) -> torch.Tensor:
        out = torch.empty(len(self.weights), self.dim, dtype=torch.float32, device=self.weights.device)
        o = self._ops()
        for lo in _chunks(len(self.weights), "dequantize"):
            hi = lo + CHUNK_ROWS
            out[lo:hi] = o.dequantize_rows(self.precision, self.weights[lo:hi], self.dim)
        return out

    # --- conversion ---------------------------------------------------------------------
    @classmethod
    def from_float(cls, weights: torch.Tensor, config: EmbeddingConfig) -> "QuantizedEmbeddingBag":
        """Quantize FP32 tables (total_rows, D) with round-to-nearest into config's precision."""
        if tuple(weights.shape) != (config.total_rows, config.dim):
            raise UserError(f"weights {tuple(weights.shape)} != ({config.total_rows}, {config.dim})")
        return cls(config, quantize_table(weights.float(), config.precision, ops.for_config(config)))

    def export_torch_quantized(self) -> list[torch.Tensor]:
        """Per-table uint8 tensors in PyTorch's quantized EmbeddingBag row format (INT8 ->
        embedding_bag_byte_rowwise_offsets, INT4/INT2 -> the 4bit/2bit ops)."""
        return quant.export_torch_quantized(self.weights, self.precision, self.table_offsets)

    @classmethod
    def import_torch_quantized(cls, tables: list[torch.Tensor], config: EmbeddingConfig) -> "QuantizedEmbeddingBag":
        """A backend over tables exported by export_torch_quantized or torch's prepack ops."""
        sizes = tuple(len(t) for t in tables)
        if sizes != config.cardinalities:
            raise UserError(f"table sizes {sizes} differ from config.cardinalities {config.cardinalities}")
        return cls(config, quant.import_torch_quantized(tables, config.precision, config.dim))


def quantize_table(weights: torch.Tensor, precision: Precision, implementation) -> torch.Tensor:
    """FP32 rows -> storage rows by round-to-nearest, in chunks of CHUNK_ROWS rows."""
    out = quant.empty_storage(precision, len(weights), weights.shape[1], weights.device)
    for lo in _chunks(len(weights), f"quantize {precision.value}"):
        hi = lo + CHUNK_ROWS
        rows = torch.arange(lo, min(hi, len(weights)), device=weights.device)
        out[lo:hi] = implementation.quantize_rows(precision, weights[lo:hi].contiguous(),
                                                  Rounding.NEAREST, 0, 0, rows, rng.PURPOSE_UPDATE)
    return out


def build_low_precision(config: EmbeddingConfig) -> EmbeddingBackend:
    """The factory behind kinds fp16/int8/int4/int2: uncached, or cached when asked."""
    if config.cache.fraction > 0:
        try:
            from mpc.embedding.cache import CachedQuantizedEmbeddingBag
        except ImportError as e:
            raise UserError(f"cache fraction {config.cache.fraction} needs the cached backend "
                            f"(mpc.embedding.cache.CachedQuantizedEmbeddingBag), which is not "
                            f"available: {e}") from e
        return CachedQuantizedEmbeddingBag(config)
    return QuantizedEmbeddingBag(config)


for _p in LOW_PRECISIONS:
    register(_p.value)(build_low_precision)
