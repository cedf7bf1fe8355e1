"""The on-disk data set: one folder of raw little-endian arrays plus meta.json.

Both the Criteo TSV preparation and the synthetic generator write this, and training
memory-maps it. Rows are kept in file order; the DLRM split is three consecutive row
ranges (train = days 0-5, then test, then validation) recorded in the metadata, so
nothing is copied to split. Shuffling of the training rows is done by the loader.

    DIR/meta.json     format, source, rows, cardinalities, split sizes, provenance
    DIR/dense.f32     float32 [rows, 13]   log(x + 1) of the clipped integer features
    DIR/cat.i32       int32   [rows, 26]   contiguous ids per table, 0 <= id < card
    DIR/label.u8      uint8   [rows]       0 or 1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mpc.criteo import NUM_DENSE, NUM_SPARSE, SplitSizes
from mpc.errors import DataError, UserError
from mpc.runinfo import atomic_write_json

FORMAT = "mpc-criteo-v1"
META = "meta.json"
ARRAYS = {  # name: (file, dtype, columns)
    "dense": ("dense.f32", np.dtype("<f4"), NUM_DENSE),
    "cat": ("cat.i32", np.dtype("<i4"), NUM_SPARSE),
    "label": ("label.u8", np.dtype("u1"), None),
}
SPLITS = ("train", "val", "test")


def dense_transform(values: np.ndarray) -> np.ndarray:
    """The DLRM reference's dense preprocessing: negatives -> 0, then log(x + 1).

    `values` are the raw integers (missing already 0). Both the TSV path and the
    generator call this one function, so their outputs are bit-identical.
    """
    x = np.maximum(values, 0).astype(np.float32)
    return np.log1p(x, out=x)


@dataclass
class DatasetMeta:
    source: str                      # "criteo-tsv" or "synthetic"
    rows: int
    cardinalities: list[int]
    splits: dict[str, int]           # sizes: train, test, val (file order: train, test, val)
    info: dict = field(default_factory=dict)  # sha256, lines skipped, generator settings...
    format: str = FORMAT

    @property
    def split_sizes(self) -> SplitSizes:
        return SplitSizes(train=self.splits["train"], test=self.splits["test"], val=self.splits["val"])

    def to_json(self) -> dict:
        return asdict(self)


class DatasetWriter:
    """Appends row chunks to the three array files of a (temporary) folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files = {k: open(self.folder / f, "wb") for k, (f, _, _) in ARRAYS.items()}
        self.rows = 0

    def append(self, dense: np.ndarray, cat: np.ndarray, label: np.ndarray) -> None:
        n = len(label)
        if dense.shape != (n, NUM_DENSE) or cat.shape != (n, NUM_SPARSE):
            raise ValueError(f"chunk shapes disagree: dense {dense.shape}, cat {cat.shape}, label {label.shape}")
        for key, arr in (("dense", dense), ("cat", cat), ("label", label)):
            _, dtype, _ = ARRAYS[key]
            self._files[key].write(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        self.rows += n

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def finish(self, meta: DatasetMeta) -> None:
        """Close the files and write meta.json (last, so its presence marks completion)."""
        self.close()
        if meta.rows != self.rows:
            raise ValueError(f"meta says {meta.rows} rows, {self.rows} were written")
        atomic_write_json(self.folder / META, meta.to_json())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Split:
    """Memory-mapped rows of one split (views, nothing loaded)."""

    name: str
    dense: np.ndarray   # (n, 13) float32
    cat: np.ndarray     # (n, 26) int32
    label: np.ndarray   # (n,) uint8

    def __len__(self) -> int:
        return len(self.label)


class Dataset:
    """A prepared folder, opened read-only by memory-mapping its arrays."""

    def __init__(self, folder: Path, meta: DatasetMeta, arrays: dict[str, np.ndarray]):
        self.folder, self.meta, self._arrays = folder, meta, arrays

    @property
    def cardinalities(self) -> list[int]:
        return list(self.meta.cardinalities)

    @classmethod
    def open(cls, folder: str | Path) -> "Dataset":
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: data folder not found")
        meta_path = folder / META
        if not meta_path.is_file():
            raise UserError(f"{folder}: no {META} (not a prepared data set, or an interrupted run); "
                            "create one with `python -m mpc synth` or `python -m mpc prepare-criteo`")
        try:
            raw = json.loads(meta_path.read_text())
            meta = DatasetMeta(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"unreadable metadata: {e}", path=meta_path) from None
        if meta.format != FORMAT:
            raise DataError(f"unknown format {meta.format!r}, expected {FORMAT!r}", path=meta_path)
        if len(meta.cardinalities) != NUM_SPARSE or min(meta.cardinalities) < 1:
            raise DataError("cardinalities must be 26 positive integers", path=meta_path,
                            value=meta.cardinalities)
        if sum(meta.splits.get(s, -1) for s in SPLITS) != meta.rows:
            raise DataError(f"split sizes do not add up to {meta.rows} rows", path=meta_path,
                            value=meta.splits)
        arrays = {}
        for key, (fname, dtype, cols) in ARRAYS.items():
            path = folder / fname
            shape = (meta.rows,) if cols is None else (meta.rows, cols)
            want = int(np.prod(shape)) * dtype.itemsize
            if not path.is_file():
                raise DataError("array file missing", path=path)
            have = path.stat().st_size
            if have != want:
                raise DataError(f"file has {have} bytes, expected {want} for {meta.rows} rows "
                                "(truncated or corrupt)", path=path)
            arrays[key] = (np.memmap(path, dtype=dtype, mode="r", shape=shape) if meta.rows
                           else np.empty(shape, dtype))
        return cls(folder, meta, arrays)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        start, stop = self.meta.split_sizes.ranges()[name]
        a = self._arrays
        return Split(name, a["dense"][start:stop], a["cat"][start:stop], a["label"][start:stop])
