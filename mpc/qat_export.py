"""Export of a DQRM quantization-aware-trained DLRM to real low-bit storage, and its size.

DQRM (PAPERS.md §2) reports its INT4 Kaggle model at 0.270 GB against 2.161 GB in FP32:
that is every weight at its bit width - 33,762,577 x 16 codes of 4 bits - with the scales
(one per table, one per MLP output channel) and the FP32 biases adding well under 1 MB.
`QuantizedDLRM` holds exactly that:

    tables   packed codes, offset binary (code + 2^(b-1), so -qmax..qmax -> 1..2^b-1),
             lowest bits first as mpc.embedding.quant.pack_codes; int16 for 16 bits
             + one float32 scale per table
    MLPs     per layer: packed codes (out, ceil(in*b/8)) + float32 scale per output
             channel + float32 bias (or plain float32 weights when the MLP is not quantized)

`to_model()` turns it back into a runnable DLRM whose tables are the ecosystem's fused
INT8/INT4/INT2 rows (mpc.embedding.quant; served by mpc.embedding.lowp and readable by
torch.ops.quantized.embedding_bag_*_rowwise_offsets): per row fp16 scale = s and bias =
-2^(b-1) s. Because QAT keeps s fp16-exact, scale * (code) + bias equals q * s to the
bit, so the exported model's logits equal the fake-quantized model's. The fused rows
cost 4 bytes per row more than the compact form (reported by `fused_bytes`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mpc.embedding import quant
from mpc.embedding.config import EmbeddingConfig, Precision
from mpc.embedding.qat import QATEmbeddingBag
from mpc.errors import UserError
from mpc.model import DLRM, DLRMConfig
from mpc.qat_mlp import QuantLinear
from mpc.runinfo import atomic_write_bytes

FORMAT_VERSION = 1


def packed_width(bits: int, n: int) -> int:
    """Bytes of n codes of `bits` bits in the compact form (int16 for 16 bits)."""
    return 2 * n if bits == 16 else -(-n * bits // 8)


def pack_symmetric(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) int codes in [-qmax, qmax] -> compact storage (uint8 packed, or int16)."""
    if bits == 16:
        return codes.to(torch.int16)
    return quant.pack_codes(codes.to(torch.int32) + (1 << (bits - 1)), bits)


