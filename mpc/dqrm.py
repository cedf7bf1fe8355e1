"""DQRM experiments: the runs behind each of the paper's tables, and the tables themselves.

The notebook notebooks/05_dqrm stays thin: it picks a base TrainConfig (data, samples,
epochs) and calls these. Every run is `mpc.train.run` (or `mpc.distributed.run_local`
for the communication table) writing its run JSON under `out_dir`; a JSON already
there with the same config is reused, so a notebook re-run does not retrain.

    variants                          what it compares (PAPERS.md §2)
    embedding_bits_variants()         FP32 vs QAT tables at 16/8/4 bits, MLP FP32
    full_model_variants()             FP32, PTQ INT4, DQRM INT4 (tables + MLP), INT4 tables + FP32 MLP
    scale_period_variants()           DQRM INT4 with scale periods 1, 200, 500
    epoch_comparison()                FP32 vs DQRM INT4 over several epochs (overfitting claim)
    communication_runs()              data-parallel none / sparse / sparse-int8 (2 local ranks)
    mpc_variants()                    MPC's cached low-precision tables (for the combined table)

    timing (interleaved training steps on the data's own batches, one process)
    time_variants()                   any variants, e.g. FP32 vs MPC vs DQRM
    scale_period_timing()             DQRM with each scale period (and FP32)

Run JSONs are named `<variant>-<config hash>.json`, so one folder holds every run and a
run with the same config under another name (e.g. "qat emb int4" and "dqrm int4 mlp
fp32") is trained once. A variant with `export=True` (DQRM INT-b, tables + MLP, in
full_model_variants) is also exported after training (mpc.qat_export.export_and_evaluate,
to a temporary file): its JSON's "export" holds the measured file bytes, the stored
tensors' bytes and the served model's test metrics beside the fake-quantized model's;
`full_model_table` and `export_table` show them.

Tables: `bits_table`, `full_model_table`, `export_table`, `scale_period_table`,
`epoch_curves`, `communication_table`, `size_table`, `combined_table`; each puts the
paper's figure (mpc/paper_numbers.json) beside ours where the paper has one (with its
"check" note where PAPERS.md does not state that figure or contradicts it), and
`seed_summary` averages a table over seeds. The claims of the report (mpc.report) are
worded from these tables by mpc.dqrm_claims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mpc.criteo import BOTTOM_MLP, KAGGLE_CARDINALITIES, TOP_MLP
from mpc.embedding import CacheConfig, EmbeddingConfig
from mpc.embedding.config import Precision
from mpc.grad_exchange import DistributedConfig, GradCompression, analytic_bytes
from mpc.qat_export import model_bytes
from mpc.runinfo import atomic_write_json
from mpc.train import TrainConfig, run

log = logging.getLogger(__name__)


def paper() -> dict:
    from mpc.report import paper_numbers

    return paper_numbers()["dqrm"]


# --- configurations -----------------------------------------------------------------------

def qat_embedding(bits: int = 4, scale_period: int = 200, looked_up_only: bool = True, **kw) -> EmbeddingConfig:
    return EmbeddingConfig(kind="qat", options={"bits": bits, "scale_period": scale_period,
                                                "looked_up_only": looked_up_only}, **kw)


def ptq_embedding(bits: int = 4, granularity: str = "row", **kw) -> EmbeddingConfig:
    return EmbeddingConfig(kind="ptq", options={"bits": bits, "granularity": granularity}, **kw)


@dataclass(frozen=True)
class Variant:
    """One training run: a name, its tables and its MLP precision (on a shared base config)."""

    name: str
    embedding: EmbeddingConfig
    mlp_bits: int = 32
    export: bool = False     # qat: also export the trained model and test the export

    def config(self, base: TrainConfig) -> TrainConfig:
        emb = self.embedding.replace(seed=base.embedding.seed, use_kernels=base.embedding.use_kernels)
        return dataclasses.replace(base, embedding=emb, mlp_bits=self.mlp_bits)


def embedding_bits_variants(bits=(16, 8, 4), scale_period: int = 200) -> list[Variant]:
    return [Variant("fp32", EmbeddingConfig(kind="fp32"))] + [
        Variant(f"qat emb int{b}", qat_embedding(b, scale_period)) for b in bits]


def full_model_variants(bits: int = 4, scale_period: int = 200,
                        ptq_granularity: str | tuple[str, ...] = "row") -> list[Variant]:
    """FP32, post-training INT-b (one run per granularity; named "ptq int4 (row)" etc.
    when there are several), DQRM INT-b, and DQRM's tables with an FP32 MLP."""
    grans = (ptq_granularity,) if isinstance(ptq_granularity, str) else tuple(ptq_granularity)
    ptq = [Variant(f"ptq int{bits}" + (f" ({g})" if len(grans) > 1 else ""), ptq_embedding(bits, g), mlp_bits=bits)
           for g in grans]
    return [Variant("fp32", EmbeddingConfig(kind="fp32")), *ptq,
            Variant(f"dqrm int{bits}", qat_embedding(bits, scale_period), mlp_bits=bits, export=True),
            Variant(f"dqrm int{bits} mlp fp32", qat_embedding(bits, scale_period))]


