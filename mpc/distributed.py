"""Data-parallel DLRM training on torch.distributed, with DQRM's compressed gradients.

    torchrun --nproc-per-node 2 -m mpc train --distributed --grad-compression sparse-int8 ...

DQRM (PAPERS.md §2) trains data-parallel: every rank holds the whole model, computes
the gradients of its part of the batch, and the ranks exchange gradients
(mpc.grad_exchange: dense, sparse rows, or sparse rows + INT8) so that every rank
applies the same update. Decisions:

  - The global batch is TrainConfig.batch_size: every rank reads the same global batch
    (same shuffled order from the seed) and takes its contiguous shard (torch.tensor_split:
    sizes differ by at most one). Each rank's loss is its BCE *sum* divided by the global
    batch size, so the sum of the ranks' gradients is the single-process gradient of the
    global batch: the same model up to float summation order (tests check this).
  - The fused embedding update uses the aggregated rows: `DistributedEmbedding` wraps
    any backend; its backward exchanges (rows, gradients) and hands the result to the
    wrapped backend's own fused update as a batch of one-row bags.
  - Rank 0 alone validates, tests, writes checkpoints and the run JSON; the others wait
    at the next collective. Checkpoints store the plain (unwrapped) model, so single-
    process and distributed runs read each other's checkpoints, plus every rank's
    error-feedback memory.
  - Backend (`select_backend`): gloo for a run on the CPU, NCCL for a run on a CUDA
    device, or what MPC_DIST_BACKEND (or the `backend` argument) asks for; NCCL without
    CUDA, or for CPU tensors, is a UserError. mpc.train.Trainer trains on the CPU only
    (TRAIN_DEVICE: no device option, the model and batches stay on the CPU, and the
    exchange builds CPU tensors), so every run here selects gloo today; the selection
    is explicit so that a CUDA trainer only has to pass its device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mpc.data.loader import Batch
from mpc.embedding import jagged_from_dense, ops
from mpc.embedding.base import EmbeddingBackend
from mpc.errors import UserError
from mpc.grad_exchange import DistributedConfig, GradCompression, GradientExchange, row_tables
from mpc.runinfo import atomic_write_json
from mpc.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

__all__ = ["BACKEND_ENV", "DistributedConfig", "DistributedEmbedding", "DistributedTrainer", "GradCompression",
           "TRAIN_DEVICE", "init_from_env", "one_row_bags", "run_distributed", "run_local", "select_backend"]

BACKEND_ENV = "MPC_DIST_BACKEND"   # "auto" (default) | "gloo" | "nccl"
BACKENDS = ("auto", "gloo", "nccl")
TRAIN_DEVICE = "cpu"               # where mpc.train.Trainer keeps the model and batches (CPU only)


def select_backend(device: str | torch.device = TRAIN_DEVICE, requested: str | None = None) -> str:
    """The torch.distributed backend for a run on `device`: "gloo" or "nccl".

    requested: "auto" | "gloo" | "nccl"; None reads $MPC_DIST_BACKEND (unset: "auto").
    auto picks NCCL when the run trains on a CUDA device (CUDA available, torch built
    with NCCL), else gloo. Asking for NCCL without CUDA, without an NCCL build of torch, or for a run on
    the CPU (NCCL reduces CUDA tensors only) is a UserError; gloo is always allowed.
    """
    source = "backend argument"
    if requested is None:
        requested, source = os.environ.get(BACKEND_ENV, "") or "auto", f"${BACKEND_ENV}"
    choice = str(requested).strip().lower()
    if choice not in BACKENDS:
        raise UserError(f"{source}={requested!r}: choose one of {', '.join(BACKENDS)}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"not a torch device: {device!r}") from None
    cuda = torch.cuda.is_available()
    if device.type == "cuda" and not cuda:
        raise UserError(f"the run's device is {device} but CUDA is not available here")
    if choice == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if choice == "nccl":
        if not cuda:
            raise UserError(f"{source}=nccl needs CUDA, which is not available here; use gloo (CPU)")
        if not dist.is_nccl_available():
            raise UserError(f"{source}=nccl: this torch build has no NCCL; use gloo")
        if device.type != "cuda":
            raise UserError(f"{source}=nccl: NCCL exchanges CUDA tensors, but this run trains on {device} "
                            f"(mpc.train.Trainer trains on the CPU only); use gloo")
    return choice


def one_row_bags(rows: torch.Tensor, grads: torch.Tensor, table_offsets: torch.Tensor):
    """(sorted global rows, (U, D) gradients) -> a jagged batch of one-row bags.

    Table t gets bags 0..n_t-1 holding its rows in order (the rest of its B bags are
    empty); grad_out[b, t] is that row's gradient. A fused update over this batch
    applies row -= lr * gradient to exactly these rows.
    """
    T = len(table_offsets) - 1
    D = grads.shape[1]
    tables = row_tables(rows, table_offsets)
    counts = torch.bincount(tables, minlength=T)
    B = max(int(counts.max()) if len(rows) else 0, 1)
    pos = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[tables]
    lengths = torch.zeros(T * B, dtype=torch.int64)
    lengths[tables * B + pos] = 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    grad_out = torch.zeros(B, T, D, dtype=torch.float32)
    grad_out[pos, tables] = grads
    return rows - table_offsets[tables], offsets, grad_out


class DistributedEmbedding(EmbeddingBackend):
    """Wraps a backend: lookups pass through; updates use the rows of all ranks."""

    def __init__(self, inner: EmbeddingBackend, exchange: GradientExchange):
        super().__init__(inner.config)
        self.inner = inner
        self.exchange = exchange

    def set_learning_rate(self, lr: float) -> None:
        super().set_learning_rate(lr)
        self.inner.set_learning_rate(lr)

    def prepare(self, indices, offsets):
        self.inner.prepare(indices, offsets)

    def lookup(self, indices, offsets):
        return self.inner.lookup(indices, offsets)

    def backward_update(self, indices, offsets, grad_out):
        rows = ops.global_rows(indices, offsets, self.table_offsets)
        uniq, _, grads = ops.row_gradients(grad_out.float(), rows, offsets)
        self.apply_global(uniq, grads)

    def apply_global(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Exchange this rank's row gradients and apply the sum over ranks (collective)."""
        rows, grads = self.exchange.embedding_rows(rows, grads)
        if len(rows):   # the same on every rank, so ranks stay in step
            self.inner.backward_update(*one_row_bags(rows, grads, self.table_offsets))

    def memory_bytes(self):
        return self.inner.memory_bytes()

    def stats(self):
        return self.inner.stats()

    def flush(self):
        self.inner.flush()

    def to_float(self):
        return self.inner.to_float()


