"""Criteo Kaggle `train.txt[.gz]` -> the binary data set (`python -m mpc prepare-criteo`).

Implements the DLRM reference preprocessing of PAPERS.md §4: empty integers -> 0,
negative integers -> 0, log(x + 1) on the 13 dense features (`dense_transform`, shared
with the synthetic generator); each of the 26 categorical columns mapped to contiguous
ids with one vocabulary over the whole file (ids in order of first appearance; an empty
value is hex 0 as in the reference, so it gets an id like any other); rows kept in file
order and split into the reference's 7 "days" by `mpc.criteo.split_sizes`. The line
rules (40 fields, 0/1 label, integers, 8 hex digits; CRLF accepted) are in
mpc/data/criteo_tsv.py, which parses the text.

How it is fast with bounded memory: the main thread reads blocks of whole lines (gunzip
and sha256 on the way), a small thread pool parses and decodes each block (pyarrow and
numpy release the GIL), and the main thread takes the blocks in file order: vocabulary
lookup in pandas' hash tables, then append to the `DatasetWriter`. At most
`workers + 1` blocks are in memory besides the vocabularies.
"""

from __future__ import annotations

import argparse
import enum
import gzip
import hashlib
import logging
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pandas._libs import hashtable as pd_hashtable
from tqdm.auto import tqdm

from mpc.criteo import NUM_SPARSE, split_sizes
from mpc.data.criteo_tsv import MAX_EXAMPLES, ParsedBlock, iter_blocks, parse_item
from mpc.data.format import DatasetMeta, DatasetWriter
from mpc.errors import DataError, UserError
from mpc.runinfo import atomic_directory, git_commit

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 8 << 20  # ~33k lines; smaller blocks stay in cache (faster), down to ~4 MiB

_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip",
          b"\x28\xb5\x2f\xfd": "zstd"}


class OnBadLine(str, enum.Enum):
    ERROR = "error"  # stop at the first bad line, leave no output
    SKIP = "skip"    # drop bad lines, count them in the metadata


# --- the source file -------------------------------------------------------------------

class _Source:
    """The raw file: gunzipped if needed; every byte read is hashed and shown in the bar."""

    def __init__(self, path: Path, progress: bool):
        self.path = path
        if not path.exists():
            raise UserError(f"{path}: file not found")
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
        try:
            self._raw = open(path, "rb")
            magic = self._raw.read(6)
            self._raw.seek(0)
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
        self.size = path.stat().st_size
        if self.size == 0:
            self._raw.close()
            raise DataError("file is empty", path=path)
        self.compression = next((kind for m, kind in _MAGIC.items() if magic.startswith(m)), "none")
        if self.compression not in ("gzip", "none"):
            self._raw.close()
            raise DataError(f"{self.compression}-compressed; only plain or gzip (.gz) input is supported",
                            path=path)
        self._sha = hashlib.sha256()
        self._bar = tqdm(total=self.size, unit="B", unit_scale=True, desc="prepare-criteo",
                         disable=not progress)
        self._gzip = gzip.GzipFile(fileobj=self, mode="rb") if self.compression == "gzip" else None

    def read(self, n: int = -1) -> bytes:
        """Raw bytes (GzipFile reads through here too)."""
        try:
            chunk = self._raw.read(n)
        except OSError as e:
            raise UserError(f"{self.path}: read failed: {e.strerror or e}") from None
        self._sha.update(chunk)
        self._bar.update(len(chunk))
        return chunk

    def read_text(self, n: int) -> bytes:
        """Up to n bytes of (decompressed) TSV."""
        if self._gzip is None:
            return self.read(n)
        try:
            return self._gzip.read(n)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"truncated or corrupt gzip data ({e})", path=self.path) from None

    def sha256(self) -> str:
        while self.read(1 << 22):  # hash whatever the decompressor did not need
            pass
        return self._sha.hexdigest()

    def close(self) -> None:
        self._bar.close()
        self._raw.close()


# --- vocabularies ----------------------------------------------------------------------

class Vocabulary:
    """Per categorical column: raw uint32 value -> contiguous id, in order of first appearance.

    Built on pandas' uint32 hash tables because their `get_labels` factorizes
    incrementally (ids continue from `count_prior`), which the public `pd.factorize`
    cannot do across chunks.
    """

    def __init__(self, columns: int = NUM_SPARSE):
        self._tables = [pd_hashtable.UInt32HashTable() for _ in range(columns)]

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """(columns, n) uint32 raw values -> (columns, n) int32 ids, growing the vocabularies."""
        ids = np.empty(keys.shape, np.int32)
        for j, table in enumerate(self._tables):
            # a fresh Vector per call: pandas refuses to grow one whose array was handed out
            ids[j] = table.get_labels(np.ascontiguousarray(keys[j]), pd_hashtable.UInt32Vector(),
                                      len(table), -1)
        return ids

    @property
    def cardinalities(self) -> list[int]:
        return [len(t) for t in self._tables]

    @property
    def nbytes(self) -> int:
        """Memory held by the hash tables (what grows with the file)."""
        return sum(t.sizeof() for t in self._tables)


# --- the pipeline ----------------------------------------------------------------------

@dataclass
class _Counts:
    lines: int = 0
    valid: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)   # the first MAX_EXAMPLES bad lines, described
    first_bad: list[int] = field(default_factory=list)  # ... and their line numbers


