"""DQRM: fake quantization + STE, the scale period, looked-up-only quantization, QAT MLPs,
post-training quantization, export to real low-bit storage, resume, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mpc.criteo import BOTTOM_MLP, KAGGLE_CARDINALITIES, TOP_MLP
from mpc.embedding import EmbeddingConfig, build_embedding, jagged_from_dense, quant
from mpc.embedding.config import Precision
from mpc.embedding.fp32 import FP32EmbeddingBag
from mpc.embedding.lowp import QuantizedEmbeddingBag
from mpc.embedding.qat import FakeQuantizeSTE, fake_quantize, symmetric_scale, table_max_abs
from mpc.errors import UserError
from mpc.metrics import predict
from mpc.qat_export import (QuantizedDLRM, export_and_evaluate, export_qat, fused_rows, model_bytes,
                            unpack_symmetric)
from mpc.qat_mlp import MLPQuantMode, QuantLinear
from mpc.train import Trainer, TrainConfig

from conftest import SMALL_CARDS

CARDS = (5, 40, 3, 17)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: one thread is fastest, and immune to the other processes on the machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qat(bits=4, period=1, looked_up_only=True, cards=CARDS, dim=8, seed=0, use_kernels=False):
    cfg = EmbeddingConfig(cardinalities=cards, dim=dim, kind="qat", seed=seed, use_kernels=use_kernels,
                          options={"bits": bits, "scale_period": period, "looked_up_only": looked_up_only})
    emb = build_embedding(cfg)
    emb.set_learning_rate(0.5)
    return emb


def _batch(cards, B, seed):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in cards], 1)
    return jagged_from_dense(cat)


def _train_step(emb, indices, offsets, seed):
    out = emb(indices, offsets)
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    return out.detach(), grad


# --- the quantizer ------------------------------------------------------------------------

def test_fake_quantize_matches_a_hand_computation():
    w = torch.tensor([1.75, -0.3, 0.12, 0.13, -1.0, 0.625, 3.0])
    s = symmetric_scale(torch.tensor(1.75), 4)
    assert float(s) == 0.25                       # 1.75 / 7, exact in fp16
    # w/s = 7, -1.2, .48, .52, -4, 2.5 (half to even -> 2), 12 (clamped to 7)
    want = torch.tensor([1.75, -0.25, 0.0, 0.25, -1.0, 0.5, 1.75])
    assert torch.equal(fake_quantize(w, s, 4), want)
    # 2 bits: codes -1..1 on the grid of 1.75
    assert torch.equal(fake_quantize(w, symmetric_scale(torch.tensor(1.75), 2), 2),
                       torch.tensor([1.75, 0, 0, 0, -1.75, 0, 1.75]))
    # the scale is rounded to an fp16 value: 1/7 is not, fp16(1/7) is
    assert float(symmetric_scale(torch.tensor(1.0), 4)) == float(torch.tensor(1 / 7).half())
    assert float(symmetric_scale(torch.tensor(0.0), 4)) == 2.0 ** -24   # never 0


def test_straight_through_gradient():
    w = torch.tensor([1.75, -0.3, 0.12, 3.0], requires_grad=True)
    y = FakeQuantizeSTE.apply(w, torch.tensor(0.25), 4)
    upstream = torch.tensor([0.5, -2.0, 3.0, 7.0])
    y.backward(upstream)
    assert torch.equal(w.grad, upstream)          # rounding and clamping passed through


def test_qat_update_is_fp32_sgd_on_the_master_rows():
    emb = _qat(bits=4)
    w0 = emb.weights.clone()
    indices = torch.tensor([1, 4, 7, 0, 2, 2])     # tables of 2 bags: {1,4}, {}, {7}, {0}, {2,2}, ...
    offsets = torch.tensor([0, 2, 2, 3, 4, 4, 6, 6, 6])
    out, grad = _train_step(emb, indices, offsets, seed=3)
    want = w0.clone()
    # bag (t, b) -> grad[b, t]; row (table offset + id) gets lr * sum of its bags' grads
    want[0 + 1] -= 0.5 * grad[0, 0]
    want[0 + 4] -= 0.5 * grad[0, 0]
    want[5 + 7] -= 0.5 * grad[0, 1]
    want[5 + 0] -= 0.5 * grad[1, 1]
    want[45 + 2] -= 0.5 * (grad[1, 2] + grad[1, 2])
    torch.testing.assert_close(emb.weights, want, rtol=0, atol=1e-7)
    # the forward used q * s with the table's scale
    s = symmetric_scale(table_max_abs(w0, emb.table_offsets), 4)
    assert torch.equal(out[0, 0], fake_quantize(w0[1], s[0], 4) + fake_quantize(w0[4], s[0], 4))
    assert torch.equal(out[1, 1], fake_quantize(w0[5], s[1], 4))
    assert torch.equal(out[1, 0], torch.zeros(8))


def test_scale_recomputed_only_every_period():
    emb = _qat(bits=4, period=3)
    emb.set_learning_rate(5.0)   # large steps: the table maxima move every step
    seen = []
    for step in range(7):
        before = emb.weights.clone()
        _train_step(emb, *_batch(CARDS, 16, step), seed=step)
        now = symmetric_scale(table_max_abs(before, emb.table_offsets), 4)
        seen.append(emb.scales.clone())
        if step % 3 == 0:
            assert torch.equal(emb.scales, now), step
        else:
            assert torch.equal(emb.scales, seen[-2]), step
            assert not torch.equal(emb.scales, now), step   # a stale scale, as intended
    assert int(emb.scale_updates) == 3 and int(emb.step) == 7


def test_looked_up_only_gives_the_whole_table_forward():
    a, b = _qat(bits=4, period=2), _qat(bits=4, period=2, looked_up_only=False)
    for step in range(5):
        batch = _batch(CARDS, 32, 10 + step)
        out_a, _ = _train_step(a, *batch, seed=step)
        out_b, _ = _train_step(b, *batch, seed=step)
        assert torch.equal(out_a, out_b)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.scales, b.scales)
    assert not torch.equal(a.weights, _qat().weights)   # it did train


def test_quant_linear_per_channel_and_ste():
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.75, -0.875, 0.125], [0.0, 0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    q = QuantLinear.from_float(lin, bits=4)
    # channel 0: s = 0.25, codes 7, -3.5 -> -4, 0.5 -> 0; channel 1 all zero stays zero
    assert torch.equal(q.quantized_weight(), torch.tensor([[1.75, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    y = q(x)
    assert torch.equal(y, x @ q.quantized_weight().t() + lin.bias)
    g = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    y.backward(g)
    torch.testing.assert_close(q.weight.grad, g.t() @ x)     # STE: as if unquantized
    codes, scales = q.codes_and_scales()
    assert codes.tolist() == [[7, -4, 0], [0, 0, 0]] and scales[0] == 0.25
    ptq = QuantLinear.from_float(lin, bits=4, mode=MLPQuantMode.PTQ)
    assert torch.equal(ptq(x), lin(x))                        # training: FP32
    ptq.eval()
    assert torch.equal(ptq(x), y.detach())                    # evaluation: quantized


# --- export -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_rows_dequantize_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 16, generator=g) * torch.logspace(-6, 1, 300)[:, None]   # tiny scales too
    s = symmetric_scale(w.abs().amax(1), bits)
    codes = torch.round(w / s[:, None]).clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    rows = fused_rows(codes.int(), s, bits)
    precision = Precision(f"int{bits}")
    assert rows.shape == (300, precision.row_bytes(16))
    assert torch.equal(quant.dequantize_rows(rows, precision, 16), codes * s[:, None])


def _train_qat(data, tmp_path=None, **kw):
    kw.setdefault("embedding", EmbeddingConfig(kind="qat", use_kernels=False,
                                               options={"bits": 4, "scale_period": 7}))
    cfg = TrainConfig(data=str(data), batch_size=64, max_train_samples=1280, max_eval_samples=2000,
                      max_test_samples=2000, progress=False, **kw)
    trainer = Trainer(cfg)
    return trainer, trainer.fit()


@pytest.mark.parametrize("bits, mlp_bits", [(4, 4), (4, 32), (2, 2), (8, 8), (16, 16)])
def test_export_serves_the_fake_quantized_model(learnable_data, tmp_path, bits, mlp_bits):
    trainer, result = _train_qat(learnable_data, mlp_bits=mlp_bits, embedding=EmbeddingConfig(
        kind="qat", use_kernels=False, options={"bits": bits, "scale_period": 7}))
    exported = export_qat(trainer.model)
    exported.save(tmp_path / "model.dqrm")
    loaded = QuantizedDLRM.load(tmp_path / "model.dqrm")
    served = loaded.to_model(use_kernels=False)
    if bits == 16:   # no 16-bit row format: the exact values served from FP32 tables
        assert isinstance(served.embedding, FP32EmbeddingBag)
    else:
        assert isinstance(served.embedding, QuantizedEmbeddingBag)
        assert served.embedding.precision is Precision(f"int{bits}")
    labels, p_qat = predict(trainer.model, trainer.test_loader)
    _, p_served = predict(served, trainer.test_loader)
    assert (p_qat == p_served).all()                          # bit for bit
    from mpc.metrics import classification_metrics

    assert classification_metrics(labels, p_served)["auc"] == result["test"]["auc"]
    # real storage: b-bit codes of every row + one scale per table (+ the MLP)
    emb = trainer.model.config.embedding
    sizes = loaded.nbytes()
    assert sizes == exported.nbytes() == model_bytes(emb.cardinalities, emb.dim, trainer.model.config.bottom_mlp,
                                                     trainer.model.config.top_mlp, bits, mlp_bits)
    assert sizes["embedding_values"] == emb.total_rows * emb.dim * bits // 8    # D = 16: whole bytes
    assert sizes["embedding_scales"] == 4 * emb.num_tables
    shapes = [p.shape for n, p in trainer.model.named_parameters() if n.endswith("weight")
              and not n.startswith("embedding")]
    per_row = (lambda n: 4 * n) if mlp_bits == 32 else (lambda n: -(-n * mlp_bits // 8))   # 13 inputs, 4 bits: 7
    assert sizes["mlp_values"] == sum(m * per_row(n) for m, n in shapes)
    codes = unpack_symmetric(loaded.table_codes, bits, emb.dim)
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1 and int(codes.abs().max()) > 0
    # the same, end to end through the file: export_and_evaluate
    rec = export_and_evaluate(trainer, tmp_path / "again.dqrm")
    assert rec["test"] == result["test"] and rec["total_bytes"] == sum(sizes.values())
    assert rec["file_bytes"] == (tmp_path / "again.dqrm").stat().st_size > rec["total_bytes"]


def test_exported_rows_read_by_torch_quantized_ops(learnable_data):
    trainer, _ = _train_qat(learnable_data)
    served = export_qat(trainer.model).to_model(use_kernels=False)
    tables = served.embedding.export_torch_quantized()
    qat = trainer.model.embedding
    for t in (0, 2, 11):
        ids = torch.arange(len(tables[t]))
        got = quant.torch_pool(tables[t], Precision.INT4, ids, torch.arange(len(ids) + 1))
        torch.testing.assert_close(got, qat.table_weights(t), rtol=0, atol=1e-6)


def test_kaggle_sizes_match_the_paper():
    fp32 = model_bytes(KAGGLE_CARDINALITIES, 16, BOTTOM_MLP, TOP_MLP, 32, 32)
    int4 = model_bytes(KAGGLE_CARDINALITIES, 16, BOTTOM_MLP, TOP_MLP, 4, 4)
    assert fp32["embedding_values"] == 2_160_804_928                    # 2.161 GB
    assert round(sum(int4.values()) / 1e9, 3) == 0.270
    assert round(sum(model_bytes(KAGGLE_CARDINALITIES, 16, BOTTOM_MLP, TOP_MLP, 4, 32).values()) / 1e9,
                 3) == 0.272   # INT4 tables + FP32 MLP (the paper says 0.271)


def test_export_refuses_a_non_qat_model(learnable_data):
    trainer = Trainer(TrainConfig(data=str(learnable_data), max_train_samples=64, progress=False,
                                  embedding=EmbeddingConfig(kind="fp32", use_kernels=False)))
    with pytest.raises(UserError, match="--embedding qat"):
        export_qat(trainer.model)


# --- post-training quantization ---------------------------------------------------------

def test_ptq_trains_as_fp32_and_evaluates_quantized(learnable_data):
    common = dict(data=str(learnable_data), batch_size=64, max_train_samples=640, max_eval_samples=1000,
                  max_test_samples=1000, progress=False)
    fp32 = Trainer(TrainConfig(embedding=EmbeddingConfig(kind="fp32", use_kernels=False), **common))
    ptq = Trainer(TrainConfig(embedding=EmbeddingConfig(kind="ptq", use_kernels=False,
                                                        options={"bits": 4}), mlp_bits=4, **common))
    r_fp32, r_ptq = fp32.fit(), ptq.fit()
    # Same training (PTQ MLP layers are FP32 while training) ...
    assert torch.equal(fp32.model.embedding.weights, ptq.model.embedding.weights)
    assert torch.equal(fp32.model.top[0].weight, ptq.model.top[0].weight)
    # ... but evaluation reads row-wise INT4 tables and per-channel INT4 MLPs.
    assert r_fp32["test"]["auc"] != r_ptq["test"]["auc"]
    indices, offsets = _batch(fp32.model.config.embedding.cardinalities, 50, 0)
    ptq.model.eval()
    ref = QuantizedEmbeddingBag.from_float(ptq.model.embedding.weights,
                                           ptq.model.config.embedding.replace(kind="int4", options={})).eval()
    assert torch.equal(ptq.model.embedding(indices, offsets), ref(indices, offsets))
    assert r_ptq["embedding_stats"]["deployed_bytes"] == quant.values_bytes(
        Precision.INT4, fp32.model.config.embedding.total_rows, 16)


def test_ptq_per_table_granularity_uses_the_qat_grid():
    cfg = EmbeddingConfig(cardinalities=CARDS, dim=8, kind="ptq", use_kernels=False,
                          options={"bits": 4, "granularity": "table"})
    ptq = build_embedding(cfg).eval()
    qat = _qat(bits=4).eval()
    indices, offsets = _batch(CARDS, 20, 1)
    assert torch.equal(ptq(indices, offsets), qat(indices, offsets))


@pytest.mark.parametrize("kind,options,message", [
    ("qat", {"bits": 3}, "QAT bits must be one of"),
    ("qat", {"bits": 4, "scale_period": 0}, "scale period must be >= 1"),
    ("qat", {"bits": 4, "period": 5}, "unknown qat option"),
    ("ptq", {"bits": 16}, "row granularity takes bits"),
])
def test_bad_options_are_user_errors(kind, options, message):
    with pytest.raises(UserError, match=message):
        build_embedding(EmbeddingConfig(cardinalities=CARDS, kind=kind, options=options))


# --- resume and command line --------------------------------------------------------------

def test_qat_resume_gives_the_same_weights(learnable_data, tmp_path):
    ck = tmp_path / "ck.pt"
    kw = dict(mlp_bits=4, epochs=2)
    full, _ = _train_qat(learnable_data, **kw)
    cfg = TrainConfig(data=str(learnable_data), batch_size=64, max_train_samples=1280, max_eval_samples=2000,
                      max_test_samples=2000, progress=False, checkpoint=str(ck),
                      embedding=EmbeddingConfig(kind="qat", use_kernels=False,
                                                options={"bits": 4, "scale_period": 7}), **kw)
    assert Trainer(cfg).fit(stop_after=24) == {"stopped_at": 24}   # between two scale updates
    second = Trainer(cfg)
    second.load_checkpoint(ck)
    second.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    assert int(second.model.embedding.step) == 40 and int(second.model.embedding.scale_updates) == 6


def test_cli_trains_qat_and_ptq(learnable_data, tmp_path, capsys):
    from mpc.cli import main

    out = tmp_path / "qat.json"
    code = main(["train", "--data", str(learnable_data), "--out", str(out), "--embedding", "qat", "--bits", "4",
                "--mlp-bits", "4", "--scale-period", "2", "--max-train-samples", "640", "--no-progress",
                "--no-kernels", "--threads", "1", "--max-eval-samples", "1000", "--max-test-samples", "1000",
                 "--export", str(tmp_path / "model.dqrm")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rec = json.loads(out.read_text())
    assert rec["steps"] == 5 and rec["model"]["mlp_bits"] == 4
    assert rec["embedding_stats"]["scale_updates"] == 3            # steps 0, 2, 4
    assert rec["config"]["embedding"]["options"] == {"bits": 4, "scale_period": 2, "looked_up_only": True}
    assert "qat 4-bit: test AUC" in captured.out
    # the exported file serves the same test metrics, from 4-bit codes
    assert rec["export"]["test"] == rec["test"]
    assert rec["export"]["bytes"]["embedding_values"] == sum(rec["model"]["embedding"]["cardinalities"]) * 8
    assert rec["export"]["file_bytes"] > rec["export"]["total_bytes"]     # + torch.save framing
    code = main(["train", "--data", str(learnable_data), "--out", str(tmp_path / "p.json"), "--embedding", "ptq",
                 "--bits", "16"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "row granularity takes bits" in err
    code = main(["train", "--data", str(learnable_data), "--out", str(tmp_path / "p.json"), "--export",
                 str(tmp_path / "x.dqrm")])
    assert code == 2 and "--export needs --embedding qat" in capsys.readouterr().err
    code = main(["train", "--data", str(learnable_data), "--out", str(tmp_path / "p.json"), "--embedding", "int8",
                 "--bits", "4"])
    assert code == 2 and "--bits applies to --embedding qat|ptq, not int8" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "x.dqrm").exists()


# --- experiment helpers (mpc.dqrm) ----------------------------------------------------------

def test_dqrm_runs_are_tabulated_and_reused(learnable_data, tmp_path):
    from mpc import dqrm

    base = TrainConfig(data=str(learnable_data), batch_size=64, max_train_samples=640, max_eval_samples=1000,
                       max_test_samples=1000, progress=False,
                       embedding=EmbeddingConfig(kind="fp32", use_kernels=False))
    variants = dqrm.full_model_variants(bits=4, scale_period=3)
    runs = dqrm.run_variants(base, variants, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert dqrm.run_variants(base, variants, tmp_path) == runs                  # reused, not retrained
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    table = dqrm.full_model_table(runs).set_index("run")
    assert table.loc["dqrm int4", "paper_auc"] == 0.8073 and table.loc["ptq int4", "paper_auc"] == 0.7675
    rows = sum(runs["fp32"]["model"]["embedding"]["cardinalities"])   # the data's tables
    assert rows == sum(SMALL_CARDS)
    assert table.loc["fp32", "model_bytes"] == rows * 64 + 4 * sum(p.numel() for p in
                                                                  Trainer(base).model.dense_parameters())
    assert table.loc["ptq int4", "model_bytes"] - table.loc["dqrm int4", "model_bytes"] == 4 * rows - 4 * 26
    assert table.loc["dqrm int4", "test_auc"] == runs["dqrm int4"]["test"]["auc"]
    curves = dqrm.epoch_curves(runs)
    assert list(curves[curves.run == "fp32"].epoch) == [1]


def _base(data, **kw):
    return TrainConfig(data=str(data), batch_size=64, max_train_samples=640, max_eval_samples=1000,
                       max_test_samples=1000, progress=False,
                       embedding=EmbeddingConfig(kind="fp32", use_kernels=False), **kw)


def test_dqrm_runs_are_shared_between_names_and_kept_apart_by_config(learnable_data, tmp_path):
    from mpc import dqrm

    base = _base(learnable_data)
    bits_runs = dqrm.run_variants(base, dqrm.embedding_bits_variants((4,), scale_period=3), tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
    full = dqrm.full_model_variants(4, 3, ("table", "row"))
    assert [v.name for v in full] == ["fp32", "ptq int4 (table)", "ptq int4 (row)", "dqrm int4",
                                      "dqrm int4 mlp fp32"]
    full_runs = dqrm.run_variants(base, full, tmp_path)
    # "fp32" and "qat emb int4" = "dqrm int4 mlp fp32" were reused: 3 new runs only
    assert len(list(tmp_path.glob("*.json"))) == 5
    assert full_runs["dqrm int4 mlp fp32"] == bits_runs["qat emb int4"]
    assert full_runs["ptq int4 (table)"]["test"] != full_runs["ptq int4 (row)"]["test"]
    # the same name with another config (2 epochs) is a new file, the 1-epoch run stays
    two = dqrm.run_variants(dataclasses.replace(base, epochs=2), full[:1], tmp_path)
    assert len(list(tmp_path.glob("fp32-*.json"))) == 2 and two["fp32"]["steps"] == 2 * full_runs["fp32"]["steps"]
    assert dqrm.run_variants(base, full[:1], tmp_path)["fp32"] == full_runs["fp32"]
    seeds = dqrm.run_seeds(base, full[:1], tmp_path, seeds=(0, 1))
    assert seeds[0]["fp32"] == full_runs["fp32"] and seeds[1]["fp32"]["config"]["seed"] == 1
    assert seeds[1]["fp32"]["config"]["embedding"]["seed"] == 1
    assert seeds[1]["fp32"]["test"]["auc"] != seeds[0]["fp32"]["test"]["auc"]


def test_dqrm_full_int4_run_is_exported_and_measured(learnable_data, tmp_path):
    import math

    from mpc import dqrm

    base = _base(learnable_data)
    variants = dqrm.full_model_variants(bits=4, scale_period=3)
    assert [v.name for v in variants if v.export] == ["dqrm int4"]     # tables + MLP INT4 only
    runs = dqrm.run_variants(base, variants[-2:], tmp_path)
    rec = runs["dqrm int4"]
    e = rec["export"]
    assert "export" not in runs["dqrm int4 mlp fp32"]
    # measured: the file on disk, and the stored tensors (= the analytic count of this model)
    table = dqrm.full_model_table(runs).set_index("run")
    assert e["file_bytes"] > e["total_bytes"] == table.loc["dqrm int4", "model_bytes"] > 0
    assert table.loc["dqrm int4", "export_file_bytes"] == e["file_bytes"]
    assert table.loc["dqrm int4", "export_bytes"] == e["total_bytes"]
    assert math.isnan(table.loc["dqrm int4 mlp fp32", "export_file_bytes"])
    # the served export has the fake-quantized model's test metrics
    assert e["test"]["auc"] == pytest.approx(rec["test"]["auc"], abs=dqrm.EXPORT_TOLERANCE)
    assert e["test"]["logloss"] == pytest.approx(rec["test"]["logloss"], abs=dqrm.EXPORT_TOLERANCE)
    assert e["matches_fake_quant"] and e["fake_quant_test"]["auc"] == rec["test"]["auc"]
    assert table.loc["dqrm int4", "export_test_auc"] == e["test"]["auc"]
    assert abs(table.loc["dqrm int4", "export_auc_minus_fake_quant"]) <= dqrm.EXPORT_TOLERANCE
    assert e["path"] is None                                        # a temporary file, gone
    saved = json.loads(next(tmp_path.glob("dqrm_int4-*.json")).read_text())
    assert saved["export"] == e and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json"]
    exports = dqrm.export_table({0: runs})
    assert list(exports.run) == ["dqrm int4"] and bool(exports.matches_fake_quant.iloc[0])
    assert exports.file_overhead_bytes.iloc[0] == e["file_bytes"] - e["total_bytes"] > 0
    # reused with its export; a JSON of the same config without one is trained and exported again
    assert dqrm.run_variants(base, variants[-2:], tmp_path) == runs
    path = next(tmp_path.glob("dqrm_int4-*.json"))
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "export"}))
    assert dqrm.run_variants(base, variants[-2:-1], tmp_path)["dqrm int4"]["export"]["file_bytes"] == e["file_bytes"]
    assert "export" in json.loads(path.read_text())
    # a variant that needs no export reuses the exported run
    period = dqrm.run_variants(base, dqrm.scale_period_variants((3,)), tmp_path)
    assert period["dqrm int4 period 3"] == json.loads(path.read_text())


def test_mpc_variants_are_cached_low_precision_tables():
    from mpc import dqrm

    v = {x.name: x for x in dqrm.mpc_variants(["int8+5%lru", "int4+1%lfu"])}
    assert set(v) == {"mpc int8+5%lru", "mpc int4+1%lfu"}
    emb = v["mpc int4+1%lfu"].embedding
    assert (emb.kind, emb.cache.fraction, emb.cache.policy.value) == ("int4", 0.01, "lfu")
    assert v["mpc int8+5%lru"].mlp_bits == 32
    with pytest.raises(UserError):
        dqrm.mpc_variants(["int9+5%lru"])


def test_auc_standard_error_matches_the_spread_of_resampled_aucs():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from mpc.dqrm import auc_standard_error

    # at AUC 0.5 it is the Mann-Whitney null variance (n1 + n2 + 1) / (12 n1 n2)
    assert auc_standard_error(0.5, 100, 300) == pytest.approx((401 / (12 * 100 * 300)) ** 0.5, rel=1e-12)
    rng = np.random.default_rng(0)
    pos, neg = 60, 140
    aucs = [roc_auc_score(np.r_[np.ones(pos), np.zeros(neg)],
                          np.r_[rng.normal(1.0, 1, pos), rng.normal(0.0, 1, neg)]) for _ in range(300)]
    mean, spread = float(np.mean(aucs)), float(np.std(aucs))
    assert mean == pytest.approx(0.76, abs=0.01)
    assert auc_standard_error(mean, pos, neg) == pytest.approx(spread, rel=0.12)
    assert auc_standard_error(mean, 4 * pos, 4 * neg) == pytest.approx(auc_standard_error(mean, pos, neg) / 2,
                                                                       rel=0.02)
    assert np.isnan(auc_standard_error(0.7, 0, 10))


def test_seed_summary_averages_and_spreads_in_the_first_tables_order():
    import pandas as pd

    from mpc.dqrm import seed_summary

    a = pd.DataFrame({"run": ["fp32", "int4"], "bits": [32, 4], "test_auc": [0.70, 0.72], "note": ["x", "y"]})
    b = pd.DataFrame({"run": ["int4", "fp32"], "bits": [4, 32], "test_auc": [0.74, 0.72], "note": ["y", "x"]})
    s = seed_summary({0: a, 1: b})
    assert list(s.run) == ["fp32", "int4"] and list(s.note) == ["x", "y"] and list(s.seeds) == [2, 2]
    assert list(s.test_auc) == pytest.approx([0.71, 0.73])
    assert list(s.test_auc_std) == pytest.approx([0.02 ** 0.5 / 10, 0.02 ** 0.5 / 10])
    one = seed_summary({0: a})
    assert one.test_auc_std.isna().all() and list(one.test_auc) == [0.70, 0.72]


def test_scale_period_timing_pays_whole_periods_and_feeds_the_table(learnable_data, tmp_path):
    from mpc import dqrm

    base = _base(learnable_data)
    rec = dqrm.scale_period_timing(base, periods=(1, 3, 4), bits=4, mlp_bits=4, rounds=2, min_steps=13)
    assert (rec["params"]["steps"], rec["params"]["rounds"]) == (12, 2)     # 24 = 2 x lcm(1, 3, 4)
    sec = rec["results"]["seconds_per_step"]
    assert set(sec) == {"fp32", "qat period 1", "qat period 3", "qat period 4"} and min(sec.values()) > 0
    with pytest.raises(UserError, match="rounds"):
        dqrm.scale_period_timing(base, periods=(1, 3), rounds=5, min_steps=3)
    runs = dqrm.run_variants(base, dqrm.scale_period_variants((1, 3), bits=4), tmp_path)
    table = dqrm.scale_period_table(runs, rec).set_index("period")
    assert table.loc[3, "bench_vs_period_1"] == pytest.approx(sec["qat period 3"] / sec["qat period 1"])
    steps = runs["dqrm int4 period 3"]["steps"]
    assert list(table.scale_updates) == [steps, -(-steps // 3)]


def test_timed_steps_train_each_round_on_its_own_batches(monkeypatch):
    import mpc.bench.qat as bench_qat

    seen = {}
    monkeypatch.setattr(bench_qat, "sgd_step",
                        lambda model, opt, dense, *rest: seen.setdefault(id(model), []).append(int(dense[0, 0])))
    configs = {"fp32": EmbeddingConfig(cardinalities=CARDS, use_kernels=False),
               "qat": EmbeddingConfig(cardinalities=CARDS, kind="qat", use_kernels=False, options={"bits": 4})}
    ids, offsets = jagged_from_dense(torch.zeros(2, len(CARDS), dtype=torch.int64))
    batches = [(torch.full((2, 13), float(k)), ids, offsets, torch.zeros(2)) for k in range(6)]
    sec = bench_qat.time_qat_steps(configs, 2, steps=3, rounds=2, batches=batches)
    assert set(sec) == {"fp32", "qat"}
    # a warm-up step on the first batch, then round 0 trains batches 0-2 and round 1 batches 3-5
    assert list(seen.values()) == [[0, 0, 1, 2, 3, 4, 5]] * 2
    seen.clear()
    bench_qat.time_qat_steps(configs, 2, steps=3, rounds=2, batches=batches[:3])   # the same 3 each round
    assert list(seen.values()) == [[0, 0, 1, 2, 0, 1, 2]] * 2
    with pytest.raises(ValueError, match="5 batches"):
        bench_qat.time_qat_steps(configs, 2, steps=3, rounds=2, batches=batches[:5])


def test_combined_table_counts_kaggle_bytes_of_each_method(learnable_data, tmp_path):
    from mpc import dqrm
    from mpc.embedding import CacheConfig
    from mpc.memory import memory_row

    base = _base(learnable_data)
    variants = ([dqrm.Variant("fp32", EmbeddingConfig(kind="fp32"))] + dqrm.mpc_variants(["int8+5%lru"])
                + [dqrm.Variant("dqrm int4", dqrm.qat_embedding(4, 3), mlp_bits=4)])
    runs = dqrm.run_variants(base, variants, tmp_path)
    timing = dqrm.time_variants(base, variants, steps=3, rounds=1)
    t = dqrm.combined_table(runs, timing).set_index("run")
    mlp = 4 * 475_985
    rows = sum(KAGGLE_CARDINALITIES)
    assert t.loc["fp32", "kaggle_training_tables_gb"] * 1e9 == pytest.approx(rows * 64)
    assert t.loc["fp32", "kaggle_served_model_gb"] * 1e9 == pytest.approx(rows * 64 + mlp)
    cached = memory_row(KAGGLE_CARDINALITIES, 16, "int8", CacheConfig(fraction=0.05))["total_bytes"]
    assert t.loc["mpc int8+5%lru", "kaggle_training_tables_gb"] * 1e9 == pytest.approx(cached)
    assert t.loc["mpc int8+5%lru", "kaggle_served_model_gb"] * 1e9 == pytest.approx(rows * (16 + 8) + mlp)
    served = sum(model_bytes(KAGGLE_CARDINALITIES, 16, BOTTOM_MLP, TOP_MLP, 4, 4).values())
    assert t.loc["dqrm int4", "kaggle_served_model_gb"] * 1e9 == pytest.approx(served)
    assert t.loc["dqrm int4", "kaggle_training_tables_gb"] * 1e9 == pytest.approx(rows * 64 + 4 * 26)
    assert 0 < t.loc["mpc int8+5%lru", "cache_hit_rate"] < 1 and pd_isna(t.loc["fp32", "cache_hit_rate"])
    sec = timing["results"]["seconds_per_step"]
    assert t.loc["dqrm int4", "timed_speed_vs_fp32"] == pytest.approx(sec["fp32"] / sec["dqrm int4"])
    assert t.loc["dqrm int4", "served_size_vs_fp32"] == pytest.approx((rows * 64 + mlp) / served)


def pd_isna(x) -> bool:
    return x is None or x != x


def test_kaggle_communication_is_near_the_paper():
    from mpc import dqrm

    table = dqrm.communication_table(local_batch=32).set_index("mode")
    assert table.loc["none", "kaggle_bytes"] == 2_160_804_928 + 4 * 475_985 + 4
    # our byte count for the paper's setting (batch 128 over 4 GPUs) lands within 5% of its figures
    for mode in ("sparse", "sparse-int8"):
        assert table.loc[mode, "kaggle_bytes"] == pytest.approx(table.loc[mode, "paper_bytes"], rel=0.05)


def test_compiled_kernels_give_the_reference_results():
    # QAT pools fake-quantized values through the FP32 kernels and serves exports through
    # the INT4 ones; the ops contract makes both byte-identical to the reference.
    ref, fast = _qat(bits=4, period=2), _qat(bits=4, period=2, use_kernels=True)
    for step in range(4):
        batch = _batch(CARDS, 32, 20 + step)
        out_ref, _ = _train_step(ref, *batch, seed=step)
        out_fast, _ = _train_step(fast, *batch, seed=step)
        assert torch.equal(out_ref, out_fast)
    assert torch.equal(ref.weights, fast.weights)
