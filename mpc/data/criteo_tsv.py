"""Criteo TSV text -> validated, decoded columns, a block of whole lines at a time.

The parsing half of `python -m mpc prepare-criteo` (mpc/data/prepare.py), following the
DLRM reference's reading of the Kaggle `train.txt` (PAPERS.md §4). Line rules, checked
on every line: exactly 40 tab-separated fields; label `0` or `1`; I1..I13 empty or
`-?[0-9]+` of at most 18 characters; C1..C26 empty or exactly 8 hex digits. Upper-case
hex is accepted and means the same number (the reference parses with `int(x, 16)`); an
empty categorical is the value hex 0, exactly as in the reference. CRLF line endings are
accepted: one carriage return right before the line feed is dropped; a carriage return
anywhere else makes the line bad. A blank line is a bad line.

A block is parsed by pyarrow's CSV reader with every column as raw bytes (quoting off),
then each column is validated and decoded with numpy straight from the Arrow buffers.
Only a block in which Arrow saw a line with the wrong field count (or an empty label,
the mark of a stray carriage return) takes the careful path: split into lines in Python,
bad lines set aside, the rest re-parsed. `reference_prepare` is the plain per-line
Python twin that the tests compare against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from mpc.criteo import NUM_DENSE, NUM_FIELDS, NUM_SPARSE, field_name
from mpc.data.format import dense_transform
from mpc.errors import DataError

FIELD_NAMES = [field_name(i) for i in range(NUM_FIELDS)]
MAX_INT_CHARS = 18        # keeps every accepted integer inside int64
MAX_LINE_BYTES = 1 << 20  # a valid line is < 600 bytes; this only bounds runaway lines
MAX_EXAMPLES = 10         # bad lines described per block (and in the metadata)


@dataclass
class BadLine:
    line: int            # 0-based within its block, until the consumer numbers it in the file
    field: str | None    # None for a line that does not split into 40 fields
    problem: str
    value: str

    def error(self, path) -> DataError:
        return DataError(self.problem, path=path, line=self.line, field=self.field, value=self.value)


@dataclass
class ParsedBlock:
    """One block: the decoded good rows, and what was wrong with the others."""

    lines: int                 # physical lines in the block
    label: np.ndarray          # (n,) uint8
    dense: np.ndarray          # (n, 13) float32, already through dense_transform
    keys: np.ndarray           # (26, n) uint32 raw categorical values (empty -> 0)
    bad_count: int = 0
    bad: list[BadLine] = field(default_factory=list)  # the first MAX_EXAMPLES, in line order

    @classmethod
    def only_bad(cls, lines: int, bad_count: int, bad: list[BadLine]) -> "ParsedBlock":
        return cls(lines, np.zeros(0, np.uint8), np.zeros((0, NUM_DENSE), np.float32),
                   np.zeros((NUM_SPARSE, 0), np.uint32), bad_count, bad)


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "..."


# --- column decoding on Arrow buffers ---------------------------------------------

# Two hex characters (read as one little-endian uint16) -> their byte value, 0x100 if
# either is not a hex digit. A 128 KiB table: one gather decodes two characters.
_HEX_PAIRS = np.full(1 << 16, 0x100, np.uint16)
_HEX_DIGITS = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
for _a, _va in _HEX_DIGITS.items():
    for _b, _vb in _HEX_DIGITS.items():
        _HEX_PAIRS[_a | (_b << 8)] = (_va << 4) | _vb


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n + 1,) and data bytes of a binary Arrow array, without copying."""
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, len(arr) + 1, arr.offset * 4)
    if data_buf is None or not data_buf.size:  # every value empty
        return offsets, np.zeros(1, np.uint8)
    data = np.frombuffer(data_buf, np.uint8)
    return offsets, data


