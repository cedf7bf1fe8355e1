"""`python -m mpc bench <name>`: benchmarks that print ratios against a baseline measured
in the same run, and record them (with parameters, commit and machine) under
results/bench/<name>.json.

A benchmark module joins by defining `register_bench(subparsers)`.
"""

from __future__ import annotations

import importlib

from mpc.runinfo import REPO_ROOT, atomic_write_json, provenance

BENCH_MODULES = (
    "mpc.bench.prepare",   # prepare: Criteo TSV preprocessing lines/s
    "mpc.bench.synth",     # synth: generator samples/s
    "mpc.bench.train",     # train: FP32 training step vs 26 nn.EmbeddingBag + SGD
    "mpc.bench.lookup",    # lookup: pooled INT8/INT4 lookup vs torch quantized ops
    "mpc.bench.cache",     # cache: cached INT8 training vs the FP32 baseline
    "mpc.bench.qat",       # qat: DQRM QAT step time, scale period 1 vs N
    "mpc.inference.bench",  # inference: eager PyTorch vs torch.compile, ONNX Runtime, OpenVINO
)

RESULTS_DIR = REPO_ROOT / "results" / "bench"


def register_cli(sub) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (ratios against a same-run baseline)")
    bench_sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register_bench(bench_sub)


def record(name: str, params: dict, results: dict, out=None) -> dict:
    """Write results/bench/<name>.json (or `out`) with provenance; return the record."""
    rec = {"benchmark": name, "params": params, "results": results, "provenance": provenance()}
    atomic_write_json(out or RESULTS_DIR / f"{name}.json", rec)
    return rec
