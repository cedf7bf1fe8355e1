"""Where notebooks put what they measured: JSON records, tables, figures.

Every notebook ends by calling `record(...)`; tables and figures go through
`save_table` / `save_figure`. All land under `results_dir()`: the repository's
results/ folder, or the staging folder that `python -m mpc reproduce` sets in
MPC_RESULTS_DIR so that a notebook that fails replaces none of the good results.

    results/<notebook>/results.json    values, parameters, data source, provenance
    results/tables/<name>.csv | .md
    results/figures/<name>.png
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from mpc.runinfo import REPO_ROOT, atomic_write_bytes, atomic_write_json, provenance

ENV = "MPC_RESULTS_DIR"


def results_dir() -> Path:
    return Path(os.environ.get(ENV) or REPO_ROOT / "results")


def record(notebook: str, values: dict, parameters: dict, data: dict | None = None) -> Path:
    """Write results/<notebook>/results.json: the recorded values and where they came from."""
    path = results_dir() / notebook / "results.json"
    atomic_write_json(path, {"notebook": notebook, "parameters": parameters, "data": data or {},
                             "values": values, "provenance": provenance()})
    return path


def load(notebook: str, root: Path | None = None) -> dict | None:
    path = (root or results_dir()) / notebook / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_table(df, name: str, *, index: bool = False, floatfmt: str = ".4g") -> Path:
    """results/tables/<name>.csv and .md (a Markdown table for README/REPORT)."""
    base = results_dir() / "tables"
    atomic_write_bytes(base / f"{name}.csv", df.to_csv(index=index).encode())
    atomic_write_bytes(base / f"{name}.md", (markdown_table(df, index=index, floatfmt=floatfmt) + "\n").encode())
    return base / f"{name}.csv"


def markdown_table(df, *, index: bool = False, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table without the optional `tabulate` dependency."""
    frame = df.reset_index() if index else df
    cols = [str(c) for c in frame.columns]

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt) if v == v else ""
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def save_figure(fig, name: str, *, dpi: int = 130) -> Path:
    """results/figures/<name>.png."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    path = results_dir() / "figures" / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
