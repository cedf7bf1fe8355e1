"""The DQRM claims' wording (mpc.dqrm_claims): verdicts follow the numbers and the noise."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mpc import dqrm, dqrm_claims

DATA = "test data"


def _bits(fp32_auc, int4_auc, se=0.001, std=math.nan):
    return pd.DataFrame({"run": ["fp32", "qat emb int4"], "bits": [32, 4], "test_auc": [fp32_auc, int4_auc],
                         "test_accuracy": [78.0, 78.1], "test_logloss": [0.46, 0.46], "test_samples": [50_000] * 2,
                         "test_auc_se": [se, se], "test_auc_std": [std, std]})


@pytest.mark.parametrize("int4_auc, se, word", [
    (0.7060, 0.001, "reproduced"),            # +0.006 > 2 * sqrt(2) * 0.001
    (0.7010, 0.001, "consistent"),            # within noise 0.0028 > the paper's 0.0026
    (0.7010, 0.0005, "partly"),               # within noise 0.0014 < the paper's 0.0026: gain absent
    (0.6900, 0.001, "not reproduced"),
])
def test_embedding_only_verdict_follows_difference_and_noise(int4_auc, se, word):
    claim = dqrm_claims.embedding_only(_bits(0.7000, int4_auc, se), DATA)
    assert claim["verdict"].startswith(word) and claim["data"] == DATA
    assert f"{int4_auc - 0.7:+.4f}" in claim["ours"]


def test_seed_spread_widens_the_noise():
    rows = _bits(0.7, 0.704, se=0.001, std=0.003)
    a, b = rows.iloc[0], rows.iloc[1]
    assert dqrm_claims.auc_noise(a, b) == pytest.approx(2 * math.hypot(0.003, 0.003))
    assert dqrm_claims.compare(0.004, dqrm_claims.auc_noise(a, b)) == "equal"
    rows = _bits(0.7, 0.704, se=0.001)
    assert dqrm_claims.compare(0.004, dqrm_claims.auc_noise(rows.iloc[0], rows.iloc[1])) == "higher"


def _full(fp32_auc, ptq_auc, dqrm_auc, se=0.001, dqrm_accuracy=78.0):
    return pd.DataFrame({"run": ["fp32", "ptq int4 (table)", "ptq int4 (row)", "dqrm int4"],
                         "model_bytes": [2_000_000, 300_000, 400_000, 280_000],
                         "kaggle_size_gb": [2.1627, 0.2704, 0.4054, 0.2704],
                         "test_auc": [fp32_auc, ptq_auc, fp32_auc, dqrm_auc], "test_auc_se": [se] * 4,
                         "test_accuracy": [78.0, 78.0, 78.0, dqrm_accuracy], "test_logloss": [0.46] * 4,
                         "test_samples": [50_000] * 4})


def test_full_model_and_ptq_verdicts():
    full = _full(0.700, 0.650, 0.701)
    claim = dqrm_claims.full_model(full, DATA)
    assert claim["verdict"].startswith("size reproduced") and "equal to FP32 within noise" in claim["verdict"]
    assert "8.00x smaller" in claim["ours"]
    ptq = dqrm_claims.ptq(full, DATA)
    # the table-wise PTQ loses, the row-wise one (equal to FP32 here) does not
    assert ptq["verdict"].startswith("partly reproduced")
    assert "ptq int4 (table) loses AUC to FP32 and DQRM" in ptq["verdict"]
    no_loss = _full(0.700, 0.699, 0.701)
    assert dqrm_claims.ptq(no_loss, DATA)["verdict"].startswith("not reproduced")
    accuracy_only = no_loss.assign(test_accuracy=[78.0, 77.0, 78.0, 78.0])
    verdict = dqrm_claims.ptq(accuracy_only, DATA)["verdict"]
    assert verdict.startswith("partly reproduced (accuracy, not AUC)") and "1.00 points lower" in verdict
    worse = dqrm_claims.full_model(_full(0.700, 0.650, 0.690), DATA)
    assert "AUC below FP32 by 0.0100" in worse["verdict"]
    # binomial noise of 50,000 samples at 78%: 2 * sqrt(2) * 0.185 = 0.52 points
    assert "points" not in dqrm_claims.full_model(_full(0.7, 0.65, 0.7, dqrm_accuracy=77.6), DATA)["verdict"]
    lower = dqrm_claims.full_model(_full(0.7, 0.65, 0.7, dqrm_accuracy=77.3), DATA)["verdict"]
    assert "equal to FP32 within noise" in lower and "accuracy is 0.70 points lower than FP32's" in lower


def _periods(ms1, ms200, auc1=0.7, auc200=0.7):
    return pd.DataFrame({"run": ["p1", "p200"], "period": [1, 200], "test_auc": [auc1, auc200],
                         "test_auc_se": [0.001, 0.001], "bench_ms_per_step": [ms1, ms200],
                         "bench_vs_period_1": [1.0, ms200 / ms1]})


def test_scale_period_verdict_compares_ratios():
    fast = dqrm_claims.scale_period(_periods(10.0, 6.0), DATA)
    assert fast["verdict"].startswith("reproduced") and "0.60 vs the paper's 0.71" in fast["verdict"]
    assert dqrm_claims.scale_period(_periods(10.0, 10.2), DATA)["verdict"].startswith("not reproduced: no")
    assert dqrm_claims.scale_period(_periods(10.0, 12.0), DATA)["verdict"].startswith("not reproduced: period")
    other = _periods(10.0, 6.0).replace({200: 20})
    assert "for period 200" in dqrm_claims.scale_period(other, DATA, period=20)["verdict"]


def test_communication_verdict_from_the_analytic_table():
    table = dqrm.communication_table()
    claim = dqrm_claims.communication(table, DATA, 2)
    assert claim["verdict"].startswith("reproduced") and "2.1627 GB -> 1.961 MB -> 0.493 MB" in claim["ours"]
    table["measured_bytes"] = [3e6, 1e6, 2e6]     # out of order
    table["measured_auc"] = [0.7, 0.7, 0.7]
    assert "do not fall" in dqrm_claims.communication(table, DATA, 2)["verdict"]


def _curves(fp32, int4):
    rows = [{"run": r, "epoch": e + 1, "val_auc": v} for r, vs in (("fp32", fp32), ("dqrm int4", int4))
            for e, v in enumerate(vs)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fp32, int4, word", [
    ([0.70, 0.72, 0.71, 0.69], [0.69, 0.71, 0.72, 0.73], "reproduced"),
    ([0.70, 0.72, 0.71, 0.69], [0.69, 0.72, 0.71, 0.70], "partly"),
    ([0.70, 0.71, 0.72, 0.73], [0.69, 0.71, 0.72, 0.73], "not reproduced"),
    ([0.72, 0.7195, 0.7192, 0.7191], [0.69, 0.71, 0.72, 0.73], "not reproduced"),   # falls < 0.001
    ([0.70, 0.72], [0.69, 0.71], "not tested"),
])
def test_overfitting_verdict(fp32, int4, word):
    claim = dqrm_claims.overfitting(_curves(fp32, int4), DATA)
    assert claim["verdict"].startswith(word)
