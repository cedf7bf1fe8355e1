"""The synthetic Criteo generator (mpc.data.synth, mpc.data.teacher).

Checks what the rest of the project relies on: Kaggle-shaped tables at every scale,
determinism (per seed, whatever the chunking), Criteo-like CTR, skew, drift and missing
values, a planted label model with real signal in the ids, and a TSV that
`prepare-criteo` turns back into the same data.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mpc.cli import main
from mpc.criteo import KAGGLE_CARDINALITIES, KAGGLE_LINES, NUM_DENSE, NUM_SPARSE, split_sizes
from mpc.data.format import Dataset, dense_transform
from mpc.data.synth import (KAGGLE_DENSE, KAGGLE_TABLES, Scale, SynthConfig, SyntheticCriteo,
                            format_tsv, generate, popularity_quantiles, scaled_cardinalities,
                            write_tsv)
from mpc.data.synth_tables import draw_ranks, id_permutation
from mpc.data.teacher import hash_words, to_unit
from mpc.errors import UserError

TINY = SynthConfig(scale="tiny")                     # 40,000 rows, ~3.4k table rows
SMALL = SynthConfig(scale="small", samples=150_000)  # ~34k table rows
BIG_TABLES = [t for t, n in enumerate(KAGGLE_CARDINALITIES) if n > 1_000_000]


@pytest.fixture(scope="module")
def tiny():
    gen = SyntheticCriteo(TINY)
    return gen, gen.rows(0, gen.samples)


@pytest.fixture(scope="module")
def small():
    gen = SyntheticCriteo(SMALL)
    return gen, gen.rows(0, gen.samples)


# --- tables and sizes ------------------------------------------------------------------

def test_scaled_cardinalities():
    assert scaled_cardinalities("full") == KAGGLE_CARDINALITIES
    assert sum(scaled_cardinalities("full")) == 33_762_577
    for scale in Scale:
        cards = scaled_cardinalities(scale)
        assert len(cards) == NUM_SPARSE
        for n, spec, kaggle in zip(cards, KAGGLE_TABLES, KAGGLE_CARDINALITIES):
            assert n >= (2 if spec.missing > 0 else 1)
            assert n == max(n, round(kaggle * scale.factor))  # only the floor can raise it
    medium = scaled_cardinalities("medium")
    assert medium[2] == round(10131227 / 100) and 330_000 < sum(medium) < 345_000
    assert 3_000 < sum(scaled_cardinalities("tiny")) < 5_000


def test_default_samples():
    assert SynthConfig(scale="full").samples == KAGGLE_LINES
    assert 20_000 <= TINY.samples <= 50_000
    assert SynthConfig(scale="small").samples < SynthConfig(scale="medium").samples < KAGGLE_LINES


# --- determinism -----------------------------------------------------------------------

def _arrays(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "meta.json"}


def test_same_bytes_whatever_the_chunking(tmp_path):
    config = SynthConfig(scale="tiny", samples=9_000, seed=7)
    generate(config, tmp_path / "a", chunk_rows=9_000, workers=1, progress=False)
    generate(config, tmp_path / "b", chunk_rows=1_234, workers=2, progress=False)
    generate(config, tmp_path / "c", chunk_rows=4_096, workers=3, progress=False)
    a = _arrays(tmp_path / "a")
    assert set(a) == {"dense.f32", "cat.i32", "label.u8"}
    assert a == _arrays(tmp_path / "b") == _arrays(tmp_path / "c")
    other = generate(SynthConfig(scale="tiny", samples=9_000, seed=8), tmp_path / "d", progress=False)
    assert other.rows == 9_000 and _arrays(tmp_path / "d")["label.u8"] != a["label.u8"]


def test_row_ranges_are_independent(tiny):
    gen, rows = tiny
    fresh = SyntheticCriteo(TINY)  # rebuilt from the config alone
    part = fresh.rows(12_345, 13_000)
    for name in ("dense", "cat", "label", "logit", "dense_raw", "dense_missing", "cat_missing"):
        assert np.array_equal(getattr(part, name), getattr(rows, name)[12_345:13_000]), name


def test_meta(tmp_path):
    config = SynthConfig(scale="tiny", samples=7_001, seed=2, drift=0.5)
    meta = generate(config, tmp_path / "d", progress=False)
    ds = Dataset.open(tmp_path / "d")
    assert ds.meta.source == "synthetic" and meta.rows == 7_001
    assert ds.meta.cardinalities == list(scaled_cardinalities("tiny"))
    sizes = split_sizes(7_001)
    assert ds.meta.splits == {"train": sizes.train, "test": sizes.test, "val": sizes.val}
    assert SynthConfig(**ds.meta.info["config"]) == config  # the full config round-trips
    cat = np.asarray(ds._arrays["cat"])
    assert cat.min() >= 0 and np.all(cat.max(axis=0) < np.array(ds.meta.cardinalities))


# --- distributions ---------------------------------------------------------------------

def test_ctr_near_kaggle(tiny, small):
    for _, rows in (tiny, small):
        assert abs(rows.label.mean() - 0.256) < 0.01


def test_missing_rates_and_groups(tiny):
    gen, rows = tiny
    for j, spec in enumerate(KAGGLE_DENSE):
        assert abs(rows.dense_missing[:, j].mean() - spec.missing) < 0.012, f"I{j + 1}"
    for t, spec in enumerate(KAGGLE_TABLES):
        assert abs(rows.cat_missing[:, t].mean() - spec.missing) < 0.012, f"C{t + 1}"
        if spec.missing:  # a missing value is the table's id 0, and only missing values are
            assert np.array_equal(rows.cat[:, t] == 0, rows.cat_missing[:, t]), f"C{t + 1}"
    # Columns empty together in Criteo are empty together here.
    assert np.array_equal(rows.dense_missing[:, 0], rows.dense_missing[:, 9])     # I1, I10
    assert np.array_equal(rows.cat_missing[:, 18], rows.cat_missing[:, 25])       # C19, C26
    assert not np.array_equal(rows.cat_missing[:, 18], rows.cat_missing[:, 21])   # C19, C22
    assert np.all(rows.dense_raw[rows.dense_missing] == 0)


def test_dense_values(tiny):
    _, rows = tiny
    raw, present = rows.dense_raw, ~rows.dense_missing
    assert np.array_equal(rows.dense, dense_transform(raw))
    negative = raw < 0
    assert not negative[:, [j for j in range(NUM_DENSE) if j != 1]].any()  # only I2
    assert 0.02 < negative[:, 1].mean() < 0.04 and raw[:, 1].min() >= -3
    for j, spec in enumerate(KAGGLE_DENSE):
        v = raw[present[:, j], j]
        med = np.median(v)
        assert 0.5 * spec.median - 1 <= med <= 1.5 * spec.median + 1, f"I{j + 1}"
        if spec.tail < 3:  # heavy tails: the maximum is far above the median
            assert v.max() > 20 * max(med, 1), f"I{j + 1}"


def _top_share(ids: np.ndarray, rows: int, fraction: float = 0.01) -> float:
    counts = np.sort(np.bincount(ids, minlength=rows))[::-1]
    return counts[:max(1, int(fraction * rows))].sum() / counts.sum()


def test_access_skew(small):
    gen, rows = small
    for t in BIG_TABLES:
        present = rows.cat[~rows.cat_missing[:, t], t]
        share = _top_share(present, int(gen.cards[t]))
        assert 0.2 < share < 0.7, f"C{t + 1}: top 1% of rows take {share:.2f} of accesses"
        counts = np.bincount(present, minlength=int(gen.cards[t]))
        # popularity is not the id order: hot ids are spread over the table
        hot = np.argsort(counts)[::-1][:50]
        assert 0.2 < np.median(hot) / gen.cards[t] < 0.8
    shares = [_top_share(rows.cat[:, t], int(gen.cards[t])) for t in BIG_TABLES]
    assert max(shares) - min(shares) > 0.05  # tables differ


def test_id_permutation_is_a_keyed_bijection():
    for values in (1, 2, 3, 5, 64, 1_000, 65_537):
        p = id_permutation(0, 2, values)
        assert np.array_equal(np.sort(p), np.arange(values)), values
    p, q = id_permutation(0, 2, 10_000), id_permutation(1, 2, 10_000)
    assert (p == np.arange(10_000)).mean() < 0.01 and (p == q).mean() < 0.01
    assert abs(np.corrcoef(p, np.arange(10_000))[0, 1]) < 0.05


def test_popularity_sampling_matches_law():
    spec, values = KAGGLE_TABLES[1], 7   # 7 values: every rank's mass is visible
    q = popularity_quantiles(values, spec)
    ranks = np.arange(values, dtype=np.float64)
    pmf = (ranks + spec.head) ** -spec.exponent
    pmf = (1 - spec.floor) * pmf / pmf.sum() + spec.floor / values
    u = (np.arange(200_000) + 0.5) / 200_000
    freq = np.bincount(draw_ranks(q, u), minlength=values) / len(u)
    np.testing.assert_allclose(freq, pmf, atol=1e-3)
    # a big table: the head ranks keep their masses, the tail its shape
    spec, values = KAGGLE_TABLES[2], 100_000
    ranks = np.arange(values, dtype=np.float64)
    pmf = (ranks + spec.head) ** -spec.exponent
    pmf = (1 - spec.floor) * pmf / pmf.sum() + spec.floor / values
    freq = np.bincount(draw_ranks(popularity_quantiles(values, spec), u), minlength=values) / len(u)
    np.testing.assert_allclose(freq[:5], pmf[:5], rtol=0.02)
    for lo, hi in ((100, 1_000), (1_000, 10_000), (10_000, 100_000)):
        assert abs(freq[lo:hi].sum() / pmf[lo:hi].sum() - 1) < 0.02
    assert (freq[10_000:] > 0).sum() > 30_000  # the whole tail is drawn, not 4096 grid points


def test_drift_moves_the_hot_set():
    def day_overlap(drift):
        gen = SyntheticCriteo(SynthConfig(scale="small", samples=140_000, drift=drift))
        t, n = 2, int(gen.cards[2])  # C3
        first, last = gen.rows(0, 20_000).cat[:, t], gen.rows(120_000, 140_000).cat[:, t]
        top = max(1, n // 100)
        hot = [set(np.argsort(np.bincount(c, minlength=n))[::-1][:top]) for c in (first, last)]
        return len(hot[0] & hot[1]) / top

    still, moving = day_overlap(0.0), day_overlap(1.0)
    assert still > 0.6 and moving < still - 0.1


# --- the planted labels -----------------------------------------------------------------

def test_teacher_signal(small):
    gen, rows = small
    auc = roc_auc_score(rows.label, rows.logit)
    assert 0.78 < auc < 0.92
    cal = gen.teacher.calibration
    terms = gen.teacher.raw_terms(rows.dense[:20_000], gen._features(np.arange(20_000))["sums"])
    for name in ("dense", "bias", "pair", "dense_cat"):  # each term has the spread asked for
        want = getattr(SMALL.teacher, f"{name}_std")
        assert abs(cal.gains[name] * terms[name].std() / want - 1) < 0.15, name
    # The dense response is not linear in the (standardised) features.
    psi = (rows.dense[:20_000] - np.array(cal.psi_mean)) / np.array(cal.psi_std)
    fit = np.linalg.lstsq(np.c_[psi, np.ones(len(psi))], terms["dense"], rcond=None)[1][0]
    assert fit / ((terms["dense"] - terms["dense"].mean()) ** 2).sum() > 0.03
    # A model of the dense features alone falls well short: the ids carry the signal.
    n = 100_000
    lr = LogisticRegression(max_iter=200).fit(rows.dense[:n:2], rows.label[:n:2])
    dense_auc = roc_auc_score(rows.label[n:], lr.predict_proba(rows.dense[n:])[:, 1])
    assert dense_auc < roc_auc_score(rows.label[n:], rows.logit[n:]) - 0.08


def test_counter_hash_is_uniform_and_uncorrelated():
    w = hash_words(np.arange(200_000, dtype=np.uint32), 12345, 4)
    u = to_unit(w)
    assert np.all((u > 0) & (u < 1)) and np.all(to_unit(w, np.float32) < 1)
    np.testing.assert_allclose(u.mean(axis=1), 0.5, atol=0.005)
    assert np.abs(np.corrcoef(u) - np.eye(4)).max() < 0.01       # columns (purposes)
    assert abs(np.corrcoef(u[0, :-1], u[0, 1:])[0, 1]) < 0.01  # neighbouring rows


# --- TSV -------------------------------------------------------------------------------

def _reference_line(rows, hexv, i) -> bytes:
    """One TSV line the obvious way (the twin of the vectorised format_tsv)."""
    fields = [str(rows.label[i])]
    fields += ["" if rows.dense_missing[i, j] else str(rows.dense_raw[i, j]) for j in range(NUM_DENSE)]
    fields += ["" if rows.cat_missing[i, t] else f"{hexv[i, t]:08x}" for t in range(NUM_SPARSE)]
    return ("\t".join(fields) + "\n").encode()


def test_format_tsv_matches_reference(tiny):
    gen, _ = tiny
    sub = gen.rows(0, 3_000)
    hexv = gen.hex_values(sub)
    text = format_tsv(sub, hexv)
    assert text == b"".join(_reference_line(sub, hexv, i) for i in range(len(sub)))
    for t in range(NUM_SPARSE):  # one-to-one, never the value that means "empty"
        v = hexv[~sub.cat_missing[:, t], t]
        ids = sub.cat[~sub.cat_missing[:, t], t]
        assert np.all(v != 0)
        pairs = np.unique(np.stack([v, ids], axis=1), axis=0)
        assert len(pairs) == len(np.unique(v)) == len(np.unique(ids))
    # edge values: widest numbers, zeros, negatives, all-empty fields, hex with leading zeros
    edge = gen.rows(0, 4)
    edge.dense_raw[:] = [[0, -3, 9, 10, 2**31 - 1, 1_000_000_000, 99, 100, 7, 0, 1, 2, 3]] * 4
    edge.dense_missing[:] = False
    edge.dense_missing[1] = True
    edge.cat_missing[:] = False
    edge.cat_missing[2] = True
    hexv = gen.hex_values(edge)
    hexv[0] = np.arange(NUM_SPARSE, dtype=np.uint32) * 0x01010101 + 1
    text = format_tsv(edge, hexv)
    assert text == b"".join(_reference_line(edge, hexv, i) for i in range(4))
    line1 = text.split(b"\n")[1]
    assert line1.startswith(b"%d" % edge.label[1] + b"\t" * 14)  # 13 empty dense fields


@pytest.mark.parametrize("suffix", [".tsv.gz", ".tsv"])
def test_tsv_prepares_to_the_same_data(tmp_path, suffix):
    from mpc.data.prepare import prepare_criteo

    config = SynthConfig(scale="tiny", samples=12_000, seed=5)
    generate(config, tmp_path / "direct", chunk_rows=5_000, progress=False)
    info = write_tsv(config, tmp_path / f"train{suffix}", chunk_rows=3_000, progress=False)
    raw = (tmp_path / f"train{suffix}").read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == suffix.endswith(".gz") and info["rows"] == 12_000
    prepare_criteo(tmp_path / f"train{suffix}", tmp_path / "prepared", progress=False)
    a, b = Dataset.open(tmp_path / "direct"), Dataset.open(tmp_path / "prepared")
    assert a.meta.splits == b.meta.splits
    for name in ("train", "test", "val"):
        x, y = a.split(name), b.split(name)
        assert np.array_equal(x.dense, y.dense) and np.array_equal(x.label, y.label), name
    ca, cb = np.asarray(a._arrays["cat"]), np.asarray(b._arrays["cat"])
    for t in range(NUM_SPARSE):  # ids equal up to a one-to-one relabelling per table
        pairs = np.unique(np.stack([ca[:, t], cb[:, t]], axis=1), axis=0)
        assert len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1])), f"C{t + 1}"


def test_tsv_fields(tmp_path):
    write_tsv(SynthConfig(scale="tiny", samples=2_000), tmp_path / "t.tsv.gz", progress=False)
    lines = gzip.decompress((tmp_path / "t.tsv.gz").read_bytes()).decode().splitlines()
    assert len(lines) == 2_000
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 40 for f in fields)
    assert {f[0] for f in fields} == {"0", "1"}
    cats = [c for f in fields for c in f[14:] if c]
    assert all(len(c) == 8 and int(c, 16) != 0 and c == c.lower() for c in cats)
    assert any(f[2].startswith("-") for f in fields)           # I2's negatives
    assert any(f[1] == "" for f in fields) and any(f[35] == "" for f in fields)  # I1, C22 empty


# --- bad input -------------------------------------------------------------------------

def test_bad_options():
    with pytest.raises(UserError, match="samples"):
        SynthConfig(samples=-5)
    with pytest.raises(UserError, match="unknown scale 'huge'.*tiny, small, medium, full"):
        SynthConfig(scale="huge")
    with pytest.raises(UserError, match="drift"):
        SynthConfig(drift=-1.0)
    with pytest.raises(UserError, match="seed"):
        SynthConfig(seed=-1)


def test_cli(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--scale", "tiny", "--samples", "3000",
                 "--tsv", str(tmp_path / "t.tsv")]) == 0
    assert Dataset.open(out).meta.rows == 3000 and (tmp_path / "t.tsv").stat().st_size > 0
    assert main(["synth", "--out", str(out), "--samples", "3000"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "e"), "--scale", "huge"]) == 2
    assert "unknown scale 'huge'" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "e"), "--samples", "-1"]) == 2
    assert "samples must be" in capsys.readouterr().err
    assert main(["synth", "--scale", "tiny"]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, start, stop):
        if start > 0:
            raise RuntimeError("disk on fire")
        return real(self, start, stop)

    real = SyntheticCriteo.rows
    monkeypatch.setattr(SyntheticCriteo, "rows", boom)
    config = SynthConfig(scale="tiny", samples=5_000)
    with pytest.raises(RuntimeError):
        generate(config, tmp_path / "d", chunk_rows=1_000, progress=False)
    with pytest.raises(RuntimeError):
        write_tsv(config, tmp_path / "t.tsv", chunk_rows=1_000, progress=False)
    assert list(tmp_path.iterdir()) == []
