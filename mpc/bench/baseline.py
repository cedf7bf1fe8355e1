"""The baseline a user would write instead: 26 `nn.EmbeddingBag(sparse=True)` + torch SGD.

This is how the DLRM reference builds its tables (one EmbeddingBag per table, sparse
gradients, torch.optim.SGD over all parameters), with the dot interaction in torch ops
(mpc.model's `_PairDots`: bmm + gather, already cheaper in backward than the
reference's indexing). Benchmarks measure mpc against it in the same run, on the same
model (same layers, same function), batches and initial weights. `mpc_interaction=True`
gives the baseline mpc's interaction kernel too, to split mpc's gain between the
embedding and the interaction.
"""

from __future__ import annotations

import torch
from torch import nn

from mpc.model import DLRM, DLRMConfig


class EmbeddingBagList(nn.Module):
    """One nn.EmbeddingBag(mode="sum", sparse=True) per table; same I/O as a backend."""

    def __init__(self, cardinalities, dim: int, flat_weights: torch.Tensor | None = None):
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in cardinalities)
        if flat_weights is not None:
            with torch.no_grad():
                start = 0
                for bag, n in zip(self.bags, cardinalities):
                    bag.weight.copy_(flat_weights[start:start + n])
                    start += n

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        T = len(self.bags)
        B = (len(offsets) - 1) // T
        out = []
        for t, bag in enumerate(self.bags):
            lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
            out.append(bag(indices[lo:hi], offsets[t * B:(t + 1) * B] - lo))
        return torch.stack(out, dim=1)  # (B, T, D)


def baseline_dlrm(config: DLRMConfig, flat_weights: torch.Tensor | None = None,
                  mpc_interaction: bool = False) -> DLRM:
    """DLRM with the baseline tables (initialised from `flat_weights` when given)."""
    emb = EmbeddingBagList(config.embedding.cardinalities, config.embedding.dim, flat_weights)
    model = DLRM(config, embedding=emb)
    model.interaction.use_kernels = mpc_interaction
    return model


def baseline_optimizer(model: DLRM, lr: float) -> torch.optim.Optimizer:
    """What a plain-PyTorch user writes: one SGD over all parameters, sparse ones included."""
    return torch.optim.SGD(model.parameters(), lr=lr)
