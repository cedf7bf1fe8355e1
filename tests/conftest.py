"""Shared fixtures: small data sets written in the project's binary format."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpc.criteo import split_sizes
from mpc.data.format import DatasetMeta, DatasetWriter, dense_transform
from mpc.runinfo import atomic_directory

# A kernel that fails to build must fail the tests, not fall back silently.
os.environ.setdefault("MPC_REQUIRE_KERNELS", "1")
os.environ.setdefault("MPC_BUILD_DIR", os.path.expanduser("~/.cache/mpc/extensions"))
# Training and benchmarks switch on process-wide CPU settings (mpc.cpu_settings: malloc
# thresholds, flush-denormal); tests run without them, so that no test's numerics depend
# on which test ran first. tests/test_cpu_settings.py checks them in a fresh process.
os.environ.setdefault("MPC_CPU_TUNING", "0")

SMALL_CARDS = [7, 30, 200, 150, 5, 3, 60, 25, 3, 90, 40, 180, 35, 4, 70, 160, 2, 45, 30, 3, 170, 4, 3, 80,
               10, 100]


def write_learnable_dataset(folder, rows: int, cards=SMALL_CARDS, seed: int = 0):
    """Random rows whose labels depend on a dense feature and two tables' ids.

    A plain fixture for training-loop tests; the calibrated generator (mpc.data.synth)
    has its own tests.
    """
    rng = np.random.default_rng(seed)
    with atomic_directory(folder, overwrite=True) as tmp:
        writer = DatasetWriter(tmp)
        dense = dense_transform(rng.integers(-1, 200, (rows, 13)))
        cat = np.stack([rng.integers(0, c, rows) for c in cards], 1).astype(np.int32)
        effect2 = np.random.default_rng(seed + 1).normal(0, 1.5, cards[2])
        logit = 1.2 * (dense[:, 0] - 3.5) + effect2[cat[:, 2]] + np.where(cat[:, 1] % 3 == 0, 1.0, -0.5) - 1.0
        label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.uint8)
        writer.append(dense, cat, label)
        s = split_sizes(rows)
        writer.finish(DatasetMeta(source="synthetic", rows=rows, cardinalities=list(cards),
                                  splits={"train": s.train, "test": s.test, "val": s.val},
                                  info={"fixture": "tests/conftest.py"}))
    return folder


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory):
    return write_learnable_dataset(tmp_path_factory.mktemp("data") / "learnable", 14_000)
