"""`python -m mpc bench train`: DLRM training throughput, mpc vs plain PyTorch.

Same model, same initial weights (the FP32 tables of every configuration are the same
reference initialisation), same batches: Zipf ids over full Kaggle-size tables by
default. The baseline is 26 `nn.EmbeddingBag(sparse=True)` + `torch.optim.SGD` over all
parameters, the interaction in torch ops (mpc.bench.baseline); a second baseline with
mpc's interaction kernel shows how much of the gain is the embedding's. mpc's
configurations are fused table-batched backends (`--configs fp32 int8+5%lru ...`, specs
as in mpc.experiments.setup). Every round uses
fresh batches (a cache must not be timed on ids it has already seen), rounds are
interleaved across configurations (their order rotating; each round starts with a few
untimed steps that bring its contender's hot data back into the CPU caches), and the
median is reported;
the ratios vs the baseline and vs mpc fp32 are medians of the per-round ratios (each
pair timed back to back: robust to a slow patch of a shared machine).
"""

from __future__ import annotations

import numpy as np
import torch

from mpc.bench import record
from mpc.bench.baseline import baseline_dlrm, baseline_optimizer
from mpc.bench.common import median, paired_ratio, paired_ratio_quartiles, print_table, random_batch, time_rounds
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import jagged_from_dense
from mpc.errors import UserError
from mpc.experiments.setup import config_label, parse_config
from mpc.model import DLRM, DLRMConfig
from mpc.train import sgd_step


def bench_cardinalities(text: str) -> tuple[int, ...]:
    if text == "kaggle":
        return KAGGLE_CARDINALITIES
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1:
        raise UserError(f"--cardinalities must be 'kaggle' or a scale factor in (0, 1], got {text!r}")
    return tuple(max(1, round(c * scale)) for c in KAGGLE_CARDINALITIES)


SPLIT_BASELINE = "baseline, mpc interaction"


def build_contenders(cards, specs, seed: int, lr: float, split: bool = True):
    """name -> (model, optimizer); 'baseline' first, all from the same initial weights.

    With `split`, also the baseline with mpc's interaction kernel (SPLIT_BASELINE): its
    ratio to 'baseline' is the interaction's share of mpc's gain, the rest the embedding's.
    """
    models = {}
    for spec in ["fp32"] + [s for s in specs if s != "fp32"]:
        emb = parse_config(spec, cardinalities=cards, seed=seed)
        model = DLRM(DLRMConfig.for_embedding(emb, seed=seed))
        model.embedding.set_learning_rate(lr)
        models[f"mpc {config_label(emb)}"] = (model, torch.optim.SGD(model.dense_parameters(), lr=lr))
    fp32 = models["mpc fp32"][0]
    baselines = {}
    for name in ["baseline", SPLIT_BASELINE] if split else ["baseline"]:
        base = baseline_dlrm(fp32.config, fp32.embedding.to_float(), mpc_interaction=name == SPLIT_BASELINE)
        base.load_state_dict({k: v for k, v in fp32.state_dict().items() if not k.startswith("embedding.")},
                             strict=False)
        baselines[name] = (base, baseline_optimizer(base, lr))
    return {**baselines, **models}


