"""Embedding backends behind one interface (mpc.embedding.base.EmbeddingBackend).

    build_embedding(EmbeddingConfig(kind="int8", cache=CacheConfig(fraction=0.05)))

Backends register a kind name with @register; `BACKENDS` lists them.
"""

from __future__ import annotations

from typing import Callable

from mpc.embedding.base import EmbeddingBackend, jagged_from_dense
from mpc.embedding.config import CacheConfig, CachePolicy, EmbeddingConfig, Precision, Rounding

BACKENDS: dict[str, Callable[[EmbeddingConfig], EmbeddingBackend]] = {}


def register(kind: str):
    def deco(factory):
        BACKENDS[kind] = factory
        return factory
    return deco


def build_embedding(config: EmbeddingConfig) -> EmbeddingBackend:
    _import_backends()
    try:
        factory = BACKENDS[config.kind]
    except KeyError:
        raise ValueError(f"unknown embedding kind {config.kind!r}; choose one of "
                         f"{', '.join(sorted(BACKENDS))}") from None
    return factory(config)


def _import_backends() -> None:
    # Imported here, not at module import, so that each backend module may import this one.
    import importlib

    for mod in ("fp32", "lowp", "qat"):
        try:
            importlib.import_module(f"mpc.embedding.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"mpc.embedding.{mod}":
                raise


__all__ = ["BACKENDS", "CacheConfig", "CachePolicy", "EmbeddingBackend", "EmbeddingConfig",
           "Precision", "Rounding", "build_embedding", "jagged_from_dense", "register"]
