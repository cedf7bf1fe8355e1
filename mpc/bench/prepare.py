"""`python -m mpc bench prepare`: speed and memory of the Criteo TSV preparation.

Writes a Criteo-format TSV of `--lines` lines with the project's synthetic generator
(`mpc.data.synth.write_tsv`, Kaggle-size tables by default), plain and gzipped, and
prepares each one in a fresh Python process, so that neither the generation nor the
parent's imports count toward the reported peak RSS. Reported per input: lines/s, MB/s
of TSV text, CPU seconds per million lines, peak RSS.

Baselines measured in the same run, on the same file:
- the pure-Python reference (`reference_prepare`: split, regex-check and dict-map each
  line, the way the DLRM reference script does it) on the first `--reference-lines`;
- pyarrow's bare CSV read of the plain file (the parser alone: no validation, decoding
  or vocabularies), the floor that the preparation builds on.
The goal (PAPERS.md §4 data, 45.8M lines in under 4 minutes) is >= 200,000 lines/s.
Wall time depends on what else runs on the cores, so the 1-minute load average is
recorded, and so is the throughput per CPU-second of all threads: contention moves it
much less, and on a dedicated machine with the file in the page cache the wall-clock
throughput is about that or better (the threads overlap; nothing waits on a disk).
Memory: the same preparation on a `--rss-lines` file shows whether peak RSS grows with
the file beyond the vocabularies (which grow with the number of distinct values).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpc.bench import record
from mpc.runinfo import REPO_ROOT, peak_rss_bytes

log = logging.getLogger(__name__)

GOAL_LINES_PER_S = 200_000


# --- inputs ----------------------------------------------------------------------------

def write_tsv(path: Path, lines: int, scale: str, seed: int) -> dict:
    """The benchmark TSV, written by the project's synthetic generator."""
    from mpc.data.synth import SynthConfig, write_tsv as synth_write_tsv

    return synth_write_tsv(SynthConfig(scale=scale, samples=lines, seed=seed), path, progress=False)


def _gzip_copy(src: Path, dst: Path, level: int) -> None:
    with open(src, "rb") as f, gzip.open(dst, "wb", compresslevel=level) as g:
        shutil.copyfileobj(f, g, 8 << 20)


# --- measurements ----------------------------------------------------------------------

