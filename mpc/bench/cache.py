"""`python -m mpc bench cache`: training low-precision tables behind the FP32 cache (MPC,
PAPERS.md §1) against what a PyTorch user writes instead.

Full Kaggle-size tables (`--cardinalities 0.01` for a quick run), dim 16, batch 2048,
one id per table per sample from a skewed stream: `--ids zipf` (mpc.bench.common's
sampler, as the other benchmarks) or `--ids synth` (the Criteo-calibrated generator of
mpc.data.synth at full scale; about a minute and 3.5 GB to set up). One iteration:

    baseline     26 nn.EmbeddingBag(mode="sum", sparse=True): forward, backward,
                 torch.optim.SGD step (how the DLRM reference trains its tables)
    mpc cached   INT8 tables + a 5% LRU FP32 cache (mpc.embedding.cache): admission,
                 eviction, write-back and fill, pooled lookup, fused backward + update
    mpc uncached the same INT8 tables without a cache (for reference)

With `--model dlrm` an iteration is a whole DLRM training step (MLPs, interaction, BCE)
around each embedding. The cache is warmed on the stream first; then every timed
iteration of every contender gets a fresh batch of the stream, in interleaved rounds,
and the median round is reported with the cache's hit rate and host<->device traffic
model (stats()) over the timed window.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mpc.bench import record
from mpc.bench.common import median, paired_ratio, print_table, random_batch
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import CacheConfig, EmbeddingConfig, build_embedding, jagged_from_dense
from mpc.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    indices: torch.Tensor
    offsets: torch.Tensor
    dense: torch.Tensor
    label: torch.Tensor


@dataclass
class Contender:
    name: str
    step: Callable[[Batch], None]
    embedding: torch.nn.Module


def batch_stream(args, cards):
    """Yields Batches: Zipf ids (common.random_batch) or the synthetic Criteo generator's rows."""
    if args.ids == "synth":
        from mpc.data.synth import SynthConfig, SyntheticCriteo

        log.info("setting up the full-scale synthetic generator")
        gen = SyntheticCriteo(SynthConfig(scale="full", seed=args.seed))
        start = 0
        while True:
            rows = gen.rows(start, start + args.batch)
            start += args.batch
            yield Batch(*jagged_from_dense(torch.from_numpy(rows.cat.astype(np.int64))),
                        torch.from_numpy(rows.dense), torch.from_numpy(rows.label.astype(np.float32)))
    rng = np.random.default_rng(args.seed)
    while True:
        dense, cat, label = random_batch(rng, cards, args.batch, args.zipf)
        yield Batch(*jagged_from_dense(cat), dense, label)


def embedding_configs(args, cards) -> dict[str, EmbeddingConfig]:
    cache = CacheConfig(fraction=args.cache_fraction, policy=args.policy, ways=args.ways)
    cached = EmbeddingConfig(cardinalities=cards, dim=args.dim, kind=args.precision, cache=cache, seed=args.seed)
    name = f"mpc {args.precision} + {args.cache_fraction:g} {args.policy} cache"
    configs = {name: cached}
    if args.uncached:
        configs[f"mpc {args.precision} (no cache)"] = cached.replace(cache=CacheConfig())
    return configs


