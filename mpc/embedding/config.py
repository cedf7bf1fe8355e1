"""Configuration of an embedding layer: what it stores, how it rounds, what it caches.

Config is data (as in torchrec): enums for the choices and frozen dataclasses that a
run JSON records verbatim and a backend is built from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from mpc.criteo import EMBEDDING_DIM, KAGGLE_CARDINALITIES


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"

    @property
    def bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}[self.value]

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4, Precision.INT2)

    def row_bytes(self, dim: int) -> int:
        """Bytes of one stored row in the fused format (PAPERS.md §5).

        INT8: dim uint8 + fp32 scale + fp32 bias. INT4/INT2: packed values + fp16 scale
        + fp16 bias. FP32/FP16: dim floats.
        """
        if self is Precision.FP32:
            return 4 * dim
        if self is Precision.FP16:
            return 2 * dim
        if self is Precision.INT8:
            return dim + 8
        per_byte = 8 // self.bits
        return -(-dim // per_byte) + 4


class Rounding(str, Enum):
    STOCHASTIC = "stochastic"
    NEAREST = "nearest"


class CachePolicy(str, Enum):
    LRU = "lru"
    LFU = "lfu"


@dataclass(frozen=True)
class CacheConfig:
    """An FP32 cache in front of low-precision tables (MPC, PAPERS.md §1).

    fraction: cache rows as a fraction of each table's rows (0 = no cache).
    ways: associativity; 0 means fully associative.
    shared: one budget (fraction x all rows) shared by all tables instead of per table.
    """

    fraction: float = 0.0
    policy: CachePolicy = CachePolicy.LRU
    ways: int = 32
    shared: bool = False

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"cache fraction must be in [0, 1], got {self.fraction}")
        if self.ways < 0:
            raise ValueError(f"cache ways must be >= 0 (0 = fully associative), got {self.ways}")
        object.__setattr__(self, "policy", CachePolicy(self.policy))


@dataclass(frozen=True)
class EmbeddingConfig:
    """Everything that defines an embedding layer of T tables of one dimension.

    kind names the backend (see mpc.embedding.BACKENDS): "fp32", the low-precision
    "fp16" | "int8" | "int4" | "int2" (cached when cache.fraction > 0), and the ones
    later issues register (e.g. "qat", "ptq").
    """

    cardinalities: tuple[int, ...] = KAGGLE_CARDINALITIES
    dim: int = EMBEDDING_DIM
    kind: str = "fp32"
    rounding: Rounding = Rounding.STOCHASTIC
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0                  # initial weights and the stochastic-rounding stream
    use_kernels: bool = True       # False forces the pure-PyTorch reference path
    options: dict = field(default_factory=dict)  # backend-specific extras (e.g. QAT bits)

    def __post_init__(self):
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in self.cardinalities))
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        if isinstance(self.cache, dict):
            object.__setattr__(self, "cache", CacheConfig(**self.cache))
        if not self.cardinalities or min(self.cardinalities) < 1:
            raise ValueError(f"cardinalities must be positive, got {self.cardinalities}")
        if not 1 <= self.dim <= 4096:
            raise ValueError(f"embedding dim must be in [1, 4096], got {self.dim}")

    @property
    def num_tables(self) -> int:
        return len(self.cardinalities)

    @property
    def total_rows(self) -> int:
        return sum(self.cardinalities)

    @property
    def precision(self) -> Precision:
        """Storage precision for the fp32/lowp kinds (FP32 for others unless they say)."""
        try:
            return Precision(self.kind)
        except ValueError:
            return Precision.FP32

    def replace(self, **changes) -> "EmbeddingConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rounding"] = self.rounding.value
        d["cache"]["policy"] = self.cache.policy.value
        d["cardinalities"] = list(self.cardinalities)
        return d