def warm_caches(contenders, cards, batch_size: int, iterations: int, rng, zipf: float) -> dict:
    """Bring every cached contender's cache to its steady state before timing.

    A cache starts empty: its first iterations fill it (a fill and a write-back per
    miss), which training does once per run, not per step. Embedding-only training steps
    (gradient of the pooled sum) on fresh Zipf batches, as `bench cache --warmup` does.
    Returns each cached contender's hit rate over the last tenth of the warm-up.
    """
    hit_rates = {}
    for name, (model, _) in contenders.items():
        emb = model.embedding
        if not hasattr(emb, "cache") or iterations == 0:
            continue
        tail = max(1, iterations // 10)
        for k in range(iterations):
            if k == iterations - tail:
                before = emb.stats()["totals"]
            _, cat, _ = random_batch(rng, cards, batch_size, zipf)
            emb(*jagged_from_dense(cat)).sum().backward()
        after = emb.stats()["totals"]
        looked = after["lookups"] - before["lookups"]
        hit_rates[name] = (after["hits"] - before["hits"]) / looked if looked else 0.0
    return hit_rates


def default_rounds(batch_size: int) -> int:
    """21 rounds at batch 2048; more for smaller batches, whose rounds are shorter (the
    same timed work, up to 61 rounds: 61 at batch 128)."""
    return min(61, max(21, 21 * 2048 // batch_size))


def repeats_per_batch(batch_sizes, repeats=None) -> list[int]:
    """One round count per batch size: `repeats` is None (default_rounds), an int, one
    count per batch size, or one count for all."""
    if repeats is None:
        return [default_rounds(bs) for bs in batch_sizes]
    counts = [repeats] if isinstance(repeats, int) else list(repeats)
    if len(counts) == 1:
        counts = counts * len(batch_sizes)
    if len(counts) != len(batch_sizes):
        raise UserError(f"--repeats takes one count or one per batch size ({len(batch_sizes)}), got {len(counts)}")
    return counts


def time_training(cards, specs, batch_sizes, steps: int, repeats, seed: int = 0, lr: float = 0.1,
                  zipf: float = 1.05, warmup_steps: int | None = None, cache_warmup: int = 0,
                  settle_steps: int = 5) -> dict:
    """Samples/s of every contender per batch size, with ratios (see the module doc).

    `repeats`: timed rounds: None (the default counts), an int, or one per batch size (repeats_per_batch).
    `cache_warmup` embedding-only iterations (at the largest batch size) bring the caches
    to their steady state first (see warm_caches).
    """
    round_counts = repeats_per_batch(batch_sizes, repeats)
    contenders = build_contenders(cards, specs, seed, lr)
    rng = np.random.default_rng(seed)
    warm_batch = max(batch_sizes) if batch_sizes else 0
    warm_hit_rate = warm_caches(contenders, cards, warm_batch, cache_warmup, rng, zipf) if batch_sizes else {}
    out = {}
    for bs, repeats in zip(batch_sizes, round_counts):
        warm = warmup_steps if warmup_steps is not None else steps

        def fresh(n):
            return [(d, *jagged_from_dense(c), l) for d, c, l in
                    (random_batch(rng, cards, bs, zipf) for _ in range(n))]

        rounds = [fresh(settle_steps + steps) for _ in range(repeats)]
        warmup = fresh(warm)
        feeds = {name: iter(rounds) for name in contenders}
        current = {}

        def settler(name):
            model, opt = contenders[name]

            def settle():  # untimed: the round's first steps (see time_rounds)
                current[name] = next(feeds[name])
                for b in current[name][:settle_steps]:
                    sgd_step(model, opt, *b)
            return settle

        def runner(name):
            model, opt = contenders[name]

            def run():
                for b in current[name][settle_steps:]:
                    sgd_step(model, opt, *b)
            return run

        for model, opt in contenders.values():  # warm-up: kernel build, allocator, cache fill
            for b in warmup:
                sgd_step(model, opt, *b)
        times = time_rounds({name: runner(name) for name in contenders}, rounds=repeats, inner=1,
                            settle={name: settler(name) for name in contenders})
        sps = {name: bs * steps / median(t) for name, t in times.items()}
        stats = {name: m.embedding.stats() for name, (m, _) in contenders.items() if hasattr(m.embedding, "stats")}
        out[str(bs)] = {"samples_per_second": sps, "seconds_per_round": times,
                        "ratio_vs_baseline": {n: paired_ratio(times, "baseline", n) for n in sps},
                        "ratio_vs_mpc_fp32": {n: paired_ratio(times, "mpc fp32", n) for n in sps},
                        # the spread of the per-round ratios (a shared machine's noise)
                        "ratio_vs_baseline_quartiles": {n: paired_ratio_quartiles(times, "baseline", n)
                                                        for n in sps},
                        "ratio_vs_mpc_fp32_quartiles": {n: paired_ratio_quartiles(times, "mpc fp32", n)
                                                        for n in sps},
                        "rounds": repeats, "steps_per_round": steps,
                        "hit_rate": {n: s.get("hit_rate") for n, s in stats.items() if s.get("hit_rate") is not None},
                        "cache_warmup": {"iterations": cache_warmup, "batch_size": warm_batch,
                                         "final_hit_rate": warm_hit_rate}}
    return out


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    cards = bench_cardinalities(args.cardinalities)
    results = time_training(cards, args.configs, args.batch_sizes, args.steps, args.repeats, args.seed,
                            args.lr, args.zipf, cache_warmup=args.cache_warmup, settle_steps=args.settle_steps)
    rows = []
    for bs, r in results.items():
        for name, sps in r["samples_per_second"].items():
            q = r["ratio_vs_baseline_quartiles"][name]
            rows.append({"batch": int(bs), "config": name, "samples/s": sps,
                         "ms/step": 1e3 * int(bs) / sps, "vs baseline": r["ratio_vs_baseline"][name],
                         "rounds q25-q75": f"{q[0]:.2f}-{q[1]:.2f}" if name != "baseline" else "",
                         "vs mpc fp32": None if name == "baseline" else r["ratio_vs_mpc_fp32"][name]})
    print_table(rows, ["batch", "config", "samples/s", "ms/step", "vs baseline", "rounds q25-q75", "vs mpc fp32"])
    from mpc import kernels

    params = {k: v for k, v in vars(args).items() if k != "func"}
    params.update(total_rows=sum(cards), kernels="compiled" if kernels.available() else "reference")
    return record(args.record_name, params, results)


def register_bench(sub) -> None:
    from mpc.cli import positive_int

    p = sub.add_parser("train", help="DLRM training step: mpc vs 26 nn.EmbeddingBag + SGD")
    p.add_argument("--configs", nargs="+", default=["fp32"],
                   help="mpc embedding configurations, e.g. fp32 int8 int8+5%%lru (fp32 always included)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=positive_int, default=10, help="steps per timed round")
    p.add_argument("--repeats", type=positive_int, nargs="+", default=None,
                   help="timed rounds (median), one count per batch size or one for all; default 21 at "
                        "batch 2048 and more for smaller batches, up to 61 (61 at 128). Many short rounds "
                        "keep a pair's two rounds close in time, so a noisy neighbour's burst spoils few pairs")
    p.add_argument("--cardinalities", default="kaggle",
                   help="'kaggle' (full size) or a scale factor such as 0.01")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--settle-steps", type=int, default=5,
                   help="untimed steps at the start of every round: the contender's hot rows and pages "
                        "back in the CPU caches after the others ran (timed: the steady state)")
    p.add_argument("--cache-warmup", type=int, default=1500,
                   help="embedding-only iterations that bring each cache to its steady state before timing "
                        "(Zipf 1.05 at batch 2048: steady after ~1500; 0 times from a cold cache)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--record-name", default="train", help="results/bench/<name>.json")
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
