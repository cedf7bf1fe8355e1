"""An inference-only DLRM made of plain ops, built from a trained model (PAPERS.md §3).

The training model (mpc.model.DLRM) pools jagged bags through an embedding backend and
picks the interaction's pairs with advanced indexing; exporters handle neither well.
For serving Criteo-style inputs (one id per table per sample) the same function is::

    logit = top( [ x | gather(flatten(Z Z^T), pair_index) ] ),   x = bottom(dense)
    Z = [x; e_1; ...; e_T],   e_t = dequant(table_t[cat[:, t]])

with the pair index fixed at build time (row-major positions of the strictly lower
triangle, the order of torch.tril_indices) and the tables read by one of three lookups:

    GATHER       index_select on flat tables; INT8/INT4/INT2/FP16 rows are dequantized
                 by arithmetic on uint8 tensors (floor/multiply/add), so every runtime
                 (TorchScript, torch.export, inductor, ONNX Runtime, OpenVINO) takes it.
    TORCH_OPS    PyTorch's own ops on the same bytes: F.embedding_bag for FP32 and
                 torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_rowwise_offsets for
                 the fused row formats (one call over all tables, global row ids).
    MPC_KERNELS  mpc's compiled table-batched pool (mpc.embedding.ops); eager only.

Quantized MLP layers (DQRM) become plain Linear layers holding their dequantized
weights q * s: the runtimes compute the MLPs in FP32 either way. Integer tables keep
exactly the trained bytes: INT8 rows split into uint8 values and
their fp32 scale/bias, INT4/INT2 rows into packed bytes and their fp16 scale/bias held as
fp32 (exact). The tables are those evaluation reads (`EmbeddingBackend.inference_tables`):
a QAT model's fake-quantized q * s as fused INT{bits} rows (exact, its scales are
fp16-exact), a PTQ model's quantized tables, a cached model's rows with the cache written
back as a flush would (on a copy: the trained model is not changed). An FP32 model asked
for INT8/INT4 is quantized post-training (nearest, the fused format of mpc.embedding.quant).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from mpc.embedding import jagged_from_dense, quant
from mpc.embedding.base import EmbeddingBackend
from mpc.embedding.config import Precision, Rounding
from mpc.errors import UserError

log = logging.getLogger(__name__)


class LookupKind(str, Enum):
    GATHER = "gather"
    TORCH_OPS = "torch_ops"
    MPC_KERNELS = "mpc_kernels"


@dataclass
class TableStorage:
    """All T tables in one flat tensor, in the fused row format of `precision`."""

    precision: Precision
    storage: torch.Tensor          # (rows, D) float for FP32/FP16, (rows, row_bytes) uint8 else
    table_offsets: torch.Tensor    # (T+1,) int64: first row of each table
    dim: int

    @property
    def num_tables(self) -> int:
        return len(self.table_offsets) - 1

    @property
    def total_rows(self) -> int:
        return int(self.table_offsets[-1])

    def nbytes(self) -> int:
        return self.storage.nbytes


def _find_storage(backend: EmbeddingBackend, precision: Precision) -> torch.Tensor | None:
    """The backend's flat storage buffer in `precision`'s format, found by shape and dtype."""
    cfg = backend.config
    shape = quant.storage_shape(precision, cfg.total_rows, cfg.dim)
    dtype = quant.STORAGE_DTYPE[precision]
    for name in ("storage", "weights"):
        t = getattr(backend, name, None)
        if isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == shape:
            return t
    for _, t in backend.named_buffers(recurse=False):
        if t.dtype == dtype and tuple(t.shape) == shape:
            return t
    return None


def table_storage(backend: EmbeddingBackend, precision: Precision | str | None = None) -> TableStorage:
    """The tables a trained backend evaluates with, in `precision` (default: the format
    the backend evaluates in). The backend is left unchanged (no flush).

    A backend that says what evaluation reads (`inference_tables()`: QAT's and PTQ's
    quantized tables, a cache's rows as a flush would write them back) gives exactly
    those; any other gives its stored buffer when it stores `precision`. Otherwise the
    FP32 view of those tables (dequantized, or `to_float()`) is quantized with
    round-to-nearest: post-training quantization.
    """
    inner = getattr(backend, "inner", None)
    if isinstance(inner, EmbeddingBackend):     # a wrapper (mpc.distributed): its backend's tables
        return table_storage(inner, precision)
    asked = None if precision is None else Precision(precision)
    exact = backend.inference_tables()
    if exact is not None:
        own, tables = exact
        precision = own if asked is None else asked
        if precision is own:
            storage = tables.detach()
        else:
            weights = quant.dequantize_rows(tables, own, backend.dim) if own.is_integer else tables.float()
            storage = _post_training(weights.detach(), own, precision)
    else:
        own = backend.config.precision
        precision = own if asked is None else asked
        stored = _find_storage(backend, precision) if precision is own else None
        if stored is not None:
            storage = stored.detach().clone()
        else:
            storage = _post_training(backend.to_float().detach(), own, precision)
    return TableStorage(precision, storage.contiguous(), backend.table_offsets.clone(), backend.dim)


def _post_training(weights: torch.Tensor, own: Precision, precision: Precision) -> torch.Tensor:
    if precision is not own and precision is not Precision.FP32:
        log.info("quantizing %s tables to %s for inference (post-training, nearest)",
                 own.value, precision.value)
    return quant.quantize_rows(weights, precision, Rounding.NEAREST)


# --- lookups: cat (B, T) int64 ids local to their table -> (B, T, D) float32 ----------

class GatherLookup(nn.Module):
    """index_select on the flat table, dequantized by arithmetic (every runtime takes it)."""

    def __init__(self, tables: TableStorage):
        super().__init__()
        self.precision, self.dim = tables.precision, tables.dim
        self.register_buffer("starts", tables.table_offsets[:-1].clone())
        if tables.precision.is_integer:
            values, scale, bias = quant.split_rows(tables.storage, tables.precision, tables.dim)
            self.register_buffer("values", values.contiguous())       # (N, packed bytes) uint8
            self.register_buffer("scale", scale[:, None].contiguous())  # (N, 1) fp32
            self.register_buffer("bias", bias[:, None].contiguous())
        else:
            self.register_buffer("values", tables.storage)             # (N, D) fp32 / fp16
        bits = tables.precision.bits
        if tables.precision in (Precision.INT4, Precision.INT2):
            # Code k of a byte p is floor(p / 2^(bits k)) mod 2^bits; in float32 every
            # step is exact for p < 256, and Floor/Div/Mul/Sub exist in every runtime
            # (uint8 bit shifts do not).
            per_byte = 8 // bits
            self.register_buffer("divisors", torch.tensor([2.0 ** (bits * k) for k in range(per_byte)]))
            self.levels = float(1 << bits)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        B, T = cat.shape[0], cat.shape[1]
        rows = (cat + self.starts).reshape(-1)                       # (B*T,)
        picked = self.values.index_select(0, rows)
        if not self.precision.is_integer:
            return picked.float().reshape(B, T, self.dim)
        if self.precision is Precision.INT8:
            q = picked.float()                                       # (B*T, D)
        else:
            p = picked.float().unsqueeze(2)                          # (B*T, nbytes, 1)
            shifted = torch.floor(p / self.divisors)                 # (B*T, nbytes, per_byte)
            q = shifted - self.levels * torch.floor(shifted / self.levels)
            q = q.reshape(q.shape[0], -1)[:, :self.dim]              # lowest bits first
        out = q * self.scale.index_select(0, rows) + self.bias.index_select(0, rows)
        return out.reshape(B, T, self.dim)


_TORCH_QUANTIZED_POOL = {
    Precision.INT8: "embedding_bag_byte_rowwise_offsets",
    Precision.INT4: "embedding_bag_4bit_rowwise_offsets",
    Precision.INT2: "embedding_bag_2bit_rowwise_offsets",
}


class TorchOpsLookup(nn.Module):
    """PyTorch's own embedding-bag ops, one call over all tables (global row ids)."""

    def __init__(self, tables: TableStorage):
        super().__init__()
        if tables.precision is Precision.FP16:
            raise UserError("PyTorch has no FP16 embedding-bag op for inference; use the gather lookup")
        self.precision, self.dim = tables.precision, tables.dim
        self.register_buffer("starts", tables.table_offsets[:-1].clone())
        self.register_buffer("storage", tables.storage)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        B, T = cat.shape[0], cat.shape[1]
        rows = (cat + self.starts).reshape(-1)                       # sample-major bags
        offsets = torch.arange(rows.shape[0] + 1, dtype=torch.int64)
        if self.precision is Precision.FP32:
            pooled = F.embedding_bag(rows, self.storage, offsets, mode="sum", include_last_offset=True)
        elif self.precision is Precision.INT8:
            pooled = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.storage, rows, offsets, mode=0, pruned_weights=False, include_last_offset=True)
        elif self.precision is Precision.INT4:
            pooled = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
                self.storage, rows, offsets, mode=0, pruned_weights=False, include_last_offset=True)
        else:
            pooled = torch.ops.quantized.embedding_bag_2bit_rowwise_offsets(
                self.storage, rows, offsets, mode=0, pruned_weights=False, include_last_offset=True)
        return pooled.reshape(B, T, self.dim)


