"""Training loop: determinism, checkpoint/resume, the run record, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpc.embedding import EmbeddingConfig
from mpc.errors import DataError, UserError
from mpc.train import Trainer, TrainConfig, run

from conftest import SMALL_CARDS


def _config(data, **kw):
    kw.setdefault("embedding", EmbeddingConfig(kind="fp32"))
    kw.setdefault("batch_size", 64)
    kw.setdefault("eval_every", 40)
    return TrainConfig(data=str(data), progress=False, **kw)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_training_learns_and_records(learnable_data, tmp_path):
    out = tmp_path / "run.json"
    result = run(_config(learnable_data, epochs=3), out)
    rec = json.loads(out.read_text())
    assert rec["test"]["auc"] == pytest.approx(result["test"]["auc"])
    # The labels depend on a dense feature and on ids: a working loop learns them.
    assert rec["test"]["auc"] > 0.70
    first, last = rec["history"][0], rec["history"][-1]
    assert last["auc"] > first["auc"]
    assert rec["history"][-1]["epoch"] == 3.0 and 0 < rec["history"][0]["epoch"] < 1
    assert rec["steps"] == 3 * -(-12000 // 64)
    for key in ("samples_per_second", "peak_rss_bytes", "embedding_bytes", "provenance", "config"):
        assert rec[key]
    assert rec["embedding_total_bytes"] == sum(SMALL_CARDS) * 16 * 4
    assert rec["provenance"]["machine"]["torch"] == torch.__version__


def test_deterministic_for_a_seed(learnable_data):
    a, b = Trainer(_config(learnable_data)), Trainer(_config(learnable_data))
    ra, rb = a.fit(), b.fit()
    assert ra["test"] == rb["test"]
    for k, v in _weights(a).items():
        assert torch.equal(v, _weights(b)[k]), k
    c = Trainer(_config(learnable_data, seed=1))
    c.fit()
    assert not torch.equal(_weights(c)["embedding.weights"], _weights(a)["embedding.weights"])


def test_resume_gives_the_same_weights(learnable_data, tmp_path):
    ck = tmp_path / "ck.pt"
    full = Trainer(_config(learnable_data, epochs=2))
    full_result = full.fit()

    first = Trainer(_config(learnable_data, epochs=2, checkpoint=str(ck)))
    assert first.fit(stop_after=250) == {"stopped_at": 250}  # inside the second epoch
    second = Trainer(_config(learnable_data, epochs=2, checkpoint=str(ck)))
    second.load_checkpoint(ck)
    resumed = second.fit()
    for k, v in _weights(full).items():
        assert torch.equal(v, _weights(second)[k]), k
    assert resumed["test"] == full_result["test"]
    assert [h["auc"] for h in resumed["history"]] == [h["auc"] for h in full_result["history"]]


def test_checkpoint_of_another_run_is_refused(learnable_data, tmp_path):
    ck = tmp_path / "ck.pt"
    Trainer(_config(learnable_data, checkpoint=str(ck))).fit(stop_after=5)
    other = Trainer(_config(learnable_data, lr=0.05, checkpoint=str(ck)))
    with pytest.raises(UserError, match="lr"):
        other.load_checkpoint(ck)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        other.load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch-size must be positive"),
    ("epochs", -1, "epochs must be positive"),
    ("lr", 0.0, "learning rate must be > 0"),
    ("max_train_samples", 0, "max-train-samples must be positive"),
])
def test_impossible_options(learnable_data, field, value, message):
    with pytest.raises(UserError, match=message):
        _config(learnable_data, **{field: value})


def _corrupt_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    arr = np.memmap(dst / ("dense.f32" if edit == "nan" else "cat.i32"), mode="r+",
                    dtype=np.float32 if edit == "nan" else np.int32,
                    shape=(meta["rows"], 13 if edit == "nan" else 26))
    if edit == "nan":
        arr[5, 3] = np.nan
    else:
        arr[7, 2] = meta["cardinalities"][2] + 4
    arr.flush()
    return dst


@pytest.mark.parametrize("edit,pattern", [("nan", r"row 5, field I4: dense value is not finite"),
                                          ("id", r"row 7, field C3: id out of range")])
def test_bad_rows_are_named(learnable_data, tmp_path, edit, pattern):
    bad = _corrupt_copy(learnable_data, tmp_path / "bad", edit)
    trainer = Trainer(_config(bad, max_train_samples=64))
    trainer.train_loader.shuffle = False
    with pytest.raises(DataError, match=pattern):
        trainer.fit()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mpc", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path, learnable_data):
    for args, needle in [
        (["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r.json")], "data folder not found"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "r.json")], "no meta.json"),
        (["train", "--data", str(learnable_data), "--out", str(tmp_path / "r.json"), "--batch-size", "0"],
         "must be positive"),
        (["train", "--data", str(learnable_data), "--out", str(tmp_path / "r.json"),
          "--cache-fraction", "0.05"], "needs a low-precision --embedding"),
    ]:
        proc = _cli(*args)
        assert proc.returncode != 0
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r.json").exists()


def test_cli_train_writes_the_run(tmp_path, learnable_data):
    out = tmp_path / "run.json"
    proc = _cli("train", "--data", str(learnable_data), "--out", str(out), "--max-train-samples", "2000",
                "--no-progress", "--batch-size", "256")
    assert proc.returncode == 0, proc.stderr
    assert "test AUC" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["samples"] == 2000 and rec["config"]["batch_size"] == 256
