"""`python -m mpc bench synth`: generator speed, and (--calibration) its calibration evidence.

Speed: samples/s of `generate` (binary splits) with 1 and N worker threads and of
`write_tsv` (plain and gzip), against two baselines measured in the same run: the
1,000,000 samples/s goal, and the I/O floor (the same bytes written through the same
DatasetWriter from ready-made arrays, i.e. generation at infinite speed). Recorded in
results/bench/synth.json.

Calibration (slow: minutes at the default medium scale): generates the data set and
measures what the generator promises (mpc.data.synth, mpc.data.teacher): CTR, missing
rates, the share of accesses taken by the top 1% of rows of the big tables, rows ever
accessed; the teacher's own (Bayes) test AUC; a dense-features-only model's test AUC
(gradient-boosted trees, scikit-learn); DLRM trained by the reference recipe (FP32, one
epoch, SGD lr 0.1, batch 128, mpc.train) and its test AUC after rounding the trained
tables to INT4 / INT2 with torch's fused row-wise formats
(torch.ops.quantized.embedding_bag_{4,2}bit_prepack). Recorded in results/calibration.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpc.bench import record
from mpc.bench.common import print_table
from mpc.criteo import NUM_DENSE, NUM_SPARSE
from mpc.data.format import Dataset, DatasetMeta, DatasetWriter
from mpc.data.synth import KAGGLE_DENSE, KAGGLE_TABLES, SynthConfig, SyntheticCriteo, generate, write_tsv
from mpc.runinfo import REPO_ROOT

GOAL_SAMPLES_PER_S = 1_000_000
CALIBRATION_OUT = REPO_ROOT / "results" / "calibration.json"


# --- speed -----------------------------------------------------------------------------

def io_floor_seconds(samples: int, folder: Path, chunk_rows: int = 16384) -> float:
    """Seconds to write `samples` rows of ready-made arrays through DatasetWriter."""
    dense = np.ones((chunk_rows, NUM_DENSE), np.float32)
    cat = np.ones((chunk_rows, NUM_SPARSE), np.int32)
    label = np.ones(chunk_rows, np.uint8)
    t0 = time.perf_counter()
    with DatasetWriter(folder) as w:
        for a in range(0, samples, chunk_rows):
            n = min(chunk_rows, samples - a)
            w.append(dense[:n], cat[:n], label[:n])
    return time.perf_counter() - t0


def run_speed(args) -> dict:
    config = SynthConfig(scale=args.scale, samples=args.samples, seed=args.seed)
    tsv_config = SynthConfig(scale=args.scale, samples=args.tsv_samples, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mpc-bench-synth-", dir=args.tmp))
    runs = {}
    try:
        n = config.samples
        c0 = time.process_time()
        runs["io floor"] = (n, io_floor_seconds(n, tmp / "floor"), None, time.process_time() - c0)
        for workers in sorted({1, args.workers}):
            t0, c0 = time.perf_counter(), time.process_time()
            meta = generate(config, tmp / f"bin{workers}", workers=workers, progress=False)
            runs[f"binary, {workers} worker(s)"] = (n, time.perf_counter() - t0, meta.info["setup_s"],
                                                   time.process_time() - c0)
            shutil.rmtree(tmp / f"bin{workers}")
        for kind, suffix in (("TSV", ".tsv"), ("TSV gzip", ".tsv.gz")):
            t0, c0 = time.perf_counter(), time.process_time()
            info = write_tsv(tsv_config, tmp / f"train{suffix}", workers=args.workers, progress=False)
            runs[f"{kind}, {args.workers} worker(s)"] = (tsv_config.samples, time.perf_counter() - t0,
                                                        info["setup_s"], time.process_time() - c0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor = runs["io floor"][0] / runs["io floor"][1]
    rows, results = [], {}
    for name, (samples, seconds, setup, cpu) in runs.items():
        sps = samples / seconds
        steady = samples / (seconds - setup) if setup is not None else None
        # CPU time: on a machine shared with other jobs, wall time shows our share of it.
        results[name] = {"samples": samples, "seconds": seconds, "cpu_seconds": cpu,
                         "samples_per_s": sps, "samples_per_cpu_s": samples / cpu, "setup_s": setup,
                         "samples_per_s_after_setup": steady, "vs_goal": sps / GOAL_SAMPLES_PER_S,
                         "vs_io_floor": sps / floor}
        rows.append({"run": name, "samples": samples, "samples/s": sps, "after setup": steady,
                     "per CPU-s": samples / cpu, "vs 1M/s goal": sps / GOAL_SAMPLES_PER_S,
                     "vs io floor": sps / floor})
    print_table(rows, ["run", "samples", "samples/s", "after setup", "per CPU-s", "vs 1M/s goal",
                       "vs io floor"])
    results["load_average"] = list(os.getloadavg())
    print(f"load average {results['load_average'][0]:.1f} on {os.cpu_count()} cores "
          "(other jobs share the machine when it is above the worker count)")
    params = {"scale": config.scale.value, "samples": config.samples, "tsv_samples": tsv_config.samples,
              "workers": args.workers, "seed": args.seed, "torch_threads": torch.get_num_threads()}
    return record(args.record_name, params, results)


# --- calibration -----------------------------------------------------------------------

def data_stats(gen: SyntheticCriteo, ds: Dataset) -> dict:
    """CTR, missing rates, access skew of the big tables, over all rows of the data set."""
    cat = np.asarray(ds._arrays["cat"])
    label = np.asarray(ds._arrays["label"])
    out = {"ctr": float(label.mean()),
           "ctr_by_split": {s: float(ds.split(s).label.mean()) for s in ("train", "test", "val")}}
    missing_cat = [(float((cat[:, t] == 0).mean()), spec.missing)
                   for t, spec in enumerate(KAGGLE_TABLES) if spec.missing]
    dense_zero = np.asarray(ds._arrays["dense"]) == 0  # missing or a true 0: an upper bound
    out["categorical_missing_max_abs_error"] = max(abs(a - b) for a, b in missing_cat)
    out["dense_zero_or_missing"] = dense_zero.mean(axis=0).round(4).tolist()
    out["dense_missing_target"] = [s.missing for s in KAGGLE_DENSE]
    big = {}
    for t, card in enumerate(gen.cards):
        if KAGGLE_TABLES[t].kaggle_rows < 1_000_000:
            continue
        present = cat[:, t][cat[:, t] != 0] if KAGGLE_TABLES[t].missing else cat[:, t]
        counts = np.sort(np.bincount(present, minlength=int(card)))[::-1]
        top = counts[:max(1, int(0.01 * card))].sum() / counts.sum()
        big[f"C{t + 1}"] = {"rows": int(card), "top1pct_share": float(top),
                            "top5pct_share": float(counts[:max(1, int(0.05 * card))].sum() / counts.sum()),
                            "rows_accessed": float((counts > 0).mean())}
    out["big_tables"] = big
    return out


def dense_only_auc(ds: Dataset, max_train: int) -> float:
    """Test AUC of gradient-boosted trees on the 13 dense features (ids ignored)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    train, test = ds.split("train"), ds.split("test")
    rows = np.random.default_rng(0).permutation(len(train))[:max_train]
    rows.sort()
    model = HistGradientBoostingClassifier(max_iter=200, random_state=0)
    model.fit(np.asarray(train.dense[rows]), np.asarray(train.label[rows]))
    return float(roc_auc_score(np.asarray(test.label), model.predict_proba(np.asarray(test.dense))[:, 1]))