class MpcKernelLookup(nn.Module):
    """mpc's table-batched pool (compiled kernel, or its reference twin); eager only."""

    def __init__(self, tables: TableStorage, use_kernels: bool = True):
        super().__init__()
        from mpc.embedding import ops

        self.precision, self.dim = tables.precision, tables.dim
        self.register_buffer("table_offsets", tables.table_offsets.clone())
        self.register_buffer("storage", tables.storage)
        self.ops = ops.for_config(_UseKernels(use_kernels))

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        indices, offsets = jagged_from_dense(cat)
        return self.ops.pool(self.precision, self.storage, self.table_offsets, indices, offsets, self.dim)


@dataclass(frozen=True)
class _UseKernels:
    use_kernels: bool


LOOKUPS = {LookupKind.GATHER: GatherLookup, LookupKind.TORCH_OPS: TorchOpsLookup,
           LookupKind.MPC_KERNELS: MpcKernelLookup}


def plain_mlp(mlp: nn.Module) -> nn.Module:
    """A copy of `mlp` whose quantized Linear layers (DQRM's QuantLinear, anything with
    `quantized_weight()`) are plain nn.Linear holding the weights they compute with
    (q * s): the same function in eval mode, without re-quantizing at every call."""
    out = copy.deepcopy(mlp)
    for name, child in list(out.named_children()):
        if isinstance(child, nn.Linear) and hasattr(child, "quantized_weight"):
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(child.quantized_weight())
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            setattr(out, name, plain)
        elif not isinstance(child, nn.Linear):
            setattr(out, name, plain_mlp(child))
    return out