def _parse_label(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    offsets, data = _buffers(arr)
    label = data[np.minimum(offsets[:-1], len(data) - 1)] - np.uint8(ord("0"))
    bad = (np.diff(offsets) != 1) | (label > 1)
    return label, bad


def _parse_int(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strict decimal integers; empty -> 0. Arrow's own cast is too lenient (takes 0x1f)."""
    offsets, data = _buffers(arr)
    lengths = np.diff(offsets)
    bad = lengths > MAX_INT_CHARS
    nondigit = np.flatnonzero((data[offsets[0]:offsets[-1]] - np.uint8(ord("0"))) > 9) + offsets[0]
    if len(nondigit):
        row = np.searchsorted(offsets, nondigit, side="right") - 1
        # a minus sign may only open a value that has digits after it
        ok = (data[nondigit] == ord("-")) & (offsets[row] == nondigit) & (lengths[row] > 1)
        bad[row[~ok]] = True
    # With empty and bad values marked null, Arrow's cast only sees clean digit strings.
    valid = pa.py_buffer(np.packbits((lengths > 0) & ~bad, bitorder="little"))
    clean = pa.Array.from_buffers(pa.binary(), len(lengths), [valid, pa.py_buffer(offsets), arr.buffers()[2]])
    values = pc.cast(clean, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return values, bad


def _parse_hex(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """8 hex digits -> uint32 (the value int(x, 16)); empty -> 0."""
    offsets, data = _buffers(arr)
    lengths = np.diff(offsets)
    full = lengths == 8
    bad = ~full & (lengths != 0)
    keys = np.zeros(len(lengths), np.uint32)
    if bad.any():  # the 8-character values are no longer back to back: gather them
        chars = data[offsets[:-1][full][:, None] + np.arange(8)].ravel()
    else:
        chars = data[offsets[0]:offsets[-1]]
    if not len(chars):
        return keys, bad
    pairs = np.take(_HEX_PAIRS, chars.view("<u2")).reshape(-1, 4)
    nonhex = (pairs.view(np.uint64).ravel() & np.uint64(0x0100_0100_0100_0100)) != 0
    keys[full] = pairs.astype(np.uint8).view(">u4").ravel()  # first pair = most significant byte
    bad[np.flatnonzero(full)[nonhex]] = True
    return keys, bad


# --- blocks ------------------------------------------------------------------------

_PARSE = dict(delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False)
_CONVERT = pa_csv.ConvertOptions(column_types={n: pa.binary() for n in FIELD_NAMES},
                                 strings_can_be_null=False)


def _arrow_read(block: bytes, on_invalid) -> pa.Table:
    """All 40 columns as raw bytes; `on_invalid` sees lines with the wrong field count."""
    return pa_csv.read_csv(
        pa.py_buffer(block),
        # 2 MiB Arrow chunks parse ~15% faster than one 8 MiB chunk (they stay in cache)
        read_options=pa_csv.ReadOptions(column_names=FIELD_NAMES, use_threads=False, block_size=2 << 20),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid, **_PARSE),
        convert_options=_CONVERT,
    )


def _split_lines(block: bytes) -> tuple[bytes, np.ndarray, int, int, list[BadLine]]:
    """The careful path for a block Arrow flagged: check field counts line by line.

    Returns the good lines re-joined, each good line's index in the block, the number of
    lines, the number of bad lines and the first MAX_EXAMPLES of them.
    """
    lines = block.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the block's final line feed ends a line, it does not open one
    good, rows, bad, n_bad = [], [], [], 0
    for i, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        n = line.count(b"\t") + 1
        if n == NUM_FIELDS and b"\r" not in line:
            good.append(line)
            rows.append(i)
            continue
        n_bad += 1
        if len(bad) < MAX_EXAMPLES:
            problem = (f"expected {NUM_FIELDS} tab-separated fields, found {n}" if n != NUM_FIELDS
                       else "carriage return inside the line")
            if n == NUM_FIELDS - 1:
                problem += " (Criteo's test.txt has no label column: use train.txt)"
            bad.append(BadLine(i, None, problem, _show(line)))
    joined = b"\n".join(good) + b"\n" if good else b""
    return joined, np.asarray(rows, np.int64), len(lines), n_bad, bad


def _refuse(row) -> str:
    raise AssertionError(f"re-parsed line still has {row.actual_columns} fields")


def _read_block(block: bytes):
    """Arrow table of the block's good-shaped lines, line count, row -> line map, bad lines."""
    flagged = []
    try:
        table = _arrow_read(block, lambda row: flagged.append(row) or "skip")
    except pa.ArrowInvalid:
        flagged.append(None)
    # A stray carriage return can make Arrow see an extra empty line: its label is empty.
    if not flagged and pc.min(pc.binary_length(table.column(0))).as_py() != 0:
        return table, table.num_rows, None, 0, []
    good, rows, n_lines, n_bad, bad = _split_lines(block)
    table = _arrow_read(good, _refuse) if good else None
    return table, n_lines, rows, n_bad, bad


_PROBLEM = {"label": "label must be 0 or 1", "I": "not an integer", "C": "not 8 hex digits"}


def parse_block(block: bytes) -> ParsedBlock:
    """Parse, validate and decode one block of whole lines (thread-safe: runs on workers)."""
    table, n_lines, row_lines, n_bad, bad = _read_block(block)
    if table is None:
        return ParsedBlock.only_bad(n_lines, n_bad, bad)
    cols = [c.combine_chunks() for c in table.columns]
    n = table.num_rows
    label, label_bad = _parse_label(cols[0])
    ints = np.empty((NUM_DENSE, n), np.int64)
    keys = np.empty((NUM_SPARSE, n), np.uint32)
    masks = [label_bad]
    for j in range(NUM_DENSE):
        ints[j], m = _parse_int(cols[1 + j])
        masks.append(m)
    for j in range(NUM_SPARSE):
        keys[j], m = _parse_hex(cols[1 + NUM_DENSE + j])
        masks.append(m)
    any_bad = np.logical_or.reduce(masks)
    bad_rows = np.flatnonzero(any_bad)
    if len(bad_rows):
        for r in bad_rows[:MAX_EXAMPLES]:
            j = next(k for k, m in enumerate(masks) if m[r])  # a line's first bad field
            name = FIELD_NAMES[j]
            line = int(r if row_lines is None else row_lines[r])
            bad.append(BadLine(line, name, _PROBLEM[name if j == 0 else name[0]],
                               _show(cols[j][int(r)].as_py())))
        bad = sorted(bad, key=lambda b: b.line)[:MAX_EXAMPLES]
        good = ~any_bad
        label, ints, keys = label[good], ints[:, good], keys[:, good]
    dense = dense_transform(ints.T)
    return ParsedBlock(n_lines, label, dense, keys, n_bad + len(bad_rows), bad)


class LongLine:
    """Stands in for a line longer than MAX_LINE_BYTES, whose bytes were dropped."""

    @staticmethod
    def parsed() -> ParsedBlock:
        return ParsedBlock.only_bad(1, 1, [BadLine(0, None, f"line longer than {MAX_LINE_BYTES} bytes",
                                                   "...")])


def iter_blocks(read: Callable[[int], bytes], block_bytes: int) -> Iterator[bytes | LongLine]:
    """Blocks of whole lines from `read(n)` (the file's last line may lack its line feed)."""
    carry, dropping = b"", False
    while chunk := read(block_bytes):
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n") + 1
        if dropping:  # inside a runaway line: discard up to its end
            first = data.find(b"\n")
            if first < 0:
                carry = b""
                continue
            dropping, data, cut = False, data[first + 1:], cut - first - 1
        if cut == 0:
            if len(data) > MAX_LINE_BYTES:  # bound memory: never hold a runaway line
                yield LongLine()
                carry, dropping = b"", True
            else:
                carry = data
            continue
        yield data[:cut]
        carry = data[cut:]
    if carry:
        yield carry


def parse_item(item: bytes | LongLine) -> ParsedBlock:
    return item.parsed() if isinstance(item, LongLine) else parse_block(item)


# --- the pure-Python reference twin ------------------------------------------------------

_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")


def reference_parse_line(line: bytes) -> tuple[int, list[int], list[int]]:
    """One line (without its line feed) the obvious way; ValueError(field or None) if bad.

    The slow twin of `parse_block`, used by the tests and as the benchmark baseline.
    Returns (label, 13 raw integers with empty -> 0, 26 raw categorical values).
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS or b"\r" in line:
        raise ValueError(None)
    if fields[0] not in (b"0", b"1"):
        raise ValueError("label")
    ints = []
    for j, f in enumerate(fields[1:1 + NUM_DENSE], start=1):
        if f and not (_INT_RE.fullmatch(f) and len(f) <= MAX_INT_CHARS):
            raise ValueError(FIELD_NAMES[j])
        ints.append(int(f) if f else 0)
    keys = []
    for j, f in enumerate(fields[1 + NUM_DENSE:], start=1 + NUM_DENSE):
        if f and not _HEX_RE.fullmatch(f):
            raise ValueError(FIELD_NAMES[j])
        keys.append(int(f, 16) if f else 0)
    return int(fields[0]), ints, keys


def reference_prepare(text: bytes):
    """The whole preprocessing in pure Python (skip mode): (dense, cat, label, bad).

    `bad` lists (1-based line, field name or None) for every bad line.
    """
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    vocab: list[dict[int, int]] = [{} for _ in range(NUM_SPARSE)]
    ints, cats, labels, bad = [], [], [], []
    for number, line in enumerate(lines, start=1):
        try:
            label, row_ints, row_keys = reference_parse_line(line)
        except ValueError as e:
            bad.append((number, e.args[0]))
            continue
        labels.append(label)
        ints.append(row_ints)
        cats.append([v.setdefault(k, len(v)) for v, k in zip(vocab, row_keys)])
    dense = dense_transform(np.array(ints, np.int64).reshape(-1, NUM_DENSE))
    return (dense, np.array(cats, np.int32).reshape(-1, NUM_SPARSE), np.array(labels, np.uint8),
            bad)


