"""DQRM's quantization-aware training of the tables, and the post-training baseline.

DQRM (PAPERS.md §2) trains DLRM with uniform *symmetric* fake quantization and a
straight-through estimator (STE): the forward pass sees q * s with

    s = max|w| / (2^(b-1) - 1)           one scale per table
    q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)

while SGD updates the FP32 master weights with the gradient taken at q * s, as if the
rounding were the identity (HAWQ's pass-through STE, no clipping mask). Its two
speed techniques are switchable here so that their effect can be measured:

  1. `looked_up_only` - fake-quantize only the rows the batch gathered (off: the whole
     table every step, the naive way). Both give the same forward for the same scale.
  2. `scale_period` N - recompute the table scales (a max over the whole table) only
     every N training steps (N = 1 is the naive baseline; the paper uses 200).

Scales are rounded to fp16-representable values (clamped to [2^-24, 65504]). This
changes a scale by at most 2^-11 relative and makes the export exact: s * (q + 2^(b-1))
+ (-2^(b-1) s) is then computed without rounding in float32, so the tables can be
written as the ecosystem's fused INT8/INT4/INT2 rows (mpc.embedding.quant; see
mpc.qat_export) and served with the same logits as the fake-quantized model.

Kind "qat" (options: bits 2|4|8|16, scale_period, looked_up_only) and kind "ptq"
(options: bits, granularity "row"|"table"): train in FP32, evaluate quantized - the
fused row-wise INT8/INT4/INT2 format (the FBGEMM/PyTorch PTQ path) or DQRM's
symmetric per-table grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from mpc.embedding import ops, register
from mpc.embedding.base import bag_table_ids
from mpc.embedding.config import EmbeddingConfig, Precision
from mpc.embedding.fp32 import FP32EmbeddingBag
from mpc.errors import UserError

QAT_BITS = (2, 4, 8, 16)
FP16_MIN_SUBNORMAL = 2.0 ** -24
FP16_MAX = 65504.0


def qmax(bits: int) -> int:
    """Largest code of the symmetric b-bit grid: codes are in [-qmax, qmax]."""
    return (1 << (bits - 1)) - 1


def symmetric_scale(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    """max|w| / qmax, rounded to an fp16 value (kept as float32) so exports are exact."""
    s = (max_abs.float() / qmax(bits)).clamp(FP16_MIN_SUBNORMAL, FP16_MAX)
    # Rounding can land a hair below the smallest subnormal only by underflow to 0.
    return s.half().float().clamp_min(FP16_MIN_SUBNORMAL)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float32) of w on the grid of `scale` (broadcast), clamped."""
    m = qmax(bits)
    return torch.round(w / scale).clamp_(-m, m)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """q * s: the values the quantized model computes with (no autograd)."""
    return quantize_codes(w, scale, bits) * scale


