"""FP32 vs INT8 vs INT8 + 5% cache vs INT4 + 1% cache on the `small` synthetic data set.

A quick accuracy check of the MPC backends with the real command line (`python -m mpc
synth` and `python -m mpc train`), a few seeds each; the notebooks (02_accuracy) do the
full study at Kaggle size. Writes results/small_synthetic/: one run JSON per training
run (as `train --out` writes it) and summary.{json,md} with mean and spread per
configuration and the paired AUC difference to FP32.

    python scripts/small_accuracy.py [--seeds 0 1 2] [--data data/small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpc.runinfo import atomic_write_bytes, atomic_write_json, provenance  # noqa: E402

CONFIGS = {
    "fp32": ["--embedding", "fp32"],
    "int8": ["--embedding", "int8"],
    "int8+5%lru": ["--embedding", "int8", "--cache-fraction", "0.05", "--cache-policy", "lru"],
    "int4+1%lru": ["--embedding", "int4", "--cache-fraction", "0.01", "--cache-policy", "lru"],
}


def mpc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mpc", *args], check=True, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "small")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "small_synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (args.data / "meta.json").exists():
        mpc("synth", "--out", str(args.data), "--scale", "small", "--seed", "0")
    runs = {}
    for name, flags in CONFIGS.items():
        for seed in args.seeds:
            out = args.out / "runs" / f"{name.replace('%', 'pct')}_seed{seed}.json"
            mpc("train", "--data", str(args.data), *flags, "--seed", str(seed), "--threads", str(args.threads),
                "--no-progress", "--out", str(out))
            runs.setdefault(name, []).append(json.loads(out.read_text()))
    summary, rows = {}, []
    fp32_auc = [r["test"]["auc"] for r in runs["fp32"]]
    for name, rs in runs.items():
        auc = [r["test"]["auc"] for r in rs]
        d_auc = [a - b for a, b in zip(auc, fp32_auc)]
        s = {"seeds": args.seeds, "auc": auc, "logloss": [r["test"]["logloss"] for r in rs],
             "accuracy": [r["test"]["accuracy"] for r in rs], "d_auc_vs_fp32": d_auc,
             "embedding_bytes": rs[0]["embedding_total_bytes"], "hit_rate": rs[0]["embedding_stats"].get("hit_rate")}
        summary[name] = s
        spread = statistics.stdev(auc) if len(auc) > 1 else 0.0
        rows.append(f"| {name} | {statistics.mean(auc):.4f} ± {spread:.4f} | "
                    f"{statistics.mean(s['logloss']):.4f} | {statistics.mean(s['accuracy']):.4f} | "
                    f"{statistics.mean(d_auc):+.4f} [{min(d_auc):+.4f}, {max(d_auc):+.4f}] | "
                    f"{s['embedding_bytes'] / 1e6:.2f} |")
    prov = provenance()
    atomic_write_json(args.out / "summary.json", {"data": str(args.data), "configs": summary, "provenance": prov})
    md = ["# FP32 vs MPC backends on the `small` synthetic data set", "",
          f"Data: `python -m mpc synth --scale small --seed 0` (synthetic, calibrated to Criteo Kaggle; "
          f"tables 1/1000 of Kaggle's). One epoch, batch 128, SGD lr 0.1; seeds {args.seeds}. "
          f"Commit `{prov['commit']}`, {prov['machine'].get('cpu', '')}. Made by `python scripts/small_accuracy.py`.",
          "", "| config | test AUC (mean ± sd) | logloss | accuracy | dAUC vs FP32 (mean [min, max], paired by seed) "
          "| embedding MB |", "|---|---|---|---|---|---|", *rows, ""]
    atomic_write_bytes(args.out / "summary.md", ("\n".join(md)).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