def _peak_rss_bytes() -> int:
    """This process's peak RSS. getrusage's ru_maxrss is not used: across fork + exec
    Linux carries the parent's RSS into it, so a child of a big parent reads too high."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()  # no procfs: the best there is


def _child(raw: str, out: str, workers: str, block_bytes: str) -> None:
    """Runs in the fresh process: prepare once, print one JSON line of measurements."""
    from mpc.data.prepare import prepare_criteo

    rss_imported = _peak_rss_bytes()
    cpu0, t0 = os.times(), time.perf_counter()
    meta = prepare_criteo(raw, out, workers=int(workers), block_bytes=int(block_bytes), progress=False)
    wall, cpu1 = time.perf_counter() - t0, os.times()
    print(json.dumps({"wall_s": wall, "cpu_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system,
                      "peak_rss": _peak_rss_bytes(), "rss_after_imports": rss_imported,
                      "lines": meta.info["lines_total"], "vocabulary": sum(meta.cardinalities),
                      "vocabulary_bytes": meta.info["vocabulary_bytes"]}))


def _prepare_in_subprocess(raw: Path, work: Path, workers: int, block_bytes: int) -> dict:
    out = work / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    code = "import sys; from mpc.bench.prepare import _child; _child(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(raw), str(out), str(workers), str(block_bytes)],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"preparation of {raw} failed:\n{proc.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _arrow_read_lines_per_s(raw: Path) -> float:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from mpc.data.criteo_tsv import FIELD_NAMES

    t0, rows = time.perf_counter(), 0
    reader = pa_csv.open_csv(
        raw, read_options=pa_csv.ReadOptions(column_names=FIELD_NAMES, block_size=8 << 20),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(column_types={n: pa.binary() for n in FIELD_NAMES}))
    for batch in reader:
        rows += batch.num_rows
    return rows / (time.perf_counter() - t0)


def _reference_lines_per_s(raw: Path, lines: int) -> float:
    from mpc.data.criteo_tsv import reference_prepare

    with open(raw, "rb") as f:
        text = b"".join(f.readline() for _ in range(lines))
    t0 = time.perf_counter()
    reference_prepare(text)
    return text.count(b"\n") / (time.perf_counter() - t0)


# --- the benchmark -----------------------------------------------------------------------

def run_bench(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mpc-bench-prepare-", dir=args.tmp))
    try:
        return _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: Path) -> dict:
    plain, gz, small = work / "train.txt", work / "train.txt.gz", work / "small.txt"
    t0 = time.perf_counter()
    write_tsv(plain, args.lines, args.scale, args.seed)
    write_tsv(small, args.rss_lines, args.scale, args.seed)
    _gzip_copy(plain, gz, args.gzip_level)
    log.info("inputs written in %.1f s", time.perf_counter() - t0)
    load_before = os.getloadavg()[0]
    small_name = f"plain {args.rss_lines} lines"
    inputs = {"plain": (plain, args.repeats), "gzip": (gz, args.repeats), small_name: (small, 1)}
    runs = {name: [_prepare_in_subprocess(path, work, args.workers, args.block_mb << 20) for _ in range(n)]
            for name, (path, n) in inputs.items()}
    baselines = {"python reference": _reference_lines_per_s(plain, min(args.reference_lines, args.lines)),
                 "pyarrow csv read": _arrow_read_lines_per_s(plain)}
    text_bytes_per_line = plain.stat().st_size / args.lines
    results = {name: _summarise(measured, inputs[name][0].stat().st_size, text_bytes_per_line, baselines)
               for name, measured in runs.items()}
    results["baselines_lines_per_s"] = baselines
    results["load_average_before_after"] = [load_before, os.getloadavg()[0]]
    full, low = results["plain"], results[small_name]
    results["peak_rss_ratio_full_vs_small"] = full["peak_rss_mb"] / low["peak_rss_mb"]
    results["peak_rss_less_vocabulary_ratio_full_vs_small"] = (
        full["peak_rss_less_vocabulary_mb"] / low["peak_rss_less_vocabulary_mb"])
    _print(results, args, small_name)
    params = {k: v for k, v in vars(args).items() if k not in ("func", "tmp")} | {
        "generator": "mpc.data.synth.write_tsv", "text_bytes": plain.stat().st_size,
        "gzip_bytes": gz.stat().st_size}
    return record(args.record_name, params, results)


def _summarise(measured: list[dict], file_bytes: int, text_bytes_per_line: float, baselines: dict) -> dict:
    wall = statistics.median(m["wall_s"] for m in measured)
    lines, vocab_bytes = measured[0]["lines"], measured[0]["vocabulary_bytes"]
    peak = max(m["peak_rss"] for m in measured)
    lps = lines / wall
    return {"lines": lines, "wall_s_median": wall, "wall_s_all": [m["wall_s"] for m in measured],
            "lines_per_s": lps, "text_mb_per_s": lines * text_bytes_per_line / 1e6 / wall,
            "file_mb_per_s": file_bytes / 1e6 / wall,
            "cpu_s_per_million_lines": statistics.median(m["cpu_s"] for m in measured) * 1e6 / lines,
            "peak_rss_mb": peak / 1e6, "rss_after_imports_mb": measured[0]["rss_after_imports"] / 1e6,
            "vocabulary_entries": measured[0]["vocabulary"], "vocabulary_mb": vocab_bytes / 1e6,
            "peak_rss_less_vocabulary_mb": (peak - vocab_bytes) / 1e6,
            "vs_python_reference": lps / baselines["python reference"],
            "vs_pyarrow_read": lps / baselines["pyarrow csv read"], "vs_goal": lps / GOAL_LINES_PER_S,
            # all threads' CPU time: about what a dedicated machine's wall time would be, or less
            "lines_per_cpu_s": lines / statistics.median(m["cpu_s"] for m in measured)}


def _print(results: dict, args, small_name: str) -> None:
    from mpc.bench.common import print_table

    rows = [{"input": name, "lines": r["lines"], "lines/s": r["lines_per_s"], "MB/s text": r["text_mb_per_s"],
             "lines/CPU-s": r["lines_per_cpu_s"], "peak RSS MB": r["peak_rss_mb"],
             "vocab MB": r["vocabulary_mb"], "vs python": r["vs_python_reference"],
             "vs arrow read": r["vs_pyarrow_read"], "vs goal": r["vs_goal"]}
            for name, r in results.items() if name in ("plain", "gzip", small_name)]
    print_table(rows, list(rows[0]))
    base = results["baselines_lines_per_s"]
    print(f"baselines: python reference {base['python reference']:,.0f} lines/s, "
          f"pyarrow CSV read alone {base['pyarrow csv read']:,.0f} lines/s")
    full, low = results["plain"], results[small_name]
    print(f"peak RSS {full['peak_rss_mb']:.0f} MB for {args.lines} lines vs {low['peak_rss_mb']:.0f} MB for "
          f"{args.rss_lines} lines ({results['peak_rss_ratio_full_vs_small']:.2f}x); less the vocabularies' "
          f"hash tables ({full['vocabulary_mb']:.0f} vs {low['vocabulary_mb']:.0f} MB): "
          f"{results['peak_rss_less_vocabulary_ratio_full_vs_small']:.2f}x")
    load = results["load_average_before_after"]
    gz = results["gzip"]
    print(f"goal {GOAL_LINES_PER_S:,} lines/s: plain {full['vs_goal']:.2f}x, gzip {gz['vs_goal']:.2f}x "
          f"(1-min load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores); "
          f"per CPU-second of all threads: plain {full['lines_per_cpu_s'] / GOAL_LINES_PER_S:.2f}x, "
          f"gzip {gz['lines_per_cpu_s'] / GOAL_LINES_PER_S:.2f}x")


def register_bench(sub) -> None:
    from mpc.cli import positive_int
    from mpc.data.prepare import DEFAULT_BLOCK_BYTES

    p = sub.add_parser("prepare", help="Criteo TSV preparation: lines/s, MB/s, peak RSS (plain, gzip)")
    p.add_argument("--lines", type=positive_int, default=1_000_000, help="lines of the benchmark TSV")
    p.add_argument("--rss-lines", type=positive_int, default=200_000,
                   help="lines of the smaller file whose peak RSS is compared")
    p.add_argument("--reference-lines", type=positive_int, default=50_000,
                   help="lines timed with the pure-Python reference")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per input (median)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--block-mb", type=positive_int, default=DEFAULT_BLOCK_BYTES >> 20)
    p.add_argument("--gzip-level", type=int, choices=range(1, 10), default=6)
    p.add_argument("--scale", default="full", choices=["tiny", "small", "medium", "full"],
                   help="synthetic tables' scale (full: Kaggle's cardinalities, realistic vocabularies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the temporary files (default: system temp)")
    p.add_argument("--record-name", default="prepare", help="results/bench/<name>.json")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
