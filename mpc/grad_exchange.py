"""The gradient exchange of DQRM's data-parallel training, with an exact byte count.

DQRM (PAPERS.md §2) cuts the per-iteration communication of data-parallel DLRM in two
steps: exchange only the embedding rows the batch looked up (2.161 GB -> 2.010 MB per
iteration on Kaggle), then quantize the gradients to INT8 with a scale shared through an
all-reduce (-> 0.509 MB), with error compensation on the MLP gradients only. The three
modes, on torch.distributed collectives (CPU tensors, so gloo: see
mpc.distributed.select_backend):

  none         embedding: all_reduce of the full (total_rows, D) float32 gradient as a
               dense tensor; MLP: all_reduce of the flat float32 gradient.
  sparse       embedding: all_gather of each rank's distinct looked-up rows (int32 ids
               + float32 row gradients, padded to the largest rank's row count, after an
               all_gather of the counts); MLP: as `none`.
  sparse-int8  embedding: as `sparse` with int8 values; one scale per table, the
               all-reduced (MAX) largest |gradient| / 127; stochastic rounding (no
               error feedback on the tables, as in the paper). MLP: int8 values, one
               scale per parameter tensor (all-reduced MAX), round to nearest, and the
               rounding error kept and added to the next step's gradient (error
               feedback). int8 values are all_gathered and summed in int32 (an int8
               all_reduce would overflow).

Bytes are counted as the payload each rank hands to each collective (its own tensor),
by category; what the transport relays on top (e.g. ring all-reduce sends about
2 (W-1)/W times the payload) depends on the algorithm and is not counted.
`analytic_bytes` gives the same count from sizes alone (for the full Kaggle model).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist

from mpc.embedding import rng

INT8_MAX = 127
PURPOSE_GRADIENT = 2   # rounding stream of gradient quantization (mpc.embedding.rng)
CATEGORIES = ("embedding_values", "embedding_ids", "embedding_counts", "embedding_scales",
              "mlp_values", "mlp_scales", "loss")


class GradCompression(str, Enum):
    NONE = "none"
    SPARSE = "sparse"
    SPARSE_INT8 = "sparse-int8"


@dataclass(frozen=True)
class DistributedConfig:
    """How ranks exchange gradients. Global batch = TrainConfig.batch_size (split over ranks)."""

    compression: GradCompression = GradCompression.SPARSE
    error_feedback: bool = True    # sparse-int8 only, and on the MLP gradients only

    def __post_init__(self):
        object.__setattr__(self, "compression", GradCompression(self.compression))

    def to_json(self) -> dict:
        return {"compression": self.compression.value, "error_feedback": self.error_feedback}


def row_tables(rows: torch.Tensor, table_offsets: torch.Tensor) -> torch.Tensor:
    """The table of each global row."""
    return torch.searchsorted(table_offsets, rows, right=True) - 1


class GradientExchange:
    """One rank's side of the exchange; counts the bytes it sends (see module docstring)."""

    def __init__(self, config: DistributedConfig, table_offsets: torch.Tensor, dim: int, seed: int = 0,
                 group=None):
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.table_offsets = table_offsets
        self.dim = dim
        self.seed = seed
        self.step = 0                      # set by the trainer: keys the rounding stream
        self.sent: Counter = Counter()
        self.residuals: list[torch.Tensor] | None = None   # MLP error feedback

    # --- counted collectives ------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, category: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        self.sent[category] += t.nbytes
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _all_gather(self, t: torch.Tensor, category: str) -> list[torch.Tensor]:
        self.sent[category] += t.nbytes
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return out

    def all_reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(loss_sum.detach().float().reshape(1).clone(), "loss")[0]

    # --- embedding rows -----------------------------------------------------------------
    def embedding_rows(self, rows: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (distinct rows, summed gradients) -> the sum over all ranks.

        Returns rows sorted ascending and their float32 gradients; every rank gets the same.
        """
        mode = self.config.compression
        if mode is GradCompression.NONE:
            total = int(self.table_offsets[-1])
            dense = torch.zeros(total, self.dim, dtype=torch.float32)
            dense[rows] = grads
            self._all_reduce(dense, "embedding_values")
            # Rows no rank looked up have exact zeros; so may a looked-up row, which an
            # FP32 update would leave unchanged anyway.
            keep = dense.ne(0).any(1).nonzero().squeeze(1)
            return keep, dense[keep]
        if bool((rows > torch.iinfo(torch.int32).max).any()):
            raise ValueError("row ids above 2^31 - 1 do not fit the int32 id exchange")
        if mode is GradCompression.SPARSE:
            ids, values = self._gather_rows(rows, grads)
            return _coalesce(ids, values.float())
        scale = self._table_scales(rows, grads)
        tables = row_tables(rows, self.table_offsets)
        u = rng.uniform(self.seed + 7919 * (self.rank + 1), self.step, rows, self.dim, PURPOSE_GRADIENT)
        q = torch.floor(grads / scale[tables][:, None] + u).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        ids, codes = self._gather_rows(rows, q)
        ids, summed = _coalesce(ids, codes.to(torch.int32))
        return ids, summed.float() * scale[row_tables(ids, self.table_offsets)][:, None]

    def _gather_rows(self, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self._all_gather(torch.tensor([len(rows)], dtype=torch.int32), "embedding_counts")
        counts = [int(c) for c in counts]
        width = max(counts)
        ids = torch.zeros(width, dtype=torch.int32)
        ids[:len(rows)] = rows
        padded = torch.zeros(width, self.dim, dtype=values.dtype)
        padded[:len(rows)] = values
        all_ids = self._all_gather(ids, "embedding_ids")
        all_values = self._all_gather(padded, "embedding_values")
        return (torch.cat([i[:c] for i, c in zip(all_ids, counts)]).long(),
                torch.cat([v[:c] for v, c in zip(all_values, counts)]))

    def _table_scales(self, rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        T = len(self.table_offsets) - 1
        local = torch.zeros(T, dtype=torch.float32)
        if len(rows):
            local.scatter_reduce_(0, row_tables(rows, self.table_offsets), grads.abs().amax(1), "amax")
        shared = self._all_reduce(local, "embedding_scales", op=dist.ReduceOp.MAX)
        return torch.where(shared > 0, shared / INT8_MAX, torch.ones_like(shared))

    # --- MLP gradients ------------------------------------------------------------------
    def mlp_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's .grad by the sum over ranks (compressed as configured)."""
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.config.compression is not GradCompression.SPARSE_INT8:
            summed = self._all_reduce(flat, "mlp_values")
        else:
            summed = self._int8_mlp(flat, [g.numel() for g in grads])
        for p, part in zip(params, torch.split(summed, [g.numel() for g in grads])):
            p.grad.copy_(part.view_as(p.grad))

    def _int8_mlp(self, flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if self.config.error_feedback:
            if self.residuals is None:
                self.residuals = [torch.zeros(n) for n in sizes]
            flat = flat + torch.cat(self.residuals)
        parts = torch.split(flat, sizes)
        local = torch.stack([p.abs().max() for p in parts])
        shared = self._all_reduce(local, "mlp_scales", op=dist.ReduceOp.MAX)
        scale = torch.where(shared > 0, shared / INT8_MAX, torch.ones_like(shared))
        per_elem = scale.repeat_interleave(torch.as_tensor(sizes))
        q = torch.round(flat / per_elem).clamp_(-INT8_MAX, INT8_MAX)
        if self.config.error_feedback:
            self.residuals = list(torch.split(flat - q * per_elem, sizes))
        total = torch.zeros_like(flat, dtype=torch.int32)
        for codes in self._all_gather(q.to(torch.int8), "mlp_values"):
            total += codes
        return total.float() * per_elem

    # --- bookkeeping --------------------------------------------------------------------
    def gather_residuals(self) -> list[torch.Tensor] | None:
        """Every rank's error-feedback memory (a collective; not counted as gradient traffic)."""
        if not (self.config.compression is GradCompression.SPARSE_INT8 and self.config.error_feedback):
            return None
        mine = torch.cat(self.residuals) if self.residuals is not None else torch.zeros(0)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(mine)]), group=self.group)
        width = max(int(s) for s in sizes)
        padded = torch.zeros(width)
        padded[:len(mine)] = mine
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return [o[:int(s)] for o, s in zip(out, sizes)]

    def set_residual(self, flat: torch.Tensor | None, sizes: list[int]) -> None:
        self.residuals = None if flat is None or len(flat) == 0 else list(torch.split(flat.clone(), sizes))

    def report(self, steps: int) -> dict:
        per_iter = {k: self.sent[k] / steps if steps else 0.0 for k in CATEGORIES}
        return {"bytes_sent_total": {k: self.sent[k] for k in CATEGORIES},
                "bytes_per_iteration": per_iter,
                "bytes_per_iteration_total": sum(per_iter.values())}