def pair_index(num_vectors: int) -> torch.Tensor:
    """Positions in the flattened (n x n) Z Z^T of the strictly lower triangle, in the
    order of torch.tril_indices (the training model's order)."""
    li, lj = torch.tril_indices(num_vectors, num_vectors, offset=-1)
    return li * num_vectors + lj


class InferenceDLRM(nn.Module):
    """DLRM for serving: forward(dense (B, 13) float32, cat (B, T) int64) -> logits (B,)."""

    def __init__(self, bottom: nn.Module, top: nn.Module, lookup: nn.Module, num_tables: int):
        super().__init__()
        self.bottom, self.top, self.lookup = bottom, top, lookup
        self.register_buffer("pairs", pair_index(num_tables + 1))

    @classmethod
    def from_model(cls, model, precision: Precision | str | None = None,
                   lookup: LookupKind | str = LookupKind.GATHER) -> "InferenceDLRM":
        """Inference twin of a trained mpc.model.DLRM in eval mode (which is left
        unchanged). precision defaults to the format the embedding evaluates in
        (table_storage: QAT's INT{bits} rows, PTQ's quantized rows, a cache's rows as
        written back)."""
        lookup = LookupKind(lookup)
        tables = table_storage(model.embedding, precision)
        kw = {"use_kernels": model.embedding.config.use_kernels} if lookup is LookupKind.MPC_KERNELS else {}
        built = cls(plain_mlp(model.bottom), plain_mlp(model.top),
                    LOOKUPS[lookup](tables, **kw), tables.num_tables)
        built.requires_grad_(False)
        return built.eval()

    @property
    def precision(self) -> Precision:
        return self.lookup.precision

    @property
    def lookup_kind(self) -> LookupKind:
        return next(k for k, cls in LOOKUPS.items() if type(self.lookup) is cls)

    def forward(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)                                       # (B, D)
        emb = self.lookup(cat)                                       # (B, T, D)
        z = torch.cat([x.unsqueeze(1), emb], dim=1)                  # (B, T+1, D)
        zz = torch.bmm(z, z.transpose(1, 2))                         # (B, T+1, T+1)
        flat = zz.reshape(zz.shape[0], -1).index_select(1, self.pairs)
        return self.top(torch.cat([x, flat], dim=1)).squeeze(1)      # (B,)