def teacher_auc(gen: SyntheticCriteo, ds: Dataset) -> float:
    """Test AUC of the planted logit itself: the best any model can do (Bayes)."""
    from sklearn.metrics import roc_auc_score

    lo, hi = ds.meta.split_sizes.ranges()["test"]
    logits = np.concatenate([gen.rows(a, min(a + 65536, hi)).logit for a in range(lo, hi, 65536)])
    return float(roc_auc_score(np.asarray(ds.split("test").label), logits))


def rowwise_dequantized(weights: torch.Tensor, cards, bits: int) -> torch.Tensor:
    """Tables rounded through torch's fused row-wise `bits`-bit format and read back."""
    prepack = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    lookup = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_rowwise_offsets")
    out, start = [], 0
    for n in cards:
        packed = prepack(weights[start:start + n].contiguous())
        ids = torch.arange(n, dtype=torch.int64)
        out.append(lookup(packed, ids, ids, mode=0, pruned_weights=False, include_last_offset=False))
        start += n
    return torch.cat(out)


def train_dlrm(folder: Path, args) -> dict:
    """The reference recipe (FP32, 1 epoch, SGD lr 0.1, batch 128) and post-training INT4/INT2."""
    from mpc.embedding import EmbeddingConfig
    from mpc.embedding.fp32 import FP32EmbeddingBag
    from mpc.metrics import predict
    from mpc.train import TrainConfig, Trainer

    config = TrainConfig(data=str(folder), embedding=EmbeddingConfig(kind="fp32"), epochs=1,
                         batch_size=128, lr=0.1, threads=args.threads, progress=args.progress,
                         max_train_samples=args.max_train_samples)
    trainer = Trainer(config)
    result = trainer.fit()
    out = {"auc": result["test"]["auc"], "logloss": result["test"]["logloss"],
           "accuracy": result["test"]["accuracy"], "train_samples": result["samples"],
           "train_seconds": result["train_seconds"]}
    model = trainer.model
    emb_config = model.embedding.config
    trained = model.embedding.to_float().detach().clone()
    labels, fp32 = predict(model, trainer.test_loader)
    for bits in (4, 2):
        model.embedding = FP32EmbeddingBag.from_float(
            rowwise_dequantized(trained, emb_config.cardinalities, bits), emb_config)
        _, rounded = predict(model, trainer.test_loader)
        loss, se = paired_auc_difference(labels, fp32, rounded)
        out[f"int{bits}_auc"] = out["auc"] - loss
        out[f"int{bits}_auc_loss"] = loss
        out[f"int{bits}_auc_loss_se"] = se
    return out


