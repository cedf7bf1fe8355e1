"""`python -m mpc bench lookup`: the one-call table-batched lookup vs PyTorch's ops.

Full Kaggle-size tables (PAPERS.md §4; `--cardinalities 0.01` for a quick run), dim 16,
batch 2048, one Zipf-distributed id per table per sample. For each precision, mpc's
single pooled call over all 26 tables (mpc.embedding.ops, kernels/tbe_cpu.cpp) is timed
against what a PyTorch user calls instead, once per table on the same bytes, then
stacked into the same (B, T, D) output:
    FP32 / FP16   F.embedding_bag(mode="sum")
    INT8          torch.ops.quantized.embedding_bag_byte_rowwise_offsets
    INT4 / INT2   torch.ops.quantized.embedding_bag_{4bit,2bit}_rowwise_offsets
The two sides read separately drawn batches of the same distribution (so neither warms
the CPU caches for the other), a fresh batch per call, alternating call by call; medians
are reported (minima are recorded too). Also: the
lookup's useful bytes/s (rows + indices read) against this machine's copy bandwidth,
and the fused backward + SGD update (stochastic rounding) against the pure-PyTorch
reference of the same update (PyTorch has no training op for quantized tables; FP32
is also compared with 26 `index_add_` calls, a plain sparse SGD step). Bytes/s are
given twice: useful bytes (rows + indices) and the 64-byte lines actually moved (rows
straddling two lines, and the output), since random rows are read a line at a time.

Tables live in transparent huge pages where the OS allows (quant.empty_storage; both
sides read the very same tensors): with 4 KiB pages most random row reads of a
gigabyte table also miss the TLB. On a machine shared with other jobs, set
OMP_WAIT_POLICY=PASSIVE (before Python starts): with OpenMP's default spin-waiting,
threads of several jobs fighting for the cores stall every parallel region of either
side by milliseconds; `--threads 1` is the other robust reading.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mpc.bench import record
from mpc.bench.common import median, memory_bandwidth_gbs, print_table, zipf_ids
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import ops, quant
from mpc.embedding.base import jagged_from_dense, table_offsets
from mpc.embedding.config import Precision, Rounding
from mpc.embedding.fp32 import reference_init
from mpc.embedding.lowp import quantize_table
from mpc.errors import UserError

log = logging.getLogger(__name__)


def scaled_cardinalities(text: str) -> tuple[int, ...]:
    """'kaggle' -> the Kaggle tables; a number f -> each table scaled by f (>= 1 row)."""
    if text == "kaggle":
        return KAGGLE_CARDINALITIES
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if not f > 0:
        raise UserError(f"--cardinalities must be 'kaggle' or a positive scale factor, got {text!r}")
    return tuple(max(1, round(c * f)) for c in KAGGLE_CARDINALITIES)


def make_batches(rng, cards, batch: int, count: int, exponent: float):
    """`count` jagged batches (indices, offsets) plus their per-table slices."""
    out = []
    for _ in range(count):
        cat = np.stack([zipf_ids(rng, n, batch, exponent) for n in cards], axis=1)
        indices, offsets = jagged_from_dense(torch.from_numpy(cat))
        per_table = [(indices[t * batch:(t + 1) * batch], offsets[:batch + 1])
                     for t in range(len(cards))]
        out.append((indices, offsets, per_table))
    return out


def torch_lookup_fn(precision: Precision, tables: list[torch.Tensor]):
    """The per-table PyTorch call for one precision, stacked to (B, T, D)."""
    if precision.is_integer:
        def lookup(per_table):
            return torch.stack([quant.torch_pool(w, precision, i, o)
                                for w, (i, o) in zip(tables, per_table)], 1)
    else:
        def lookup(per_table):
            return torch.stack([F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
                                for w, (i, o) in zip(tables, per_table)], 1)
    return lookup


def line_bytes(precision: Precision, dim: int, toff: torch.Tensor, batch) -> int:
    """Bytes of the 64-byte cache lines one lookup call moves: every line each row read
    touches (a row may straddle two) plus the lines of the (B, T, D) output."""
    rows = ops.global_rows(batch[0], batch[1], toff)
    rb = precision.row_bytes(dim)
    first, last = rows * rb // 64, (rows * rb + rb - 1) // 64
    out_lines = -(-(len(batch[1]) - 1) * dim * 4 // 64)
    return 64 * (int((last - first + 1).sum()) + out_lines)


def time_alternating(fns: dict[str, Callable[[int], object]], rounds: int, warmup: int):
    """Seconds of each call fn(r), r = 0 .. rounds-1, after `warmup` calls on other batches.

    The functions alternate call by call (order reversed every other round), so load
    from other jobs on a shared machine hits all of them alike; report medians.
    """
    for r in range(warmup):
        for fn in fns.values():
            fn(rounds + r)
    names = list(fns)
    out = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name](r)
            out[name].append(time.perf_counter() - t0)
    return out


def _summary(times: dict[str, list[float]], n_idx: int, key: str) -> dict:
    med = {k: median(v) for k, v in times.items()}
    return {f"{key}_seconds": med, f"{key}_seconds_min": {k: min(v) for k, v in times.items()},
            f"{key}_per_second": {k: n_idx / v for k, v in med.items()},  # ids per second
            f"{key}_ratio": {k: med[k] / med["mpc"] for k in med}}


def bench_precision(precision, storage, toff, cards, dim, batches_a, batches_b, args, impl):
    """Lookup and update timings of one precision -> result dict."""
    bounds = toff.tolist()
    tables = [storage[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    baseline = torch_lookup_fn(precision, tables)
    fns = {"mpc": lambda r: impl.pool(precision, storage, toff, *batches_a[r][:2], dim),
           "torch": lambda r: baseline(batches_b[r][2])}
    n_idx = len(batches_a[0][0])
    res = _summary(time_alternating(fns, args.rounds, args.warmup), n_idx, "lookup")
    res["ratio_vs_torch"] = res["lookup_ratio"]["torch"]
    res["useful_bytes_per_second"] = n_idx * (precision.row_bytes(dim) + 8) / res["lookup_seconds"]["mpc"]
    res["line_bytes_per_second"] = line_bytes(precision, dim, toff, batches_a[0]) / res["lookup_seconds"]["mpc"]

    grads = [torch.randn(args.batch, len(cards), dim) for _ in batches_a]
    ref = ops.ReferenceOps()

    def update(o, batch, grad):
        o.sgd_update(precision, storage, toff, batch[0], batch[1], grad, args.lr, dim,
                     Rounding.STOCHASTIC, args.seed, 0)

    ufns = {"mpc": lambda r: update(impl, batches_a[r], grads[r]),
            "pytorch reference": lambda r: update(ref, batches_b[r], grads[r])}
    if precision is Precision.FP32:
        def index_add(r):
            for t, (w, (i, _)) in enumerate(zip(tables, batches_b[r][2])):
                w.index_add_(0, i, grads[r][:, t], alpha=-args.lr)
        ufns["torch index_add_"] = index_add
    res.update(_summary(time_alternating(ufns, args.rounds, args.warmup), n_idx, "update"))
    return res


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    cards = scaled_cardinalities(args.cardinalities)
    from mpc import kernels

    if kernels.load() is None:
        raise UserError(f"the lookup benchmark needs the compiled kernels ({kernels.build_error()})")
    impl = ops.KernelOps(kernels.load())
    dim = args.dim
    toff = table_offsets(cards)
    rng = np.random.default_rng(args.seed)
    count = args.rounds + args.warmup
    batches_a = make_batches(rng, cards, args.batch, count, args.zipf)
    batches_b = make_batches(rng, cards, args.batch, count, args.zipf)
    bandwidth = memory_bandwidth_gbs(args.bandwidth_mib << 20)
    log.info("initialising %d rows x %d", sum(cards), dim)
    weights = reference_init(cards, dim, args.seed)
    results, rows = {"copy_bandwidth_gb_per_s": bandwidth}, []
    for name in args.precisions:
        precision = Precision(name)
        storage = weights if precision is Precision.FP32 else quantize_table(weights, precision, impl)
        res = bench_precision(precision, storage, toff, cards, dim, batches_a, batches_b, args, impl)
        res["useful_fraction_of_copy_bandwidth"] = res["useful_bytes_per_second"] / 1e9 / bandwidth
        res["line_fraction_of_copy_bandwidth"] = res["line_bytes_per_second"] / 1e9 / bandwidth
        results[name] = res
        rows.append({"precision": name, "mpc Mlookups/s": res["lookup_per_second"]["mpc"] / 1e6,
                     "torch Mlookups/s": res["lookup_per_second"]["torch"] / 1e6,
                     "lookup vs torch": res["ratio_vs_torch"],
                     "GB/s useful": res["useful_bytes_per_second"] / 1e9,
                     "of copy BW": res["useful_fraction_of_copy_bandwidth"],
                     "GB/s lines": res["line_bytes_per_second"] / 1e9,
                     "update Mids/s": res["update_per_second"]["mpc"] / 1e6,
                     "update vs ref": res["update_ratio"]["pytorch reference"],
                     "update vs index_add_": res["update_ratio"].get("torch index_add_")})
        del storage
    print(f"copy bandwidth (read + write): {bandwidth:.1f} GB/s; batch {args.batch}, "
          f"{len(cards)} tables, {sum(cards):,} rows, dim {dim}, {args.threads} threads; "
          f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print_table(rows, list(rows[0]))
    params = {k: v for k, v in vars(args).items() if k != "func"}
    params["total_rows"] = sum(cards)
    # Other jobs on the machine move these numbers; record how busy it was.
    params["load_average_start"], params["load_average_end"] = load_start, os.getloadavg()
    params["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    return record(args.record_name, params, results)


def register_bench(sub) -> None:
    from mpc.cli import non_negative_int, positive_int

    p = sub.add_parser("lookup", help="pooled lookup of all tables vs PyTorch's per-table ops")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int4", "int2"],
                   choices=[q.value for q in Precision])
    p.add_argument("--batch", type=positive_int, default=2048)
    p.add_argument("--dim", type=positive_int, default=16)
    p.add_argument("--rounds", type=positive_int, default=60,
                   help="timed calls per side, each on its own batch (median)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls per side first")
    p.add_argument("--cardinalities", default="kaggle",
                   help="'kaggle' (full size) or a scale factor such as 0.01")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--bandwidth-mib", type=positive_int, default=1024,
                   help="size of the tensor copied to measure memory bandwidth")
    p.add_argument("--record-name", default="lookup", help="results/bench/<name>.json")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
