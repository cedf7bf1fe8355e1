"""`python -m mpc bench qat`: the cost of DQRM's quantization-aware training step.

DQRM (PAPERS.md §2) reports 31 ms/iter when the table scales are recomputed every
iteration and 22 ms/iter with a period of 200 (FP32: 7 ms), on a GPU. This times, in
one run and on the same batches, DLRM training steps with:

    fp32                      the FP32 backend (baseline)
    qat naive                 whole tables fake-quantized every step, scales every step
    qat period 1              looked-up rows only, scales every step
    qat period N              looked-up rows only, scales every N steps (DQRM)

Rounds are interleaved; a configuration's time is its total over all rounds divided by
its steps (not a median: the scale recomputation lands in one round in N steps, and its
cost must be amortized). Make rounds x steps a multiple of N so every configuration
pays for the same number of recomputations per step.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mpc.bench import record
from mpc.bench.common import print_table, random_batch
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import EmbeddingConfig, jagged_from_dense
from mpc.model import DLRM, DLRMConfig
from mpc.train import sgd_step

log = logging.getLogger(__name__)


def qat_configs(cardinalities, bits: int, period: int, seed: int, use_kernels: bool) -> dict[str, EmbeddingConfig]:
    base = EmbeddingConfig(cardinalities=tuple(cardinalities), seed=seed, use_kernels=use_kernels)

    def qat(p, looked_up_only):
        return base.replace(kind="qat", options={"bits": bits, "scale_period": p, "looked_up_only": looked_up_only})

    return {"fp32": base, "qat naive": qat(1, False), "qat period 1": qat(1, True),
            f"qat period {period}": qat(period, True)}


def time_qat_steps(configs: dict[str, EmbeddingConfig], batch_size: int, steps: int, rounds: int,
                   mlp_bits: int | dict[str, int] = 32, lr: float = 0.1, seed: int = 0, zipf: float = 1.05,
                   batches: list | None = None) -> dict[str, float]:
    """Mean seconds per training step of each configuration (same batches, interleaved).

    mlp_bits: of the qat configurations' MLPs (others FP32), or {name: bits} per config.
    batches: (dense, indices, offsets, label) tuples to train on (e.g. a data set's; then
    batch_size and zipf are ignored): `steps` of them, trained again in every round, or
    `rounds * steps`, round r training the r-th slice (no batch seen twice: fair to a
    cache). Default: `steps` random Zipf batches.
    """
    if batches is None:
        rng = np.random.default_rng(seed)
        cards = next(iter(configs.values())).cardinalities
        batches = []
        for _ in range(steps):
            dense, cat, label = random_batch(rng, cards, batch_size, zipf)
            batches.append((dense, *jagged_from_dense(cat), label))
    if len(batches) not in (steps, rounds * steps):
        raise ValueError(f"{len(batches)} batches for {rounds} rounds of {steps} steps")
    per_round = len(batches) > steps
    models, opts = {}, {}
    for name, emb in configs.items():
        bits = mlp_bits.get(name, 32) if isinstance(mlp_bits, dict) else mlp_bits if emb.kind == "qat" else 32
        models[name] = DLRM(DLRMConfig.for_embedding(emb, seed=seed, mlp_bits=bits))
        models[name].embedding.set_learning_rate(lr)
        opts[name] = torch.optim.SGD(models[name].dense_parameters(), lr=lr)
        sgd_step(models[name], opts[name], *batches[0])   # warm-up: kernels, allocator
    total = dict.fromkeys(configs, 0.0)
    for r in range(rounds):
        chunk = batches[r * steps:(r + 1) * steps] if per_round else batches
        for name in configs:
            t0 = time.perf_counter()
            for b in chunk:
                sgd_step(models[name], opts[name], *b)
            total[name] += time.perf_counter() - t0
    return {name: t / (rounds * steps) for name, t in total.items()}


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    cards = KAGGLE_CARDINALITIES if args.cardinalities == "kaggle" else tuple(
        max(1, round(c * float(args.cardinalities))) for c in KAGGLE_CARDINALITIES)
    if (args.steps * args.rounds) % args.scale_period:
        log.warning("rounds x steps = %d is not a multiple of the scale period %d: the period-%d "
                    "configuration is timed over a partial period", args.steps * args.rounds,
                    args.scale_period, args.scale_period)
    configs = qat_configs(cards, args.bits, args.scale_period, args.seed, not args.no_kernels)
    sec = time_qat_steps(configs, args.batch_size, args.steps, args.rounds, args.mlp_bits, seed=args.seed)
    naive, fp32 = sec["qat naive"], sec["fp32"]
    rows = [{"config": n, "ms/step": 1e3 * s, "vs qat naive": s / naive, "vs fp32": s / fp32}
            for n, s in sec.items()]
    print_table(rows, ["config", "ms/step", "vs qat naive", "vs fp32"])
    period = f"qat period {args.scale_period}"
    print(f"period {args.scale_period} / period 1 (looked-up rows): {sec[period] / sec['qat period 1']:.3f}"
          f"   (paper, GPU: 22 / 31 = {22 / 31:.3f})")
    params = {k: v for k, v in vars(args).items() if k != "func"}
    params["rows"] = sum(cards)
    from mpc import kernels

    params["kernels"] = "reference" if args.no_kernels or not kernels.available() else "compiled"
    results = {"seconds_per_step": sec, "ratio_vs_naive": {n: s / naive for n, s in sec.items()},
               "ratio_vs_fp32": {n: s / fp32 for n, s in sec.items()},
               "period_vs_period_1": sec[period] / sec["qat period 1"]}
    return record(args.record_name, params, results)


def register_bench(sub) -> None:
    from mpc.cli import positive_int

    p = sub.add_parser("qat", help="DQRM QAT step time: scale period and looked-up-only quantization")
    p.add_argument("--cardinalities", default="0.1", help="'kaggle' (full size) or a scale factor (default 0.1)")
    p.add_argument("--bits", type=int, choices=(2, 4, 8, 16), default=4)
    p.add_argument("--mlp-bits", type=int, choices=(2, 4, 8, 16, 32), default=32)
    p.add_argument("--scale-period", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--steps", type=positive_int, default=50, help="steps per timed round")
    p.add_argument("--rounds", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--record-name", default="qat", help="results/bench/<name>.json")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
