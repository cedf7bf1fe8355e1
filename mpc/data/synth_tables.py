"""What Criteo Kaggle looks like, column by column: the synthetic generator's targets.

The 26 categorical tables (cardinality, missing rate, popularity law, drift share) and
the 13 integer columns (missing rate, median, tail), with the rates and shapes of
public analyses of Kaggle's train.txt (PAPERS.md §4; approximate, and recorded here
rather than measured, since the data cannot be downloaded). Also the pieces of the
popularity model that depend only on a table: its quantile function, the permutation
from popularity rank to id, and the id's raw 32-bit value in a TSV. Used by
mpc.data.synth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from mpc.criteo import KAGGLE_CARDINALITIES, KAGGLE_LINES
from mpc.data.teacher import key, mix32

QUANTILE_CELLS = 4096     # resolution of the tabulated popularity quantile functions
_PERM, _HEX = 0xBE12, 0x4E8  # hash purposes


class Scale(str, Enum):
    TINY = "tiny"       # unit tests: ~3.4k table rows
    SMALL = "small"     # quick experiments: ~34k rows
    MEDIUM = "medium"   # calibration and notebooks: ~338k rows (1/100 of Kaggle)
    FULL = "full"       # the exact Kaggle tables and line count

    @property
    def factor(self) -> float:
        return {"tiny": 1e-4, "small": 1e-3, "medium": 1e-2, "full": 1.0}[self.value]

    @property
    def default_samples(self) -> int:
        return {"tiny": 40_000, "small": 400_000, "medium": 4_000_000, "full": KAGGLE_LINES}[self.value]


@dataclass(frozen=True)
class TableSpec:
    """How one Kaggle column C1..C26 is drawn (rates from public analyses of train.txt)."""

    kaggle_rows: int
    missing: float     # share of empty fields
    group: int         # columns of one group go missing together (-1: none)
    exponent: float    # Zipf-Mandelbrot s
    head: float        # Zipf-Mandelbrot offset q: larger = flatter head
    floor: float       # share of draws uniform over all values (the long tail of rare ids)
    trend: float       # share of draws from the sliding trending window (times `drift`)

    @property
    def importance(self) -> float:
        """Weight of the table in the teacher: bigger tables carry more signal."""
        return min(1.0, 0.35 + 0.65 * np.log10(self.kaggle_rows) / 7.0)


_T = TableSpec
KAGGLE_TABLES: tuple[TableSpec, ...] = (
    _T(1460, 0.0, -1, 1.10, 2, 0.02, 0.0), _T(583, 0.0, -1, 1.30, 1, 0.01, 0.0),
    _T(10131227, 0.034, 0, 1.05, 3, 0.25, 0.10), _T(2202608, 0.034, 0, 1.10, 2, 0.15, 0.06),
    _T(305, 0.0, -1, 1.60, 1, 0.005, 0.0), _T(24, 0.121, 3, 1.40, 1, 0.0, 0.0),
    _T(12517, 0.0, -1, 1.00, 5, 0.05, 0.03), _T(633, 0.0, -1, 1.50, 2, 0.0, 0.0),
    _T(3, 0.0, -1, 2.00, 1, 0.0, 0.0), _T(93145, 0.0, -1, 1.05, 4, 0.10, 0.05),
    _T(5683, 0.0, -1, 1.05, 3, 0.05, 0.03), _T(8351593, 0.034, 0, 1.00, 5, 0.30, 0.10),
    _T(3194, 0.0, -1, 1.10, 3, 0.03, 0.02), _T(27, 0.0, -1, 1.20, 1, 0.0, 0.0),
    _T(14992, 0.0, -1, 1.00, 3, 0.05, 0.03), _T(5461306, 0.034, 0, 1.05, 2, 0.25, 0.08),
    _T(10, 0.0, -1, 1.00, 2, 0.0, 0.0), _T(5652, 0.0, -1, 1.10, 2, 0.04, 0.02),
    _T(2173, 0.44, 1, 1.20, 1, 0.02, 0.0), _T(4, 0.44, 1, 1.00, 1, 0.0, 0.0),
    _T(7046547, 0.034, 0, 1.10, 2, 0.25, 0.10), _T(18, 0.763, 2, 1.80, 1, 0.0, 0.0),
    _T(15, 0.0, -1, 1.20, 1, 0.0, 0.0), _T(286181, 0.034, 0, 1.05, 3, 0.12, 0.05),
    _T(105, 0.44, 1, 1.50, 1, 0.0, 0.0), _T(142572, 0.44, 1, 1.10, 2, 0.10, 0.05),
)
assert tuple(t.kaggle_rows for t in KAGGLE_TABLES) == KAGGLE_CARDINALITIES


@dataclass(frozen=True)
class DenseSpec:
    """How one integer column I1..I13 is drawn: floor(median * exp(g / tail)), g ~ logistic."""

    missing: float
    group: int
    median: float
    tail: float        # log-logistic shape: P(x > v) ~ (v / median)^-tail
    shared: float      # loading on the per-row factor that correlates the columns
    negative: float = 0.0  # share of -1/-2/-3 (I2)


_D = DenseSpec
KAGGLE_DENSE: tuple[DenseSpec, ...] = (
    _D(0.454, 4, 1.0, 2.0, 0.5), _D(0.0, -1, 3.0, 1.55, 0.3, 0.03), _D(0.215, 5, 6.0, 1.9, 0.4),
    _D(0.224, 5, 4.0, 3.2, 0.6), _D(0.026, 6, 2800.0, 1.95, 0.3), _D(0.224, 5, 33.0, 1.85, 0.5),
    _D(0.043, 6, 3.0, 1.8, 0.6), _D(0.0005, 6, 7.0, 2.6, 0.5), _D(0.043, 6, 38.0, 2.65, 0.6),
    _D(0.454, 4, 0.9, 7.0, 0.4), _D(0.043, 6, 1.2, 3.2, 0.5), _D(0.765, 7, 0.4, 1.7, 0.3),
    _D(0.224, 5, 4.0, 2.3, 0.5),
)
def scaled_cardinalities(scale: Scale | str) -> tuple[int, ...]:
    """Kaggle's 26 table sizes times the scale factor (>= 2 rows where values go missing)."""
    scale = Scale(scale)
    return tuple(max(2 if t.missing > 0 else 1, round(t.kaggle_rows * scale.factor))
                 for t in KAGGLE_TABLES)


