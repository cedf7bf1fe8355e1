"""The uncached low-precision backend (mpc.embedding.lowp): construction, conversion,
export to PyTorch's quantized ops, resumable stochastic rounding, training in a DLRM."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mpc.embedding import build_embedding, quant
from mpc.embedding.base import jagged_from_dense
from mpc.embedding.config import CacheConfig, EmbeddingConfig, Precision, Rounding
from mpc.embedding.fp32 import reference_init
from mpc.embedding.lowp import QuantizedEmbeddingBag
from mpc.errors import UserError
from mpc.model import DLRM, DLRMConfig

CARDS = (9, 1, 120, 40, 3)
KINDS = ["fp16", "int8", "int4", "int2"]


def config(kind, **kw) -> EmbeddingConfig:
    return EmbeddingConfig(cardinalities=CARDS, dim=kw.pop("dim", 8), kind=kind, seed=kw.pop("seed", 3), **kw)


def batch(seed: int, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (size,), generator=g) for c in CARDS], 1)
    return jagged_from_dense(cat)


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_build_nearest_rounded_reference_init(kind):
    emb = build_embedding(config(kind))
    assert isinstance(emb, QuantizedEmbeddingBag)
    p = Precision(kind)
    init = reference_init(CARDS, 8, seed=3)
    assert torch.equal(emb.weights, quant.quantize_rows(init, p, Rounding.NEAREST))
    assert emb.weights.dtype == quant.STORAGE_DTYPE[p]
    # exact memory: the components add up to the storage tensor's bytes
    mem = emb.memory_bytes()
    assert set(mem) == {"values", "scale_bias", "step_counter"}
    assert sum(mem.values()) == emb.weights.nbytes + emb.step.nbytes
    expect = {"fp16": (16, 0), "int8": (8, 8), "int4": (4, 4), "int2": (2, 4)}[kind]
    rows = sum(CARDS)
    assert (mem["values"], mem["scale_bias"]) == (rows * expect[0], rows * expect[1])
    assert emb.step.item() == 0 and "step" in emb.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_to_float_is_dequantized_storage(kind):
    emb = build_embedding(config(kind, dim=5))
    back = emb.to_float()
    init = reference_init(CARDS, 5, seed=3)
    assert back.shape == init.shape
    assert torch.equal(back, quant.dequantize_rows(emb.weights, Precision(kind), 5))
    rel = (back - init).abs().max() / init.abs().max()
    assert 0 < rel < {"fp16": 1e-3, "int8": 1e-2, "int4": 0.2, "int2": 0.8}[kind]


@pytest.mark.parametrize("kind", ["int8", "int4", "int2"])
def test_export_serves_in_torch_quantized_ops(kind):
    w = torch.randn(sum(CARDS), 8)
    emb = QuantizedEmbeddingBag.from_float(w, config(kind))
    assert torch.equal(emb.weights, quant.quantize_rows(w, Precision(kind), Rounding.NEAREST))
    tables = emb.export_torch_quantized()
    indices, offsets = batch(1)
    ours = emb(indices, offsets)                       # (B, T, D)
    B = 16
    for t, table in enumerate(tables):
        theirs = quant.torch_pool(table, Precision(kind), indices[t * B:(t + 1) * B], offsets[:B + 1])
        assert torch.allclose(theirs, ours[:, t], atol=1e-5, rtol=1e-5)
    again = QuantizedEmbeddingBag.import_torch_quantized(tables, config(kind))
    assert torch.equal(again.weights, emb.weights)
    with pytest.raises(UserError, match="table sizes"):
        QuantizedEmbeddingBag.import_torch_quantized(tables[:-1], config(kind))


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="weights"):
        QuantizedEmbeddingBag.from_float(torch.zeros(3, 8), config("int8"))
    with pytest.raises(UserError, match="storage must be"):
        QuantizedEmbeddingBag(config("int4"), torch.zeros(sum(CARDS), 9, dtype=torch.uint8))
    with pytest.raises(UserError, match="fp16/int8/int4/int2"):
        QuantizedEmbeddingBag(config("fp32"))


def test_cache_fraction_needs_the_cached_backend(monkeypatch):
    cfg = config("int8", cache=CacheConfig(fraction=0.1))
    monkeypatch.setitem(sys.modules, "mpc.embedding.cache", types.ModuleType("mpc.embedding.cache"))
    with pytest.raises(UserError, match="cached backend"):
        build_embedding(cfg)
    fake = types.ModuleType("mpc.embedding.cache")

    class CachedQuantizedEmbeddingBag(QuantizedEmbeddingBag):
        pass

    fake.CachedQuantizedEmbeddingBag = CachedQuantizedEmbeddingBag
    monkeypatch.setitem(sys.modules, "mpc.embedding.cache", fake)
    assert type(build_embedding(cfg)) is CachedQuantizedEmbeddingBag


def _train(emb, steps, first=0, lr=0.3):
    emb.train()
    emb.set_learning_rate(lr)
    for s in range(first, first + steps):
        indices, offsets = batch(100 + s)
        out = emb(indices, offsets)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(s))
        ((out - target) ** 2).sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_and_reference_train_identically(kind):
    a = build_embedding(config(kind, use_kernels=True))
    b = build_embedding(config(kind, use_kernels=False))
    _train(a, 3)
    _train(b, 3)
    assert torch.equal(a.weights.view(torch.uint8), b.weights.view(torch.uint8))
    indices, offsets = batch(7)
    assert torch.equal(a(indices, offsets), b(indices, offsets))
    assert a.step.item() == b.step.item() == 3


@pytest.mark.parametrize("kind", ["int4", "fp16"])
def test_state_dict_resume_gives_identical_bytes(kind):
    straight = build_embedding(config(kind))
    _train(straight, 4)
    first = build_embedding(config(kind))
    _train(first, 2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = build_embedding(config(kind))
    resumed.load_state_dict(torch.load(buf))
    assert resumed.step.item() == 2
    _train(resumed, 2, first=2)
    assert torch.equal(resumed.weights.view(torch.uint8), straight.weights.view(torch.uint8))
    assert resumed.step.item() == 4
    # negative control: forgetting the step replays the rounding stream -> other bytes
    forgot = build_embedding(config(kind))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    state["step"].zero_()
    forgot.load_state_dict(state)
    _train(forgot, 2, first=2)
    assert not torch.equal(forgot.weights.view(torch.uint8), straight.weights.view(torch.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_dlrm_training_changes_only_looked_up_rows(kind):
    emb_cfg = EmbeddingConfig(cardinalities=(50, 7, 400, 3), dim=8, kind=kind, seed=1)
    model = DLRM(DLRMConfig.for_embedding(emb_cfg, bottom_mlp=(13, 16, 8), top_mlp=(8 + 10, 16, 1)))
    model.embedding.set_learning_rate(0.5)
    opt = torch.optim.SGD(model.dense_parameters(), lr=0.1)
    before = model.embedding.weights.clone()
    g = torch.Generator().manual_seed(0)
    touched = torch.zeros(len(before), dtype=torch.bool)
    starts = model.embedding.table_offsets[:-1]
    model.train()
    for _ in range(3):
        dense = torch.randn(32, 13, generator=g)
        cat = torch.stack([torch.randint(0, c, (32,), generator=g) for c in emb_cfg.cardinalities], 1)
        label = (torch.rand(32, generator=g) < 0.3).float()
        touched[(cat + starts).reshape(-1)] = True
        loss = F.binary_cross_entropy_with_logits(model.forward_onehot(dense, cat), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = model.embedding.weights
    changed = (after.view(torch.uint8) != before.view(torch.uint8)).reshape(len(before), -1).any(1)
    assert not changed[~touched].any()                 # untouched rows: identical bytes
    assert changed[touched].float().mean() > 0.5       # looked-up rows were trained
    assert model.embedding.step.item() == 3
