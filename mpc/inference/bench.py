"""`python -m mpc bench inference`: the acceleration study as a benchmark (PAPERS.md §3).

Runs mpc.inference.study (quick set by default, `--full` for the whole sweep), prints
the geometric-mean speed-up of each runtime over eager PyTorch FP32 measured in the same
run, and records every row (parameters, runtime versions, provenance) under
results/bench/<name>.json.
"""

from __future__ import annotations

from mpc.bench import record
from mpc.bench.common import print_table
from mpc.inference.study import full_study, quick_study, run_study, speedup_summary


def run_bench(args) -> dict:
    config = full_study() if args.full else quick_study()
    if args.threads:
        import dataclasses

        config = dataclasses.replace(config, threads=args.threads)
    result = run_study(config)
    summary = speedup_summary(result.frame())
    print_table(summary.to_dict("records"), list(summary.columns))
    for runtime in result.runtimes:
        if not runtime["available"]:
            print(f"left out: {runtime['runtime']} ({runtime['reason']})")
    params = {"set": "full" if args.full else "quick", "config": result.config,
              "llc_bytes": result.llc_bytes, "runtimes": result.runtimes}
    results = {"summary": summary.to_dict("records"), "rows": result.rows, "skipped": result.skipped}
    return record(args.record_name, params, results, out=args.out)


def register_bench(sub) -> None:
    from mpc.cli import positive_int

    p = sub.add_parser("inference", help="DLRM inference: eager PyTorch vs torch.compile, "
                                         "torch.export, ONNX Runtime, OpenVINO")
    p.add_argument("--full", action="store_true", help="the full sweep (~10-15 min on 2 cores)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads per runtime (default 2)")
    p.add_argument("--record-name", default="inference", help="results/bench/<name>.json")
    p.add_argument("--out", default=None, help="write the record here instead")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