def paired_auc_difference(labels, a, b, rounds: int = 100) -> tuple[float, float]:
    """AUC(a) - AUC(b) on the same rows, and its bootstrap standard error."""
    from sklearn.metrics import roc_auc_score

    diff = roc_auc_score(labels, a) - roc_auc_score(labels, b)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(rounds):
        i = rng.integers(0, len(labels), len(labels))
        boot.append(roc_auc_score(labels[i], a[i]) - roc_auc_score(labels[i], b[i]))
    return float(diff), float(np.std(boot))


def run_calibration(args) -> dict:
    config = SynthConfig(scale=args.scale, samples=args.samples, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mpc-calibration-", dir=args.tmp))
    try:
        folder = tmp / "data"
        meta: DatasetMeta = generate(config, folder, workers=args.workers, progress=args.progress)
        ds = Dataset.open(folder)
        gen = SyntheticCriteo(config)
        results = {"data": data_stats(gen, ds), "generate_samples_per_s": meta.info["samples_per_s"]}
        results["teacher_auc"] = teacher_auc(gen, ds)
        results["dense_only_auc"] = dense_only_auc(ds, args.dense_only_train)
        print(f"CTR {results['data']['ctr']:.4f}, teacher AUC {results['teacher_auc']:.4f}, "
              f"dense-only AUC {results['dense_only_auc']:.4f}", flush=True)
        if not args.skip_dlrm:
            results["dlrm"] = train_dlrm(folder, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_calibration(results)
    params = {"config": config.to_json(), "model": gen.summary()["teacher"],
              "dense_only_train": args.dense_only_train, "threads": args.threads,
              "max_train_samples": args.max_train_samples}
    return record("synth-calibration", params, results, out=args.out or CALIBRATION_OUT)


def _print_calibration(r: dict) -> None:
    rows = [{"measure": "CTR", "value": r["data"]["ctr"]},
            {"measure": "teacher (Bayes) test AUC", "value": r["teacher_auc"]},
            {"measure": "dense-only test AUC", "value": r["dense_only_auc"]}]
    if "dlrm" in r:
        d = r["dlrm"]
        rows += [{"measure": "DLRM FP32 test AUC", "value": d["auc"]},
                 {"measure": "INT4 post-training AUC loss", "value": d["int4_auc_loss"],
                  "std. error": d["int4_auc_loss_se"]},
                 {"measure": "INT2 post-training AUC loss", "value": d["int2_auc_loss"],
                  "std. error": d["int2_auc_loss_se"]}]
    for name, b in r["data"]["big_tables"].items():
        rows.append({"measure": f"{name} top-1% rows' share of accesses", "value": b["top1pct_share"]})
    for row in rows:  # AUC differences need 4 decimals
        row.update({k: f"{v:.4f}" for k, v in row.items() if isinstance(v, float)})
    print_table(rows, ["measure", "value", "std. error"])


def register_bench(sub) -> None:
    from mpc.cli import non_negative_int, positive_int

    p = sub.add_parser("synth", help="synthetic data: generator samples/s (--calibration: "
                                     "CTR, skew, teacher / dense-only / DLRM AUC, INT4/INT2 loss)")
    p.add_argument("--calibration", action="store_true",
                   help="measure the calibration (slow) instead of the speed")
    p.add_argument("--scale", default="medium", help="tiny | small | medium | full (default medium)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="rows (default: 2,000,000 for speed, the scale's default for calibration)")
    p.add_argument("--tsv-samples", type=positive_int, default=300_000, help="rows of the TSV runs")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads for DLRM")
    p.add_argument("--max-train-samples", type=positive_int, default=None,
                   help="DLRM trains on a random subset of this many training rows")
    p.add_argument("--dense-only-train", type=positive_int, default=1_000_000,
                   help="training rows of the dense-only model")
    p.add_argument("--skip-dlrm", action="store_true", help="calibration without training DLRM")
    p.add_argument("--tmp", default=None, help="scratch folder (default: the system's temp)")
    p.add_argument("--out", default=None, help="calibration record (default results/calibration.json)")
    p.add_argument("--record-name", default="synth", help="speed record: results/bench/<name>.json")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.calibration:
        run_calibration(args)
    else:
        if args.samples is None:
            args.samples = 2_000_000
        run_speed(args)
    return 0
