"""The notebooks, executed by papermill with the `quick` profile, record sane values.

One `reproduce --profile quick` run (into a temporary results folder) serves every
test here; each asserts values that a broken pipeline would not produce.
"""

from __future__ import annotations

import json
import re
import math

import pytest

from mpc import results
from mpc.memory import memory_row
from mpc.embedding import CacheConfig
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.report import CLAIMS
from mpc.reproduce import notebooks, reproduce, run_notebook


@pytest.fixture(scope="module")
def quick(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("results")
    monkeypatch_module.setenv("MPC_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    outcomes = reproduce("quick", results_root=root, progress=False)
    return root, {o.name: o for o in outcomes}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _values(root, name):
    rec = results.load(name, root)
    assert rec is not None, f"{name} recorded nothing"
    assert rec["provenance"]["commit"] and rec["parameters"]
    return rec["values"]


def test_every_notebook_runs(quick):
    root, outcomes = quick
    assert sorted(outcomes) == notebooks() and len(outcomes) == 6
    failed = {n: o.error for n, o in outcomes.items() if not o.ok}
    assert not failed
    for name in outcomes:
        assert (root / "executed" / f"{name}.ipynb").is_file()


def test_memory_ratios_equal_the_analytic_ones(quick):
    v = _values(quick[0], "01_memory_reduction")
    grid = {(r["precision"], r["cache_fraction"]): r for r in v["grid"]}
    int8 = grid[("int8", 0.05)]
    assert int8["reduction_bits_only"] == pytest.approx(32 / (8 + 32 * 0.05))
    exact = memory_row(KAGGLE_CARDINALITIES, 16, "int8", CacheConfig(0.05, "lru", 32))
    assert int8["total_bytes"] == exact["total_bytes"]
    assert grid[("int4", 0.01)]["reduction_bits_only"] == pytest.approx(32 / 4.32)
    assert all(m["matches"] for m in v["measured"]) and len(v["measured"]) == 2


def test_accuracy_table(quick):
    v = _values(quick[0], "02_accuracy")
    rows = {r["config"]: r for r in v["table"]}
    assert set(rows) == {"fp32", "int8", "int8+5%lru", "int4+1%lfu"}
    assert rows["fp32"]["auc"] > 0.62  # tiny data, 2 seeds: well above chance
    for name, r in rows.items():
        assert 0.5 < r["auc"] < 1 and 0 < r["logloss"] < 1 and r["seeds"] == 2
        assert abs(r["d_auc"]) < 0.05  # same recipe: low precision stays close
    assert 0 < rows["int8+5%lru"]["hit_rate"] < 1 and math.isnan(rows["int8"]["hit_rate"])
    assert rows["int8"]["embedding_MB"] < rows["fp32"]["embedding_MB"] / 2
    assert {c["config"] for c in v["curves"]} == set(rows)


def test_speed_traffic_follows_row_sizes(quick):
    v = _values(quick[0], "03_speedup")
    names = {r["config"] for r in v["throughput"]}
    assert {"baseline", "mpc fp32", "mpc int8+5%lru"} <= names
    model = v["transfer_model"]
    fp32_cache, mpc = model[1]["bytes_per_iteration"], model[2]["bytes_per_iteration"]
    assert mpc == pytest.approx(fp32_cache * 24 / 64)  # same row movements, INT8 rows vs FP32 rows
    assert model[2]["mpc_speedup"] == 1.0 and model[1]["mpc_speedup"] >= 1.0


def test_cache_hit_rate_grows_with_size_and_skew(quick):
    v = _values(quick[0], "04_cache_behaviour")
    lru = [r for r in v["size_sweep"] if r["policy"] == "lru" and r["order"] == "file"]
    by_size = sorted(lru, key=lambda r: r["cache_fraction"])
    assert by_size[-1]["hit_rate"] > by_size[0]["hit_rate"]
    zipf = [r for r in v["zipf"] if r["policy"] == "lru"]
    assert zipf[-1]["hit_rate"] > zipf[0]["hit_rate"]


def test_dqrm_sizes_communication_and_tables(quick):
    v = _values(quick[0], "05_dqrm")
    sizes = {r["model"]: r for r in v["sizes"]}
    assert sizes["FP32"]["total_gb"] == pytest.approx(2.1627, abs=1e-3)
    assert sizes["INT4 tables + INT4 MLP (DQRM)"]["total_gb"] == pytest.approx(0.2704, abs=1e-3)
    comm = {r["mode"]: r for r in v["communication"]}
    # Kaggle byte counts are analytic; the 2-rank runs measured real payloads that shrink ~4x with INT8.
    assert comm["none"]["kaggle_bytes"] > 1000 * comm["sparse"]["kaggle_bytes"]
    assert 3 < comm["sparse"]["measured_bytes"] / comm["sparse-int8"]["measured_bytes"] < 4.5
    assert all(0.5 < r["measured_auc"] < 1 for m, r in comm.items() if m != "none")
    full = {r["run"]: r for r in v["full_model"]}
    assert {"fp32", "ptq int4", "dqrm int4"} <= set(full)
    assert full["dqrm int4"]["model_bytes"] < full["fp32"]["model_bytes"] / 6
    assert full["fp32"]["test_auc"] > 0.6
    periods = {r["period"]: r for r in v["scale_period"]}
    assert periods[1]["scale_updates"] > periods[200]["scale_updates"] >= 1
    assert {r["run"] for r in v["combined"]} == {"fp32", "mpc int8+5%lru", "dqrm int4"}
    assert sorted({r["epoch"] for r in v["epoch_curves"]}) == [1, 2]
    # the exported INT4 model: a real file, smaller than FP32, serving the same predictions
    assert v["export"] and all(r["matches_fake_quant"] for r in v["export"])
    assert full["dqrm int4"]["export_file_bytes"] > full["dqrm int4"]["export_bytes"] > 0
    assert abs(full["dqrm int4"]["export_auc_minus_fake_quant"]) <= 1e-4


def test_inference_study_checks_every_runtime_against_eager(quick):
    v = _values(quick[0], "06_inference_acceleration")
    present = {r["runtime"] for r in v["runtimes"] if r["available"]}
    assert {"eager", "torch_export", "torch_compile"} <= present
    checks = v["checks"]
    assert set(checks["rows_by_runtime"]) == present
    assert checks["fp32_max_abs_diff_vs_baseline"] < 1e-4
    assert checks["speedup_is_ratio_of_medians"] and checks["throughput_is_batch_over_median"]
    assert 0.5 < checks["noise_geomean"] < 2  # the baseline timed against itself is ~1x
    assert v["rows"] > 0 and {r["runtime"] for r in v["runtime_speedup"]} == present | {"baseline vs itself (noise)"}


def test_report_has_a_row_per_paper_claim(quick):
    text = (quick[0] / "REPORT.md").read_text()
    for claim in CLAIMS:
        assert claim.statement.replace("|", "\\|") in text
    assert "not measured yet" not in text
    for c in CLAIMS:
        assert c.id in _values(quick[0], c.notebook)["claims"], c.id


def test_a_failing_notebook_replaces_no_results(quick):
    root = quick[0]
    before = (root / "01_memory_reduction" / "results.json").read_text()
    outcome = run_notebook("01_memory_reduction", {"PRECISIONS": ["int9"]}, root, progress=False)
    assert not outcome.ok and "int9" in outcome.error
    assert (root / "01_memory_reduction" / "results.json").read_text() == before
    assert (root / "executed" / "01_memory_reduction.failed.ipynb").is_file()
    assert not any(p.name.startswith(".01_memory_reduction.") for p in root.iterdir())  # no staging left


def test_reproduce_goes_on_after_a_failure_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """The command, end to end: one notebook fails, the next still runs, exit code 1 names it."""
    from mpc import profiles
    from mpc.cli import main

    quick = dict(profiles.PROFILES["quick"])
    quick["01_memory_reduction"] = {"PRECISIONS": ["int9"]}  # an impossible value: the notebook raises
    monkeypatch.setitem(profiles.PROFILES, "quick", quick)
    code = main(["reproduce", "--profile", "quick", "--only", "01_memory_reduction", "04_cache_behaviour",
                 "--results", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "failed: 01_memory_reduction" in err
    assert not (tmp_path / "01_memory_reduction").exists()             # nothing of the failed one
    assert (tmp_path / "executed" / "01_memory_reduction.failed.ipynb").is_file()
    assert (tmp_path / "04_cache_behaviour" / "results.json").is_file()  # the next one ran
    assert "04_cache_behaviour" in (tmp_path / "REPORT.md").read_text()


def test_a_notebook_runs_with_no_parameters(tmp_path):
    outcome = run_notebook("01_memory_reduction", {}, tmp_path, progress=False)
    assert outcome.ok, outcome.error
    rec = json.loads((tmp_path / "01_memory_reduction" / "results.json").read_text())
    assert rec["parameters"]["MEASURE_SCALE"] == 0.01  # the notebook's own default


def test_papermill_sees_every_parameter():
    """`papermill --help-notebook` and its injection warnings read the same cell: a comment
    papermill cannot parse (an '=' in it) would hide the parameter from users."""
    import nbformat
    import papermill as pm

    from mpc.reproduce import NOTEBOOK_DIR

    for name in notebooks():
        path = NOTEBOOK_DIR / f"{name}.ipynb"
        cell = next(c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", []))
        declared = [line.split("=")[0].strip() for line in cell.source.splitlines() if line[:1].isupper()]
        found = set(pm.inspect_notebook(str(path)))
        assert declared and set(declared) <= found, (name, sorted(set(declared) - found))
        statements = re.split(r"\n(?=[A-Z])", cell.source.strip())  # a parameter and its continuation lines
        assert all("#" in st for st in statements), (name, [st for st in statements if "#" not in st])


def test_profiles_only_set_parameters_the_notebooks_have():
    import nbformat

    from mpc.profiles import PROFILES
    from mpc.reproduce import NOTEBOOK_DIR

    for profile, entries in PROFILES.items():
        assert set(entries) == set(notebooks()), profile
        for name, params in entries.items():
            cell = next(c for c in nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", 4).cells
                        if "parameters" in c.metadata.get("tags", []))
            declared = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
            assert set(params) <= declared, (profile, name, set(params) - declared)
