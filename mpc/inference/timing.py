"""Latency measurement for the acceleration study, and the machine facts it depends on.

"Does Form Follow Function?" (PAPERS.md §3) reads latency against FLOPs and against the
last-level cache; here: the LLC size as the OS reports it, the thread pinning every
runtime is timed under, a timer that reports the median and spread of many calls after
warm-up, and the CPU time other processes took meanwhile (ForeignLoad). Each call takes
the next input batch from a pool, so that a table larger than the LLC is not read from
cache merely because the same ids repeat.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    unit = text[-1] if text and text[-1] in _SIZE_UNITS else ""
    return int(text[:-1] if unit else text) * _SIZE_UNITS[unit]


def llc_bytes(cpu_root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the last-level cache of CPU 0: the highest-level data/unified cache in
    sysfs (what the hardware reports to the kernel), else sysconf, else None.

    sysfs comes first because under virtual machines glibc's sysconf may report the
    host's figure (e.g. 256 MiB where sysfs and lscpu say 32 MiB)."""
    best = None
    for index in sorted(Path(cpu_root).glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            if best is None or level > best[0]:
                best = (level, size)
    if best is not None:
        return best[1]
    for name in ("SC_LEVEL4_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            size = os.sysconf(name)
            if size and size > 0:
                return int(size)
    return None


@contextlib.contextmanager
def pinned_threads(threads: int):
    """Run the block with `threads` intra-op threads on the first `threads` allowed CPUs
    (torch's pool and the process affinity; ONNX Runtime and OpenVINO get the same
    count through compile_model's `threads`). Restores both afterwards."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if threads < 1 or (allowed is not None and threads > len(allowed)):
        raise ValueError(f"threads must be in [1, {len(allowed) if allowed else 'cpus'}], got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if allowed is not None:
        os.sched_setaffinity(0, allowed[:threads])
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if allowed is not None:
            os.sched_setaffinity(0, allowed)


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per call over `reps` timed calls."""

    reps: int
    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    std_s: float
    min_s: float

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _stats(times: list[float]) -> LatencyStats:
    ordered = sorted(times)
    return LatencyStats(reps=len(ordered), median_s=statistics.median(ordered),
                        p10_s=_quantile(ordered, 0.1), p90_s=_quantile(ordered, 0.9),
                        mean_s=statistics.fmean(ordered),
                        std_s=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
                        min_s=ordered[0])


def measure_interleaved(fns: Sequence[Callable], inputs: Sequence[tuple], warmup: int = 5,
                        reps: int = 50, min_reps: int = 5, max_seconds: float | None = None,
                        block: int = 5, switch: int = 2) -> list[LatencyStats]:
    """Time several functions call by call, taking turns, so that load from other
    processes and clock drift hit them alike (on a shared machine their ratio is what
    can be measured). Every call takes the next batch of `inputs` (cycling), so no call
    finds its rows cached by the previous one.

    A turn is `switch` untimed calls then `block` timed ones: runtimes leave their
    worker threads spinning for a while after a call (ONNX Runtime, OpenVINO's TBB,
    OpenMP), which on a 2-core machine slows the next runtime's first calls by up to
    100x; the untimed calls absorb that. Each function first gets `warmup` untimed
    calls; timing stops at `reps` timed calls each, or once `max_seconds` of timed calls
    (all functions) have passed and each has `min_reps`. The garbage collector is off
    while timing (as timeit).
    """
    if not inputs or not fns:
        raise ValueError("measure_interleaved needs at least one function and one input batch")
    if min(reps, min_reps, block) < 1 or switch < 0 or warmup < 0:
        raise ValueError(f"reps, min_reps and block must be >= 1, warmup and switch >= 0; got "
                         f"{reps}, {min_reps}, {block}, {warmup}, {switch}")
    calls = 0

    def next_args():
        nonlocal calls
        calls += 1
        return inputs[(calls - 1) % len(inputs)]

    for fn in fns:
        for _ in range(warmup):
            fn(*next_args())
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0

    def done() -> bool:
        enough = all(len(t) >= min_reps for t in times)
        return all(len(t) >= reps for t in times) or (
            max_seconds is not None and spent >= max_seconds and enough)

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while not done():
            for fn, out in zip(fns, times):
                for _ in range(switch):
                    fn(*next_args())
                for _ in range(min(block, reps - len(out))):
                    args = next_args()
                    start = time.perf_counter()
                    fn(*args)
                    elapsed = time.perf_counter() - start
                    out.append(elapsed)
                    spent += elapsed
                    if done():
                        break
                if done():
                    break
    finally:
        if was_enabled:
            gc.enable()
    return [_stats(t) for t in times]


def measure_latency(fn: Callable, inputs: Sequence[tuple], warmup: int = 5, reps: int = 50,
                    min_reps: int = 5, max_seconds: float | None = None) -> LatencyStats:
    """measure_interleaved for one function (one long turn, no switch calls)."""
    return measure_interleaved([fn], inputs, warmup, reps, min_reps, max_seconds, block=reps, switch=0)[0]


def _busy_cpu_seconds(stat: str | os.PathLike = "/proc/stat") -> float | None:
    """CPU seconds all processes have spent busy since boot (user, nice, system, irq,
    softirq, steal from /proc/stat's first line); None where the file is absent."""
    try:
        fields = Path(stat).read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / ticks


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)   # inductor's compiler processes
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class ForeignLoad:
    """CPU time other processes took while a block ran, in cores on average: what shared
    the machine with the timings. A study's ratios are only trustworthy near 0 (on a
    2-core machine, one busy process elsewhere is 1.0 and can slow a 2-thread runtime
    by 100x while leaving one that spins its threads almost untouched).

        with ForeignLoad() as load:
            ...
        load.cores   # None where /proc/stat is unreadable
    """

    def __init__(self, stat: str | os.PathLike = "/proc/stat"):
        self.stat = stat
        self.cores: float | None = None

    def __enter__(self):
        self._busy, self._own, self._wall = _busy_cpu_seconds(self.stat), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, wall = _busy_cpu_seconds(self.stat), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            foreign = (busy - self._busy) - (_own_cpu_seconds() - self._own)
            self.cores = max(0.0, foreign / wall)
        return False
