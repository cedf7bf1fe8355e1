"""Memory accounting (mpc.memory) and the `memory` command.

Every backend's memory_bytes() must add up to the tensors it actually allocated, and the
analytic breakdown must predict it exactly without allocating.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpc.cli import main
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import build_embedding
from mpc.embedding.config import CacheConfig, EmbeddingConfig
from mpc.memory import memory_breakdown, memory_row, paper_reduction, read_cardinalities
from mpc.errors import DataError, UserError

CARDS = (1000, 3, 70, 257, 40)
CASES = [
    ("fp32", CacheConfig()),
    ("int8", CacheConfig()),
    ("int4", CacheConfig()),
    ("fp16", CacheConfig(0.1, "lru", 32)),
    ("int8", CacheConfig(0.05, "lru", 32)),
    ("int8", CacheConfig(0.3, "lfu", 4)),
    ("int4", CacheConfig(0.2, "lru", 0)),       # 200-way sets: hash index + LRU list
    ("int2", CacheConfig(0.2, "lfu", 0)),       # ... + LFU heap and per-row counts
    ("int8", CacheConfig(0.1, "lfu", 8, shared=True)),
    ("int8", CacheConfig(1.0, "lru", 0, shared=True)),
]


def allocated_bytes(module: torch.nn.Module) -> int:
    """Every buffer and parameter of the backend except the base class's bookkeeping."""
    skip = {"table_offsets"}
    tensors = [b for name, b in module.named_buffers() if name not in skip]
    return sum(t.nbytes for t in tensors) + sum(p.nbytes for p in module.parameters() if p.dim() > 0)


@pytest.mark.parametrize("kind,cache", CASES, ids=[f"{k}-{c.fraction}-{c.policy.value}-{c.ways}-{c.shared}"
                                                  for k, c in CASES])
def test_breakdown_matches_the_backend_and_its_allocations(kind, cache):
    cfg = EmbeddingConfig(cardinalities=CARDS, dim=13, kind=kind, cache=cache)
    emb = build_embedding(cfg)
    reported = emb.memory_bytes()
    assert reported == memory_breakdown(CARDS, 13, kind, cache)
    assert sum(reported.values()) == allocated_bytes(emb)


def test_components_by_hand():
    # INT4, dim 13: 7 bytes of values + fp16 scale + fp16 bias per row.
    parts = memory_breakdown((100, 20), 13, "int4", CacheConfig(0.1, "lru", 32))
    assert parts["values"] == 120 * 7 and parts["scale_bias"] == 120 * 4
    # capacities 10 and 2 (scan sets of 10 and 2 ways): 12 slots of 13 floats, int64 tag and
    # time, and (LRU scan sets) a 1-byte fingerprint and a 1-byte recency entry per slot
    assert parts["cache_values"] == 12 * 13 * 4
    assert parts["cache_tags"] == 12 * 8 and parts["cache_policy_state"] == 12 * (8 + 2)
    assert parts["lfu_counts"] == 0
    lfu = memory_breakdown((100, 20), 13, "int4", CacheConfig(0.1, "lfu", 32))
    assert lfu["lfu_counts"] == 120 * 4 and lfu["cache_policy_state"] == 12 * (8 + 4)
    # A fully associative 50-way set: 128 hash entries, list links, [fill, head, tail].
    big = memory_breakdown((500,), 4, "int8", CacheConfig(0.1, "lru", 0))
    assert big["cache_tags"] == 50 * 8 + 128 * 4
    assert big["cache_policy_state"] == 50 * 8 + 50 * 2 * 4 + 3 * 4


def test_paper_formula_reproduces_the_headlines():
    assert paper_reduction("int8", 0.05) == pytest.approx(10 / 3)      # "3x"
    assert paper_reduction("int4", 0.01) == pytest.approx(7.4074, abs=1e-4)  # ">7x"
    assert paper_reduction("fp32", 0.0) == 1.0


def test_kaggle_full_accounting():
    fp32 = sum(KAGGLE_CARDINALITIES) * 16 * 4
    assert fp32 == 2_160_804_928
    plain = memory_row(KAGGLE_CARDINALITIES, 16, "int8", CacheConfig())
    assert plain["total_bytes"] == 33_762_577 * 24 + 8  # 16 values + fp32 scale + fp32 bias; the step counter
    row = memory_row(KAGGLE_CARDINALITIES, 16, "int8", CacheConfig(0.05, "lru", 32))
    slots = sum(math.ceil(math.ceil(c * 5 / 100) / min(32, math.ceil(c * 5 / 100))) * min(32, math.ceil(c * 5 / 100))
                for c in KAGGLE_CARDINALITIES)
    assert row["components"]["cache_values"] == slots * 64
    assert row["reduction_paper_formula"] == pytest.approx(10 / 3)
    # Scale/bias and cache metadata cost real bytes: the true ratio is lower.
    assert 2.0 < row["reduction_full_accounting"] < 2.4


def test_read_cardinalities(tmp_path):
    assert read_cardinalities("kaggle") == KAGGLE_CARDINALITIES
    j = tmp_path / "c.json"
    j.write_text("[5, 7, 9]")
    assert read_cardinalities(str(j)) == (5, 7, 9)
    t = tmp_path / "c.txt"
    t.write_text("# sizes\n10, 20\n30   40\n")
    assert read_cardinalities(str(t)) == (10, 20, 30, 40)
    bad = tmp_path / "bad.txt"
    bad.write_text("10 20\n30 x1\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2: .*'x1'"):
        read_cardinalities(str(bad))
    neg = tmp_path / "neg.json"
    neg.write_text("[3, 0]")
    with pytest.raises(DataError, match="item 1"):
        read_cardinalities(str(neg))
    with pytest.raises(UserError, match="no such cardinalities file"):
        read_cardinalities(str(tmp_path / "missing"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no cardinalities"):
        read_cardinalities(str(empty))


def test_cli_prints_both_reductions(capsys, tmp_path):
    out = tmp_path / "m.json"
    assert main(["memory", "--precision", "int8", "int4", "--cache-fraction", "0.05,0.01", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = {tuple(line.split()[:2]): line for line in text.splitlines() if line.strip().startswith("int")}
    assert "3.33" in lines[("int8", "5%")] and "7.41" in lines[("int4", "1%")]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["cache_fraction"]) for r in rows] == [("int8", 0.05), ("int8", 0.01),
                                                                     ("int4", 0.05), ("int4", 0.01)]
    assert rows[0]["total_bytes"] == sum(rows[0]["components"].values())


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    bad = tmp_path / "cards.json"
    bad.write_text("[1, 2,")
    assert main(["memory", "--cardinalities", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cards.json" in err and "not valid JSON" in err
    with pytest.raises(SystemExit):
        main(["memory", "--precision", "int9"])
    assert "unknown precision 'int9'" in capsys.readouterr().err
