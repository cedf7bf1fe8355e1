"""What the benchmarks share: Zipf-distributed batches, timing, table printing."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import numpy as np
import torch

from mpc.criteo import NUM_DENSE


def zipf_ids(rng: np.random.Generator, rows: int, size: int, exponent: float = 1.05) -> np.ndarray:
    """`size` ids in [0, rows) with Zipf(exponent)-like popularity; hot ids scattered.

    Ranks come from the inverse CDF of the continuous power law on [1, rows + 1); ranks
    are mapped to ids by a fixed affine bijection mod rows, so the hottest ids are not
    simply 0, 1, 2, ...
    """
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        ranks = np.exp(u * math.log(rows + 1.0))
    else:
        a = 1.0 - exponent
        ranks = (1.0 + u * ((rows + 1.0) ** a - 1.0)) ** (1.0 / a)
    ranks = np.minimum(ranks.astype(np.int64) - 1, rows - 1)
    mult = 2654435761 % rows or 1
    while math.gcd(mult, rows) != 1:
        mult += 1
    return (ranks * mult + 12345) % rows


def random_batch(rng: np.random.Generator, cardinalities, batch_size: int, exponent: float = 1.05):
    """(dense, cat, label) tensors of one batch: heavy-tailed dense, Zipf ids, 25% clicks."""
    dense = np.log1p(rng.lognormal(1.0, 1.5, (batch_size, NUM_DENSE))).astype(np.float32)
    cat = np.stack([zipf_ids(rng, n, batch_size, exponent) for n in cardinalities], axis=1)
    label = (rng.random(batch_size) < 0.256).astype(np.float32)
    return torch.from_numpy(dense), torch.from_numpy(cat), torch.from_numpy(label)


def time_rounds(fns: dict[str, Callable[[], None]], rounds: int, inner: int,
                settle: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, `rounds` times, interleaved so drift hits all alike.

    The order of the functions rotates from round to round, so that none is always the
    one that runs first (after another's cache-evicting work) or last. `settle[name]`,
    if given, runs untimed before each of that function's rounds: the other contenders
    ran in between, so its hot data left the CPU caches and TLBs; a few untimed steps
    bring them back, so that a round times the steady state a real run is in.
    """
    out = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if settle and name in settle:
                settle[name]()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out[name].append((time.perf_counter() - t0) / inner)
    return out


def paired_ratio(times: dict[str, list[float]], baseline: str, name: str) -> float:
    """Median over rounds of baseline time / contender time, each pair timed in one round.

    A slow patch on a shared machine slows both members of a round's pair, so the ratio
    of the pair moves much less than either median does.
    """
    return statistics.median(round_ratios(times, baseline, name))


def round_ratios(times: dict[str, list[float]], baseline: str, name: str) -> list[float]:
    """Baseline time / contender time of each round."""
    return [b / t for b, t in zip(times[baseline], times[name])]


def paired_ratio_quartiles(times: dict[str, list[float]], baseline: str, name: str) -> list[float]:
    """[25th, 75th] percentiles of the per-round ratios of paired_ratio: their spread."""
    ratios = round_ratios(times, baseline, name)
    if len(ratios) < 2:
        return [ratios[0], ratios[0]] if ratios else []
    q = statistics.quantiles(ratios, n=4)
    return [q[0], q[2]]


def median(xs) -> float:
    return statistics.median(xs)


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Copy bandwidth of this machine: bytes read + written per second, GB/s (1e9)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / min(times) / 1e9


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)
