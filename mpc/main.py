"""`python -m mpc main`: the README's main job.

Runs every notebook with the `default` profile (`python -m mpc reproduce`): it
generates the embedded default data (the synthetic generator calibrated to Criteo
Kaggle) on first use, trains the FP32 baseline and the low-precision / cached / QAT
configurations, and writes results/ (tables, figures, REPORT.md). At the end it prints
the headline figures: FP32 test AUC / logloss / accuracy and each paper claim's verdict.
"""

from __future__ import annotations

import sys

from mpc import results
from mpc.report import CLAIMS


def headline(root=None) -> str:
    lines = []
    acc = results.load("02_accuracy", root)
    if acc:
        for row in acc["values"]["table"]:
            if row["config"] == "fp32":
                lines.append(f"FP32 DLRM: test AUC {row['auc']:.4f}  logloss {row['logloss']:.4f}  "
                             f"accuracy {row['accuracy']:.4f}  ({row['seeds']} seeds; {acc['data']['description']})")
    for claim in CLAIMS:
        rec = results.load(claim.notebook, root)
        ours = (rec or {}).get("values", {}).get("claims", {}).get(claim.id)
        if ours:
            lines.append(f"- {claim.statement}: paper {claim.paper_value}; ours {ours['ours']} -> {ours['verdict']}")
    return "\n".join(lines)


def register_cli(sub) -> None:
    p = sub.add_parser("main", help="the README's main job: reproduce every notebook (default profile)")
    p.add_argument("--profile", choices=("quick", "default", "paper"), default="default")
    p.add_argument("--data", default=None, help="a prepared real Criteo folder instead of synthetic data")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from mpc.reproduce import reproduce

    outcomes = reproduce(args.profile, args.data)
    print(headline())
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"failed notebooks: {', '.join(failed)} (see results/executed/<name>.failed.ipynb)", file=sys.stderr)
        return 1
    print("results: results/REPORT.md")
    return 0
