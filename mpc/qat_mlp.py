"""Quantized MLP layers for DQRM: per-output-channel symmetric weights, FP32 activations.

DQRM (PAPERS.md §2) quantizes the MLP weights of DLRM to INT4 with one scale per
output channel, s_c = max_j |W[c, j]| / (2^(b-1) - 1), and leaves activations (and
biases) in FP32. `QuantLinear` is an `nn.Linear` (same parameters, same state_dict
keys) whose forward uses fake-quantized weights:

  - mode "qat": always, with the straight-through estimator (the gradient reaches the
    FP32 weights unchanged), scales recomputed from the current weights every step -
    the MLPs are small, so DQRM's scale period is only needed for the tables;
  - mode "ptq": only in eval mode, so training is plain FP32 and evaluation measures
    post-training quantization of the weights at that point.

The forward computes with exactly q * s (not w + (q s - w) detached, which rounds
differently), so the exported integer model (mpc.qat_export) gives the same outputs.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from mpc.embedding.qat import FakeQuantizeSTE, fake_quantize, qmax, quantize_codes
from mpc.errors import UserError

MLP_BITS = (2, 4, 8, 16, 32)   # 32 = not quantized


class MLPQuantMode(str, Enum):
    QAT = "qat"
    PTQ = "ptq"


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, 1) float32 symmetric scales, one per output channel (row of W)."""
    max_abs = weight.detach().abs().amax(1, keepdim=True)
    # An all-zero channel keeps codes 0 with any positive scale; avoid 0/0.
    return torch.where(max_abs > 0, max_abs / qmax(bits), torch.ones_like(max_abs))


class QuantLinear(nn.Linear):
    """nn.Linear with per-output-channel symmetric fake-quantized weights."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 mode: MLPQuantMode = MLPQuantMode.QAT, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if bits not in MLP_BITS[:-1]:
            raise UserError(f"MLP bits must be one of {MLP_BITS[:-1]} to quantize, got {bits}")
        self.bits = bits
        self.mode = MLPQuantMode(mode)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, mode: MLPQuantMode = MLPQuantMode.QAT) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bits, mode, bias=linear.bias is not None)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def quantized_weight(self) -> torch.Tensor:
        """q * s, no autograd (the weights an integer deployment computes with)."""
        return fake_quantize(self.weight.detach(), channel_scales(self.weight, self.bits), self.bits)

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (out, in) int32 in [-qmax, qmax] and scales (out,) float32."""
        s = channel_scales(self.weight, self.bits)
        return quantize_codes(self.weight.detach(), s, self.bits).to(torch.int32), s[:, 0].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is MLPQuantMode.PTQ and self.training:
            return super().forward(x)
        w = FakeQuantizeSTE.apply(self.weight, channel_scales(self.weight, self.bits), self.bits)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, mode={self.mode.value}"


def quantize_linears(module: nn.Module, bits: int, mode: MLPQuantMode = MLPQuantMode.QAT) -> nn.Module:
    """Replace every nn.Linear child of `module` (recursively) by a QuantLinear, in place.

    Keeps the weights, so a model initialised as the FP32 reference starts identical.
    """
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, QuantLinear.from_float(child, bits, mode))
        else:
            quantize_linears(child, bits, mode)
    return module