def scale_period_variants(periods=(1, 200, 500), bits: int = 4) -> list[Variant]:
    return [Variant(f"dqrm int{bits} period {p}", qat_embedding(bits, p), mlp_bits=bits) for p in periods]


def mpc_variants(specs=("int8+5%lru", "int4+1%lru")) -> list[Variant]:
    """MPC's low-precision tables with an FP32 cache, from specs such as "int8+5%lru"
    (mpc.experiments.setup.parse_config), named "mpc <spec>"; MLP in FP32 as in MPC."""
    from mpc.experiments.setup import config_label, parse_config

    return [Variant(f"mpc {config_label(parse_config(s))}", parse_config(s)) for s in specs]


# --- running ------------------------------------------------------------------------------

def config_hash(config: TrainConfig) -> str:
    """A short digest of everything that defines a run (its config as JSON)."""
    text = json.dumps(config.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _reusable(out_dir: Path, config: TrainConfig, export: bool = False) -> dict | None:
    """A run JSON in out_dir made with exactly this config (under any variant name);
    with `export`, only one that also recorded the export of its model."""
    wanted = json.loads(json.dumps(config.to_json()))
    for path in sorted(out_dir.glob(f"*-{config_hash(config)}.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):   # a foreign or damaged file: train again
            continue
        if rec.get("config") == wanted and (not export or "export" in rec):
            return rec
    return None


EXPORT_TOLERANCE = 1e-4   # |served - fake-quantized| test AUC and log loss counted as equal


def run_and_export(config: TrainConfig, out: str | Path | None = None) -> dict:
    """Train a QAT run (mpc.train.run), export the trained model to a temporary file
    (mpc.qat_export.export_and_evaluate), measure it, and delete the file.

    The record's "export" holds: "file_bytes" (the file on disk), "total_bytes" and
    "bytes" (the stored tensors in memory, by component), "fused_table_bytes", "test"
    (the reloaded model's test metrics), "fake_quant_test" (the trained model's, as
    record["test"]), their differences and "matches_fake_quant" (both within
    EXPORT_TOLERANCE). Written to `out` (JSON) when given.
    """
    with tempfile.TemporaryDirectory(prefix="mpc-dqrm-export-") as tmp:
        rec = run(config, None, export=Path(tmp) / "model.dqrm")
    e, fake = rec["export"], rec["test"]
    e["path"] = None   # a temporary file, deleted once measured
    e["fake_quant_test"] = {k: fake[k] for k in ("auc", "logloss", "accuracy")}
    e["auc_minus_fake_quant"] = e["test"]["auc"] - fake["auc"]
    e["logloss_minus_fake_quant"] = e["test"]["logloss"] - fake["logloss"]
    e["tolerance"] = EXPORT_TOLERANCE
    e["matches_fake_quant"] = bool(abs(e["auc_minus_fake_quant"]) <= EXPORT_TOLERANCE
                                   and abs(e["logloss_minus_fake_quant"]) <= EXPORT_TOLERANCE)
    if not e["matches_fake_quant"]:
        log.warning("exported model's test AUC/log loss differ from the fake-quantized model's: %+.2e / %+.2e",
                    e["auc_minus_fake_quant"], e["logloss_minus_fake_quant"])
    if out is not None:
        atomic_write_json(out, rec)
    return rec


def _as_recorded(config: TrainConfig) -> TrainConfig:
    """The config as a run records it: the tables sized by the data's cardinalities."""
    from mpc.data.format import Dataset

    cards = tuple(Dataset.open(config.data).cardinalities)
    return dataclasses.replace(config, embedding=config.embedding.replace(cardinalities=cards))


def run_variants(base: TrainConfig, variants: list[Variant], out_dir: str | Path, *,
                 reuse: bool = True) -> dict[str, dict]:
    """Train each variant into out_dir/<name>-<config hash>.json, or reuse a JSON there
    made with the same config (under any name; `reuse=False` retrains all)."""
    out_dir = Path(out_dir)
    results = {}
    for v in variants:
        config = _as_recorded(v.config(base))
        rec = _reusable(out_dir, config, v.export) if reuse else None
        if rec is None:
            log.info("training %s", v.name)
            path = out_dir / f"{_slug(v.name)}-{config_hash(config)}.json"
            rec = run_and_export(config, path) if v.export else run(config, path)
        results[v.name] = rec
    return results


def run_seeds(base: TrainConfig, variants: list[Variant], out_dir: str | Path, seeds=(0,),
              reuse: bool = True) -> dict[int, dict[str, dict]]:
    """run_variants once per seed (weights, data order, rounding): {seed: {name: record}}."""
    return {s: run_variants(dataclasses.replace(base, seed=s,
                                                embedding=base.embedding.replace(seed=s)),
                            variants, out_dir, reuse=reuse) for s in seeds}


def epoch_comparison(base: TrainConfig, out_dir: str | Path, epochs: int = 5, bits: int = 4,
                     scale_period: int = 200) -> pd.DataFrame:
    """FP32 vs DQRM INT4 (tables + MLP) trained `epochs` epochs, validated after each."""
    base = dataclasses.replace(base, epochs=epochs, eval_every=0)
    runs = run_variants(base, [Variant("fp32", EmbeddingConfig(kind="fp32")),
                               Variant(f"dqrm int{bits}", qat_embedding(bits, scale_period), mlp_bits=bits)],
                        out_dir)
    return epoch_curves(runs)


def communication_runs(base: TrainConfig, world_size: int = 2,
                       modes=("none", "sparse", "sparse-int8")) -> dict[str, dict]:
    """Data-parallel runs of DQRM INT4 on `world_size` local processes, one per mode."""
    from mpc.distributed import run_local

    jobs = [(base, DistributedConfig(compression=m)) for m in modes]
    return dict(zip(modes, run_local(jobs, world_size=world_size)))


def _train_batches(base: TrainConfig, steps: int) -> tuple[tuple[int, ...], list]:
    """(the data's cardinalities, `steps` training batches of base.data as jagged tuples)."""
    from mpc.data.format import Dataset
    from mpc.data.loader import BatchLoader
    from mpc.embedding import jagged_from_dense

    ds = Dataset.open(base.data)
    cards = tuple(ds.cardinalities)
    loader = BatchLoader(ds.split("train"), cards, base.batch_size, shuffle=True, seed=base.seed,
                         limit=steps * base.batch_size, source=str(ds.folder))
    batches = [(b.dense, *jagged_from_dense(b.cat), b.label) for b in loader.batches(0)]
    return cards, (batches * -(-steps // len(batches)))[:steps]   # a small split is cycled


def time_variants(base: TrainConfig, variants: list[Variant], steps: int = 100, rounds: int = 4) -> dict:
    """Seconds per training step of each variant, timed by mpc.bench.qat.time_qat_steps on
    the training batches of base.data (its tables, batch size, lr, kernels): `rounds`
    rounds of `steps` batches, the variants interleaved in each round (so a burst of load
    from elsewhere hits all alike), every variant training the same rounds x steps
    distinct batches in the same order. Returns a record shaped like `python -m mpc
    bench qat`'s."""
    from mpc.bench.qat import time_qat_steps

    cards, batches = _train_batches(base, steps * rounds)
    configs = {v.name: v.config(base).embedding.replace(cardinalities=cards) for v in variants}
    sec = time_qat_steps(configs, base.batch_size, steps, rounds, {v.name: v.mlp_bits for v in variants},
                         lr=base.lr, seed=base.seed, batches=batches)
    params = {"data": str(base.data), "rows": sum(cards), "batch_size": base.batch_size, "steps": steps,
              "rounds": rounds, "variants": [v.name for v in variants],
              "use_kernels": base.embedding.use_kernels}
    return {"benchmark": "time_variants", "params": params, "results": {"seconds_per_step": sec}}


def scale_period_timing(base: TrainConfig, periods=(1, 200, 500), bits: int = 4, mlp_bits: int = 4,
                        rounds: int = 10, min_steps: int = 1000, naive: bool = False) -> dict:
    """Seconds per training step of DQRM INT-b for each scale period ("qat period N"),
    and of FP32, by `time_variants`. Every configuration runs a multiple of every period
    in total (at least min_steps), so all pay for the same number of scale
    recomputations per step. naive: also whole-table fake quantization every step
    ("qat naive"). `scale_period_table` reads the record."""
    from mpc.errors import UserError

    lcm = math.lcm(*periods)
    total = lcm * max(1, math.ceil(min_steps / lcm))
    if total % rounds:
        raise UserError(f"timing rounds ({rounds}) must divide the {total} timed steps (a multiple of "
                        f"every scale period)")
    variants = [Variant("fp32", EmbeddingConfig(kind="fp32"))]
    if naive:
        variants.append(Variant("qat naive", qat_embedding(bits, 1, looked_up_only=False), mlp_bits))
    variants += [Variant(f"qat period {p}", qat_embedding(bits, p), mlp_bits) for p in periods]
    rec = time_variants(base, variants, total // rounds, rounds)
    rec["params"].update(bits=bits, mlp_bits=mlp_bits, periods=list(periods))
    return rec


# --- tables -------------------------------------------------------------------------------

def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC from its value and class counts (Hanley & McNeil, 1982).

    A yardstick for "is this difference noise": the difference of two AUCs on one test
    set has at most about sqrt(2) times this error (less, since the sets are shared).
    """
    if positives < 1 or negatives < 1 or not 0 < auc < 1:
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def _metrics(rec: dict) -> dict:
    t = rec["test"]
    pos = round(t["samples"] * t["ctr"]) if "samples" in t else 0
    return {"test_auc": t["auc"], "test_accuracy": 100 * t["accuracy"], "test_logloss": t["logloss"],
            "test_auc_se": auc_standard_error(t["auc"], pos, t.get("samples", 0) - pos),
            "test_samples": t.get("samples")}


METRICS = ("test_auc", "test_accuracy", "test_logloss")


def seed_summary(tables: dict[int, pd.DataFrame], key: str = "run") -> pd.DataFrame:
    """One table from one per seed: numbers averaged over seeds (first row order kept),
    `<metric>_std` the spread of the test metrics across seeds (NaN for one seed)."""
    frames = list(tables.values())
    if len(frames) == 1:
        out = frames[0].copy()
        for m in METRICS:
            if m in out:
                out[f"{m}_std"] = float("nan")
        out["seeds"] = 1
        return out
    both = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(frames[0][key]))
    numeric = [c for c in both.columns if c != key and pd.api.types.is_numeric_dtype(both[c])]
    out = both.groupby(key, sort=False)[numeric].mean()
    for m in METRICS:
        if m in both:
            out[f"{m}_std"] = both.groupby(key, sort=False)[m].std()
    out["seeds"] = both.groupby(key, sort=False).size()
    other = [c for c in frames[0].columns if c != key and c not in numeric]
    if other:
        out = out.join(frames[0].set_index(key)[other])
    return out.loc[order].reset_index()[[key] + [c for c in frames[0].columns if c != key]
                                        + [c for c in out.columns if c not in frames[0].columns]]


def _bits(rec: dict) -> int:
    emb = rec["config"]["embedding"]
    return emb["options"].get("bits", 32) if emb["kind"] in ("qat", "ptq") else 32


def bits_table(results: dict[str, dict]) -> pd.DataFrame:
    """Embedding-only QAT: bits x test AUC / accuracy, beside the paper (Kaggle, 5 epochs)."""
    ref = {r["bits"]: r for r in paper()["kaggle_embedding_only"]}
    rows = []
    for name, rec in results.items():
        b = _bits(rec)
        rows.append({"run": name, "bits": b, **_metrics(rec),
                     "paper_auc": ref.get(b, {}).get("auc"), "paper_accuracy": ref.get(b, {}).get("accuracy")})
    df = pd.DataFrame(rows).sort_values("bits", ascending=False, ignore_index=True)
    fp32 = df.loc[df.bits == 32, "test_auc"]
    if len(fp32):
        df["auc_vs_fp32"] = df["test_auc"] - fp32.iloc[0]
    return df


def _model_sizes(rec: dict) -> tuple[int, int]:
    """(bytes of this run's model, bytes of the same model at full Kaggle size), stored as
    mpc.qat_export stores it, except PTQ row-wise tables: fused rows (scale/bias per row)."""
    emb, model = rec["model"]["embedding"], rec["model"]   # the data's tables
    b, mlp_b = _bits(rec), rec["config"].get("mlp_bits", 32)
    out = []
    for cards in (emb["cardinalities"], KAGGLE_CARDINALITIES):
        size = model_bytes(cards, emb["dim"], model["bottom_mlp"], model["top_mlp"], b, mlp_b)
        if emb["kind"] == "ptq" and emb["options"].get("granularity", "row") == "row":
            size["embedding_values"] = sum(cards) * Precision(f"int{b}").row_bytes(emb["dim"])
            size["embedding_scales"] = 0
        out.append(sum(size.values()))
    return out[0], out[1]


def _paper_method(rec: dict) -> str | None:
    """The paper's row (kaggle_full_model_int4) that a run corresponds to."""
    kind, bits, mlp_bits = rec["config"]["embedding"]["kind"], _bits(rec), rec["config"].get("mlp_bits", 32)
    if kind == "fp32":
        return "fp32"
    if bits != 4:
        return None
    if kind == "ptq":
        return "ptq_int4"
    if kind == "qat":
        return "dqrm_int4" if mlp_bits == 4 else "dqrm_int4_mlp_fp32" if mlp_bits == 32 else None
    return None


def _export_columns(rec: dict) -> dict:
    """The measured export of a run (run_and_export), NaN for a run not exported."""
    e = rec.get("export")
    if not e:
        return dict.fromkeys(EXPORT_COLUMNS, math.nan)
    return {"export_file_bytes": e["file_bytes"], "export_bytes": e["total_bytes"],
            "export_test_auc": e["test"]["auc"], "export_test_logloss": e["test"]["logloss"],
            "export_auc_minus_fake_quant": e["test"]["auc"] - rec["test"]["auc"],
            "export_logloss_minus_fake_quant": e["test"]["logloss"] - rec["test"]["logloss"]}


EXPORT_COLUMNS = ("export_file_bytes", "export_bytes", "export_test_auc", "export_test_logloss",
                  "export_auc_minus_fake_quant", "export_logloss_minus_fake_quant")


def full_model_table(results: dict[str, dict]) -> pd.DataFrame:
    """Full-model INT4: method, size (ours, and at Kaggle size), test metrics, the paper's;
    for the exported run (DQRM INT-b), the measured export: `export_file_bytes` (the
    file), `export_bytes` (its tensors, = model_bytes), the served model's test AUC and
    log loss and their differences from the fake-quantized model's (test_auc, test_logloss)."""
    ref = {r["method"]: r for r in paper()["kaggle_full_model_int4"]}
    rows = []
    for name, rec in results.items():
        ours, kaggle = _model_sizes(rec)
        p = ref.get(_paper_method(rec), {})
        rows.append({"run": name, "model_bytes": ours, "kaggle_size_gb": kaggle / 1e9, **_metrics(rec),
                     "paper_size_gb": p.get("size_gb"), "paper_auc": p.get("auc"),
                     "paper_accuracy": p.get("accuracy"), "paper_check": p.get("check"),
                     **_export_columns(rec)})
    return pd.DataFrame(rows)


def export_table(runs: dict[int, dict[str, dict]]) -> pd.DataFrame:
    """The exported runs of run_seeds' {seed: {name: record}}, one row per (seed, run):
    measured bytes beside the analytic ones, served vs fake-quantized test metrics."""
    rows = []
    for seed, results in runs.items():
        for name, rec in results.items():
            e = rec.get("export")
            if not e:
                continue
            ours, kaggle = _model_sizes(rec)
            rows.append({"run": name, "seed": seed, "bits": _bits(rec), "mlp_bits": rec["config"].get("mlp_bits", 32),
                         "model_bytes": ours, "export_bytes": e["total_bytes"], "export_file_bytes": e["file_bytes"],
                         "file_overhead_bytes": e["file_bytes"] - e["total_bytes"],
                         "fused_table_bytes": e["fused_table_bytes"], "kaggle_size_gb": kaggle / 1e9,
                         "fake_quant_test_auc": rec["test"]["auc"], "export_test_auc": e["test"]["auc"],
                         "fake_quant_test_logloss": rec["test"]["logloss"],
                         "export_test_logloss": e["test"]["logloss"],
                         "auc_minus_fake_quant": e["test"]["auc"] - rec["test"]["auc"],
                         "logloss_minus_fake_quant": e["test"]["logloss"] - rec["test"]["logloss"],
                         "matches_fake_quant": e.get("matches_fake_quant")})
    return pd.DataFrame(rows)


def scale_period_table(results: dict[str, dict], bench: dict | None = None) -> pd.DataFrame:
    """Scale period: test metrics per period; ms/step from `python -m mpc bench qat`'s
    record when given (its ratio to period 1 beside the paper's 22/31)."""
    ref = {r["period"]: r for r in paper()["kaggle_scale_period"]}
    rows = []
    for name, rec in results.items():
        period = rec["config"]["embedding"]["options"]["scale_period"]
        rows.append({"run": name, "period": period, **_metrics(rec),
                     "scale_updates": rec["embedding_stats"]["scale_updates"],
                     "paper_ms_per_iter": ref.get(period, {}).get("ms_per_iter"),
                     "paper_auc": ref.get(period, {}).get("auc")})
    df = pd.DataFrame(rows).sort_values("period", ignore_index=True)
    if bench is not None:
        sec = bench["results"]["seconds_per_step"]
        ms = {int(k.rsplit(" ", 1)[1]): 1e3 * v for k, v in sec.items() if k.startswith("qat period")}
        df["bench_ms_per_step"] = df["period"].map(ms)
        df["bench_vs_period_1"] = df["bench_ms_per_step"] / ms.get(1, float("nan"))
        df["paper_vs_period_1"] = df["paper_ms_per_iter"] / ref[1]["ms_per_iter"]
    return df


def epoch_curves(results: dict[str, dict]) -> pd.DataFrame:
    """Validation metrics at each epoch end, one row per (run, epoch)."""
    rows = []
    for name, rec in results.items():
        for h in rec["history"]:
            if float(h["epoch"]).is_integer():
                rows.append({"run": name, "epoch": int(h["epoch"]), "val_auc": h["auc"],
                             "val_accuracy": 100 * h["accuracy"], "val_logloss": h["logloss"],
                             "train_loss": h["train_loss"]})
    df = pd.DataFrame(rows)
    if len(df):
        best = df.loc[df.groupby("run")["val_auc"].idxmax(), ["run", "epoch"]]
        df["best_epoch"] = df["run"].map(dict(zip(best["run"], best["epoch"])))
        # the paper's INT4 test AUC after as many epochs (Kaggle), beside our INT4 run
        # (paper_int4_check: what PAPERS.md does not state or contradicts, mpc/paper_numbers.json)
        ref = {r["epochs"]: r for r in paper()["kaggle_int4_by_epoch"]}
        int4 = {name for name, rec in results.items()
                if rec["config"]["embedding"]["kind"] == "qat" and _bits(rec) == 4}
        mine = [ref.get(e, {}) if r in int4 else {} for r, e in zip(df["run"], df["epoch"])]
        df["paper_int4_auc"] = [p.get("auc") for p in mine]
        df["paper_int4_check"] = [p.get("check") for p in mine]
    return df


def kaggle_mlp_sizes() -> tuple[int, int]:
    """(parameters, parameter tensors) of the reference DLRM MLPs."""
    params = tensors = 0
    for sizes in (BOTTOM_MLP, TOP_MLP):
        for n, m in zip(sizes[:-1], sizes[1:]):
            params += n * m + m
            tensors += 2
    return params, tensors


def communication_table(measured: dict[str, dict] | None = None, local_batch: int = 32) -> pd.DataFrame:
    """Bytes one rank sends per iteration: analytic at full Kaggle size (every rank sends
    `local_batch` x 26 distinct rows: the global batch 128 of the paper over 4 GPUs is 32),
    the paper's figure, and the per-iteration bytes measured in `measured` runs."""
    params, tensors = kaggle_mlp_sizes()
    ref = {r["setting"]: r for r in paper()["kaggle_communication_4gpu"]}
    names = {"none": "uncompressed", "sparse": "sparse_embedding_grads", "sparse-int8": "sparse_plus_int8"}
    rows = []
    for mode in GradCompression:
        kaggle = analytic_bytes(sum(KAGGLE_CARDINALITIES), len(KAGGLE_CARDINALITIES), 16, params, tensors,
                                mode, local_batch * len(KAGGLE_CARDINALITIES))
        p = ref[names[mode.value]]
        row = {"mode": mode.value, "kaggle_bytes": sum(kaggle.values()),
               "kaggle_embedding_bytes": kaggle["embedding_values"] + kaggle["embedding_ids"],
               "kaggle_mlp_bytes": kaggle["mlp_values"] + kaggle["mlp_scales"],
               "paper_bytes": p["bytes_per_iter"], "paper_auc": p["auc"]}
        if measured and mode.value in measured:
            rec = measured[mode.value]
            row["measured_bytes"] = rec["distributed"]["bytes_per_iteration_total"]
            row["measured_auc"] = rec["test"]["auc"]
        rows.append(row)
    df = pd.DataFrame(rows)
    df["kaggle_vs_none"] = df["kaggle_bytes"] / df["kaggle_bytes"].iloc[0]
    df["paper_vs_none"] = df["paper_bytes"] / df["paper_bytes"].iloc[0]
    return df


def size_table() -> pd.DataFrame:
    """Model size at full Kaggle size, by what is stored (see mpc.qat_export)."""
    dims = (KAGGLE_CARDINALITIES, 16, BOTTOM_MLP, TOP_MLP)
    ref = {r["method"]: r for r in paper()["kaggle_full_model_int4"]}
    rows = []
    for label, eb, mb, method in [("FP32", 32, 32, "fp32"), ("INT4 tables + INT4 MLP (DQRM)", 4, 4, "dqrm_int4"),
                                  ("INT4 tables + FP32 MLP", 4, 32, "dqrm_int4_mlp_fp32"),
                                  ("INT8 tables + INT8 MLP", 8, 8, None)]:
        b = model_bytes(*dims, eb, mb)
        p = ref.get(method, {})
        rows.append({"model": label, "total_gb": sum(b.values()) / 1e9, "embedding_gb": b["embedding_values"] / 1e9,
                     "scales_and_mlp_mb": (sum(b.values()) - b["embedding_values"]) / 1e6,
                     "paper_gb": p.get("size_gb"), "paper_check": p.get("check")})
    # what mpc.qat_export.QuantizedDLRM.to_model serves: fused rows with fp16 scale + bias each
    tables = sum(KAGGLE_CARDINALITIES) * Precision.INT4.row_bytes(16)
    mlp = sum(v for k, v in model_bytes(*dims, 4, 4).items() if k.startswith("mlp"))
    rows.append({"model": "INT4 fused rows (fp16 scale+bias per row) + INT4 MLP", "total_gb": (tables + mlp) / 1e9,
                 "embedding_gb": tables / 1e9, "scales_and_mlp_mb": mlp / 1e6, "paper_gb": None,
                 "paper_check": None})
    return pd.DataFrame(rows)


def kaggle_bytes(rec: dict) -> tuple[int, int]:
    """(bytes of the tables while training, bytes of the trained model as served) of a
    run's method at full Kaggle size (26 tables, 33.8M rows, dim 16, the reference MLPs).

    fp32 / int8 / int4 (+ cache): mpc.memory.memory_row, every byte the backend holds;
    served: the tables without cache (flushed) + FP32 MLP. qat: FP32 masters + one scale
    per table while training, served as mpc.qat_export stores it. ptq: trained in FP32,
    served as `_model_sizes` counts it.
    """
    from mpc.memory import memory_row

    emb = EmbeddingConfig(**{**rec["config"]["embedding"], "cardinalities": KAGGLE_CARDINALITIES})
    params, _ = kaggle_mlp_sizes()
    fp32_tables = memory_row(KAGGLE_CARDINALITIES, emb.dim, Precision.FP32, CacheConfig())["total_bytes"]
    if emb.kind == "qat":
        served = model_bytes(KAGGLE_CARDINALITIES, emb.dim, BOTTOM_MLP, TOP_MLP, _bits(rec),
                             rec["config"].get("mlp_bits", 32))
        return fp32_tables + 4 * len(KAGGLE_CARDINALITIES), sum(served.values())
    if emb.kind == "ptq":
        return fp32_tables, _model_sizes(rec)[1]
    training = memory_row(KAGGLE_CARDINALITIES, emb.dim, emb.precision, emb.cache)["total_bytes"]
    served = memory_row(KAGGLE_CARDINALITIES, emb.dim, emb.precision, CacheConfig())["total_bytes"]
    return training, served + 4 * params


def combined_table(results: dict[str, dict], timing: dict | None = None) -> pd.DataFrame:
    """One row per run (e.g. FP32, MPC INT8 + 5% cache, DQRM INT4): test metrics, the
    tables' bytes while training and the served model's bytes at full Kaggle size (and
    the run's own tables), training speed (samples/s of the run; with `timing`, a
    `time_variants` record of the same names, its interleaved ms/step), cache hit rate."""
    rows = []
    for name, rec in results.items():
        train_b, served_b = kaggle_bytes(rec)
        rows.append({"run": name, "embedding": rec["config"]["embedding"]["kind"], **_metrics(rec),
                     "kaggle_training_tables_gb": train_b / 1e9, "kaggle_served_model_gb": served_b / 1e9,
                     "embedding_bytes_while_training": rec["embedding_total_bytes"],
                     "samples_per_second": rec["samples_per_second"],
                     "cache_hit_rate": rec["embedding_stats"].get("hit_rate"), "epochs": rec["config"]["epochs"]})
    df = pd.DataFrame(rows)
    fp32 = df.loc[df.embedding == "fp32"]
    if len(fp32):
        ref = fp32.iloc[0]
        df["training_memory_vs_fp32"] = ref["kaggle_training_tables_gb"] / df["kaggle_training_tables_gb"]
        df["served_size_vs_fp32"] = ref["kaggle_served_model_gb"] / df["kaggle_served_model_gb"]
        df["speed_vs_fp32"] = df["samples_per_second"] / ref["samples_per_second"]
    if timing is not None:
        sec = timing["results"]["seconds_per_step"]
        df["timed_ms_per_step"] = df["run"].map(lambda r: 1e3 * sec[r] if r in sec else None)
        if len(fp32) and fp32.iloc[0]["run"] in sec:
            df["timed_speed_vs_fp32"] = 1e3 * sec[fp32.iloc[0]["run"]] / df["timed_ms_per_step"]
    return df
