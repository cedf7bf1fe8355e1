"""Dispatch between the compiled kernels and their pure-PyTorch reference twins.

`for_config(config)` returns the kernel-backed implementation when kernels are wanted
and build, else the reference. Both expose the same functions with the same meaning;
tests compare them on random inputs.
"""

from __future__ import annotations

import torch

from mpc.embedding.fp32 import global_rows, reference_pool, reference_row_grads


class ReferenceOps:
    """Pure PyTorch, written for clarity."""

    name = "reference"

    @staticmethod
    def pool_fp32(weights, table_offsets, indices, offsets):
        rows = global_rows(indices, offsets, table_offsets)
        return reference_pool(weights, rows, offsets, len(table_offsets) - 1)

    @staticmethod
    def sgd_fp32(weights, table_offsets, indices, offsets, grad_out, lr):
        rows = global_rows(indices, offsets, table_offsets)
        uniq, grads = reference_row_grads(grad_out, rows, offsets, len(table_offsets) - 1)
        weights.index_add_(0, uniq, grads, alpha=-lr)


def for_config(config) -> type[ReferenceOps]:
    return ReferenceOps
