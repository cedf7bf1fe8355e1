"""What an acceleration study found, summarised for notebook 06 and the report (PAPERS.md §3).

"Does Form Follow Function?" reports hardware-specific runtimes' speed-ups over the
native framework (380% on average, 550% for depthwise bottleneck convolutions, 1200%
for a DARTS architecture, MobileNet-V2 at ~2.4 ms) for CNNs. This module reduces the
tidy rows of mpc.inference.study to the same kinds of figures for DLRM:

    runtime_summary    per runtime: geometric-mean and best speed-up over eager PyTorch
                       FP32, on the FP32 rows where only the runtime changes
    pattern_summary    per design point of each sweep (MLP depth/pattern, width,
                       embedding dim, table size vs LLC, precision x lookup)
    batch_trends       per runtime: speed-up at the smallest vs the largest batch size
                       (runtimes can go opposite ways: never pooled for the verdict)
    reference_latency  latency (median, p10-p90) and throughput of the Kaggle-shape model
    paper_comparison   the paper's numbers (CNNs) beside ours (DLRM), never merged
    claim              the report's record for claim fff_runtime_speedup

Speed-up is always baseline median / runtime median of one interleaved pair
(study.py); averages over points are geometric means, the mean that treats a 2x
speed-up and a 2x slow-down symmetrically.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mpc.inference.study import BASELINE, FOREIGN_LOAD_WARNING, ModelSpec

SWEEP_ORDER = ("mlp_depth", "mlp_width", "dim", "table_size", "precision")
BASELINE_LABEL = "eager FP32 (baseline)"
NOISE_LABEL = "baseline vs itself (noise)"


def geomean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.exp(np.log(v).mean())) if len(v) else float("nan")


def runtime_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows where only the runtime differs from the baseline: FP32 tables read by
    the plain-op gather, which every runtime builds (index_select where the baseline
    calls F.embedding_bag: with one id per table, the same arithmetic)."""
    return frame[(frame.lookup == "gather") & (frame.precision == "fp32")]


def noise_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The baseline timed against itself: its 'speed-up' departs from 1 by noise only."""
    return frame[frame.lookup == BASELINE]


def _num(v) -> str:
    """A swept value as written: 6 not 6.0 (a column with gaps holds ints as floats)."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def _span(lo: float, hi: float) -> str:
    """'8x' when both ends print alike, else '2-8x' (ratios to 3 significant digits)."""
    a, b = f"{lo:.3g}", f"{hi:.3g}"
    return f"{a}x" if a == b else f"{a}-{b}x"


def _label(row) -> str:
    sweep = row["sweep"]
    if sweep == "mlp_depth":
        return f"{row['mlp_pattern']} x{_num(row['mlp_depth'])}"
    if sweep == "mlp_width":
        return f"width {_num(row['mlp_width'])}"
    if sweep == "dim":
        return f"dim {_num(row['dim'])}"
    if sweep == "table_size" and not pd.isna(row.get("table_over_llc")):
        return f"{row['table_over_llc']:.3g}x LLC"
    if row["vary"] == "precision":
        return f"{row['precision']} {row['lookup']}"
    return f"{row['vary']} {_num(row['x'])}"


