"""Criteo TSV preparation (mpc/data/prepare.py, mpc/data/criteo_tsv.py): values,
validation, gzip, splits, CLI.

Every fixture is generated here (tiny, random or handmade): no real Criteo rows.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpc.cli import main as cli_main
from mpc.criteo import KAGGLE_LINES, split_sizes
from mpc.data.format import Dataset, dense_transform
from mpc.data.criteo_tsv import MAX_LINE_BYTES, reference_parse_line, reference_prepare
from mpc.data.prepare import Vocabulary, prepare_criteo
from mpc.errors import DataError, UserError
from mpc.runinfo import REPO_ROOT

SMALL_BLOCK = 1 << 16  # the smallest block: a few hundred lines, so tests cross block edges


def tsv_line(label="0", ints=("",) * 13, cats=("",) * 26) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([str(label), *map(str, ints), *cats])


def random_lines(rng, n: int) -> list[str]:
    """Criteo-shaped lines: empty and negative integers, repeated and empty hex values."""
    ints = rng.integers(-3, 5000, (n, 13)).astype(str).astype(object)
    ints[rng.random((n, 13)) < 0.2] = ""
    pools = [np.array([f"{v:08x}" for v in rng.integers(0, 2**32, size)], dtype=object)
             for size in rng.integers(1, 60, 26)]
    cats = np.stack([pool[rng.integers(len(pool), size=n)] for pool in pools], axis=1)
    cats[rng.random((n, 26)) < 0.1] = ""
    upper = rng.random(n) < 0.05
    cats[upper, 3] = [c.upper() for c in cats[upper, 3]]
    labels = (rng.random(n) < 0.25).astype(int)
    return [tsv_line(lab, i, c) for lab, i, c in zip(labels, ints.tolist(), cats.tolist())]


BAD_TOKENS = {  # field kind -> values that must be rejected there
    "label": ["2", "", "01", "-1", "1.0", "x"],
    "I": ["0x1f", "+3", " 3", "1e3", "--1", "1-2", "5-", "-", "1.5", "12345678901234567890", "abc"],
    "C": ["abcdef0", "abcdef012", "ghijklmn", "abcdef0 ", "-bcdef01", "0x1f2e3d"],
}


def corrupt(rng, lines: list[str], count: int) -> dict[int, str | None]:
    """Break `count` random lines in place; return {1-based line: bad field or None}."""
    broken = {}
    for i in rng.choice(len(lines), count, replace=False):
        fields = lines[i].split("\t")
        kind = rng.integers(5)
        if kind == 0:
            fields.pop(int(rng.integers(40)))
            broken[i + 1] = None
        elif kind == 1:
            fields.insert(int(rng.integers(40)), "1")
            broken[i + 1] = None
        else:
            j = int(rng.choice([0, int(rng.integers(1, 14)), int(rng.integers(14, 40))]))
            name = "label" if j == 0 else (f"I{j}" if j < 14 else f"C{j - 13}")
            tokens = BAD_TOKENS["label" if j == 0 else name[0]]
            fields[j] = tokens[int(rng.integers(len(tokens)))]
            broken[i + 1] = name
        lines[i] = "\t".join(fields)
    return broken


def write(tmp_path, lines, name="train.txt", end="\n") -> Path:
    path = tmp_path / name
    data = (end.join(lines) + end).encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def prepare(raw, out, **kw):
    return prepare_criteo(raw, out, progress=False, block_bytes=kw.pop("block_bytes", SMALL_BLOCK), **kw)


def arrays(folder):
    """All rows in file order (train, test and val are consecutive ranges) and the metadata."""
    ds = Dataset.open(folder)
    parts = [ds.split(name) for name in ("train", "test", "val")]
    return (*(np.concatenate([getattr(p, key) for p in parts]) for key in ("dense", "cat", "label")),
            ds.meta)


def example_lines(meta) -> list[int]:
    return [int(re.search(r", line (\d+)", e).group(1)) for e in meta.info["skipped_examples"]]


def assert_nothing_left(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# --- splits ------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [
    (KAGGLE_LINES, (39_291_958, 3_274_330, 3_274_329)),
    (0, (0, 0, 0)), (1, (1, 0, 0)), (7, (6, 1, 0)), (8, (7, 1, 0)), (13, (12, 1, 0)),
    (14, (12, 1, 1)), (20, (18, 1, 1)), (100, (86, 7, 7)), (101, (87, 7, 7)),
])
def test_split_sizes(n, expected):
    s = split_sizes(n)
    assert (s.train, s.test, s.val) == expected


def test_split_ranges_of_prepared_rows(tmp_path):
    lines = [tsv_line(i % 2, [i] + [""] * 12) for i in range(20)]  # I1 = line index
    prepare(write(tmp_path, lines), tmp_path / "out")
    ds = Dataset.open(tmp_path / "out")
    assert ds.meta.splits == {"train": 18, "test": 1, "val": 1}
    first_ints = {name: np.rint(np.expm1(ds.split(name).dense[:, 0])).astype(int).tolist()
                  for name in ("train", "test", "val")}
    assert first_ints == {"train": list(range(18)), "test": [18], "val": [19]}


# --- values --------------------------------------------------------------------------

def test_handmade_file_value_by_value(tmp_path):
    lines = [
        tsv_line(1, [0, 1, -5, "", 1000, 3, 3, 3, 3, 3, 3, 3, 7],
                 ["68fd1e64", "80e26c9b"] + ["00000001"] * 24),
        tsv_line(0, [2, "", -1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 123456789012],
                 ["68FD1E64", ""] + ["00000002"] * 24),
        tsv_line(0, [""] * 13, ["", "00000000"] + ["00000001"] * 24),
        tsv_line(1, [-2] * 13, ["ffffffff", "80e26c9b"] + [""] * 24),
    ]
    meta = prepare(write(tmp_path, lines), tmp_path / "out")
    dense, cat, label, meta2 = arrays(tmp_path / "out")
    assert meta2 == meta
    assert label.tolist() == [1, 0, 0, 1]
    log = math.log  # empty and negative -> 0 -> log(1) = 0, exactly
    np.testing.assert_allclose(dense[0, :6], [0, log(2), 0, 0, log(1001), log(4)], rtol=1e-6, atol=0)
    np.testing.assert_allclose(dense[1, [0, 1, 2, 3, 12]], [log(3), 0, 0, log(5), log(123456789013)],
                               rtol=1e-6, atol=0)
    assert dense[2].tolist() == [0.0] * 13 and dense[3].tolist() == [0.0] * 13
    # ids in order of first appearance; upper case is the same number; empty is hex 0
    assert cat[:, 0].tolist() == [0, 0, 1, 2]
    assert cat[:, 1].tolist() == [0, 1, 1, 0]          # "" and "00000000" share an id
    assert cat[:, 2].tolist() == [0, 1, 0, 2]
    assert meta.cardinalities == [3, 2] + [3] * 24
    assert meta.rows == 4 and meta.source == "criteo-tsv"
    assert meta.splits == {"train": 4, "test": 0, "val": 0}
    info = meta.info
    assert (info["lines_total"], info["lines_valid"], info["lines_skipped"]) == (4, 4, 0)
    raw = (tmp_path / "train.txt").read_bytes()
    assert info["sha256"] == hashlib.sha256(raw).hexdigest() and info["source_bytes"] == len(raw)


def test_matches_pure_python_reference(tmp_path):
    rng = np.random.default_rng(1)
    lines = random_lines(rng, 3000)
    broken = corrupt(rng, lines, 40)
    raw = write(tmp_path, lines)
    meta = prepare(raw, tmp_path / "out", on_bad_line="skip")
    dense, cat, label, _ = arrays(tmp_path / "out")
    ref_dense, ref_cat, ref_label, ref_bad = reference_prepare(raw.read_bytes())
    assert dict(ref_bad) == broken  # the reference agrees with how the lines were broken
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_array_equal(dense, ref_dense)
    np.testing.assert_array_equal(cat, ref_cat)  # same first-appearance order, so equal ids
    assert meta.cardinalities == [int(c) for c in ref_cat.max(0) + 1]
    assert meta.info["lines_skipped"] == len(broken) and meta.rows == 3000 - len(broken)
    first = sorted(broken)[:10]
    assert example_lines(meta) == first
    # error mode stops at the first broken line, naming the reference's field
    with pytest.raises(DataError) as e:
        prepare(raw, tmp_path / "out2")
    n = min(broken)
    assert e.value.line == n and e.value.field == broken[n]
    assert_nothing_left(tmp_path, tmp_path / "out2")


def test_reference_parse_line_rules():
    label, ints, keys = reference_parse_line(tsv_line(1, [-3] + [""] * 12, ["0000001f"] * 26).encode())
    assert (label, ints[:2], keys[0]) == (1, [-3, 0], 31)
    for token in BAD_TOKENS["I"]:
        with pytest.raises(ValueError, match="I4"):
            reference_parse_line(tsv_line(0, [1, 2, 3, token] + [""] * 9).encode())


# --- bad input -----------------------------------------------------------------------

GOOD = tsv_line(1, [5] * 13, ["deadbeef"] * 26)


def with_field(j: int, value: str) -> str:
    fields = GOOD.split("\t")
    fields[j] = value
    return "\t".join(fields)


@pytest.mark.parametrize("bad_line, field, value, words", [
    ("\t".join(GOOD.split("\t")[:39]), None, None, "expected 40 tab-separated fields, found 39"),
    (GOOD + "\t1", None, None, "found 41"),
    ("", None, None, "found 1"),
    (with_field(0, "2"), "label", "2", "label must be 0 or 1"),
    (with_field(0, ""), "label", "", "label must be 0 or 1"),
    (with_field(5, "abc"), "I5", "abc", "not an integer"),
    (with_field(5, "0x1f"), "I5", "0x1f", "not an integer"),
    (with_field(2, "+3"), "I2", "+3", "not an integer"),
    (with_field(13, "-"), "I13", "-", "not an integer"),
    (with_field(4, "1-2"), "I4", "1-2", "not an integer"),
    (with_field(4, "--1"), "I4", "--1", "not an integer"),
    (with_field(1, "12345678901234567890"), "I1", "12345678901234567890", "not an integer"),
    (with_field(25, "xyz12345"), "C12", "xyz12345", "not 8 hex digits"),
    (with_field(25, "abcdef1"), "C12", "abcdef1", "not 8 hex digits"),
    (with_field(14, "abcdef012"), "C1", "abcdef012", "not 8 hex digits"),
    (GOOD[:20] + "\r" + GOOD[20:], None, None, "carriage return"),
])
def test_bad_line_is_named(tmp_path, bad_line, field, value, words):
    raw = write(tmp_path, [GOOD, GOOD, bad_line, GOOD, with_field(7, "oops")])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(raw, out)
    msg = str(e.value)
    assert msg.startswith(f"{raw}, line 3") and words in msg and "\n" not in msg
    assert e.value.line == 3 and e.value.field == field
    if value is not None:
        assert f"(value {value!r})" in msg and f"field {field}" in msg
    assert_nothing_left(tmp_path, out)


def test_line_numbers_across_blocks(tmp_path):
    rng = np.random.default_rng(2)
    lines = random_lines(rng, 1500)  # ~6 blocks of 64 KiB
    lines[1234] = with_field(30, "nothex!!")
    lines[1300] = "0\t1"
    raw = write(tmp_path, lines)
    with pytest.raises(DataError, match=r"line 1235, field C17: not 8 hex digits \(value 'nothex!!'\)"):
        prepare(raw, tmp_path / "out")
    lines[1234] = GOOD
    with pytest.raises(DataError, match=r"line 1301: expected 40 tab-separated fields, found 2"):
        prepare(raw := write(tmp_path, lines), tmp_path / "out")
    meta = prepare(raw, tmp_path / "out", on_bad_line="skip")
    assert meta.info["lines_total"] == 1500 and meta.rows == 1499


def test_block_size_does_not_change_output(tmp_path):
    rng = np.random.default_rng(7)
    lines = random_lines(rng, 11_000)  # ~2.6 MB: several Arrow chunks in one 8 MiB block
    broken = corrupt(rng, lines, 25)
    raw = write(tmp_path, lines)
    small = prepare(raw, tmp_path / "small", on_bad_line="skip")
    big = prepare(raw, tmp_path / "big", on_bad_line="skip", block_bytes=8 << 20, workers=1)
    for a, b in zip(arrays(tmp_path / "small")[:3], arrays(tmp_path / "big")[:3]):
        np.testing.assert_array_equal(a, b)
    assert small.cardinalities == big.cardinalities
    assert small.info["lines_skipped"] == big.info["lines_skipped"] == len(broken)
    assert example_lines(big) == sorted(broken)[:10]


def test_skip_mode_counts_and_records(tmp_path):
    lines = [GOOD] * 30
    for n in (3, 7, 8, 20):
        lines[n - 1] = with_field(0, "9")
    lines.insert(25, "garbage")  # becomes line 26
    meta = prepare(write(tmp_path, lines), tmp_path / "out", on_bad_line="skip")
    info = meta.info
    assert (info["lines_total"], info["lines_valid"], info["lines_skipped"]) == (31, 26, 5)
    assert meta.rows == 26 and meta.splits == {"train": 23, "test": 2, "val": 1}
    assert example_lines(meta) == info["skipped_first_lines"] == [3, 7, 8, 20, 26]
    assert "field label" in info["skipped_examples"][0] and "'9'" in info["skipped_examples"][0]
    assert Dataset.open(tmp_path / "out").meta.info["lines_skipped"] == 5


def test_all_lines_bad_in_skip_mode(tmp_path):
    raw = write(tmp_path, ["x", "y"])
    with pytest.raises(DataError, match="no valid lines"):
        prepare(raw, tmp_path / "out", on_bad_line="skip")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_runaway_line(tmp_path):
    lines = [GOOD, "7" * (3 * MAX_LINE_BYTES), GOOD]  # past the memory guard
    raw = write(tmp_path, lines)
    with pytest.raises(DataError, match=r"line 2: line longer than"):
        prepare(raw, tmp_path / "out")
    meta = prepare(raw, tmp_path / "out", on_bad_line="skip")
    assert (meta.rows, meta.info["lines_total"], meta.info["lines_skipped"]) == (2, 3, 1)


# --- file-level cases ------------------------------------------------------------------

def test_gzip_equals_plain_and_multimember(tmp_path):
    lines = random_lines(np.random.default_rng(3), 800)
    plain = write(tmp_path, lines)
    gz = write(tmp_path, lines, "train.txt.gz")
    meta_p = prepare(plain, tmp_path / "p")
    meta_g = prepare(gz, tmp_path / "g")
    multi = tmp_path / "multi.gz"  # `cat a.gz b.gz` is a valid gzip file
    half = len(lines) // 2
    multi.write_bytes(gzip.compress(("\n".join(lines[:half]) + "\n").encode())
                      + gzip.compress(("\n".join(lines[half:]) + "\n").encode()))
    prepare(multi, tmp_path / "m")
    for other in ("g", "m"):
        for a, b in zip(arrays(tmp_path / "p")[:3], arrays(tmp_path / other)[:3]):
            np.testing.assert_array_equal(a, b)
    assert meta_g.cardinalities == meta_p.cardinalities
    assert meta_g.info["compression"] == "gzip" and meta_p.info["compression"] == "none"
    assert meta_g.info["sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()


def test_truncated_gzip(tmp_path):
    raw = write(tmp_path, random_lines(np.random.default_rng(4), 300), "train.txt.gz")
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train\.txt\.gz: truncated or corrupt gzip"):
        prepare(raw, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_crlf_and_missing_final_newline(tmp_path):
    lines = random_lines(np.random.default_rng(5), 700)
    lines[100] = "1\t2"  # sends its block down the careful line-by-line path
    prepare(write(tmp_path, lines), tmp_path / "lf", on_bad_line="skip")
    prepare(write(tmp_path, lines, "crlf.txt", end="\r\n"), tmp_path / "crlf", on_bad_line="skip")
    unterminated = tmp_path / "unterminated.txt"
    unterminated.write_bytes("\n".join(lines).encode())
    prepare(unterminated, tmp_path / "un", on_bad_line="skip")
    assert Dataset.open(tmp_path / "crlf").meta.info["lines_skipped"] == 1
    for other in ("crlf", "un"):
        for a, b in zip(arrays(tmp_path / "lf")[:3], arrays(tmp_path / other)[:3]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case, words", [
    ("missing", "file not found"),
    ("empty", "file is empty"),
    ("empty_gz", "file is empty (after decompression)"),
    ("directory", "not a regular file"),
    ("bzip2", "bzip2-compressed"),
])
def test_unusable_source(tmp_path, case, words):
    raw = tmp_path / "train.txt"
    if case == "empty":
        raw.write_bytes(b"")
    elif case == "empty_gz":
        raw.write_bytes(gzip.compress(b""))
    elif case == "directory":
        raw.mkdir()
    elif case == "bzip2":
        raw.write_bytes(b"BZh91AY&SY" + bytes(50))
    with pytest.raises(UserError) as e:
        prepare(raw, tmp_path / "out")
    assert words in str(e.value) and str(raw) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_source(tmp_path, monkeypatch):
    import mpc.data.prepare as prepare_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    raw = write(tmp_path, [GOOD])
    monkeypatch.setattr(prepare_module, "open", refuse, raising=False)
    with pytest.raises(UserError, match=r"train\.txt: cannot read: Permission denied$"):
        prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        prepare(write(tmp_path, [GOOD]), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_vocabulary_matches_dict():
    rng = np.random.default_rng(6)
    vocab, ref = Vocabulary(columns=3), [{} for _ in range(3)]
    for n in (1000, 1, 5000):
        keys = rng.integers(0, 500, (3, n)).astype(np.uint32) * np.uint32(8_000_000)
        ids = vocab.encode(keys)
        expected = [[d.setdefault(int(k), len(d)) for k in row] for d, row in zip(ref, keys)]
        np.testing.assert_array_equal(ids, expected)
    assert vocab.cardinalities == [len(d) for d in ref]


def test_dense_transform_shared_with_generator():
    values = np.array([[-7, 0, 1, 1000, 2**40]], np.int64)
    expected = np.float32([0, 0, math.log(2), math.log(1001), math.log(2**40 + 1)])
    np.testing.assert_allclose(dense_transform(values)[0], expected, rtol=1e-6)


# --- command line --------------------------------------------------------------------

def test_cli_success_and_errors(tmp_path, capsys):
    raw = write(tmp_path, [GOOD, with_field(9, "1x"), GOOD])
    assert cli_main(["prepare-criteo", "--raw", str(raw), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mpc prepare-criteo: error: ")
    assert "line 2, field I9: not an integer (value '1x')" in err
    assert cli_main(["prepare-criteo", "--raw", str(raw), "--out", str(tmp_path / "a"),
                     "--on-bad-line", "skip"]) == 0
    assert "2 rows" in capsys.readouterr().out
    assert cli_main(["prepare-criteo", "--raw", str(raw), "--out", str(tmp_path / "a")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_one_line(tmp_path):
    raw = write(tmp_path, [GOOD, "1\t2"])
    proc = subprocess.run([sys.executable, "-m", "mpc", "prepare-criteo", "--raw", str(raw),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mpc prepare-criteo: error: {raw}, line 2: expected 40 tab-separated fields, found 2 "
        "(value '1\\t2')"]
    assert_nothing_left(tmp_path, tmp_path / "out")
