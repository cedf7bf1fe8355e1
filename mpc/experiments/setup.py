"""What every notebook starts with: its data and its embedding configurations.

Data specs: "synthetic:<tiny|small|medium|full>" (the calibrated generator, written once
into a cache folder and reused) or the path of a folder prepared by `prepare-criteo`.
Configuration specs are short strings a parameters cell can hold:

    fp32 | int8 | int4 | fp16 | int2                      tables, no cache
    int8+5%lru | int4+1%lfu | int8+5%lru/8                 with an FP32 cache (/ways; /0 = fully assoc.)
    int8:nearest | int8+5%lru:nearest                      round-to-nearest instead of stochastic
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mpc.data.format import Dataset
from mpc.embedding import CacheConfig, EmbeddingConfig
from mpc.errors import UserError
from mpc.runinfo import REPO_ROOT

import os

DATA_ROOT_ENV = "MPC_DATA_DIR"
SPEC = re.compile(r"^(?P<kind>fp32|fp16|int8|int4|int2)"
                  r"(?:\+(?P<pct>\d+(?:\.\d+)?)%(?P<policy>lru|lfu)(?:/(?P<ways>\d+))?)?"
                  r"(?::(?P<rounding>stochastic|nearest))?$")


def data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV) or REPO_ROOT / "data")


@dataclass(frozen=True)
class DataChoice:
    folder: Path
    description: str     # what the report says the figures came from
    synthetic: bool

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "description": self.description, "synthetic": self.synthetic}


def resolve_data(spec: str, samples: int | None = None, seed: int = 0, progress: bool = True) -> DataChoice:
    """A prepared folder for the spec, generating synthetic data on first use."""
    if spec.startswith("synthetic:"):
        from mpc.data.synth import SynthConfig, generate

        config = SynthConfig(scale=spec.split(":", 1)[1], samples=samples, seed=seed)
        folder = data_root() / f"synthetic-{config.scale.value}-{config.samples}-seed{seed}"
        if not (folder / "meta.json").is_file():
            generate(config, folder, progress=progress, overwrite=True)
        cards = Dataset.open(folder).meta.cardinalities
        desc = (f"synthetic, calibrated to Criteo Kaggle (scale {config.scale.value}: {len(cards)} tables, "
                f"{sum(cards):,} rows; {config.samples:,} samples, seed {seed})")
        return DataChoice(folder, desc, True)
    folder = Path(spec).expanduser()
    ds = Dataset.open(folder)  # clear error if it is not a prepared folder
    source = ds.meta.source
    info = ds.meta.info or {}
    if source == "criteo-tsv":
        desc = (f"real Criteo Kaggle ({ds.meta.rows:,} lines prepared from {Path(info.get('source', '?')).name}, "
                f"sha256 {str(info.get('sha256', '?'))[:12]}...)")
    else:
        desc = f"{source} data in {folder} ({ds.meta.rows:,} rows)"
    return DataChoice(folder, desc, source != "criteo-tsv")


def parse_config(spec: str, cardinalities=None, seed: int = 0) -> EmbeddingConfig:
    """An EmbeddingConfig from a short spec such as 'int8+5%lru' (see the module doc)."""
    m = SPEC.match(spec.strip().lower())
    if not m:
        raise UserError(f"cannot read embedding configuration {spec!r}; examples: fp32, int8, int8+5%lru, "
                        "int4+1%lfu/8, int8:nearest")
    kind = m["kind"]
    cache = CacheConfig()
    if m["pct"]:
        if kind == "fp32":
            raise UserError(f"{spec!r}: an FP32 cache in front of fp32 tables makes no sense")
        cache = CacheConfig(fraction=float(m["pct"]) / 100, policy=m["policy"],
                            ways=int(m["ways"]) if m["ways"] is not None else CacheConfig.ways)
    kw = {} if cardinalities is None else {"cardinalities": tuple(cardinalities)}
    return EmbeddingConfig(kind=kind, cache=cache, rounding=m["rounding"] or "stochastic", seed=seed, **kw)


def config_label(config: EmbeddingConfig) -> str:
    """The inverse of parse_config (canonical spec)."""
    s = config.kind
    if config.cache.fraction:
        s += f"+{config.cache.fraction * 100:g}%{config.cache.policy.value}"
        if config.cache.ways != CacheConfig.ways:
            s += f"/{config.cache.ways}"
    if config.rounding.value != "stochastic" and config.kind != "fp32":
        s += f":{config.rounding.value}"
    return s
