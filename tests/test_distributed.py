"""Data-parallel training (2 local gloo ranks): the same model as one process on the same
global batch, the exact bytes of each exchange mode, INT8 training quality and its
error-feedback checkpoint, torchrun. (One-rank error feedback and the backend choice:
tests/test_grad_exchange.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpc.embedding import EmbeddingConfig, build_embedding
from mpc.grad_exchange import GradCompression, analytic_bytes
from mpc.distributed import DistributedConfig, _shard, one_row_bags, run_local
from mpc.train import Trainer, TrainConfig

EXACT_SAMPLES = 641        # 10 batches of 64 and one of 1: rank 1 has an empty shard
INT8_SAMPLES = 4096
QAT = EmbeddingConfig(kind="qat", use_kernels=False, options={"bits": 4, "scale_period": 3})
FP32 = EmbeddingConfig(kind="fp32", use_kernels=False)


def _config(data, embedding, samples, **kw):
    return TrainConfig(data=str(data), embedding=embedding, batch_size=64, max_train_samples=samples,
                       max_eval_samples=1000, max_test_samples=2000, progress=False, threads=1, **kw)


@pytest.fixture(scope="module")
def runs(learnable_data, tmp_path_factory):
    """One pair of processes trains all the distributed runs (process start-up is the cost)."""
    tmp = tmp_path_factory.mktemp("dist")
    jobs = {
        "none": (_config(learnable_data, QAT, EXACT_SAMPLES, checkpoint=str(tmp / "none.pt"), mlp_bits=4),
                 DistributedConfig("none")),
        "sparse": (_config(learnable_data, QAT, EXACT_SAMPLES, checkpoint=str(tmp / "sparse.pt"), mlp_bits=4),
                   DistributedConfig("sparse")),
        "sparse-int8": (_config(learnable_data, FP32, INT8_SAMPLES, checkpoint=str(tmp / "int8.pt")),
                        DistributedConfig("sparse-int8")),
    }
    results = run_local(list(jobs.values()), world_size=2, threads=1)
    return {name: (res, jobs[name][0]) for name, res in zip(jobs, results)}


@pytest.fixture(scope="module")
def single(learnable_data):
    before = torch.get_num_threads()
    exact = Trainer(_config(learnable_data, QAT, EXACT_SAMPLES, mlp_bits=4))
    out = {"exact": (exact, exact.fit())}
    int8 = Trainer(_config(learnable_data, FP32, INT8_SAMPLES))
    out["int8"] = (int8, int8.fit())
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("mode", ["none", "sparse"])
def test_same_model_as_one_process(runs, single, mode):
    result, config = runs[mode]
    trainer, ref = single["exact"]
    weights = torch.load(config.checkpoint, weights_only=False)["model"]
    mine = trainer.model.state_dict()
    assert set(weights) == set(mine)
    for k, v in mine.items():
        torch.testing.assert_close(weights[k].float(), v.float(), rtol=0, atol=1e-6, msg=k)
    assert result["steps"] == 11 and result["samples"] == EXACT_SAMPLES
    assert result["test"]["auc"] == pytest.approx(ref["test"]["auc"], abs=1e-4)
    # the QAT scale period ran in step on both ranks (the empty shard included)
    assert result["embedding_stats"]["scale_updates"] == ref["embedding_stats"]["scale_updates"] == 4


def _shard_rows(config: TrainConfig) -> list[tuple[int, int]]:
    """Distinct rows each of the two ranks looked up, per step, replaying the loader."""
    trainer = Trainer(dataclasses.replace(config, checkpoint=None))
    offsets = trainer.model.embedding.table_offsets[:-1]
    out = []
    for batch in trainer.train_loader.batches(0):
        counts = []
        for rank in (0, 1):
            lo, hi = _shard(len(batch), rank, 2)
            counts.append(len(torch.unique(batch.cat[lo:hi] + offsets)))
        out.append(tuple(counts))
    return out


def test_bytes_counted_per_mode(runs, single):
    model = single["exact"][0].model
    emb = model.config.embedding
    P = sum(p.numel() for p in model.dense_parameters())
    n_tensors = len(model.dense_parameters())
    dense = runs["none"][0]["distributed"]
    assert dense["bytes_per_iteration"] == analytic_bytes(emb.total_rows, emb.num_tables, emb.dim, P, n_tensors,
                                                          GradCompression.NONE, 0)
    assert dense["bytes_per_iteration"]["embedding_values"] == emb.total_rows * 16 * 4
    # sparse: each rank sends the largest rank's row count (all_gather needs equal sizes)
    steps = _shard_rows(runs["sparse"][1])
    widest = sum(max(c) for c in steps)
    sent = runs["sparse"][0]["distributed"]["bytes_sent_total"]
    assert sent["embedding_ids"] == 4 * widest and sent["embedding_values"] == 64 * widest
    assert sent["mlp_values"] == 4 * P * len(steps) and sent["embedding_counts"] == 4 * len(steps)
    int8 = runs["sparse-int8"][0]["distributed"]["bytes_per_iteration"]
    assert int8["mlp_values"] == P and int8["mlp_scales"] == 4 * n_tensors
    assert int8["embedding_scales"] == 4 * emb.num_tables
    assert int8["embedding_values"] * 4 == int8["embedding_ids"] * 16     # 1 byte vs 4 per id, D = 16
    assert sum(int8.values()) < sum(dense["bytes_per_iteration"].values()) / 3


def test_int8_trains_close_to_one_process(runs, single):
    result, _ = runs["sparse-int8"]
    ref = single["int8"][1]
    assert ref["test"]["auc"] > 0.62                                     # it learns at all
    assert result["test"]["auc"] == pytest.approx(ref["test"]["auc"], abs=0.02)
    assert result["test"]["auc"] != ref["test"]["auc"]                   # and it did quantize


def test_int8_checkpoint_keeps_every_ranks_error_feedback(runs, single):
    result, config = runs["sparse-int8"]
    assert result["distributed"]["backend"] == "gloo" and result["distributed"]["error_feedback"] is True
    residuals = torch.load(config.checkpoint, weights_only=False)["error_feedback"]
    P = sum(p.numel() for p in single["int8"][0].model.dense_parameters())
    assert len(residuals) == 2 and all(r.shape == (P,) for r in residuals)
    # each rank carries its own rounding error of its own gradient shard
    assert all(bool(r.ne(0).any()) for r in residuals) and not torch.equal(residuals[0], residuals[1])
    # the uncompressed modes keep none
    assert torch.load(runs["sparse"][1].checkpoint, weights_only=False)["error_feedback"] is None


def test_one_row_bags_apply_exactly_these_rows():
    cfg = EmbeddingConfig(cardinalities=(4, 9, 2), dim=3, kind="fp32", use_kernels=False)
    emb = build_embedding(cfg)
    emb.set_learning_rate(0.25)
    before = emb.weights.clone()
    rows = torch.tensor([1, 3, 4, 5, 12, 14])
    grads = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    emb.backward_update(*one_row_bags(rows, grads, emb.table_offsets))
    want = before.clone()
    want[rows] -= 0.25 * grads
    assert torch.equal(emb.weights, want)
    assert [_shard(5, r, 2) for r in (0, 1)] == [(0, 3), (3, 5)]
    assert [_shard(1, r, 2) for r in (0, 1)] == [(0, 1), (1, 1)]


def test_torchrun_command(learnable_data, tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run(   # torchrun, by its module name
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mpc", "train", "--distributed",
         "--grad-compression", "sparse-int8", "--data", str(learnable_data), "--out", str(out),
         "--max-train-samples", "256", "--max-eval-samples", "500", "--max-test-samples", "500",
         "--no-progress", "--no-kernels", "--threads", "1", "--embedding", "qat", "--mlp-bits", "4"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test AUC") == 1                           # rank 0 alone reports
    rec = json.loads(out.read_text())
    assert rec["distributed"]["world_size"] == 2 and rec["distributed"]["compression"] == "sparse-int8"
    assert rec["samples"] == 256 and rec["steps"] == 2
    assert list(Path(tmp_path).iterdir()) == [out]