# --- popularity: which row each draw hits ----------------------------------------------

def popularity_quantiles(values: int, spec: TableSpec, cells: int = QUANTILE_CELLS) -> np.ndarray:
    """The static popularity law of a table as its quantile function on a grid.

    pmf(rank) = (1 - floor) * zipf_mandelbrot(rank) + floor / values; each rank is spread
    uniformly over [rank, rank + 1), and Q[i] = F^-1(i / cells). Sampling interpolates
    linearly between grid points (cells of 1/4096 in probability: rank masses are exact
    to ~1e-4 at the head and the tail's shape to ~1e-6 relative).
    """
    ranks = np.arange(values, dtype=np.float64)
    pmf = (ranks + spec.head) ** -spec.exponent
    pmf *= (1.0 - spec.floor) / pmf.sum()
    pmf += spec.floor / values
    cum = np.cumsum(pmf)
    cum /= cum[-1]
    grid = np.arange(cells + 1, dtype=np.float64) / cells
    rank = np.minimum(np.searchsorted(cum, grid, side="right"), values - 1)
    below = np.where(rank > 0, cum[np.maximum(rank - 1, 0)], 0.0)
    q = rank + np.clip((grid - below) / (cum[rank] - below), 0.0, 1.0)
    q[-1] = values
    return q


def id_permutation(seed: int, table: int, values: int) -> np.ndarray:
    """Popularity position -> id offset: a keyed pseudo-random permutation of range(values).

    A 4-round Feistel network on the smallest even number of bits covering `values`,
    with cycle walking (re-apply until the result falls below `values`): O(values) and
    no sort, so a Kaggle-size table (10M rows) takes a fraction of a second.
    """
    half = max(1, (max(values - 1, 1).bit_length() + 1) // 2)
    mask = np.uint32((1 << half) - 1)
    keys = [np.uint32(key(seed, _PERM, table, r)) for r in range(4)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint32(half), x & mask
        for k in keys:
            left, right = right, left ^ (mix32(right ^ k) & mask)
        return (left << np.uint32(half)) | right

    out = feistel(np.arange(values, dtype=np.uint32))
    todo = np.flatnonzero(out >= values)
    while len(todo):  # each walk stays on the cycle, so the result is a bijection
        out[todo] = feistel(out[todo])
        todo = todo[out[todo] >= values]
    return out.astype(np.int32)


def hex_keys(seed: int, table: int, ids: np.ndarray) -> np.ndarray:
    """Raw 32-bit Criteo values of ids: a bijection that never gives 0 (0 is "empty")."""
    k = np.uint32(key(seed, _HEX, table) | 0x80000000)  # ids < 2**31, so id ^ k != 0
    return mix32(ids.astype(np.uint32) ^ k)


def draw_ranks(quantiles: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Ranks (int64) for uniforms v in [0, 1): linear interpolation of the quantile grid."""
    cells = len(quantiles) - 1
    x = v * cells
    cell = np.minimum(x.astype(np.int64), cells - 1)
    lo = np.take(quantiles, cell)
    x = lo + (x - cell) * (np.take(quantiles, cell + 1) - lo)
    return np.minimum(x.astype(np.int64), int(quantiles[-1]) - 1)

