"""Inference inputs for the acceleration study: uniform or Zipf ids, in pools of batches.

Whether a lookup hits the last-level cache depends on the table size and on how skewed
the ids are (PAPERS.md §3 relates latency to LLC efficacy). Ids are drawn per table
either uniformly or from the bounded Zipf law of the benchmarks (mpc.bench.common.
zipf_ids: P(rank k) ~ k^-s, hot ranks scattered over the ids, as in Criteo where an id
says nothing about its frequency). The generator of mpc.data.synth is calibrated to the
Kaggle tables; the study sweeps arbitrary table sizes, hence the plain law.

A pool holds distinct batches that the timer cycles through, so a call does not find
its rows in cache only because the previous call asked for the same ids.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from mpc.bench.common import zipf_ids
from mpc.criteo import NUM_DENSE

DEFAULT_ZIPF_S = 1.05
POOL_INDEX_BUDGET = 64 << 20     # bytes of ids a pool may hold


class IndexDistribution(str, Enum):
    UNIFORM = "uniform"
    ZIPF = "zipf"


def sample_ids(rng: np.random.Generator, cardinality: int, size: int,
               distribution: IndexDistribution | str, zipf_s: float = DEFAULT_ZIPF_S) -> np.ndarray:
    """`size` ids of a table of `cardinality` rows (int64)."""
    if IndexDistribution(distribution) is IndexDistribution.UNIFORM:
        return rng.integers(0, cardinality, size, dtype=np.int64)
    if zipf_s <= 0:
        raise ValueError(f"Zipf exponent must be > 0, got {zipf_s}")
    return zipf_ids(rng, cardinality, size, zipf_s)


def make_batch(rng: np.random.Generator, cardinalities, batch: int, distribution,
               zipf_s: float = DEFAULT_ZIPF_S) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense (B, 13) float32 ~ log(1 + count), cat (B, T) int64)."""
    dense = np.log1p(rng.integers(0, 200, (batch, NUM_DENSE))).astype(np.float32)
    cat = np.stack([sample_ids(rng, c, batch, distribution, zipf_s) for c in cardinalities], 1)
    return torch.from_numpy(dense), torch.from_numpy(np.ascontiguousarray(cat))


def input_pool(cardinalities, batch: int, distribution, batches: int, seed: int = 0,
               zipf_s: float = DEFAULT_ZIPF_S) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `batches` distinct batches (fewer when their ids would pass
    POOL_INDEX_BUDGET; at least one)."""
    per_batch = batch * len(cardinalities) * 8
    count = max(1, min(batches, POOL_INDEX_BUDGET // max(per_batch, 1)))
    rng = np.random.default_rng([seed, batch, list(IndexDistribution).index(IndexDistribution(distribution))])
    return [make_batch(rng, cardinalities, batch, distribution, zipf_s) for _ in range(count)]
