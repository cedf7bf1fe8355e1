"""Training and evaluation of DLRM on a prepared data set, and the `train` command.

The reference recipe (PAPERS.md §4): SGD, lr 0.1, batch 128, one epoch, BCE loss. The
MLPs are updated by torch.optim.SGD; the embedding backend updates its own rows inside
backward (fused sparse SGD, see mpc.embedding.base). Validation is evaluated every
`eval_every` steps and at the end of each epoch, the test split once at the end.
Deterministic for a seed on CPU; a run stopped and resumed from its checkpoint ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mpc.cpu_settings import tune_cpu
from mpc.data.format import Dataset
from mpc.data.loader import Batch, BatchLoader
from mpc.embedding import EmbeddingConfig, jagged_from_dense
from mpc.errors import UserError
from mpc.metrics import evaluate
from mpc.model import DLRM, DLRMConfig
from mpc.runinfo import atomic_write_bytes, atomic_write_json, peak_rss_bytes, provenance

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    eval_every: int = 0                  # steps between validation runs (0: each epoch end)
    eval_batch_size: int = 8192
    max_train_samples: int | None = None  # per epoch (a random subset when shuffled)
    max_eval_samples: int | None = None   # validation rows used during training
    max_test_samples: int | None = None
    seed: int = 0                         # weights, data order, rounding stream
    threads: int = 0                      # torch threads (0: leave as is)
    checkpoint: str | None = None         # path of the checkpoint file
    checkpoint_every: int = 0             # steps between checkpoints (0: only at the end)
    progress: bool = True
    mlp_bits: int = 32                    # < 32: DQRM-quantized MLP weights (mpc.qat_mlp)

    def __post_init__(self):
        if isinstance(self.embedding, dict):
            self.embedding = EmbeddingConfig(**self.embedding)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {v}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["embedding"] = self.embedding.to_json()
        return d


def sgd_step(model: DLRM, optimizer: torch.optim.Optimizer, dense: torch.Tensor,
             indices: torch.Tensor, offsets: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Forward, BCE loss, backward (fused backends update their rows here), optimizer step."""
    loss = F.binary_cross_entropy_with_logits(model(dense, indices, offsets), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class Trainer:
    """Owns the model, optimizer, loaders and the run's history."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None):
        self.config = c = config
        tune_cpu()
        if c.threads:
            torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)
        self.dataset = dataset or Dataset.open(c.data)
        cards = tuple(self.dataset.cardinalities)
        emb = c.embedding.replace(cardinalities=cards)
        # Record the tables actually built (the data's), not the config's defaults.
        self.config = c = dataclasses.replace(c, embedding=emb)
        # MLPs quantize the way the tables do: post-training with "ptq", else QAT.
        self.model = DLRM(DLRMConfig.for_embedding(emb, seed=c.seed, mlp_bits=c.mlp_bits,
                                                   mlp_quant="ptq" if emb.kind == "ptq" else "qat"))
        self.model.embedding.set_learning_rate(c.lr)
        self.optimizer = torch.optim.SGD(self.model.dense_parameters(), lr=c.lr)
        src = str(self.dataset.folder)
        self.train_loader = BatchLoader(self.dataset.split("train"), cards, c.batch_size, shuffle=True,
                                        seed=c.seed, limit=c.max_train_samples, source=src)
        self.val_loader = BatchLoader(self.dataset.split("val"), cards, c.eval_batch_size, shuffle=False,
                                      limit=c.max_eval_samples, source=src)
        self.test_loader = BatchLoader(self.dataset.split("test"), cards, c.eval_batch_size, shuffle=False,
                                       limit=c.max_test_samples, source=src)
        if len(self.train_loader) == 0:
            raise UserError(f"{src}: the training split is empty")
        self.state = {"epoch": 0, "batch": 0, "step": 0, "samples": 0, "train_seconds": 0.0,
                      "loss_sum": 0.0, "loss_count": 0, "history": []}

    # --- one step -----------------------------------------------------------------
    def train_step(self, batch: Batch) -> torch.Tensor:
        indices, offsets = jagged_from_dense(batch.cat)
        return sgd_step(self.model, self.optimizer, batch.dense, indices, offsets, batch.label)

    # --- checkpoints ----------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"config": self.config.to_json(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "state": dict(self.state)}

    def save_checkpoint(self, path: str | Path) -> None:
        import io

        buf = io.BytesIO()
        torch.save(self.checkpoint_state(), buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # corrupt or foreign file
            raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
        mine = self.config.to_json()
        theirs = ck.get("config", {})
        for key in ("data", "embedding", "batch_size", "lr", "seed", "max_train_samples", "mlp_bits"):
            if theirs.get(key) != mine.get(key):
                raise UserError(f"{path}: checkpoint was made with {key}={theirs.get(key)!r}, "
                                f"this run has {mine.get(key)!r}")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = dict(ck["state"])

    # --- the loop -------------------------------------------------------------------
    def fit(self, *, stop_after: int | None = None) -> dict:
        """Train to the end (or stop after `stop_after` total steps, checkpointing)."""
        c, st = self.config, self.state
        steps_per_epoch = len(self.train_loader)
        total = c.epochs * steps_per_epoch
        bar = tqdm(total=total, initial=st["step"], desc="train", unit="step",
                   disable=not c.progress, dynamic_ncols=True)
        self.model.train()
        try:
            while st["epoch"] < c.epochs:
                t0 = time.perf_counter()
                for batch in self.train_loader.batches(st["epoch"], st["batch"]):
                    loss = self.train_step(batch)
                    st["loss_sum"] += float(loss)
                    st["loss_count"] += 1
                    st["step"] += 1
                    st["batch"] += 1
                    st["samples"] += len(batch)
                    bar.update(1)
                    if st["step"] % 50 == 0:
                        bar.set_postfix(loss=f"{st['loss_sum'] / max(st['loss_count'], 1):.4f}")
                    last_of_epoch = st["batch"] == steps_per_epoch
                    if c.eval_every and st["step"] % c.eval_every == 0 and not last_of_epoch:
                        st["train_seconds"] += time.perf_counter() - t0
                        self._validate()
                        t0 = time.perf_counter()
                    if c.checkpoint and c.checkpoint_every and st["step"] % c.checkpoint_every == 0:
                        self.save_checkpoint(c.checkpoint)
                    if stop_after is not None and st["step"] >= stop_after:
                        st["train_seconds"] += time.perf_counter() - t0
                        if c.checkpoint:
                            self.save_checkpoint(c.checkpoint)
                        return {"stopped_at": st["step"]}
                st["train_seconds"] += time.perf_counter() - t0
                st["epoch"] += 1
                st["batch"] = 0
                self._validate()
                if c.checkpoint:
                    self.save_checkpoint(c.checkpoint)
        finally:
            bar.close()
        return self.finish()

    def _validate(self) -> None:
        st = self.state
        m = evaluate(self.model, self.val_loader)
        epochs_done = st["epoch"] + st["batch"] / len(self.train_loader)
        m.update(split="val", step=st["step"], epoch=epochs_done, samples_seen=st["samples"],
                 train_loss=st["loss_sum"] / max(st["loss_count"], 1))
        st["loss_sum"], st["loss_count"] = 0.0, 0
        st["history"].append(m)
        log.info("step %d: val auc %.4f logloss %.4f acc %.4f", st["step"], m["auc"], m["logloss"], m["accuracy"])

    def finish(self) -> dict:
        """Test metrics and the run record (config, history, speed, memory, provenance)."""
        st = self.state
        test = evaluate(self.model, self.test_loader)
        emb = self.model.embedding
        return {
            "config": self.config.to_json(),
            "model": self.model.config.to_json(),
            "data": {"folder": str(self.dataset.folder), "source": self.dataset.meta.source,
                     "splits": self.dataset.meta.splits, "info": self.dataset.meta.info},
            "history": st["history"],
            "test": test,
            "steps": st["step"],
            "samples": st["samples"],
            "train_seconds": st["train_seconds"],
            "samples_per_second": st["samples"] / st["train_seconds"] if st["train_seconds"] else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "embedding_bytes": emb.memory_bytes(),
            "embedding_total_bytes": emb.total_bytes(),
            "mlp_bytes": self.model.mlp_bytes(),
            "embedding_stats": emb.stats(),
            "kernels": _kernel_status(self.config.embedding),
            "provenance": provenance(),
        }


def _kernel_status(emb: EmbeddingConfig) -> str:
    if not emb.use_kernels:
        return "reference (disabled)"
    from mpc import kernels

    return "compiled" if kernels.available() else f"reference ({kernels.build_error()})"


def run(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
        export: str | Path | None = None) -> dict:
    """Train (resuming from config.checkpoint if asked) and write the run JSON atomically.

    export: write the trained QAT model in real low-bit storage there (mpc.qat_export)
    and record its size and test metrics under result["export"].
    """
    if export is not None and config.embedding.kind != "qat":
        raise UserError("--export needs --embedding qat")
    trainer = Trainer(config)
    if resume:
        if not config.checkpoint:
            raise UserError("--resume needs --checkpoint PATH")
        trainer.load_checkpoint(config.checkpoint)
    result = trainer.fit()
    if export is not None:
        from mpc.qat_export import export_and_evaluate

        result["export"] = export_and_evaluate(trainer, export)
    if out is not None:
        atomic_write_json(out, result)
    return result


# --- command line ------------------------------------------------------------------
EMBEDDING_KINDS = ("fp32", "fp16", "int8", "int4", "int2", "qat", "ptq")


def add_embedding_arguments(p) -> None:
    """The embedding options shared by `train` and the benchmarks."""
    from mpc.cli import fraction, non_negative_int, positive_int

    g = p.add_argument_group("embedding")
    g.add_argument("--embedding", default="fp32", choices=EMBEDDING_KINDS,
                   help="storage precision of the tables (default fp32)")
    g.add_argument("--cache-fraction", type=fraction, default=0.0,
                   help="FP32 cache rows as a fraction of each table (default 0: no cache)")
    g.add_argument("--cache-policy", choices=("lru", "lfu"), default="lru")
    g.add_argument("--cache-ways", type=non_negative_int, default=32,
                   help="associativity; 0 = fully associative (default 32)")
    g.add_argument("--cache-shared", action="store_true",
                   help="one cache budget shared by all tables instead of one per table")
    g.add_argument("--rounding", choices=("stochastic", "nearest"), default="stochastic")
    g.add_argument("--no-kernels", action="store_true",
                   help="use the pure-PyTorch reference instead of the compiled kernels")
    g.add_argument("--bits", type=int, choices=(2, 4, 8, 16), default=None,
                   help="qat/ptq: bits of the quantized tables (default 4; ptq row-wise: 2, 4, 8)")
    g.add_argument("--scale-period", type=positive_int, default=None,
                   help="qat: steps between table-scale recomputations (default 200; 1 = naive)")
    g.add_argument("--quantize-all-rows", action="store_true",
                   help="qat: fake-quantize whole tables every step (naive) instead of looked-up rows")
    g.add_argument("--ptq-granularity", choices=("row", "table"), default="row",
                   help="ptq: fused row-wise scale/bias (default) or one symmetric scale per table")


def embedding_config_from_args(args, **extra) -> EmbeddingConfig:
    from mpc.embedding import CacheConfig

    if args.cache_fraction > 0 and args.embedding in ("fp32", "qat", "ptq"):
        raise UserError("--cache-fraction needs a low-precision --embedding (fp16, int8, int4, int2)")
    for flag, given, kinds in (("--bits", args.bits is not None, ("qat", "ptq")),
                               ("--scale-period", args.scale_period is not None, ("qat",)),
                               ("--quantize-all-rows", args.quantize_all_rows, ("qat",))):
        if given and args.embedding not in kinds:
            raise UserError(f"{flag} applies to --embedding {'|'.join(kinds)}, not {args.embedding}")
    if args.embedding == "qat":
        extra.setdefault("options", {"bits": args.bits or 4, "scale_period": args.scale_period or 200,
                                     "looked_up_only": not args.quantize_all_rows})
    elif args.embedding == "ptq":
        extra.setdefault("options", {"bits": args.bits or 4, "granularity": args.ptq_granularity})
    cache = CacheConfig(fraction=args.cache_fraction, policy=args.cache_policy,
                        ways=args.cache_ways, shared=args.cache_shared)
    return EmbeddingConfig(kind=args.embedding, cache=cache, rounding=args.rounding,
                           seed=args.seed, use_kernels=not args.no_kernels, **extra)


def register_cli(sub) -> None:
    from mpc.cli import non_negative_int, positive_float, positive_int

    p = sub.add_parser("train", help="train DLRM on a prepared data set and write a run JSON")
    p.add_argument("--data", required=True, help="folder written by `synth` or `prepare-criteo`")
    p.add_argument("--out", required=True, help="run JSON to write (atomically)")
    add_embedding_arguments(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=1)
    g.add_argument("--batch-size", type=positive_int, default=128)
    g.add_argument("--lr", type=positive_float, default=0.1)
    g.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="validate every K steps (default 0: at each epoch end)")
    g.add_argument("--eval-batch-size", type=positive_int, default=8192)
    g.add_argument("--max-train-samples", type=positive_int, default=None,
                   help="train on a random subset of this many rows per epoch")
    g.add_argument("--max-eval-samples", type=positive_int, default=None,
                   help="validate on the first N validation rows")
    g.add_argument("--max-test-samples", type=positive_int, default=None)
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: default)")
    g.add_argument("--checkpoint", default=None, help="checkpoint file (written atomically)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (default: at each epoch end only)")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    g.add_argument("--export", default=None,
                   help="qat: write the trained model in real low-bit storage to this file")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--mlp-bits", type=int, choices=(2, 4, 8, 16, 32), default=32,
                   help="quantize the MLP weights per channel (QAT; post-training with "
                        "--embedding ptq); default 32 = FP32")
    d = p.add_argument_group("data-parallel (launch with torchrun --nproc-per-node N -m mpc train ...)")
    d.add_argument("--distributed", action="store_true",
                   help="data-parallel over the torchrun ranks; --batch-size is the global batch")
    d.add_argument("--grad-compression", choices=("none", "sparse", "sparse-int8"), default="sparse",
                   help="dense all-reduce | sparse embedding rows | sparse + INT8 (default sparse)")
    d.add_argument("--no-error-feedback", action="store_true",
                   help="sparse-int8: no error compensation on the MLP gradients")
    p.set_defaults(func=_cli_train)


def _cli_train(args) -> int:
    config = TrainConfig(
        data=args.data, embedding=embedding_config_from_args(args), epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, max_test_samples=args.max_test_samples,
        seed=args.seed, threads=args.threads, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress, mlp_bits=args.mlp_bits)
    if args.distributed:
        from mpc.distributed import DistributedConfig, run_distributed

        dist = DistributedConfig(compression=args.grad_compression,
                                 error_feedback=not args.no_error_feedback)
        result = run_distributed(config, dist, args.out, resume=args.resume, export=args.export)
        if result is None:   # not rank 0: rank 0 reports and writes
            return 0
    else:
        result = run(config, args.out, resume=args.resume, export=args.export)
    print(summary_line(result))
    if "export" in result:
        e = result["export"]
        print(f"exported {e['path']}: {e['total_bytes']:,} bytes stored ({e['file_bytes']:,} on disk), "
              f"test AUC {e['test']['auc']:.4f}")
    print(f"wrote {args.out}")
    return 0


def summary_line(result: dict) -> str:
    t = result["test"]
    emb = result["config"]["embedding"]
    label = emb["kind"] + (f"+{emb['cache']['fraction']:.0%} {emb['cache']['policy']} cache"
                           if emb["cache"]["fraction"] else "")
    if emb["options"].get("bits"):
        label += f" {emb['options']['bits']}-bit"
    sps = result["samples_per_second"] or 0.0
    return (f"{label}: test AUC {t['auc']:.4f}  logloss {t['logloss']:.4f}  accuracy {t['accuracy']:.4f}"
            f"  ({result['samples']} samples, {sps:,.0f} samples/s)")