def embedding_contenders(args, cards) -> list[Contender]:
    """Embedding forward + backward + update only."""
    from mpc.bench.baseline import EmbeddingBagList

    grad = 0.01 * torch.randn(args.batch, len(cards), args.dim, generator=torch.Generator().manual_seed(0))
    base = EmbeddingBagList(cards, args.dim)
    opt = torch.optim.SGD(base.parameters(), lr=args.lr)

    def baseline_step(b: Batch) -> None:
        base(b.indices, b.offsets).backward(grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = [Contender("baseline: 26 EmbeddingBag + SGD", baseline_step, base)]
    for name, cfg in embedding_configs(args, cards).items():
        emb = build_embedding(cfg)
        emb.set_learning_rate(args.lr)
        out.append(Contender(name, lambda b, emb=emb: emb(b.indices, b.offsets).backward(grad), emb))
    return out


def dlrm_contenders(args, cards) -> list[Contender]:
    """Whole DLRM training steps (mpc.train.sgd_step) around each embedding."""
    from mpc.bench.baseline import baseline_dlrm, baseline_optimizer
    from mpc.model import DLRM, DLRMConfig
    from mpc.train import sgd_step

    out = []
    for name, cfg in embedding_configs(args, cards).items():
        model = DLRM(DLRMConfig.for_embedding(cfg, seed=args.seed))
        model.embedding.set_learning_rate(args.lr)
        opt = torch.optim.SGD(model.dense_parameters(), lr=args.lr)
        out.append(Contender(name, lambda b, m=model, o=opt: sgd_step(m, o, b.dense, b.indices, b.offsets, b.label),
                             model.embedding))
    fp32 = EmbeddingConfig(cardinalities=cards, dim=args.dim, kind="fp32")
    base = baseline_dlrm(DLRMConfig.for_embedding(fp32, seed=args.seed))
    bopt = baseline_optimizer(base, args.lr)
    step = (lambda b: sgd_step(base, bopt, b.dense, b.indices, b.offsets, b.label))
    return [Contender("baseline: DLRM with 26 EmbeddingBag + SGD", step, base.embedding)] + out


def cache_window(emb) -> dict:
    """Counters and traffic of a cached backend (for differences over a window)."""
    s = emb.stats()
    return {"totals": s["totals"], "traffic": s["traffic"], "iterations": s["iterations"]}


def window_stats(before: dict, after: dict) -> dict:
    it = after["iterations"] - before["iterations"]
    tot = {k: after["totals"][k] - before["totals"][k] for k in after["totals"]}
    keys = ("fill_bytes", "writeback_bytes", "uncached_bytes", "no_cache_bytes", "total_bytes")
    traffic = {k + "_per_iteration": (after["traffic"][k] - before["traffic"][k]) / it for k in keys}
    return {"iterations": it, "hit_rate": tot["hits"] / tot["lookups"], "fills_per_iteration": tot["fills"] / it,
            "writebacks_per_iteration": tot["evictions"] / it, **traffic}


def timed_rounds(contenders, stream, args) -> dict[str, list[float]]:
    """Seconds per iteration of each contender, one value per round (fresh batches)."""
    times = {c.name: [] for c in contenders}
    for r in tqdm(range(args.rounds), desc="timed rounds", leave=False):
        batches = [next(stream) for _ in range(args.steps)]
        k = r % len(contenders)  # rotate the order: none always runs first
        for c in contenders[k:] + contenders[:k]:
            t0 = time.perf_counter()
            for b in batches:
                c.step(b)
            times[c.name].append((time.perf_counter() - t0) / args.steps)
    return times


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    from mpc import kernels

    if args.use_kernels_required and kernels.load() is None:
        raise UserError(f"the cache benchmark needs the compiled kernels ({kernels.build_error()})")
    cards = KAGGLE_CARDINALITIES if args.cardinalities == "kaggle" else tuple(
        max(1, round(c * float(args.cardinalities))) for c in KAGGLE_CARDINALITIES)
    if args.ids == "synth" and args.cardinalities != "kaggle":
        raise UserError("--ids synth draws full-scale Kaggle ids; use it with --cardinalities kaggle")
    stream = batch_stream(args, cards)
    contenders = (dlrm_contenders if args.model == "dlrm" else embedding_contenders)(args, cards)
    cached = contenders[1]
    for _ in tqdm(range(args.warmup), desc="warming the cache", leave=False):
        b = next(stream)
        cached.step(b)
    for c in contenders:  # one untimed iteration each: allocator, first-touch, threads
        c.step(next(stream))
    before = cache_window(cached.embedding)
    times = timed_rounds(contenders, stream, args)
    window = window_stats(before, cache_window(cached.embedding))
    return report(args, cards, contenders, times, window)


def report(args, cards, contenders, times, window) -> dict:
    rows, results = [], {"seconds_per_iteration": {}, "ratio_vs_baseline": {}, "memory_bytes": {}}
    for c in contenders:
        t = median(times[c.name])
        mem = (sum(c.embedding.memory_bytes().values()) if hasattr(c.embedding, "memory_bytes")
               else sum(p.nbytes for p in c.embedding.parameters()))
        results["seconds_per_iteration"][c.name] = t
        results["ratio_vs_baseline"][c.name] = paired_ratio(times, contenders[0].name, c.name)
        results["memory_bytes"][c.name] = mem
        rows.append({"contender": c.name, "ms/iter": 1e3 * t, "samples/s": args.batch / t,
                     "vs baseline": results["ratio_vs_baseline"][c.name], "embedding MB": mem / 1e6})
    results["rounds_seconds_per_iteration"] = times
    results["cache_window"] = window
    print(f"{args.model} iterations, batch {args.batch}, {len(cards)} tables, {sum(cards):,} rows, dim {args.dim}, "
          f"ids {args.ids}, {args.threads} threads; median of {args.rounds} rounds x {args.steps} iterations "
          f"after {args.warmup} warm-up iterations")
    print_table(rows, list(rows[0]))
    w = {k: v / 1e6 if k.endswith("bytes_per_iteration") else v for k, v in window.items()}  # MB
    cache_mb = w["fill_bytes_per_iteration"] + w["writeback_bytes_per_iteration"]
    print(f"cache over the timed window: hit rate {w['hit_rate']:.3f}, {w['fills_per_iteration']:.0f} fills and "
          f"{w['writebacks_per_iteration']:.0f} write-backs per iteration; traffic model per iteration: "
          f"{w['total_bytes_per_iteration']:.2f} MB (cache {cache_mb:.2f} + uncached "
          f"{w['uncached_bytes_per_iteration']:.2f}) vs {w['no_cache_bytes_per_iteration']:.2f} MB without a cache")
    params = {k: v for k, v in vars(args).items() if k != "func"}
    params["total_rows"] = sum(cards)
    return record(args.record_name, params, results)


def register_bench(sub) -> None:
    from mpc.cli import fraction, non_negative_int, positive_int

    p = sub.add_parser("cache", help="INT8 tables + FP32 cache vs 26 nn.EmbeddingBag + SGD (training)")
    p.add_argument("--model", choices=["embedding", "dlrm"], default="embedding",
                   help="time the embeddings alone, or whole DLRM training steps")
    p.add_argument("--precision", choices=["fp16", "int8", "int4", "int2"], default="int8")
    p.add_argument("--cache-fraction", type=fraction, default=0.05)
    p.add_argument("--policy", choices=["lru", "lfu"], default="lru")
    p.add_argument("--ways", type=non_negative_int, default=32, help="0 = fully associative")
    p.add_argument("--batch", type=positive_int, default=2048)
    p.add_argument("--dim", type=positive_int, default=16)
    p.add_argument("--ids", choices=["zipf", "synth"], default="zipf")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent (--ids zipf)")
    p.add_argument("--cardinalities", default="kaggle", help="'kaggle' (full size) or a scale factor such as 0.01")
    p.add_argument("--warmup", type=non_negative_int, default=1500,
                   help="iterations that fill the cache first (Zipf 1.05: steady after ~1500)")
    p.add_argument("--steps", type=positive_int, default=10, help="iterations per timed round")
    p.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (median)")
    p.add_argument("--no-uncached", dest="uncached", action="store_false",
                   help="skip the uncached low-precision contender")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--record-name", default="cache", help="results/bench/<name>.json")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1], use_kernels_required=True)
