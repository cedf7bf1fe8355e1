"""`python -m mpc bench inference`: the acceleration study as a benchmark (PAPERS.md §3).

Runs one set of mpc.inference.study (`--set quick` by default; `default` ~8 min and
`paper` ~15 min on 2 cores; `--full` is `--set paper`), prints the geometric-mean
speed-up of each runtime over eager PyTorch FP32 measured in the same run, and records
every row (parameters, runtime versions, other processes' CPU use, provenance) under
results/bench/<name>.json.
"""

from __future__ import annotations

from mpc.bench import record
from mpc.bench.common import print_table
from mpc.inference.study import FOREIGN_LOAD_WARNING, StudySet, run_study, speedup_summary, study_config


def run_bench(args) -> dict:
    name = StudySet.PAPER.value if args.full else args.set
    config = study_config(name, threads=args.threads)
    result = run_study(config)
    summary = speedup_summary(result.frame())
    print_table(summary.to_dict("records"), list(summary.columns))
    for runtime in result.runtimes:
        if not runtime["available"]:
            print(f"left out: {runtime['runtime']} ({runtime['reason']})")
    if result.foreign_cpu_cores is not None and result.foreign_cpu_cores > FOREIGN_LOAD_WARNING:
        print(f"other processes used {result.foreign_cpu_cores:.2f} CPU cores meanwhile: ratios unreliable")
    params = {"set": name, "config": result.config, "llc_bytes": result.llc_bytes, "runtimes": result.runtimes}
    results = {"summary": summary.to_dict("records"), "rows": result.rows, "skipped": result.skipped,
               "seconds": result.seconds, "foreign_cpu_cores": result.foreign_cpu_cores}
    return record(args.record_name, params, results, out=args.out)


def register_bench(sub) -> None:
    from mpc.cli import positive_int

    p = sub.add_parser("inference", help="DLRM inference: eager PyTorch vs torch.compile, "
                                         "torch.export, ONNX Runtime, OpenVINO")
    p.add_argument("--set", choices=[s.value for s in StudySet], default=StudySet.QUICK.value,
                   help="quick (< 1 min), default (~8 min), paper (every point, ~15 min on 2 cores)")
    p.add_argument("--full", action="store_true", help="same as --set paper")
    p.add_argument("--threads", type=positive_int, default=None, help="threads per runtime (default 2)")
    p.add_argument("--record-name", default="inference", help="results/bench/<name>.json")
    p.add_argument("--out", default=None, help="write the record here instead")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
