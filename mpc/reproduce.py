"""`python -m mpc reproduce`: execute every notebook with papermill and build the report.

Each notebook runs in its own staging folder (MPC_RESULTS_DIR) and is executed into
results/executed/<notebook>.ipynb. Only when it succeeds are its files (its
results/<notebook>/results.json, tables, figures, executed copy) moved into results/,
so a failing notebook replaces none of the good results. A failure does not stop the
others; the command ends non-zero and names the failed notebooks. Finally
results/REPORT.md is rebuilt from every notebook's recorded values (mpc.report).

Profiles set the notebooks' parameters (each notebook's `parameters` cell lists them):
    quick    tiny data, every notebook, a few minutes here — the tests use it
    default  full Kaggle-size tables, enough samples for meaningful deltas, < 1 hour here
    paper    the paper's scale: a full epoch of Kaggle-size data or the real file given
             with --data (hours; meant for a bigger machine or a GPU)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mpc.errors import UserError
from mpc.runinfo import REPO_ROOT

log = logging.getLogger(__name__)

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "mpc"


@dataclass
class NotebookOutcome:
    name: str
    ok: bool
    seconds: float
    error: str = ""
    files: list[str] = field(default_factory=list)


def notebooks() -> list[str]:
    """Notebook names (without .ipynb), in execution order."""
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def ensure_kernel() -> str:
    """Make sure the 'mpc' Jupyter kernel exists and runs this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if KERNEL_NAME in specs:
        import json

        argv = json.loads((Path(specs[KERNEL_NAME]) / "kernel.json").read_text())["argv"]
        if Path(argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL_NAME
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name="Python (mpc)", prefix=sys.prefix)
    return KERNEL_NAME


def run_notebook(name: str, parameters: dict, results_root: Path, *, progress: bool = True) -> NotebookOutcome:
    """Execute one notebook into a staging folder; promote its files on success.

    Any failure (the kernel cannot be set up, a cell raises, no results recorded) is
    returned as a failed outcome, so that the caller goes on with the next notebook.
    """
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=results_root))
    env_before = os.environ.get("MPC_RESULTS_DIR")
    os.environ["MPC_RESULTS_DIR"] = str(staging)
    try:
        import papermill as pm

        kernel = ensure_kernel()
        executed = staging / "executed" / f"{name}.ipynb"
        executed.parent.mkdir(parents=True)
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(executed), parameters=parameters,
                            kernel_name=kernel, cwd=str(NOTEBOOK_DIR), progress_bar=progress,
                            log_output=False)
        if not (staging / name / "results.json").is_file():
            raise RuntimeError(f"{name} finished without recording results/{name}/results.json")
        files = _promote(staging, results_root, name)
        return NotebookOutcome(name, True, time.perf_counter() - t0, files=files)
    except Exception as e:  # papermill raises PapermillExecutionError with the cell's error
        msg = str(e).strip().splitlines()
        short = next((l for l in reversed(msg) if l.strip()), type(e).__name__)
        failed = results_root / "executed" / f"{name}.failed.ipynb"
        if (staging / "executed" / f"{name}.ipynb").is_file():
            failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staging / "executed" / f"{name}.ipynb", failed)
        return NotebookOutcome(name, False, time.perf_counter() - t0, error=short[:500])
    finally:
        if env_before is None:
            os.environ.pop("MPC_RESULTS_DIR", None)
        else:
            os.environ["MPC_RESULTS_DIR"] = env_before
        shutil.rmtree(staging, ignore_errors=True)


def _promote(staging: Path, results_root: Path, name: str) -> list[str]:
    """Move every file of a successful run into results/, replacing older versions."""
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = src.relative_to(staging)
        dst = results_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved.append(str(rel))
    (results_root / "executed" / f"{name}.failed.ipynb").unlink(missing_ok=True)
    return moved


def reproduce(profile: str = "default", data: str | None = None, only: list[str] | None = None,
              results_root: Path | None = None, progress: bool = True) -> list[NotebookOutcome]:
    from mpc.profiles import parameters_for
    from mpc.report import write_report

    names = notebooks()
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise UserError(f"unknown notebook(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [n for n in names if n in only]
    root = Path(results_root or REPO_ROOT / "results")
    root.mkdir(parents=True, exist_ok=True)
    outcomes = []
    bar = tqdm(names, desc=f"reproduce ({profile})", unit="notebook", disable=not progress, position=0)
    for name in bar:
        bar.set_postfix_str(name)
        params = parameters_for(name, profile, data)
        log.info("running %s with %s", name, params)
        outcome = run_notebook(name, params, root, progress=progress)
        outcomes.append(outcome)
        status = "ok" if outcome.ok else f"FAILED: {outcome.error}"
        tqdm.write(f"{name}: {status} ({outcome.seconds:.0f} s)")
    write_report(root)
    return outcomes


def register_cli(sub) -> None:
    p = sub.add_parser("reproduce", help="execute every notebook with papermill and write results/REPORT.md")
    p.add_argument("--profile", choices=("quick", "default", "paper"), default="default")
    p.add_argument("--data", default=None,
                   help="a prepared real Criteo folder (prepare-criteo) to use instead of synthetic data")
    p.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK", help="run only these notebooks")
    p.add_argument("--results", default=None, help="results folder (default: the repository's results/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.data is not None and not (Path(args.data) / "meta.json").is_file():
        raise UserError(f"{args.data}: not a prepared data folder (run `python -m mpc prepare-criteo` first)")
    t0 = time.perf_counter()
    out = Path(args.results) if args.results else REPO_ROOT / "results"
    outcomes = reproduce(args.profile, args.data, args.only, out, progress=not args.no_progress)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"reproduce ({args.profile}): {len(outcomes) - len(failed)}/{len(outcomes)} notebooks ok "
          f"in {(time.perf_counter() - t0) / 60:.1f} min; report: {out / 'REPORT.md'}")
    if failed:
        print(f"failed: {', '.join(failed)} (see {out / 'executed'}/<name>.failed.ipynb)", file=sys.stderr)
        return 1
    return 0
