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

Tables: `bits_table`, `full_model_table`, `scale_period_table`, `epoch_curves`,
`communication_table`, `size_table`, `combined_table`; each puts the paper's figure
(mpc/paper_numbers.json) beside ours where the paper has one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mpc.criteo import BOTTOM_MLP, KAGGLE_CARDINALITIES, TOP_MLP
from mpc.embedding import EmbeddingConfig
from mpc.embedding.config import Precision
from mpc.grad_exchange import DistributedConfig, GradCompression, analytic_bytes
from mpc.qat_export import model_bytes
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

    def config(self, base: TrainConfig) -> TrainConfig:
        emb = self.embedding.replace(seed=base.embedding.seed, use_kernels=base.embedding.use_kernels)
        return dataclasses.replace(base, embedding=emb, mlp_bits=self.mlp_bits)


def embedding_bits_variants(bits=(16, 8, 4), scale_period: int = 200) -> list[Variant]:
    return [Variant("fp32", EmbeddingConfig(kind="fp32"))] + [
        Variant(f"qat emb int{b}", qat_embedding(b, scale_period)) for b in bits]


def full_model_variants(bits: int = 4, scale_period: int = 200, ptq_granularity: str = "row") -> list[Variant]:
    return [Variant("fp32", EmbeddingConfig(kind="fp32")),
            Variant(f"ptq int{bits}", ptq_embedding(bits, ptq_granularity), mlp_bits=bits),
            Variant(f"dqrm int{bits}", qat_embedding(bits, scale_period), mlp_bits=bits),
            Variant(f"dqrm int{bits} mlp fp32", qat_embedding(bits, scale_period))]


def scale_period_variants(periods=(1, 200, 500), bits: int = 4) -> list[Variant]:
    return [Variant(f"dqrm int{bits} period {p}", qat_embedding(bits, p), mlp_bits=bits) for p in periods]


# --- running ------------------------------------------------------------------------------

def run_variants(base: TrainConfig, variants: list[Variant], out_dir: str | Path, *,
                 reuse: bool = True) -> dict[str, dict]:
    """Train each variant (or reuse out_dir/<name>.json made with the same config)."""
    out_dir = Path(out_dir)
    results = {}
    for v in variants:
        config = v.config(base)
        path = out_dir / f"{v.name.replace(' ', '_')}.json"
        if reuse and path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("config") == json.loads(json.dumps(config.to_json())):
                results[v.name] = rec
                continue
        log.info("training %s", v.name)
        results[v.name] = run(config, path)
    return results


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


# --- tables -------------------------------------------------------------------------------

def _metrics(rec: dict) -> dict:
    t = rec["test"]
    return {"test_auc": t["auc"], "test_accuracy": 100 * t["accuracy"], "test_logloss": t["logloss"]}


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


def full_model_table(results: dict[str, dict]) -> pd.DataFrame:
    """Full-model INT4: method, size (ours, and at Kaggle size), test metrics, the paper's."""
    ref = {r["method"]: r for r in paper()["kaggle_full_model_int4"]}
    rows = []
    for name, rec in results.items():
        ours, kaggle = _model_sizes(rec)
        p = ref.get(_paper_method(rec), {})
        rows.append({"run": name, "model_bytes": ours, "kaggle_size_gb": kaggle / 1e9, **_metrics(rec),
                     "paper_size_gb": p.get("size_gb"), "paper_auc": p.get("auc"),
                     "paper_accuracy": p.get("accuracy")})
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
    rows = []
    for label, eb, mb, paper_gb in [("FP32", 32, 32, 2.161), ("INT4 tables + INT4 MLP (DQRM)", 4, 4, 0.270),
                                    ("INT4 tables + FP32 MLP", 4, 32, 0.271), ("INT8 tables + INT8 MLP", 8, 8, None)]:
        b = model_bytes(*dims, eb, mb)
        rows.append({"model": label, "total_gb": sum(b.values()) / 1e9, "embedding_gb": b["embedding_values"] / 1e9,
                     "scales_and_mlp_mb": (sum(b.values()) - b["embedding_values"]) / 1e6, "paper_gb": paper_gb})
    # what mpc.qat_export.QuantizedDLRM.to_model serves: fused rows with fp16 scale + bias each
    tables = sum(KAGGLE_CARDINALITIES) * Precision.INT4.row_bytes(16)
    mlp = sum(v for k, v in model_bytes(*dims, 4, 4).items() if k.startswith("mlp"))
    rows.append({"model": "INT4 fused rows (fp16 scale+bias per row) + INT4 MLP", "total_gb": (tables + mlp) / 1e9,
                 "embedding_gb": tables / 1e9, "scales_and_mlp_mb": mlp / 1e6, "paper_gb": None})
    return pd.DataFrame(rows)


def combined_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per run (e.g. FP32, MPC INT8 + 5% cache, DQRM INT4): metrics, bytes, speed."""
    rows = []
    for name, rec in results.items():
        rows.append({"run": name, "embedding": rec["config"]["embedding"]["kind"], **_metrics(rec),
                     "embedding_bytes_while_training": rec["embedding_total_bytes"],
                     "samples_per_second": rec["samples_per_second"], "epochs": rec["config"]["epochs"]})
    return pd.DataFrame(rows)
