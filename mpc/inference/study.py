"""The acceleration study: DLRM inference latency, eager PyTorch vs runtimes (PAPERS.md §3).

"Does Form Follow Function?" measures how much hardware-specific runtimes speed up
inference over the native framework across macro-architecture patterns and depths, and
relates latency to FLOPs and to the last-level cache. The DLRM analogue, swept one
factor at a time around the Kaggle reference model:

    mlp_depth / mlp_width   hidden layers of both MLPs (constant or funnel pattern)
    dim                     embedding dimension
    table_size              table bytes from well inside to far beyond the LLC
    precision               FP32 / INT8 / INT4 tables, each through the plain-op gather
                            (all runtimes), PyTorch's quantized ops and mpc's kernels,
                            with uniform and Zipf ids, on a table larger than the LLC
    every sweep             batch 1, 128, 2048

Each point builds a DLRM (reference initialisation), its inference twins
(mpc.inference.module) and their exports (mpc.inference.export), checks every export
against eager, and times each under pinned threads (mpc.inference.timing) on pools of
fresh batches (mpc.inference.workload). The baseline is native eager PyTorch FP32: the
same model with its tables read by F.embedding_bag (the torch_ops lookup at FP32), timed
with its calls interleaved with each runtime's (timing.measure_interleaved) so that both
see the same load; speed-up = baseline median / runtime median of that pair. Baseline
rows are the baseline timed against itself: their speed-up, ideally 1, shows the noise
of the measurement. Other processes' CPU use during the run is recorded
(timing.ForeignLoad): on a shared 2-core machine it can distort ratios a hundredfold.

Sets (study_config): `quick` (CI, well under a minute), `default` (~8 minutes on 2
cores: every sweep and batch size, fewer points), `paper` (full_study, every point).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
from tqdm.auto import tqdm

from mpc.embedding import EmbeddingConfig
from mpc.embedding.config import Precision
from mpc.errors import UserError
from mpc.inference import costs
from mpc.inference.export import Runtime, available_runtimes, check_outputs, compile_model, supports
from mpc.inference.module import InferenceDLRM, LookupKind
from mpc.inference.timing import ForeignLoad, llc_bytes, measure_interleaved, pinned_threads
from mpc.inference.workload import DEFAULT_ZIPF_S, IndexDistribution, input_pool
from mpc.model import DLRM, DLRMConfig
from mpc.runinfo import atomic_write_json, provenance, ram_bytes

log = logging.getLogger(__name__)

BASELINE = "baseline"      # the `lookup` column of baseline rows (eager PyTorch FP32, see _baseline)
KAGGLE_BOTTOM_HIDDEN = (512, 256, 64)
KAGGLE_TOP_HIDDEN = (512, 256)
FOREIGN_LOAD_WARNING = 0.25   # CPU cores other processes may use meanwhile before the run is flagged


class MlpPattern(str, Enum):
    CONSTANT = "constant"    # width, width, ...
    FUNNEL = "funnel"        # width, width/2, width/4, ... (the reference's shape)


def mlp_widths(depth: int, width: int, pattern: MlpPattern | str) -> tuple[int, ...]:
    """Hidden layer widths of an MLP of `depth` hidden layers."""
    if depth < 1 or width < 1:
        raise UserError(f"MLP depth and width must be >= 1, got depth {depth}, width {width}")
    if MlpPattern(pattern) is MlpPattern.CONSTANT:
        return (width,) * depth
    return tuple(max(width >> k, 1) for k in range(depth))


@dataclass(frozen=True)
class ModelSpec:
    """A DLRM shape: hidden layers of each MLP, embedding dim and T equal tables."""

    bottom_hidden: tuple[int, ...] = KAGGLE_BOTTOM_HIDDEN
    top_hidden: tuple[int, ...] = KAGGLE_TOP_HIDDEN
    dim: int = 16
    num_tables: int = 26
    rows_per_table: int = 1000
    mlp_depth: int | None = None       # labels for the sweeps that set them (plot axes)
    mlp_width: int | None = None
    mlp_pattern: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "bottom_hidden", tuple(self.bottom_hidden))
        object.__setattr__(self, "top_hidden", tuple(self.top_hidden))
        if self.rows_per_table < 1 or self.num_tables < 1:
            raise UserError(f"tables need >= 1 row and >= 1 table, got {self.num_tables} x {self.rows_per_table}")

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return (self.rows_per_table,) * self.num_tables

    def dlrm_config(self, seed: int = 0) -> DLRMConfig:
        n = self.num_tables + 1
        return DLRMConfig(embedding=EmbeddingConfig(cardinalities=self.cardinalities, dim=self.dim, seed=seed),
                          bottom_mlp=(13, *self.bottom_hidden, self.dim),
                          top_mlp=(self.dim + n * (n - 1) // 2, *self.top_hidden, 1), seed=seed)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "bottom_hidden": list(self.bottom_hidden),
                "top_hidden": list(self.top_hidden)}


@dataclass(frozen=True)
class Sweep:
    """Model shapes crossed with precisions, lookups, id distributions, batches, runtimes.

    vary: the column that changes along the sweep (the plots' x axis)."""

    name: str
    vary: str
    specs: tuple[ModelSpec, ...]
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    lookups: tuple[LookupKind, ...] = (LookupKind.GATHER,)
    distributions: tuple[IndexDistribution, ...] = (IndexDistribution.UNIFORM,)
    batches: tuple[int, ...] = (1, 128, 2048)
    runtimes: tuple[Runtime, ...] = tuple(Runtime)

    def __post_init__(self):
        for name, kind in (("precisions", Precision), ("lookups", LookupKind),
                           ("distributions", IndexDistribution), ("runtimes", Runtime)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        object.__setattr__(self, "specs", tuple(self.specs))
        if not self.specs or min(self.batches, default=0) < 1:
            raise UserError(f"sweep {self.name}: needs model specs and batch sizes >= 1")


@dataclass(frozen=True)
class StudyConfig:
    sweeps: tuple[Sweep, ...]
    threads: int = 2
    warmup: int = 5
    reps: int = 100             # timed calls per measurement, at most ...
    max_seconds: float = 1.0    # ... or fewer once this much time was spent (>= min_reps)
    min_reps: int = 10
    block: int = 5              # timed calls per turn when a runtime and its baseline alternate
    switch: int = 2             # untimed calls at the start of each turn (see timing)
    zipf_s: float = DEFAULT_ZIPF_S
    seed: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def quick_study() -> StudyConfig:
    """CI-sized (well under a minute): a small model; every runtime at FP32 (gather),
    PyTorch's quantized ops and mpc's kernels at INT8 and INT4 (eager, uniform and Zipf
    ids); batches 1 and 128."""
    spec = ModelSpec(bottom_hidden=(64, 32), top_hidden=(64, 32), dim=8, num_tables=8, rows_per_table=2000)
    sweeps = (
        Sweep("quick_runtimes", "precision", (spec,), batches=(1, 128)),
        Sweep("quick_lookups", "precision", (spec,), precisions=(Precision.INT8, Precision.INT4),
              lookups=(LookupKind.TORCH_OPS, LookupKind.MPC_KERNELS),
              distributions=tuple(IndexDistribution), batches=(1, 128), runtimes=(Runtime.EAGER,)),
    )
    return StudyConfig(sweeps, warmup=2, reps=20, max_seconds=0.05, min_reps=5)


def _depth_specs(base: ModelSpec, depths, width: int, funnel_depths=None) -> list[ModelSpec]:
    """Both MLPs `depth` hidden layers of `width` (constant) or halving from it (funnel)."""
    out = []
    for pattern, ds in ((MlpPattern.CONSTANT, depths), (MlpPattern.FUNNEL, funnel_depths or depths)):
        out += [dataclasses.replace(base, bottom_hidden=mlp_widths(d, width, pattern),
                                    top_hidden=mlp_widths(d, width, pattern), mlp_depth=d,
                                    mlp_width=width, mlp_pattern=pattern.value) for d in ds]
    return out


def _width_specs(base: ModelSpec, widths) -> list[ModelSpec]:
    return [dataclasses.replace(base, bottom_hidden=(w, w), top_hidden=(w, w), mlp_depth=2, mlp_width=w,
                                mlp_pattern=MlpPattern.CONSTANT.value) for w in widths]


# A point holds its FP32 tables several times over (eager model, inference twins, each
# runtime's export): the tables of one point may take at most this share of the RAM. A
# machine whose reported LLC is huge (a VM may show hundreds of MB) would otherwise
# build "8x LLC" tables of gigabytes and run out of memory.
TABLE_RAM_SHARE = 1 / 16


def _rows_for(base: ModelSpec, llc: int, ratio: float, ram: int | None = None) -> int:
    """Rows per table so that the FP32 tables take `ratio` x the LLC, capped so that
    they take at most TABLE_RAM_SHARE of the RAM (the point's recorded table_over_llc
    is then what was built, below `ratio`)."""
    per_row = 4 * base.dim * base.num_tables
    rows = max(16, int(ratio * llc / per_row))
    ram = ram_bytes() if ram is None else ram
    if ram:
        cap = max(16, int(ram * TABLE_RAM_SHARE / per_row))
        if rows > cap:
            log.warning("inference study: tables of %.3gx the LLC (%d MB) capped at %d MB, 1/%d of the RAM",
                        ratio, int(ratio * llc) >> 20, (cap * per_row) >> 20, round(1 / TABLE_RAM_SHARE))
            rows = cap
    return rows


def _table_sizes(base: ModelSpec, llc: int, ratios) -> list[ModelSpec]:
    """The table_size sweep's points: one per distinct size (capped ratios may coincide)."""
    rows = dict.fromkeys(_rows_for(base, llc, r) for r in ratios)
    return [dataclasses.replace(base, rows_per_table=n) for n in rows]


def full_study(llc: int | None = None) -> StudyConfig:
    """The whole study (the `paper` set, ~15 min on 2 cores), table sizes set from this
    machine's LLC (see the module doc)."""
    llc = llc or llc_bytes() or 32 << 20
    base = ModelSpec()
    sizes = _table_sizes(base, llc, (0.125, 0.5, 2, 8, 16))
    big = dataclasses.replace(base, rows_per_table=_rows_for(base, llc, 8))
    sweeps = (
        Sweep("mlp_depth", "mlp_depth", tuple(_depth_specs(base, (1, 2, 4, 6), 512))),
        Sweep("mlp_width", "mlp_width", tuple(_width_specs(base, (64, 256, 1024)))),
        Sweep("dim", "dim", (base, *(dataclasses.replace(base, dim=d) for d in (4, 32, 64)))),
        Sweep("table_size", "table_over_llc", tuple(sizes), distributions=tuple(IndexDistribution)),
        Sweep("precision", "precision", (big,), precisions=(Precision.FP32, Precision.INT8, Precision.INT4),
              lookups=tuple(LookupKind), distributions=tuple(IndexDistribution)),
    )
    return StudyConfig(sweeps)


def default_study(llc: int | None = None) -> StudyConfig:
    """The full study trimmed to ~8 minutes on 2 cores (the `default` set): every sweep
    and batch size kept, fewer points per sweep (the end points and the middle), and
    shorter measurements. torch.compile builds once per batch size and dominates."""
    llc = llc or llc_bytes() or 32 << 20
    base = ModelSpec()
    sizes = _table_sizes(base, llc, (0.125, 1, 8))
    sweeps = (
        # A funnel of depth 1 is the constant MLP of depth 1: measured once.
        Sweep("mlp_depth", "mlp_depth", tuple(_depth_specs(base, (1, 3, 6), 512, funnel_depths=(3, 6)))),
        Sweep("mlp_width", "mlp_width", tuple(_width_specs(base, (64, 1024)))),
        Sweep("dim", "dim", (base, *(dataclasses.replace(base, dim=d) for d in (4, 64)))),
        Sweep("table_size", "table_over_llc", tuple(sizes), distributions=tuple(IndexDistribution)),
        Sweep("precision", "precision", (sizes[-1],),
              precisions=(Precision.FP32, Precision.INT8, Precision.INT4),
              lookups=tuple(LookupKind), distributions=tuple(IndexDistribution)),
    )
    return StudyConfig(sweeps, reps=50, max_seconds=0.3, min_reps=10)


class StudySet(str, Enum):
    QUICK = "quick"        # CI: well under a minute
    DEFAULT = "default"    # the committed run: ~8 minutes on 2 cores
    PAPER = "paper"        # every point of every sweep: ~15 minutes on 2 cores


_SETS = {StudySet.QUICK: lambda llc: quick_study(), StudySet.DEFAULT: default_study,
         StudySet.PAPER: full_study}


def study_config(study_set: StudySet | str, *, runtimes=None, batches=None, llc: int | None = None,
                 **overrides) -> StudyConfig:
    """A named set, narrowed to `runtimes` (each sweep keeps those of its own that are
    listed; a sweep left with none is dropped), with `batches` replacing every sweep's
    batch sizes, and StudyConfig fields (threads, reps, max_seconds, ...) overridden
    where given and not None."""
    try:
        config = _SETS[StudySet(study_set)](llc)
    except ValueError:
        raise UserError(f"unknown study set {study_set!r}; choose one of "
                        f"{', '.join(s.value for s in StudySet)}") from None
    allowed = {f.name for f in dataclasses.fields(StudyConfig)} - {"sweeps"}
    if set(overrides) - allowed:
        raise UserError(f"unknown study setting(s) {', '.join(sorted(set(overrides) - allowed))}; "
                        f"choose from {', '.join(sorted(allowed))}")
    sweeps = config.sweeps
    if runtimes is not None:
        keep = {_enum(Runtime, r, "runtime") for r in runtimes}
        sweeps = tuple(dataclasses.replace(s, runtimes=tuple(r for r in s.runtimes if r in keep))
                       for s in sweeps)
        sweeps = tuple(s for s in sweeps if s.runtimes)
        if not sweeps:
            raise UserError(f"no sweep of the {StudySet(study_set).value} set uses any of the runtimes "
                            f"{', '.join(map(str, runtimes))}")
    if batches is not None:
        if not batches or min(batches) < 1:
            raise UserError(f"batch sizes must be >= 1, got {list(batches)}")
        sweeps = tuple(dataclasses.replace(s, batches=tuple(int(b) for b in batches)) for s in sweeps)
    return dataclasses.replace(config, sweeps=sweeps, **{k: v for k, v in overrides.items() if v is not None})


def _enum(kind, value, what: str):
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"unknown {what} {value!r}; choose from {', '.join(k.value for k in kind)}") from None


# --- running ------------------------------------------------------------------------

@dataclass
class StudyResult:
    """Tidy rows (one per timed model x batch x id distribution), what was skipped and
    why, the runtimes found (with versions) and the provenance of the run."""

    rows: list[dict]
    skipped: list[dict]
    runtimes: list[dict]
    llc_bytes: int | None
    config: dict
    provenance: dict = field(default_factory=provenance)
    seconds: float = 0.0      # wall time of the whole run (builds, checks, timings)
    foreign_cpu_cores: float | None = None   # other processes' CPU use meanwhile (timing.ForeignLoad)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_json(self) -> dict:
        return {"provenance": self.provenance, "llc_bytes": self.llc_bytes, "runtimes": self.runtimes,
                "config": self.config, "seconds": self.seconds, "foreign_cpu_cores": self.foreign_cpu_cores,
                "rows": self.rows, "skipped": self.skipped}

    def save(self, path) -> None:
        atomic_write_json(path, self.to_json())


@dataclass
class _Run:
    """What one study run carries from point to point."""

    config: StudyConfig
    present: set[Runtime]
    versions: dict[Runtime, str]
    llc: int | None
    commit: str
    bar: tqdm
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def measure(self, fn, baseline, pool):
        """(stats of fn, stats of the baseline, wall seconds spent), their calls interleaved."""
        self.bar.update(1)
        c = self.config
        start = time.perf_counter()
        stats, base = measure_interleaved([fn, baseline], pool, warmup=c.warmup, reps=c.reps,
                                          min_reps=c.min_reps, max_seconds=c.max_seconds, block=c.block,
                                          switch=c.switch)
        return stats, base, time.perf_counter() - start

    def skip(self, context: dict, reason: str, **point) -> None:
        log.info("skipped %s: %s", point, reason)
        self.skipped.append({**{k: context[k] for k in ("sweep", "spec_index")},
                             **{k: getattr(v, "value", v) for k, v in point.items()}, "reason": reason})


def _context(sweep: Sweep, index: int, spec: ModelSpec, run: _Run) -> dict:
    fp32_table = spec.num_tables * spec.rows_per_table * Precision.FP32.row_bytes(spec.dim)
    ctx = {"sweep": sweep.name, "vary": sweep.vary, "spec_index": index, **spec.to_json(),
           "table_bytes_fp32": fp32_table, "llc_bytes": run.llc,
           "table_over_llc": fp32_table / run.llc if run.llc else None,
           "threads": run.config.threads, "commit": run.commit}
    return ctx


def _row(run: _Run, ctx: dict, spec: ModelSpec, precision: Precision, lookup: str, runtime: Runtime,
         batch: int, dist: IndexDistribution, stats, base, **extra) -> dict:
    cost = costs.inference_cost((13, *spec.bottom_hidden, spec.dim), spec.dlrm_config().top_mlp,
                                spec.cardinalities, spec.dim, precision, batch)
    row = {**ctx, "precision": precision.value, "lookup": lookup, "runtime": runtime.value,
           "runtime_version": run.versions[runtime], "batch": batch, "distribution": dist.value,
           "zipf_s": run.config.zipf_s if dist is IndexDistribution.ZIPF else None,
           **{f"latency_{k}": v for k, v in stats.to_json().items()},
           "throughput_sps": batch / stats.median_s, "baseline_median_s": base.median_s,
           "speedup": base.median_s / stats.median_s, **extra,
           **{f"cost_{k}": v for k, v in cost.to_json().items()}}
    row["x"] = row.get(ctx["vary"])
    return row


def _run_spec(run: _Run, sweep: Sweep, index: int, spec: ModelSpec) -> None:
    c = run.config
    ctx = _context(sweep, index, spec, run)
    model = DLRM(spec.dlrm_config(c.seed)).eval()
    calls = 2 * (c.warmup + c.reps + c.switch * -(-c.reps // c.block))   # per timing, both sides
    pools = {(d, b): input_pool(spec.cardinalities, b, d, calls, c.seed, c.zipf_s)
             for b in sweep.batches for d in sweep.distributions}
    reference = {}
    baseline = _baseline(model)
    for (d, b), pool in pools.items():
        reference[(d, b)] = baseline(*pool[0])
        # Timed against itself: the speed-up of this row (~1) shows the measurement noise.
        stats, base, seconds = run.measure(baseline, baseline, pool)
        run.rows.append(_row(run, ctx, spec, Precision.FP32, BASELINE, Runtime.EAGER, b, d, stats, base,
                             build_seconds=0.0, artifact_bytes=0, max_abs_diff=0.0, max_abs_diff_fp32=0.0,
                             measure_seconds=seconds))
    for precision in sweep.precisions:
        for lookup in sweep.lookups:
            wanted = [r for r in sweep.runtimes if r in run.present]
            usable = [r for r in wanted if supports(r, lookup, precision)]
            for r in set(wanted) - set(usable):
                run.skip(ctx, "runtime cannot take this lookup at this precision",
                         precision=precision, lookup=lookup, runtime=r)
                run.bar.update(len(pools))
            if not usable:
                continue
            module = InferenceDLRM.from_model(model, precision, lookup)
            for runtime in usable:
                _run_runtime(run, ctx, sweep, spec, module, runtime, pools, reference, baseline)


def _baseline(model: DLRM):
    """Native eager PyTorch FP32: the model's tables read by F.embedding_bag (one call
    over all tables), nn.Linear MLPs, bmm interaction, in inference mode. Pure PyTorch,
    as the reference DLRM is written: the training model itself pools through mpc's
    compiled kernels, which would make every speed-up relative to mpc's own code."""
    module = InferenceDLRM.from_model(model, Precision.FP32, LookupKind.TORCH_OPS)

    def predict(dense, cat):
        with torch.inference_mode():
            return module(dense, cat)
    return predict


def _run_runtime(run: _Run, ctx, sweep, spec, module: InferenceDLRM, runtime: Runtime, pools, reference,
                 baseline):
    """Build `module` for `runtime` (once, or per batch size for static-shape runtimes),
    check it against eager, time it on every pool."""
    precision, lookup = module.precision, module.lookup_kind.value
    point = {"precision": precision, "lookup": lookup, "runtime": runtime}
    static = runtime is Runtime.TORCH_COMPILE
    compiled = None
    for b in sweep.batches:
        example = pools[(sweep.distributions[0], b if static else max(sweep.batches))][0]
        try:
            if compiled is None or static:
                compiled = compile_model(module, runtime, example, threads=run.config.threads)
        except UserError as e:
            log.warning("%s", e)
            for skipped in (sweep.batches[sweep.batches.index(b):] if not static else (b,)):
                run.skip(ctx, str(e), batch=skipped, **point)
                run.bar.update(len(sweep.distributions))
            if static:
                continue
            return
        for d in sweep.distributions:
            pool = pools[(d, b)]
            try:
                diff = check_outputs(compiled, module, *pool[0])
            except AssertionError as e:
                log.error("%s %s %s: output mismatch, not timed: %s", runtime.value, lookup,
                          precision.value, str(e).splitlines()[0])
                run.skip(ctx, f"output mismatch: {str(e).splitlines()[0]}", batch=b, distribution=d, **point)
                run.bar.update(1)
                continue
            diff_fp32 = float((compiled(*pool[0]) - reference[(d, b)]).abs().max())
            stats, base, seconds = run.measure(compiled, baseline, pool)
            run.rows.append(_row(run, ctx, spec, precision, lookup, runtime, b, d, stats, base,
                                 build_seconds=compiled.build_seconds,
                                 artifact_bytes=compiled.artifact_bytes(),
                                 max_abs_diff=diff, max_abs_diff_fp32=diff_fp32, measure_seconds=seconds))


def _measurements(config: StudyConfig, present: set[Runtime]) -> int:
    """Length of the progress bar: every point of every sweep, baseline included."""
    n = 0
    for s in config.sweeps:
        per_spec = len(s.batches) * len(s.distributions)
        runtimes = sum(r in present for r in s.runtimes)
        n += len(s.specs) * per_spec * (1 + len(s.precisions) * len(s.lookups) * runtimes)
    return n


def run_study(config: StudyConfig, progress: bool = True) -> StudyResult:
    """Run every sweep of `config`; runtimes that are not installed are listed (with the
    reason) in the result's `runtimes` and left out."""
    infos = available_runtimes()
    for info in infos.values():
        if not info.available:
            log.warning("runtime %s left out: %s", info.runtime.value, info.reason)
    start = time.perf_counter()
    prov = provenance()
    present = {r for r, i in infos.items() if i.available}
    with ForeignLoad() as load, pinned_threads(config.threads), \
            tqdm(total=_measurements(config, present), desc="inference study", unit="timing",
                 disable=not progress) as bar:
        run = _Run(config, present, {r: i.version for r, i in infos.items()}, llc_bytes(), prov["commit"], bar)
        for sweep in config.sweeps:
            for index, spec in enumerate(sweep.specs):
                _run_spec(run, sweep, index, spec)
    if load.cores is not None and load.cores > FOREIGN_LOAD_WARNING:
        log.warning("other processes used %.2f CPU cores on average while the study ran: the timings "
                    "shared the machine and their ratios are unreliable", load.cores)
    return StudyResult(run.rows, run.skipped, [i.to_json() for i in infos.values()], run.llc,
                       config.to_json(), prov, seconds=time.perf_counter() - start,
                       foreign_cpu_cores=load.cores)


def speedup_summary(frame, by=("sweep", "precision", "lookup", "runtime", "batch")):
    """Geometric-mean speed-up over the eager FP32 baseline, per group (rows of one
    group differ in model shape or id distribution), with the group's row count."""
    import numpy as np

    grouped = frame.groupby(list(by), sort=True)["speedup"]
    return grouped.agg(speedup_geomean=lambda s: float(np.exp(np.log(s).mean())), rows="size").reset_index()