class DistributedTrainer(Trainer):
    """Trainer whose step trains this rank's shard and exchanges gradients."""

    def __init__(self, config: TrainConfig, dist_config: DistributedConfig, dataset=None, group=None):
        if not dist.is_initialized():
            raise UserError("--distributed needs torch.distributed initialised (launch with torchrun)")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if dist.get_backend(group) == "nccl":
            # The exchange (mpc.grad_exchange) hands CPU tensors to the collectives.
            raise UserError(f"the process group uses NCCL, but the trainer runs on {TRAIN_DEVICE} "
                            f"(mpc.train.Trainer has no CUDA path); initialise it with gloo")
        if config.embedding.cache.fraction > 0:
            # Each rank's cache would admit its own rows: the ranks' tables would drift apart.
            raise UserError("--distributed does not support --cache-fraction (per-rank caches diverge)")
        if self.rank != 0:
            config = dataclasses.replace(config, progress=False)
        super().__init__(config, dataset)
        self.dist_config = dist_config
        emb = self.model.embedding
        self.exchange = GradientExchange(dist_config, emb.table_offsets, emb.dim, config.seed, group)
        self.model.embedding = DistributedEmbedding(emb, self.exchange)
        self.model.embedding.set_learning_rate(config.lr)
        self._params = self.model.dense_parameters()

    def train_step(self, batch: Batch) -> torch.Tensor:
        self.exchange.step = self.state["step"]
        n = len(batch)
        lo, hi = _shard(n, self.rank, self.world)
        self.optimizer.zero_grad(set_to_none=False)
        if hi > lo:
            indices, offsets = jagged_from_dense(batch.cat[lo:hi])
            logits = self.model(batch.dense[lo:hi], indices, offsets)
            loss_sum = F.binary_cross_entropy_with_logits(logits, batch.label[lo:hi], reduction="sum")
            (loss_sum / n).backward()   # the embedding exchange runs inside backward
        else:
            loss_sum = self._empty_shard_step()
        self.exchange.mlp_gradients(self._params)
        self.optimizer.step()
        return self.exchange.all_reduce_loss(loss_sum) / n

    def _empty_shard_step(self) -> torch.Tensor:
        """A rank without samples (a last batch smaller than the world) still joins in."""
        emb = self.model.embedding
        T, D = emb.num_tables, emb.dim
        empty, offsets = torch.zeros(0, dtype=torch.int64), torch.zeros(T + 1, dtype=torch.int64)
        emb.prepare(empty, offsets)   # keeps per-step state (QAT scale period) in step
        emb.apply_global(empty, torch.zeros(0, D))
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return torch.zeros(())

    # --- rank 0 evaluates and writes ----------------------------------------------------
    def _validate(self) -> None:
        if self.rank == 0:
            super()._validate()
        else:
            self.state["loss_sum"], self.state["loss_count"] = 0.0, 0

    def finish(self) -> dict | None:
        if self.rank != 0:
            return None
        result = super().finish()
        steps = self.state["step"]
        result["distributed"] = {
            "world_size": self.world, "backend": dist.get_backend(self.group),
            **self.dist_config.to_json(),
            "global_batch": self.config.batch_size,
            "local_batch": -(-self.config.batch_size // self.world),
            "bytes_counted": "payload handed to collectives by rank 0, see mpc.grad_exchange",
            **self.exchange.report(steps),
        }
        return result

    @contextlib.contextmanager
    def _unwrapped(self):
        wrapper = self.model.embedding
        self.model.embedding = wrapper.inner
        try:
            yield
        finally:
            self.model.embedding = wrapper

    def save_checkpoint(self, path: str | Path) -> None:
        residuals = self.exchange.gather_residuals()   # collective: every rank
        if self.rank == 0:
            self._residuals_to_save = residuals
            with self._unwrapped():
                super().save_checkpoint(path)
        dist.barrier(group=self.group)   # the file is complete before any rank may read it

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        state["error_feedback"] = getattr(self, "_residuals_to_save", None)
        return state

    def load_checkpoint(self, path: str | Path) -> None:
        with self._unwrapped():
            super().load_checkpoint(path)
        ck = torch.load(path, map_location="cpu", weights_only=False)
        residuals = ck.get("error_feedback")
        if residuals is not None:
            if len(residuals) != self.world:
                raise UserError(f"{path}: error-feedback memory of {len(residuals)} ranks, "
                                f"this run has {self.world}")
            self.exchange.set_residual(residuals[self.rank], [p.numel() for p in self._params])


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of this rank's part of n samples (torch.tensor_split's sizes)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def init_from_env(device: str | torch.device = TRAIN_DEVICE, backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment; True if we did.

    The backend is `select_backend(device, backend)` (gloo for the CPU Trainer).
    """
    if dist.is_initialized():
        return False
    chosen = select_backend(device, backend)   # a bad choice fails before the rendezvous
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"--distributed: {', '.join(missing)} not set; launch with "
                        f"`torchrun --nproc-per-node N -m mpc train --distributed ...`")
    if chosen == "nccl":   # one GPU per rank, as torchrun numbers them
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(chosen)
    return True


def run_distributed(config: TrainConfig, dist_config: DistributedConfig, out: str | Path | None = None,
                    *, resume: bool = False, export: str | Path | None = None,
                    backend: str | None = None) -> dict | None:
    """Train data-parallel; rank 0 writes `out` (and `export`, see mpc.train.run) and
    returns the run record (others None). backend: see select_backend (None: $MPC_DIST_BACKEND)."""
    if export is not None and config.embedding.kind != "qat":
        raise UserError("--export needs --embedding qat")
    created = init_from_env(TRAIN_DEVICE, backend)
    try:
        trainer = DistributedTrainer(config, dist_config)
        if resume:
            if not config.checkpoint:
                raise UserError("--resume needs --checkpoint PATH")
            trainer.load_checkpoint(config.checkpoint)
        result = trainer.fit()
        if trainer.rank == 0 and export is not None:
            from mpc.qat_export import export_and_evaluate

            result["export"] = export_and_evaluate(trainer, export)
        if trainer.rank == 0 and out is not None:
            atomic_write_json(out, result)
        dist.barrier()
        return result
    finally:
        if created:
            dist.destroy_process_group()


# --- several ranks on this machine, without torchrun ---------------------------------------

def run_local(runs: list[tuple[TrainConfig, DistributedConfig]], world_size: int = 2,
              threads: int = 1) -> list[dict]:
    """Train each (config, dist_config) in turn data-parallel over `world_size` local
    processes (on a free localhost port, backend `select_backend()`: gloo for the CPU
    Trainer); returns rank 0's run records.

    For tests and notebooks; the command line uses torchrun. Checkpoints, if configured,
    are written by rank 0 as in any distributed run. The workers are started with
    "spawn": a script calling this must do so under `if __name__ == "__main__":`.
    """
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    backend = select_backend()   # checked here, not in every worker
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="mpc-dist-") as tmp:
        out = Path(tmp) / "results.json"
        mp.spawn(_local_worker, args=(world_size, port, runs, threads, str(out), backend), nprocs=world_size)
        return json.loads(out.read_text())


def _local_worker(rank: int, world_size: int, port: int, runs, threads: int, out: str,
                  backend: str = "gloo") -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = [DistributedTrainer(config, dist_config).fit() for config, dist_config in runs]
        if rank == 0:
            atomic_write_json(out, results)
        dist.barrier()
    finally:
        dist.destroy_process_group()
