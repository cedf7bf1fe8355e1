"""FLOPs and bytes of one DLRM inference, counted analytically (PAPERS.md §3).

"Does Form Follow Function?" relates latency to FLOPs and to last-level-cache efficacy
as depth and width grow; this module gives the x axes of those plots for DLRM. Counts
are per batch of B samples with one id per table per sample (Criteo), for what the
inference module (mpc.inference.module) computes:

    FLOPs   Linear n -> m: 2nm per sample (multiply-adds) + m (bias); ReLU not counted.
            Interaction: the full (T+1) x (T+1) Gram matrix, 2 (T+1)^2 D per sample (the
            strict lower triangle kept is under half of it).
            Dequantization of INT rows: 2 per element (scale * q + bias); unpacking
            nibbles and FP16 -> FP32 casts are not floating-point arithmetic: not counted.
    bytes   each operand once: MLP parameters once per batch (shared by the samples),
            B*T stored rows in the table's row format (values + scale/bias; repeated ids
            counted each time), inputs (dense float32, int64 ids), the logits, and
            every activation written once in float32 (MLP outputs, Z, Z Z^T, the
            interaction vector).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mpc.criteo import NUM_DENSE
from mpc.embedding.config import Precision

FLOAT_BYTES = 4
INDEX_BYTES = 8


def _linear_flops(sizes: tuple[int, ...]) -> int:
    """Per sample FLOPs of an MLP with these layer sizes (2nm + m per layer)."""
    return sum(2 * n * m + m for n, m in zip(sizes[:-1], sizes[1:]))


def _linear_params(sizes: tuple[int, ...]) -> int:
    return sum(n * m + m for n, m in zip(sizes[:-1], sizes[1:]))


@dataclass(frozen=True)
class InferenceCost:
    """Counts for one batch; per-sample figures divide by `batch`."""

    batch: int
    bottom_flops: int
    interaction_flops: int
    top_flops: int
    dequant_flops: int
    mlp_param_bytes: int
    embedding_row_bytes: int
    input_bytes: int
    output_bytes: int
    activation_bytes: int
    table_bytes: int        # all stored tables (what has to fit in the cache), not per batch

    @property
    def flops(self) -> int:
        return self.bottom_flops + self.interaction_flops + self.top_flops + self.dequant_flops

    @property
    def bytes(self) -> int:
        return (self.mlp_param_bytes + self.embedding_row_bytes + self.input_bytes
                + self.output_bytes + self.activation_bytes)

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / self.bytes

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(flops=self.flops, bytes=self.bytes, flops_per_sample=self.flops / self.batch,
                 bytes_per_sample=self.bytes / self.batch,
                 arithmetic_intensity=self.arithmetic_intensity)
        return d


def inference_cost(bottom_mlp: tuple[int, ...], top_mlp: tuple[int, ...],
                   cardinalities: tuple[int, ...], dim: int, precision: Precision | str,
                   batch: int) -> InferenceCost:
    """Counts for DLRM(bottom_mlp, top_mlp) over tables of `cardinalities` x `dim`
    stored in `precision`, for a batch of `batch` samples (see the module docstring)."""
    precision = Precision(precision)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    T, D, B = len(cardinalities), dim, batch
    n = T + 1
    row_bytes = precision.row_bytes(D)
    activations = (sum(bottom_mlp[1:]) + sum(top_mlp[1:])   # MLP outputs
                   + n * D + n * n + top_mlp[0])            # Z, Z Z^T, interaction vector
    return InferenceCost(
        batch=B,
        bottom_flops=B * _linear_flops(bottom_mlp),
        interaction_flops=B * 2 * n * n * D,
        top_flops=B * _linear_flops(top_mlp),
        dequant_flops=B * T * D * 2 if precision.is_integer else 0,
        mlp_param_bytes=FLOAT_BYTES * (_linear_params(bottom_mlp) + _linear_params(top_mlp)),
        embedding_row_bytes=B * T * row_bytes,
        input_bytes=B * (NUM_DENSE * FLOAT_BYTES + T * INDEX_BYTES),
        output_bytes=B * FLOAT_BYTES,
        activation_bytes=B * FLOAT_BYTES * activations,
        table_bytes=sum(cardinalities) * row_bytes,
    )


def config_cost(config, precision: Precision | str, batch: int) -> InferenceCost:
    """inference_cost for an mpc.model.DLRMConfig."""
    return inference_cost(config.bottom_mlp, config.top_mlp, config.embedding.cardinalities,
                          config.embedding.dim, precision, batch)
