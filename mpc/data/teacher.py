"""The planted label model of the synthetic Criteo data, and the hash it draws from.

Criteo's labels cannot be shipped, so the generator (mpc.data.synth) plants them: a
"teacher" computes each sample's click logit from what a model can see -- the 13
transformed dense features and the 26 categorical ids -- and the label is a Bernoulli
draw from sigmoid(logit). The teacher is built from the same pieces as DLRM (PAPERS.md
§4), so DLRM can learn it, but only as well as the data lets it:

    logit = c0 + g_d * dense(psi)                        psi = standardised log(x + 1)
               + g_b * sum_t b_t[id_t]                     per-id biases, all 26 tables
               + g_p * sum_{t<t'} <v_t[id_t], v_t'[id_t']>  per-id latent vectors (k-dim)
               + g_c * sum_r (a_r . psi) (b_r . sum_t v_t[id_t])   dense x id, rank 2

`dense` is a sum of linear and hinge terms per feature. Every id of every table, rare
ones included, has its own bias and latent vector, so rare ids carry signal a model
sees too seldom to learn (the gap between the teacher's own AUC and DLRM's). Per-id
effects are heavy-tailed (sign(r)|r|^id_tail, r uniform): a few ids matter a lot, as
a few advertisers and publishers do, and their large learned rows make the rest of a
row coarse under row-wise low-precision rounding. The gains
g are set so that each term has the standard deviation the `TeacherConfig` asks for
(measured on a calibration sample of the data), then c0 so that the mean click
probability is Criteo's 25.6%.

Per-id parameters come from a counter-based hash of (seed, table, id): nothing is
stored that could not be recomputed, and any row range is generated independently.
They are kept pre-scaled as int8 so that the sums over tables are exact integer sums:
the logits (hence the labels) are bit-identical however the rows are chunked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from mpc.criteo import KAGGLE_CTR, NUM_DENSE
from mpc.embedding.rng import mix32_int
from mpc.errors import UserError

MASK32 = 0xFFFFFFFF
MAX_LATENT = 8  # latent bytes per id (one uint64)
DENSE_CAT_RANK = 2


# --- counter-based randomness (also the generator's) -----------------------------------

def key(*parts: int) -> int:
    """A 32-bit key from integers (seed, purpose, table, ...), by chained lowbias32."""
    h = 0x2545F491
    for p in parts:
        h = mix32_int(h ^ (int(p) & MASK32))
    return h


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint32 array, in place (a bijection of [0, 2**32))."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def hash_words(counters: np.ndarray, k: int, columns: int) -> np.ndarray:
    """(columns, len(counters)) uint32 words: word[j, i] = f(k, j, counters[i]).

    Two rounds of lowbias32: one per counter, one per (column, counter) pair. Column-
    major, so that each column (one purpose) is a contiguous array.
    """
    h = mix32(counters.astype(np.uint32) ^ np.uint32(k))
    col_keys = np.array([key(k, 0x6C0C, j) for j in range(columns)], dtype=np.uint32)
    return mix32(col_keys[:, None] ^ h[None, :])


def to_unit(words: np.ndarray, dtype=np.float64) -> np.ndarray:
    """uint32 words -> uniforms strictly inside (0, 1) (never 0 or 1, so logs are safe)."""
    if dtype == np.float32:  # 23 bits, so that the largest value, 1 - 2**-24, is exact
        return ((words >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    return (words.astype(np.float64) + 0.5) * 2.0 ** -32


def small_uniforms(k: int, n: int) -> np.ndarray:
    """n uniforms in (0, 1) for one-off model constants (weights, thresholds)."""
    return to_unit(hash_words(np.arange(n, dtype=np.uint32), k, 1)[0])


# --- the teacher ---------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherConfig:
    """Shape of the planted logit: the standard deviation of each term and the CTR.

    The defaults are the calibration recorded in results/calibration.json (see
    `python -m mpc bench synth --calibration`).
    """

    latent_dim: int = 4          # k, length of each id's latent vector (<= 8)
    dense_std: float = 1.3       # the dense-feature term
    bias_std: float = 1.2        # the sum of the 26 per-id biases
    pair_std: float = 1.0        # the id x id dot products
    dense_cat_std: float = 0.35  # the dense x id interaction
    id_tail: float = 2.5         # per-id effects are sign(r)|r|^id_tail, r ~ U(-1, 1): >1 = heavy-tailed
    ctr: float = KAGGLE_CTR      # mean click probability the intercept is solved for

    def __post_init__(self):
        if not 1 <= self.latent_dim <= MAX_LATENT:
            raise UserError(f"teacher latent_dim must be in [1, {MAX_LATENT}], got {self.latent_dim}")
        for name in ("dense_std", "bias_std", "pair_std", "dense_cat_std"):
            if not getattr(self, name) >= 0:
                raise UserError(f"teacher {name} must be >= 0, got {getattr(self, name)}")
        if not 1.0 <= self.id_tail <= 8.0:
            raise UserError(f"teacher id_tail must be in [1, 8], got {self.id_tail}")
        if not 0.0 < self.ctr < 1.0:
            raise UserError(f"teacher ctr must be in (0, 1), got {self.ctr}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """What `Teacher.fit` measured: feature standardisation, term gains, intercept."""

    psi_mean: tuple[float, ...]
    psi_std: tuple[float, ...]
    gains: dict[str, float]
    intercept: float


@dataclass
class IdSums:
    """Per sample, the id parameters summed over the 26 tables (exact integers)."""

    bias: np.ndarray   # (n,) int32: sum of biases
    z: np.ndarray      # (k, n) int32: sum of latent vectors
    self: np.ndarray   # (n,) int32: sum of each latent vector's squared norm

    @classmethod
    def from_tables(cls, bias: np.ndarray, latent: np.ndarray, self_dots: np.ndarray, k: int) -> "IdSums":
        """bias (T, n) int8, latent (T, n, 8) int8, self_dots (T, n) int32."""
        z = latent[0].astype(np.int16)
        b = bias[0].astype(np.int32)
        s = self_dots[0].astype(np.int32)
        for t in range(1, len(bias)):  # |z| <= 26 * 127: int16 is exact
            z += latent[t]
            b += bias[t]
            s += self_dots[t]
        return cls(b, np.ascontiguousarray(z[:, :k].T).astype(np.int32), s)


class Teacher:
    """Computes the planted logit of samples from their dense features and id parameters.

    `importance[t]` (in (0, 1]) scales table t's biases and latent vectors relative to
    the other tables: big tables matter more, as in Criteo.
    """

    TERMS = ("dense", "bias", "pair", "dense_cat")

    def __init__(self, config: TeacherConfig, seed: int, importance) -> None:
        self.config = config
        self.seed = seed
        self.importance = np.asarray(importance, dtype=np.float64)
        if not np.all((self.importance > 0) & (self.importance <= 1)):
            raise ValueError("table importance must be in (0, 1]")
        k, r = config.latent_dim, DENSE_CAT_RANK
        u = small_uniforms(key(seed, 0x7EAC), 3 * NUM_DENSE + r * (NUM_DENSE + k))
        # Dense term: per feature a signed slope, and a hinge above a threshold that
        # bends the response (a model must be non-linear in the dense features).
        self.slope = 2.0 * u[:NUM_DENSE] - 1.0
        self.hinge = 2.0 * u[NUM_DENSE:2 * NUM_DENSE] - 1.0
        self.knee = 2.0 * u[2 * NUM_DENSE:3 * NUM_DENSE] - 0.5    # in standard deviations
        # Dense x id interaction of rank r: sum_r (a_r . psi) (b_r . z).
        rest = 2.0 * u[3 * NUM_DENSE:] - 1.0
        self.dense_dirs = rest[:r * NUM_DENSE].reshape(r, NUM_DENSE)
        self.latent_dirs = rest[r * NUM_DENSE:].reshape(r, k)
        self.calibration: Calibration | None = None

    # -- per-id parameters --------------------------------------------------------
    def id_params(self, table: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """bias (n,) int8 and latent (n, 8) int8 of ids, scaled by the table's importance.

        127 * sign(r)|r|^id_tail with r ~ U(-1, 1) before scaling (heavy-tailed effects make
        some ids matter much more than others); latent bytes past latent_dim are zero.
        """
        words = hash_words(np.asarray(ids, dtype=np.uint32), key(self.seed, 0x1D5, table), 3)
        raw = np.ascontiguousarray(words.T).view(np.uint8).reshape(len(ids), 12)
        # The transform of a random byte is a 256-entry table (cheap at Kaggle size).
        r = np.clip(np.arange(256, dtype=np.float64) - 127.0, -127.0, 127.0) / 127.0
        lut = np.rint(127.0 * np.sign(r) * np.abs(r) ** self.config.id_tail
                      * self.importance[table]).astype(np.int8)
        bias = lut[raw[:, 0]]
        latent = np.zeros((len(ids), MAX_LATENT), dtype=np.int8)
        k = self.config.latent_dim
        latent[:, :k] = lut[raw[:, 1:1 + k]]
        return bias, latent

    # -- the logit ------------------------------------------------------------------
    def raw_terms(self, dense: np.ndarray, sums: IdSums) -> dict[str, np.ndarray]:
        """The four terms before their gains, from dense (n, 13) float32 and the id sums."""
        cal = self.calibration
        k, n = self.config.latent_dim, len(dense)
        psi = (dense.T.astype(np.float64) - np.asarray(cal.psi_mean)[:, None]) / np.asarray(cal.psi_std)[:, None]
        # Explicit loops fix the order of every float sum, so each row's value is the
        # same in any chunk (a BLAS product would not promise that).
        dense_term = np.zeros(n)
        proj = np.zeros((DENSE_CAT_RANK, n))
        for j in range(NUM_DENSE):
            col = psi[j]
            dense_term += self.slope[j] * col + self.hinge[j] * np.maximum(col - self.knee[j], 0.0)
            for r in range(DENSE_CAT_RANK):
                proj[r] += self.dense_dirs[r, j] * col
        zf = sums.z.astype(np.float64)
        dense_cat = np.zeros(n)
        for r in range(DENSE_CAT_RANK):
            along = np.zeros(n)
            for c in range(k):
                along += self.latent_dirs[r, c] * zf[c]
            dense_cat += proj[r] * along
        zz = np.zeros(n, dtype=np.int64)
        for c in range(k):
            zz += sums.z[c].astype(np.int64) ** 2
        pair = ((zz - sums.self) // 2).astype(np.float64)  # sum over table pairs of <v_t, v_t'>
        return {"dense": dense_term, "bias": sums.bias.astype(np.float64), "pair": pair,
                "dense_cat": dense_cat}

    def fit(self, dense: np.ndarray, sums: IdSums) -> Calibration:
        """Measure standardisation and term spreads on a sample; solve gains and intercept."""
        d = dense.astype(np.float64)
        std = d.std(axis=0)
        self.calibration = Calibration(tuple(d.mean(axis=0).tolist()),
                                       tuple(np.where(std > 0, std, 1.0).tolist()), {}, 0.0)
        terms = self.raw_terms(dense, sums)
        gains = {}
        for name in self.TERMS:
            spread = terms[name].std()
            want = getattr(self.config, f"{name}_std")
            gains[name] = float(want / spread) if spread > 0 else 0.0
        logit = sum(gains[name] * terms[name] for name in self.TERMS)
        intercept = float(solve_intercept(logit, self.config.ctr))
        self.calibration = dataclasses.replace(self.calibration, gains=gains, intercept=intercept)
        return self.calibration

    def logits(self, dense: np.ndarray, sums: IdSums) -> np.ndarray:
        """Click logits (n,) float64 of samples; `fit` must have run."""
        if self.calibration is None:
            raise RuntimeError("Teacher.fit must run before logits")
        terms = self.raw_terms(dense, sums)
        out = np.full(len(dense), self.calibration.intercept)
        for name in self.TERMS:
            out += self.calibration.gains[name] * terms[name]
        return out

    def summary(self) -> dict:
        cal = self.calibration
        return {"config": self.config.to_json(), "importance": self.importance.round(4).tolist(),
                "gains": cal.gains if cal else None, "intercept": cal.intercept if cal else None}


def solve_intercept(logit: np.ndarray, ctr: float) -> float:
    """c such that mean(sigmoid(logit + c)) = ctr, by bisection (deterministic)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.mean(sigmoid(logit + mid)) < ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