def unpack_symmetric(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_symmetric: -> (rows, n) int32 codes."""
    if bits == 16:
        return packed.to(torch.int32)
    return quant.unpack_codes(packed, bits, n) - (1 << (bits - 1))


def fused_rows(codes: torch.Tensor, row_scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric codes (rows, D) and per-row fp16-exact scales -> fused INT{bits} rows.

    Stored value code + 2^(b-1) with scale s and bias -2^(b-1) s, which dequantizes
    (scale * value + bias, in float32) to exactly code * s.
    """
    precision = {8: Precision.INT8, 4: Precision.INT4, 2: Precision.INT2}.get(bits)
    if precision is None:
        raise UserError(f"fused row formats hold 2, 4 or 8 bits, not {bits}")
    off = 1 << (bits - 1)
    values = codes.to(torch.int32) + off
    bias = -off * row_scales.float()
    sb_dtype = torch.float32 if precision is Precision.INT8 else torch.float16
    if sb_dtype is torch.float16 and not bool(torch.isfinite(bias.half()).all()):
        raise UserError("a table scale is too large for the fp16 bias of the fused rows")
    packed = values.to(torch.uint8) if precision is Precision.INT8 else quant.pack_codes(values, bits)
    sb = torch.stack([row_scales.float(), bias], 1).to(sb_dtype).contiguous().view(torch.uint8)
    return torch.cat([packed, sb], 1)


@dataclass
class QuantizedLayer:
    """One MLP layer: compact codes + per-channel scales, or plain FP32 weights (bits 32)."""

    name: str                 # e.g. "bottom.0"
    shape: tuple[int, int]    # (out, in)
    bits: int
    weight: torch.Tensor      # packed codes, or float32 weights when bits == 32
    scales: torch.Tensor | None
    bias: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        if self.bits == 32:
            return self.weight.float()
        return unpack_symmetric(self.weight, self.bits, self.shape[1]).float() * self.scales[:, None]

    def nbytes(self) -> dict[str, int]:
        return {"mlp_values": self.weight.nbytes,
                "mlp_scales": self.scales.nbytes if self.scales is not None else 0,
                "mlp_bias": self.bias.nbytes}


@dataclass
class QuantizedDLRM:
    """A DQRM model in real low-bit storage (see the module docstring)."""

    model_config: dict            # DLRMConfig.to_json() of the trained model
    bits: int
    table_codes: torch.Tensor     # (total_rows, packed_width(bits, D))
    table_scales: torch.Tensor    # (T,) float32, fp16-exact
    layers: list[QuantizedLayer] = field(default_factory=list)

    @property
    def embedding_config(self) -> EmbeddingConfig:
        return EmbeddingConfig(**self.model_config["embedding"])

    def nbytes(self) -> dict[str, int]:
        """Exact bytes of the stored tensors, by component."""
        out = {"embedding_values": self.table_codes.nbytes, "embedding_scales": self.table_scales.nbytes,
               "mlp_values": 0, "mlp_scales": 0, "mlp_bias": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out

    def total_bytes(self) -> int:
        return sum(self.nbytes().values())

    def fused_bytes(self) -> int:
        """Bytes of the tables as fused rows (what `to_model` serves): +fp16 scale/bias per row."""
        emb = self.embedding_config
        if self.bits == 16:
            return emb.total_rows * emb.dim * 4
        return emb.total_rows * Precision(f"int{self.bits}").row_bytes(emb.dim)

    def table_values(self) -> torch.Tensor:
        """q * s for every row, float32 (total_rows, D)."""
        emb = self.embedding_config
        counts = torch.as_tensor(emb.cardinalities)
        codes = unpack_symmetric(self.table_codes, self.bits, emb.dim)
        return codes.float() * self.table_scales.repeat_interleave(counts)[:, None]

    def to_model(self, use_kernels: bool = True) -> DLRM:
        """A runnable DLRM on the exported weights (fused low-bit rows, dequantized MLPs)."""
        from mpc.embedding.fp32 import FP32EmbeddingBag
        from mpc.embedding.lowp import QuantizedEmbeddingBag

        emb = self.embedding_config
        if self.bits == 16:   # no 16-bit integer row format: serve the exact values in FP32
            cfg = emb.replace(kind="fp32", options={}, use_kernels=use_kernels)
            backend = FP32EmbeddingBag(cfg, self.table_values())
        else:
            cfg = emb.replace(kind=f"int{self.bits}", options={}, use_kernels=use_kernels)
            counts = torch.as_tensor(emb.cardinalities)
            codes = unpack_symmetric(self.table_codes, self.bits, emb.dim)
            backend = QuantizedEmbeddingBag(cfg, fused_rows(codes, self.table_scales.repeat_interleave(counts),
                                                            self.bits))
        mc = {k: v for k, v in self.model_config.items() if k not in ("embedding", "mlp_bits", "mlp_quant")}
        model = DLRM(DLRMConfig(embedding=cfg, **mc), embedding=backend)
        with torch.no_grad():
            for layer in self.layers:
                lin = model.get_submodule(layer.name)
                lin.weight.copy_(layer.dequantized())
                lin.bias.copy_(layer.bias)
        return model.eval()

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        obj = {"format": "mpc-dqrm", "version": FORMAT_VERSION, "model_config": self.model_config,
               "bits": self.bits, "table_codes": self.table_codes, "table_scales": self.table_scales,
               "layers": [{"name": l.name, "shape": list(l.shape), "bits": l.bits, "weight": l.weight,
                           "scales": l.scales, "bias": l.bias} for l in self.layers]}
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedDLRM":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: exported model not found")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: not a readable exported model ({type(e).__name__})") from None
        if not isinstance(obj, dict) or obj.get("format") != "mpc-dqrm" or obj.get("version") != FORMAT_VERSION:
            raise UserError(f"{path}: not an mpc DQRM export (version {FORMAT_VERSION})")
        layers = [QuantizedLayer(l["name"], tuple(l["shape"]), l["bits"], l["weight"], l["scales"], l["bias"])
                  for l in obj["layers"]]
        return cls(obj["model_config"], obj["bits"], obj["table_codes"], obj["table_scales"], layers)


def export_qat(model: DLRM) -> QuantizedDLRM:
    """The trained QAT model's weights as integer codes + scales (compact storage)."""
    emb = getattr(model.embedding, "inner", model.embedding)  # unwrap a distributed wrapper
    if not isinstance(emb, QATEmbeddingBag):
        raise UserError(f"export needs a model trained with --embedding qat, not {emb.config.kind!r}")
    emb.flush()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            codes, scales = module.codes_and_scales()
            layers.append(QuantizedLayer(name, tuple(module.weight.shape), module.bits,
                                         pack_symmetric(codes, module.bits), scales,
                                         module.bias.detach().clone()))
        elif type(module) is nn.Linear:
            layers.append(QuantizedLayer(name, tuple(module.weight.shape), 32, module.weight.detach().clone(),
                                         None, module.bias.detach().clone()))
    return QuantizedDLRM(model.config.to_json(), emb.bits, pack_symmetric(emb.quantized_codes(), emb.bits),
                         emb.scales.clone(), layers)


def model_bytes(cardinalities, dim: int, bottom_mlp, top_mlp, emb_bits: int, mlp_bits: int) -> dict[str, int]:
    """Analytic size of a DLRM stored as QuantizedDLRM (32 bits = plain float32).

    Counts what `QuantizedDLRM.nbytes` counts: packed table codes, one fp32 scale per
    table, MLP codes (or fp32 weights), one fp32 scale per output channel, fp32 biases.
    """
    rows, T = sum(cardinalities), len(cardinalities)
    out = {"embedding_values": rows * (4 * dim if emb_bits == 32 else packed_width(emb_bits, dim)),
           "embedding_scales": 0 if emb_bits == 32 else 4 * T, "mlp_values": 0, "mlp_scales": 0, "mlp_bias": 0}
    for sizes in (bottom_mlp, top_mlp):
        for n, m in zip(sizes[:-1], sizes[1:]):
            out["mlp_values"] += m * (4 * n if mlp_bits == 32 else packed_width(mlp_bits, n))
            out["mlp_scales"] += 0 if mlp_bits == 32 else 4 * m
            out["mlp_bias"] += 4 * m
    return out


def export_and_evaluate(trainer, path: str | Path) -> dict:
    """Export a Trainer's QAT model to `path`, reload it, and test the served model.

    The record says what is stored (bytes by component), the file's size, the size as
    fused rows, and the served model's test metrics (equal to the fake-quantized model's).
    """
    from mpc.metrics import evaluate

    exported = export_qat(trainer.model)
    exported.save(path)
    served = QuantizedDLRM.load(path).to_model(use_kernels=trainer.config.embedding.use_kernels)
    return {"path": str(path), "bytes": exported.nbytes(), "total_bytes": exported.total_bytes(),
            "file_bytes": Path(path).stat().st_size, "fused_table_bytes": exported.fused_bytes(),
            "test": evaluate(served, trainer.test_loader)}