def label_points(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with `point` (a short label of the design point within its sweep),
    `engine` (the runtime, or BASELINE_LABEL for the baseline rows) and `sweep_rank`
    (the sweeps in the study's order, unknown ones after)."""
    out = frame.copy()
    out["point"] = [_label(r) for r in out.to_dict("records")]
    out["engine"] = out.runtime.where(out.lookup != BASELINE, BASELINE_LABEL)
    rank = {s: i for i, s in enumerate(SWEEP_ORDER)}
    out["sweep_rank"] = [rank.get(s, len(rank)) for s in out.sweep]
    return out


def point_order(frame: pd.DataFrame) -> list[str]:
    """Labels of label_points in plotting order: by sweep, then by the swept value."""
    f = label_points(frame) if "point" not in frame else frame
    key = f.x.map(lambda v: (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)))
    f = f.assign(_key=key, _pattern=f.get("mlp_pattern", pd.Series(index=f.index)).fillna("").astype(str))
    ordered = f.sort_values(["sweep_rank", "_pattern", "_key", "precision", "lookup"], kind="stable")
    return list(dict.fromkeys(ordered.point))


def runtime_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per runtime, over the FP32 gather rows: points, geometric-mean speed-up (all, and
    per batch size), the worst and best point, and the share of points faster than eager."""
    rows = label_points(runtime_rows(frame))
    out = []
    for runtime, g in rows.groupby("runtime", sort=False):
        best = g.loc[g.speedup.idxmax()]
        rec = {"runtime": runtime, "version": g.runtime_version.iloc[0], "points": len(g),
               "speedup_geomean": geomean(g.speedup), "speedup_min": float(g.speedup.min()),
               "speedup_max": float(best.speedup),
               "best_point": f"{best.sweep}: {best.point}, batch {best.batch}, {best.distribution}",
               "faster_share": float((g.speedup > 1).mean())}
        for b, gb in g.groupby("batch"):
            rec[f"geomean_batch_{b}"] = geomean(gb.speedup)
        out.append(rec)
    noise = noise_rows(frame)
    if len(noise):
        out.append({"runtime": NOISE_LABEL, "version": noise.runtime_version.iloc[0],
                    "points": len(noise), "speedup_geomean": geomean(noise.speedup),
                    "speedup_min": float(noise.speedup.min()), "speedup_max": float(noise.speedup.max()),
                    "best_point": "", "faster_share": float((noise.speedup > 1).mean()),
                    **{f"geomean_batch_{b}": geomean(gb.speedup) for b, gb in noise.groupby("batch")}})
    return pd.DataFrame(out)


def pattern_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean speed-up per sweep, design point, runtime and batch size (over id
    distributions), the baseline rows left out."""
    f = label_points(frame[frame.lookup != BASELINE])
    order = {p: i for i, p in enumerate(point_order(f))}
    grouped = f.groupby(["sweep", "sweep_rank", "point", "precision", "lookup", "runtime", "batch"])
    out = grouped.agg(speedup_geomean=("speedup", geomean), latency_median_s=("latency_median_s", "median"),
                      rows=("speedup", "size")).reset_index()
    out["point_rank"] = out.point.map(order)
    return out.sort_values(["sweep_rank", "point_rank", "runtime", "batch"]).drop(
        columns=["sweep_rank", "point_rank"]).reset_index(drop=True)


def _is_reference(f: pd.DataFrame) -> pd.Series:
    ref = ModelSpec()
    return ((f.dim == ref.dim) & (f.num_tables == ref.num_tables) & (f.rows_per_table == ref.rows_per_table)
            & f.bottom_hidden.map(lambda h: tuple(h) == ref.bottom_hidden)
            & f.top_hidden.map(lambda h: tuple(h) == ref.top_hidden))


def reference_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """FP32 rows (baseline and gather) of the Kaggle-shape model (ModelSpec() defaults:
    MLPs 13-512-256-64-16 and 367-512-256-1, dim 16, 26 tables), uniform ids; when the
    study did not include it, of the first model it timed."""
    f = frame[frame.lookup.isin([BASELINE, "gather"]) & (frame.precision == "fp32")]
    same = _is_reference(f)
    picked = f[same] if same.any() else f[(f.sweep == f.sweep.iloc[0]) & (f.spec_index == f.spec_index.iloc[0])]
    first = picked.drop_duplicates(["runtime", "lookup", "batch", "distribution"])   # one sweep's copy
    uniform = first[first.distribution == "uniform"]
    return uniform if len(uniform) else first


def reference_name(frame: pd.DataFrame) -> str:
    """'Kaggle-shape DLRM' when reference_rows found it, else the model in words."""
    rows = reference_rows(frame)
    return "Kaggle-shape DLRM" if _is_reference(rows).all() else f"DLRM ({model_description(frame)})"


def reference_latency(frame: pd.DataFrame) -> pd.DataFrame:
    """Latency (ms: median, p10, p90, relative spread) and throughput per runtime and
    batch size for the reference model (reference_rows), with the speed-up over eager."""
    f = reference_rows(frame)
    name = np.where(f.lookup == BASELINE, BASELINE_LABEL, f.runtime)
    out = pd.DataFrame({"runtime": name, "batch": f.batch.values,
                        "median_ms": f.latency_median_s.values * 1e3, "p10_ms": f.latency_p10_s.values * 1e3,
                        "p90_ms": f.latency_p90_s.values * 1e3, "spread": f.latency_spread.values,
                        "reps": f.latency_reps.values, "throughput_sps": f.throughput_sps.values,
                        "speedup": f.speedup.values})
    return out.sort_values(["batch", "median_ms"]).reset_index(drop=True)


def model_description(frame: pd.DataFrame) -> str:
    """The reference model of reference_rows, in words."""
    r = reference_rows(frame).iloc[0]
    n = r.num_tables + 1
    return (f"bottom MLP 13-{'-'.join(map(str, r.bottom_hidden))}-{r.dim}, top MLP "
            f"{r.dim + n * (n - 1) // 2}-{'-'.join(map(str, r.top_hidden))}-1, "
            f"{r.num_tables} tables x {r.rows_per_table:,} rows x dim {r.dim}")


def _pct(ratio: float) -> str:
    return f"{ratio:.2f}x ({ratio * 100:.0f}%)"


def paper_comparison(frame: pd.DataFrame, paper: dict) -> pd.DataFrame:
    """The paper's headline figures (CNNs) beside the figure of ours that answers the same
    question for DLRM. paper: paper_numbers()["form_follows_function"]."""
    rt = label_points(runtime_rows(frame))
    pat = pattern_summary(frame)
    pat = pat[(pat.precision == "fp32") & (pat.lookup == "gather")]
    by_point = pat.groupby(["sweep", "point", "runtime"]).speedup_geomean.apply(geomean).reset_index()
    rows = []
    ov = rt[rt.runtime == "openvino"]
    best_rt = rt.groupby("runtime").speedup.apply(geomean)
    rows.append({"question": "average speed-up of the hardware-specific runtime over the native framework",
                 "paper (CNNs)": f"{paper['average_speedup_percent']}% ({paper['runtime']})",
                 "ours (DLRM)": (f"OpenVINO {_pct(geomean(ov.speedup))}, geomean of {len(ov)} points; "
                                 if len(ov) else "OpenVINO not measured; ")
                 + (f"best runtime {best_rt.idxmax()} {_pct(best_rt.max())}" if len(best_rt) else "")})
    if len(by_point):
        b = by_point.loc[by_point.speedup_geomean.idxmax()]
        rows.append({"question": "largest speed-up of one design pattern",
                     "paper (CNNs)": f"{paper['depthwise_bottleneck_speedup_percent']}% (depthwise bottleneck)",
                     "ours (DLRM)": f"{_pct(b.speedup_geomean)}: {b.runtime} on {b.sweep} {b.point} "
                                    f"(geomean over batch sizes)"})
    if len(rt):
        m = rt.loc[rt.speedup.idxmax()]
        rows.append({"question": "largest speed-up of one model",
                     "paper (CNNs)": f"{paper['darts_speedup_percent']}% (DARTS-derived architecture)",
                     "ours (DLRM)": f"{_pct(m.speedup)}: {m.runtime} on {m.sweep} {m.point}, batch {m.batch}"})
    lat = reference_latency(frame)
    one = lat[lat.batch == lat.batch.min()]
    if len(one):
        fast = one.loc[one.median_ms.idxmin()]
        eager = one[one.runtime == BASELINE_LABEL].median_ms.min()
        rows.append({"question": "lowest latency of a reference model, one input",
                     "paper (CNNs)": f"{paper['mobilenet_v2_latency_ms']} ms (MobileNet-V2)",
                     "ours (DLRM)": f"{fast.median_ms:.3f} ms: {fast.runtime}, {reference_name(frame)}, batch "
                                    f"{fast.batch} (eager: {eager:.3f} ms)"})
    return pd.DataFrame(rows)


def _direction(a: float, b: float, tol: float = 0.1) -> str:
    """'larger' / 'smaller' / 'about equal' (within `tol`) for a against b."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return "not measured"
    if a > b * (1 + tol):
        return "larger"
    if a < b / (1 + tol):
        return "smaller"
    return "about equal"


def batch_trends(frame: pd.DataFrame) -> pd.DataFrame:
    """Per runtime (eager left out: it is the baseline's framework), over the FP32 gather
    rows: geometric-mean speed-up at the smallest and at the largest batch size of the
    study, and `trend`: "falls" / "rises" / "flat" as the batch grows (10% margin)."""
    rt = runtime_rows(frame)
    rt = rt[rt.runtime != "eager"]
    if rt.batch.nunique() < 2:
        return pd.DataFrame(columns=["runtime", "batch_lo", "speedup_lo", "batch_hi", "speedup_hi", "trend"])
    lo, hi = int(rt.batch.min()), int(rt.batch.max())
    out = []
    for runtime, g in rt.groupby("runtime", sort=False):
        a, b = g[g.batch == lo].speedup, g[g.batch == hi].speedup
        if not (len(a) and len(b)):
            continue
        s_lo, s_hi = geomean(a), geomean(b)
        trend = "falls" if s_lo > s_hi * 1.1 else "rises" if s_hi > s_lo * 1.1 else "flat"
        out.append({"runtime": runtime, "batch_lo": lo, "speedup_lo": s_lo, "batch_hi": hi,
                    "speedup_hi": s_hi, "trend": trend})
    return pd.DataFrame(out, columns=["runtime", "batch_lo", "speedup_lo", "batch_hi", "speedup_hi", "trend"])


def _names(trends: pd.DataFrame, trend: str) -> list[str]:
    return list(trends[trends.trend == trend].runtime)


def _batch_contrast(frame: pd.DataFrame) -> str:
    """The speed-up at the smallest against the largest batch, runtime by runtime (pooled
    over runtimes, opposite trends cancel and the pooled figure says little)."""
    t = batch_trends(frame)
    if not len(t):
        return ""
    lo, hi = t.batch_lo.iloc[0], t.batch_hi.iloc[0]
    per = "; ".join(f"{r.runtime} {r.speedup_lo:.2f}x vs {r.speedup_hi:.2f}x" for r in t.itertuples())
    groups = [(f"larger at batch {lo}", _names(t, "falls")), (f"larger at batch {hi}", _names(t, "rises")),
              ("about equal (within 10%)", _names(t, "flat"))]
    text = (f"Per runtime, geomean speed-up at batch {lo} vs batch {hi}: {per}; "
            + "; ".join(f"{what}: {', '.join(names)}" for what, names in groups if names) + ". ")
    if _names(t, "falls") and _names(t, "rises"):
        rt = runtime_rows(frame)
        rt = rt[rt.runtime.isin(set(t.runtime))]
        a, b = geomean(rt[rt.batch == lo].speedup), geomean(rt[rt.batch == hi].speedup)
        text += (f"Pooled over runtimes these opposite trends cancel ({a:.2f}x at batch {lo}, {b:.2f}x at "
                 f"batch {hi}), so the pooled figure does not describe any one runtime. ")
    return text


def _llc_contrast(frame: pd.DataFrame) -> str:
    sizes = runtime_rows(frame[frame.sweep == "table_size"])
    sizes = sizes[sizes.table_over_llc.notna()]
    inside, beyond = sizes[sizes.table_over_llc <= 0.5], sizes[sizes.table_over_llc >= 2]
    if not (len(inside) and len(beyond)):
        return ""
    a, b = geomean(beyond.speedup), geomean(inside.speedup)
    span = _span(beyond.table_over_llc.min(), beyond.table_over_llc.max())
    return (f"With tables far beyond the LLC ({span}) the runtimes' speed-up ({a:.2f}x) is "
            f"{_direction(a, b)} compared with tables inside it ({b:.2f}x). ")


def _precision_clause(frame: pd.DataFrame) -> str:
    f = frame[(frame.precision != "fp32") & (frame.runtime == "eager") & (frame.lookup != BASELINE)]
    if not len(f):
        return ""
    parts = [f"{p} {lk} {geomean(g.speedup):.2f}x" for (p, lk), g in f.groupby(["precision", "lookup"])]
    where = f.table_over_llc.dropna()
    size = f" (tables {_span(where.min(), where.max())} LLC in FP32)" if len(where) else ""
    return f" Low-precision tables in eager PyTorch{size}, geomean over batches and id laws: {', '.join(parts)}."


def _what_transfers(frame: pd.DataFrame) -> str:
    """Where each runtime's gain sits, read from the data: per-call overhead (largest at
    the smallest batch) or arithmetic (growing with the batch, as in compute-bound CNNs).
    Runtime by runtime: the runtimes of one study can go opposite ways."""
    head = "What transfers is the method (same model, runtime swapped, speed-up per design point)"
    t = batch_trends(frame)
    if not len(t):
        return head + "."
    lo, hi = t.batch_lo.iloc[0], t.batch_hi.iloc[0]
    parts = []

    def join(names):
        return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]

    falls = t[t.trend == "falls"]
    gain, loss = list(falls[falls.speedup_lo > 1].runtime), list(falls[falls.speedup_lo <= 1].runtime)
    if gain:
        parts.append(f"for {join(gain)} the gain shrinks as the batch grows, so it comes mostly from removing "
                     f"per-call framework overhead, not from faster arithmetic")
    if loss:
        parts.append(f"for {join(loss)} the speed-up falls as the batch grows")
    rises = t[t.trend == "rises"]
    slow, fast = list(rises[rises.speedup_lo < 1].runtime), list(rises[rises.speedup_lo >= 1].runtime)
    if slow:
        wins = [r for r in slow if float(rises.set_index("runtime").speedup_hi[r]) > 1.1]
        one = len(slow) == 1
        parts.append(f"{join(slow)} {'is' if one else 'are'} slower than eager at batch {lo}, where the fixed "
                     f"cost of a call weighs most (so {'its' if one else 'their'} per-call overhead is larger "
                     f"than eager's), and the gap closes as the batch grows"
                     + (f" ({join(wins)} ahead at batch {hi})" if wins else ""))
    if fast:
        parts.append(f"for {join(fast)} the gain grows with the batch, so it comes from faster arithmetic "
                     f"(fused, better blocked kernels), the regime of the paper's compute-bound CNNs")
    flat = _names(t, "flat")
    if flat:
        parts.append(f"for {join(flat)} the speed-up hardly depends on the batch size")
    if len(t) == 1:
        return f"{head}; on DLRM {parts[0]}."
    return f"{head}; on DLRM the batch size matters differently per runtime: {'; '.join(parts)}."


def claim(frame: pd.DataFrame, paper: dict, machine: str, threads: int, data: str,
          foreign_cpu_cores: float | None = None) -> dict:
    """The record of claim fff_runtime_speedup: {"ours", "verdict", "data"} (mpc.report).
    foreign_cpu_cores: other processes' CPU use during the run (StudyResult); past
    study.FOREIGN_LOAD_WARNING the verdict starts by saying the ratios are unreliable."""
    rt = label_points(runtime_rows(frame))
    summary = runtime_summary(frame)
    per = summary[summary.runtime.isin(set(rt.runtime))].set_index("runtime")
    noise = noise_rows(frame).speedup
    models = rt.drop_duplicates(["sweep", "spec_index"]).shape[0]
    batches = ", ".join(str(b) for b in sorted(rt.batch.unique()))
    runtimes = "; ".join(f"{r} {p.speedup_geomean:.2f}x (best {p.speedup_max:.2f}x)" for r, p in per.iterrows())
    best = rt.loc[rt.speedup.idxmax()] if len(rt) else None
    ours = (f"DLRM inference, FP32 tables, {models} model shape{'s' if models != 1 else ''} x batch {batches}: "
            f"geometric-mean speed-up over eager PyTorch FP32 (best point): {runtimes}."
            + (f" Best of all: {best.runtime} {best.speedup:.2f}x on {best.sweep} {best.point}, batch "
               f"{best.batch}." if best is not None else "")
            + (f" Baseline timed against itself: {noise.quantile(0.1):.2f}-{noise.quantile(0.9):.2f}x "
               f"(p10-p90, the noise of one ratio)." if len(noise) else "")
            + _precision_clause(frame))
    return {"ours": ours, "verdict": _verdict(rt, per, frame, paper, machine, threads, foreign_cpu_cores),
            "data": data}


def _verdict(rt, per, frame, paper, machine, threads, foreign_cpu_cores) -> str:
    faster = [r for r, p in per.iterrows() if p.speedup_geomean > 1.1 and r != "eager"]
    slower = [r for r, p in per.iterrows() if p.speedup_geomean < 1 / 1.1 and r != "eager"]
    paper_ratio = paper["average_speedup_percent"] / 100
    ov = per.speedup_geomean.get("openvino", float("nan"))
    text = ""
    if foreign_cpu_cores is not None and foreign_cpu_cores > FOREIGN_LOAD_WARNING:
        text = (f"UNRELIABLE: other processes used {foreign_cpu_cores:.2f} CPU cores on average during the "
                f"run, so the timings shared the machine; rerun on a quiet one. ")
    text += (f"Not the same experiment: the paper's figures are for CNNs under OpenVINO (CPU and GPU); ours "
             f"are DLRM on {machine} with {threads} pinned threads, so the numbers do not compare one to one. "
             f"On DLRM, faster than eager on average: {', '.join(faster) or 'none'}; slower: "
             f"{', '.join(slower) or 'none'}. ")
    if math.isfinite(ov):
        text += (f"OpenVINO's average ({ov:.2f}x) is {_direction(ov, paper_ratio)} compared with the paper's "
                 f"{paper['average_speedup_percent']}% read as {paper_ratio:.1f}x. ")
    return text + _batch_contrast(frame) + _llc_contrast(frame) + _what_transfers(frame)


def checks(frame: pd.DataFrame) -> dict:
    """Figures a test of the notebook can assert, which a broken pipeline would not give:
    every build agrees with its eager module, FP32 builds with the eager FP32 baseline,
    low-precision ones differ from it a little (post-training quantization), speed-ups
    and throughputs are what the recorded medians give."""
    timed = frame[frame.lookup != BASELINE]
    fp32, low = timed[timed.precision == "fp32"], timed[timed.precision != "fp32"]
    noise = noise_rows(frame).speedup
    return {
        "rows_by_runtime": {r: int(n) for r, n in timed.groupby("runtime").size().items()},
        "baseline_rows": int(len(noise)),
        "max_abs_diff_vs_eager_module": float(timed.max_abs_diff.max()) if len(timed) else None,
        "fp32_max_abs_diff_vs_baseline": float(fp32.max_abs_diff_fp32.max()) if len(fp32) else None,
        "lowp_abs_diff_vs_baseline": ([float(low.max_abs_diff_fp32.min()), float(low.max_abs_diff_fp32.max())]
                                      if len(low) else None),
        "noise_geomean": geomean(noise) if len(noise) else None,
        "speedup_range": [float(frame.speedup.min()), float(frame.speedup.max())],
        "latency_min_s": float(frame.latency_median_s.min()),
        "speedup_is_ratio_of_medians": bool(np.allclose(frame.speedup,
                                                        frame.baseline_median_s / frame.latency_median_s)),
        "throughput_is_batch_over_median": bool(np.allclose(frame.throughput_sps,
                                                            frame.batch / frame.latency_median_s)),
    }