def _coalesce(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the values of equal ids (rank order kept within a row): sorted unique ids."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    out = torch.zeros(len(uniq), values.shape[1], dtype=values.dtype)
    out.index_add_(0, inverse, values)
    return uniq, out


def analytic_bytes(total_rows: int, num_tables: int, dim: int, mlp_params: int, mlp_tensors: int,
                   compression: GradCompression, rows_per_rank: int) -> dict[str, int]:
    """Bytes one rank sends per iteration, from sizes (no padding: every rank sends
    `rows_per_rank` distinct rows). Matches GradientExchange's count category by category."""
    compression = GradCompression(compression)
    out = dict.fromkeys(CATEGORIES, 0)
    out["loss"] = 4
    if compression is GradCompression.NONE:
        out["embedding_values"] = total_rows * dim * 4
        out["mlp_values"] = mlp_params * 4
        return out
    out["embedding_counts"] = 4
    out["embedding_ids"] = rows_per_rank * 4
    if compression is GradCompression.SPARSE:
        out["embedding_values"] = rows_per_rank * dim * 4
        out["mlp_values"] = mlp_params * 4
    else:
        out["embedding_values"] = rows_per_rank * dim
        out["embedding_scales"] = num_tables * 4
        out["mlp_values"] = mlp_params
        out["mlp_scales"] = mlp_tensors * 4
    return out