def _consume(block: ParsedBlock, counts: _Counts, mode: OnBadLine, path: Path, vocab: Vocabulary,
             writer: DatasetWriter) -> None:
    """Take one block in file order: number its bad lines, stop or count them, store its rows."""
    for bad in block.bad:
        bad.line += counts.lines + 1
    if block.bad_count:
        if mode is OnBadLine.ERROR:
            raise block.bad[0].error(path)
        counts.skipped += block.bad_count
        room = MAX_EXAMPLES - len(counts.examples)
        counts.examples += [str(b.error(path)) for b in block.bad[:room]]
        counts.first_bad += [b.line for b in block.bad[:room]]
    counts.lines += block.lines
    if len(block.label):
        ids = vocab.encode(block.keys)
        writer.append(block.dense, ids.T, block.label)
        counts.valid += len(block.label)


def _run(source: _Source, writer: DatasetWriter, vocab: Vocabulary, mode: OnBadLine,
         block_bytes: int, workers: int) -> _Counts:
    counts = _Counts()
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
    try:
        for item in iter_blocks(source.read_text, block_bytes):
            pending.append(pool.submit(parse_item, item))
            if len(pending) > workers:  # keeps at most workers + 1 blocks alive
                _consume(pending.popleft().result(), counts, mode, source.path, vocab, writer)
        while pending:
            _consume(pending.popleft().result(), counts, mode, source.path, vocab, writer)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return counts


def prepare_criteo(raw: str | Path, out: str | Path, *, on_bad_line: str | OnBadLine = "error",
                   block_bytes: int = DEFAULT_BLOCK_BYTES, workers: int = 2,
                   progress: bool = True) -> DatasetMeta:
    """Convert Criteo's `train.txt` (plain or gzip) into the data set folder `out`.

    Every line is validated (see the module docstring); with `on_bad_line="error"` the
    first bad line raises a DataError naming file, line, field and value, and no folder
    is left at `out`. With "skip" bad lines are dropped and counted in `meta.info`.
    """
    try:
        mode = OnBadLine(on_bad_line)
    except ValueError:
        choices = ", ".join(m.value for m in OnBadLine)
        raise UserError(f"on_bad_line must be one of {choices}, got {on_bad_line!r}") from None
    if block_bytes < 1 << 16 or workers < 1:
        raise UserError(f"block_bytes must be >= 65536 and workers >= 1, got {block_bytes}, {workers}")
    raw, out = Path(raw), Path(out)
    start = time.perf_counter()
    source = _Source(raw, progress)
    try:
        with atomic_directory(out) as tmp, DatasetWriter(tmp) as writer:
            vocab = Vocabulary()
            counts = _run(source, writer, vocab, mode, block_bytes, workers)
            if counts.lines == 0:
                raise DataError("file is empty (after decompression)", path=raw)
            if counts.valid == 0:
                raise DataError(f"no valid lines ({counts.skipped} bad lines skipped)", path=raw)
            meta = _meta(source, counts, vocab, mode, time.perf_counter() - start)
            writer.finish(meta)
    except OSError as e:  # writing the output (disk full, permissions)
        raise UserError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        source.close()
    log.info("prepared %d rows from %s in %.1f s (%d lines/s, %d skipped)", meta.rows, raw,
             meta.info["elapsed_s"], meta.info["lines_per_s"], counts.skipped)
    return meta


def _meta(source: _Source, counts: _Counts, vocab: Vocabulary, mode: OnBadLine,
          elapsed: float) -> DatasetMeta:
    split = split_sizes(counts.valid)
    return DatasetMeta(
        source="criteo-tsv", rows=counts.valid, cardinalities=vocab.cardinalities,
        splits={"train": split.train, "test": split.test, "val": split.val},
        info={"source_path": str(source.path.resolve()), "source_bytes": source.size,
              "sha256": source.sha256(), "compression": source.compression,
              "lines_total": counts.lines, "lines_valid": counts.valid, "lines_skipped": counts.skipped,
              "skipped_first_lines": counts.first_bad, "skipped_examples": counts.examples,
              "on_bad_line": mode.value,
              "empty_categorical": "hex 0, as in the DLRM reference", "vocabulary_bytes": vocab.nbytes,
              "elapsed_s": round(elapsed, 3), "lines_per_s": round(counts.lines / elapsed),
              "commit": git_commit()})


# --- command line ------------------------------------------------------------------------

def register_cli(sub) -> None:
    from mpc.cli import positive_int

    p = sub.add_parser(
        "prepare-criteo", help="convert Criteo Kaggle train.txt[.gz] into the binary data set",
        description="Validate and preprocess the Criteo Kaggle train.txt (plain or gzip) as the "
                    "DLRM reference does, writing a data set folder that training reads. CRLF line "
                    "endings are accepted.")
    p.add_argument("--raw", required=True, type=Path, help="path of train.txt or train.txt.gz")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--on-bad-line", choices=[m.value for m in OnBadLine], default="error",
                   help="error: stop at the first bad line (default); skip: drop and count bad lines")
    p.add_argument("--block-mb", type=positive_int, default=DEFAULT_BLOCK_BYTES >> 20,
                   help="MiB of text parsed per block (default %(default)s)")
    p.add_argument("--workers", type=positive_int, default=2, help="parser threads (default 2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    meta = prepare_criteo(args.raw, args.out, on_bad_line=args.on_bad_line,
                          block_bytes=args.block_mb << 20, workers=args.workers,
                          progress=sys.stderr.isatty())
    info = meta.info
    print(f"{args.out}: {meta.rows} rows (train {meta.splits['train']}, test {meta.splits['test']}, "
          f"val {meta.splits['val']}), {info['lines_skipped']} lines skipped, "
          f"{info['elapsed_s']:.1f} s ({info['lines_per_s']} lines/s)")
    return 0
