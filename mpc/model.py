"""DLRM, exactly as the Criteo Kaggle reference (facebookresearch/dlrm; PAPERS.md §4).

                         logit (sigmoid -> click probability)
                                    ^
                    top MLP 367-512-256-1 (ReLU, last layer linear)
                                    ^
                  [ x | dot(z_i, z_j) for all i > j ]   16 + 27*26/2 = 367
                                    ^
          z_0 = x = bottom MLP 13-512-256-64-16 (ReLU)   z_1..z_26 = embeddings (dim 16)
                     ^                                              ^
              13 dense features                       26 categorical ids (one per table)

Interaction: Z = [x; e_1; ...; e_26] (27 x 16), keep the strictly lower triangle of
Z Z^T. Initialisation as the reference: Linear(n -> m) weights ~ N(0, sqrt(2/(m+n))),
biases ~ N(0, sqrt(1/m)); tables ~ U(-sqrt(1/rows), sqrt(1/rows)) (in the backend).
The loss is BCE on the sigmoid output; we compute it from the logit
(BCEWithLogits), which is the same function, numerically safer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mpc.criteo import BOTTOM_MLP, NUM_DENSE, TOP_MLP
from mpc.embedding import EmbeddingConfig, build_embedding, jagged_from_dense
from mpc.embedding.base import EmbeddingBackend


@dataclass(frozen=True)
class DLRMConfig:
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    bottom_mlp: tuple[int, ...] = BOTTOM_MLP
    top_mlp: tuple[int, ...] = TOP_MLP
    seed: int = 0  # MLP initialisation
    mlp_bits: int = 32    # < 32: DQRM per-channel quantized MLP weights (mpc.qat_mlp)
    mlp_quant: str = "qat"  # "qat" (fake-quantized while training) | "ptq" (at eval only)

    def __post_init__(self):
        if isinstance(self.embedding, dict):
            object.__setattr__(self, "embedding", EmbeddingConfig(**self.embedding))
        if self.mlp_bits not in (2, 4, 8, 16, 32) or self.mlp_quant not in ("qat", "ptq"):
            raise ValueError(f"MLP quantization must be 2/4/8/16/32 bits, qat|ptq; got "
                             f"{self.mlp_bits} bits, {self.mlp_quant!r}")
        object.__setattr__(self, "bottom_mlp", tuple(self.bottom_mlp))
        object.__setattr__(self, "top_mlp", tuple(self.top_mlp))
        if self.bottom_mlp[0] != NUM_DENSE:
            raise ValueError(f"bottom MLP must start at {NUM_DENSE} dense features")
        if self.bottom_mlp[-1] != self.embedding.dim:
            raise ValueError(f"bottom MLP must end at the embedding dim {self.embedding.dim}")
        n = self.embedding.num_tables + 1
        want = self.embedding.dim + n * (n - 1) // 2
        if self.top_mlp[0] != want or self.top_mlp[-1] != 1:
            raise ValueError(f"top MLP must go from {want} to 1, got {self.top_mlp}")

    @classmethod
    def for_embedding(cls, embedding: EmbeddingConfig, **kw) -> "DLRMConfig":
        """Reference MLP widths, with the MLP ends adapted to the embedding's shape."""
        n = embedding.num_tables + 1
        bottom = BOTTOM_MLP[:-1] + (embedding.dim,)
        top = (embedding.dim + n * (n - 1) // 2,) + TOP_MLP[1:]
        return cls(embedding=embedding, bottom_mlp=kw.pop("bottom_mlp", bottom),
                   top_mlp=kw.pop("top_mlp", top), **kw)

    def to_json(self) -> dict:
        return {"embedding": self.embedding.to_json(), "bottom_mlp": list(self.bottom_mlp),
                "top_mlp": list(self.top_mlp), "seed": self.seed, "mlp_bits": self.mlp_bits,
                "mlp_quant": self.mlp_quant}


def mlp(sizes: tuple[int, ...], generator: torch.Generator, last_relu: bool) -> nn.Sequential:
    layers = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n, m)
        with torch.no_grad():
            lin.weight.normal_(0.0, math.sqrt(2.0 / (m + n)), generator=generator)
            lin.bias.normal_(0.0, math.sqrt(1.0 / m), generator=generator)
        layers.append(lin)
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dot_interaction(x: torch.Tensor, emb: torch.Tensor, li: torch.Tensor, lj: torch.Tensor) -> torch.Tensor:
    """[x | strictly-lower-triangular entries of Z Z^T], Z = [x; emb].

    The reference's formulation, written for clarity; `DotInteraction` computes the same
    with a cheaper backward and is what the model runs (tests compare the two).
    """
    z = torch.cat([x.unsqueeze(1), emb], dim=1)          # (B, T+1, D)
    zz = torch.bmm(z, z.transpose(1, 2))                 # (B, T+1, T+1)
    return torch.cat([x, zz[:, li, lj]], dim=1)          # (B, D + (T+1)T/2)