class FakeQuantizeSTE(torch.autograd.Function):
    """fake_quantize forward; backward passes the gradient through unchanged (STE)."""

    @staticmethod
    def forward(ctx, w, scale, bits):
        return fake_quantize(w, scale, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def table_max_abs(weights: torch.Tensor, table_offsets: torch.Tensor) -> torch.Tensor:
    """max|w| of every table of the flat storage, (T,) float32."""
    bounds = table_offsets.tolist()
    out = torch.empty(len(bounds) - 1, dtype=torch.float32, device=weights.device)
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        lo_v, hi_v = torch.aminmax(weights[lo:hi])  # no |w| copy of a large table
        out[t] = torch.maximum(-lo_v, hi_v)
    return out


def fake_quantize_table(weights: torch.Tensor, table_offsets: torch.Tensor, scales: torch.Tensor,
                        bits: int) -> torch.Tensor:
    """The whole flat storage fake-quantized, table by table (the naive way)."""
    out = torch.empty_like(weights)
    bounds = table_offsets.tolist()
    m = qmax(bits)
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        # fake_quantize, written in place: a fair naive baseline allocates one table copy, not four
        view = out[lo:hi]
        torch.div(weights[lo:hi], scales[t], out=view)
        view.round_().clamp_(-m, m).mul_(scales[t])
    return out


def pool_values(values: torch.Tensor, offsets: torch.Tensor, num_tables: int, implementation) -> torch.Tensor:
    """Sum-pool per-index FP32 values (N, D) over the jagged bags -> (B, T, D).

    Goes through the table-batched FP32 pool (as one table holding the N values) so the
    sums are added in the same order as every other backend, the export included.
    """
    n, dim = values.shape
    one_table = torch.tensor([0, n], dtype=torch.int64, device=values.device)
    ids = torch.arange(n, dtype=torch.int64, device=values.device)
    pooled = implementation.pool(Precision.FP32, values.contiguous(), one_table, ids, offsets, dim)
    B = (len(offsets) - 1) // num_tables
    return pooled.view(num_tables, B, dim).transpose(0, 1).contiguous()  # (B, T, D)


@dataclass(frozen=True)
class QATOptions:
    """EmbeddingConfig.options of kind "qat"."""

    bits: int = 4
    scale_period: int = 200       # training steps between scale recomputations (1 = naive)
    looked_up_only: bool = True   # fake-quantize gathered rows only (False = whole table)

    def __post_init__(self):
        if self.bits not in QAT_BITS:
            raise UserError(f"QAT bits must be one of {QAT_BITS}, got {self.bits}")
        if int(self.scale_period) < 1:
            raise UserError(f"scale period must be >= 1 step, got {self.scale_period}")

    @classmethod
    def from_config(cls, config: EmbeddingConfig) -> "QATOptions":
        known = {"bits", "scale_period", "looked_up_only"}
        unknown = set(config.options) - known
        if unknown:
            raise UserError(f"unknown qat option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config.options)


@register("qat")
class QATEmbeddingBag(FP32EmbeddingBag):
    """FP32 master tables trained through per-table symmetric fake quantization (DQRM).

    Buffers (all in the state_dict): `weights` (the FP32 masters), `scales` (T,) the
    current table scales, `step` the training lookups so far (drives the scale period),
    `scale_updates` how many times the scales were recomputed.
    """

    def __init__(self, config: EmbeddingConfig, weights: torch.Tensor | None = None):
        super().__init__(config, weights)
        self.options = QATOptions.from_config(config)
        self.bits = self.options.bits
        self.register_buffer("scales", symmetric_scale(table_max_abs(self.weights, self.table_offsets),
                                                       self.bits))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale_updates", torch.zeros((), dtype=torch.int64))

    def recompute_scales(self) -> None:
        self.scales.copy_(symmetric_scale(table_max_abs(self.weights, self.table_offsets), self.bits))
        self.scale_updates += 1

    def prepare(self, indices, offsets):
        # Training lookups only: the scale of step k is the one computed at the last
        # multiple of the period (step 0 included), as in DQRM.
        if int(self.step) % self.options.scale_period == 0:
            self.recompute_scales()
        self.step += 1

    def lookup(self, indices, offsets):
        o = self._ops()
        rows = ops.global_rows(indices, offsets, self.table_offsets)
        if self.training and not self.options.looked_up_only:
            values = fake_quantize_table(self.weights, self.table_offsets, self.scales, self.bits)[rows]
        else:
            tables = bag_table_ids(offsets, self.num_tables)
            values = fake_quantize(self.weights[rows], self.scales[tables][:, None], self.bits)
        return pool_values(values, offsets, self.num_tables, o)

    # backward_update: inherited. The STE makes d loss / d w = d loss / d (q s), so the
    # FP32 fused SGD on the master rows is exactly the QAT update.

    def memory_bytes(self):
        return {"weights": self.weights.nbytes, "scales": self.scales.nbytes}

    def quantized_codes(self) -> torch.Tensor:
        """Integer codes of every row (total_rows, D), int32, in [-qmax, qmax]."""
        per_row = self.scales.repeat_interleave(self.table_offsets[1:] - self.table_offsets[:-1])
        return quantize_codes(self.weights, per_row[:, None], self.bits).to(torch.int32)

    def to_float(self):
        """The tables the model computes with: q * s (not the masters, see `weights`)."""
        return fake_quantize_table(self.weights, self.table_offsets, self.scales, self.bits)

    def inference_tables(self) -> tuple[Precision, torch.Tensor]:
        """The fake-quantized tables q * s that evaluation reads (not the FP32 masters).

        2/4/8 bits: fused INT{bits} rows (mpc.qat_export.fused_rows) with per-row scale s
        and bias -2^(b-1) s, which dequantize (scale * value + bias, float32) to exactly
        q * s because s is fp16-exact (symmetric_scale). 16 bits: q * s in FP32 (no
        16-bit integer row format)."""
        if self.bits == 16:
            return Precision.FP32, self.to_float()
        from mpc.qat_export import fused_rows  # qat_export imports this module

        counts = self.table_offsets[1:] - self.table_offsets[:-1]
        rows = fused_rows(self.quantized_codes(), self.scales.repeat_interleave(counts), self.bits)
        return Precision(f"int{self.bits}"), rows

    def export_bytes(self) -> dict[str, int]:
        """Bytes of real b-bit storage: packed codes and one fp32 scale per table."""
        return {"values": self.config.total_rows * (-(-self.dim * self.bits // 8)),
                "scales": 4 * self.num_tables}

    def stats(self):
        return {"bits": self.bits, "scale_period": self.options.scale_period,
                "looked_up_only": self.options.looked_up_only, "steps": int(self.step),
                "scale_updates": int(self.scale_updates), "export_bytes": self.export_bytes()}


# --- post-training quantization --------------------------------------------------------

class PTQGranularity(str, Enum):
    ROW = "row"      # fused row-wise scale/bias (FBGEMM / torch quantized EmbeddingBag)
    TABLE = "table"  # DQRM's symmetric grid, one scale per table


_ROW_PRECISION = {8: Precision.INT8, 4: Precision.INT4, 2: Precision.INT2}


@dataclass(frozen=True)
class PTQOptions:
    """EmbeddingConfig.options of kind "ptq"."""

    bits: int = 4
    granularity: PTQGranularity = PTQGranularity.ROW

    def __post_init__(self):
        object.__setattr__(self, "granularity", PTQGranularity(self.granularity))
        allowed = tuple(_ROW_PRECISION) if self.granularity is PTQGranularity.ROW else QAT_BITS
        if self.bits not in allowed:
            raise UserError(f"PTQ with {self.granularity.value} granularity takes bits "
                            f"{allowed}, got {self.bits}")

    @classmethod
    def from_config(cls, config: EmbeddingConfig) -> "PTQOptions":
        known = {"bits", "granularity"}
        unknown = set(config.options) - known
        if unknown:
            raise UserError(f"unknown ptq option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**config.options)


@register("ptq")
class PTQEmbeddingBag(FP32EmbeddingBag):
    """Trains exactly as "fp32"; evaluation (eval mode) reads the tables quantized.

    The quantized copy is made once per evaluation (dropped at each train/eval switch,
    update and state load), so validation during training reports what post-training
    quantization of the weights at that point would give.
    """

    def __init__(self, config: EmbeddingConfig, weights: torch.Tensor | None = None):
        super().__init__(config, weights)
        self.options = PTQOptions.from_config(config)
        self._quantized = None

    @property
    def row_precision(self) -> Precision | None:
        return _ROW_PRECISION[self.options.bits] if self.options.granularity is PTQGranularity.ROW else None

    def train(self, mode: bool = True):
        self._quantized = None
        return super().train(mode)

    def backward_update(self, indices, offsets, grad_out):
        self._quantized = None
        super().backward_update(indices, offsets, grad_out)

    def _load_from_state_dict(self, *args, **kwargs):
        self._quantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def quantized(self) -> torch.Tensor:
        """Row-wise: the fused storage rows; per table: the fake-quantized FP32 tables."""
        if self._quantized is None:
            if self.row_precision is not None:
                from mpc.embedding.lowp import quantize_table

                self._quantized = quantize_table(self.weights, self.row_precision, self._ops())
            else:
                scales = symmetric_scale(table_max_abs(self.weights, self.table_offsets), self.options.bits)
                self._quantized = fake_quantize_table(self.weights, self.table_offsets, scales,
                                                      self.options.bits)
        return self._quantized

    def inference_tables(self) -> tuple[Precision, torch.Tensor]:
        """What evaluation reads: the fused rows (row granularity) or the per-table
        fake-quantized FP32 tables (table granularity), a copy of `quantized()`."""
        return self.row_precision or Precision.FP32, self.quantized().clone()

    def lookup(self, indices, offsets):
        if self.training:
            return super().lookup(indices, offsets)
        precision = self.row_precision or Precision.FP32
        return self._ops().pool(precision, self.quantized(), self.table_offsets, indices, offsets, self.dim)

    def deployed_bytes(self) -> dict[str, int]:
        if self.row_precision is not None:
            from mpc.embedding import quant

            return quant.values_bytes(self.row_precision, self.config.total_rows, self.dim)
        return {"values": self.config.total_rows * (-(-self.dim * self.options.bits // 8)),
                "scales": 4 * self.num_tables}

    def stats(self):
        return {"bits": self.options.bits, "granularity": self.options.granularity.value,
                "deployed_bytes": self.deployed_bytes()}