def pair_dots(z: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Entries `flat` of each sample's Z Z^T, flattened: (B, n, D) -> (B, len(flat))."""
    zz = torch.bmm(z, z.transpose(1, 2)).view(z.shape[0], z.shape[1] * z.shape[1])  # B may be 0
    return torch.gather(zz, 1, flat.expand(z.shape[0], -1))  # = index_select(1, flat), faster


class _PairDots(torch.autograd.Function):
    """Z (B, n, D) -> the n(n-1)/2 dots z_i . z_j, i > j, in torch.tril_indices order.

    Autograd of `zz[:, li, lj]` zero-fills a (B, n, n) gradient, scatters into it with
    accumulation and runs two bmm. Here the backward builds the symmetric matrix S
    (S_ij = S_ji = dL/d(z_i . z_j), S_ii = 0) with one gather and returns S Z: one bmm.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, flat: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, sym)
        return pair_dots(z, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, sym = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(grad.shape[0], 1)], dim=1)  # last column: the diagonal's 0
        s = torch.gather(padded, 1, sym.expand(z.shape[0], -1)).view(z.shape[0], z.shape[1], z.shape[1])
        return torch.bmm(s, z), None, None


class _KernelInteraction(torch.autograd.Function):
    """The whole interaction, forward and backward, in one C++ kernel each (CPU float32;
    kernels/interaction_cpu.cpp): no (B, n, n) products in memory, no cat, no gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, emb: torch.Tensor, module) -> torch.Tensor:
        ctx.save_for_backward(x, emb)
        ctx.module = module
        return module.dot_interaction_forward(x, emb)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, emb = ctx.saved_tensors
        gx, ge = ctx.module.dot_interaction_backward(grad, x, emb)
        return gx, ge, None


def interaction_kernels(x: torch.Tensor, emb: torch.Tensor):
    """The compiled interaction module when it applies to these inputs, else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or emb.dtype != torch.float32:
        return None
    from mpc import kernels

    module = kernels.load()
    return module if module is not None and hasattr(module, "dot_interaction_forward") else None


class DotInteraction(nn.Module):
    """DLRM's dot interaction for n = T + 1 vectors: same values as `dot_interaction`.

    On CPU float32 it runs the compiled kernel (`_KernelInteraction`); elsewhere, or
    with `use_kernels=False`, torch ops (`_PairDots`). Tests compare the two.
    """

    def __init__(self, num_vectors: int, use_kernels: bool = True):
        super().__init__()
        self.use_kernels = use_kernels
        n = num_vectors
        li, lj = torch.tril_indices(n, n, offset=-1)
        pairs = torch.arange(len(li))
        sym = torch.full((n, n), len(li), dtype=torch.int64)  # len(li): the zero column
        sym[li, lj] = pairs
        sym[lj, li] = pairs
        self.register_buffer("flat", li * n + lj, persistent=False)
        self.register_buffer("sym", sym.flatten(), persistent=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        module = interaction_kernels(x, emb) if self.use_kernels else None
        if module is not None:
            if torch.is_grad_enabled() and (x.requires_grad or emb.requires_grad):
                return _KernelInteraction.apply(x, emb, module)
            return module.dot_interaction_forward(x, emb)
        z = torch.cat([x.unsqueeze(1), emb], dim=1)
        if torch.is_grad_enabled() and z.requires_grad:
            dots = _PairDots.apply(z, self.flat, self.sym)
        else:
            dots = pair_dots(z, self.flat)
        return torch.cat([x, dots], dim=1)


class DLRM(nn.Module):
    def __init__(self, config: DLRMConfig, embedding: EmbeddingBackend | None = None):
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        self.bottom = mlp(config.bottom_mlp, g, last_relu=True)
        self.top = mlp(config.top_mlp, g, last_relu=False)
        if config.mlp_bits < 32:
            from mpc.qat_mlp import quantize_linears

            quantize_linears(self.bottom, config.mlp_bits, config.mlp_quant)
            quantize_linears(self.top, config.mlp_bits, config.mlp_quant)
        self.embedding = embedding if embedding is not None else build_embedding(config.embedding)
        self.interaction = DotInteraction(config.embedding.num_tables + 1)

    def forward(self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits (B,) from dense (B, 13) and jagged table-major ids (see embedding.base)."""
        x = self.bottom(dense)                           # (B, D)
        emb = self.embedding(indices, offsets)           # (B, T, D)
        return self.top(self.interaction(x, emb)).squeeze(1)

    def forward_onehot(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """Logits from dense (B, 13) and one id per table per sample, cat (B, T)."""
        indices, offsets = jagged_from_dense(cat)
        return self(dense, indices, offsets)

    def dense_parameters(self):
        """MLP parameters (the embedding backend updates itself, fused)."""
        return [p for name, p in self.named_parameters() if not name.startswith("embedding.")]

    def mlp_bytes(self) -> int:
        return sum(p.nbytes for p in self.dense_parameters())
