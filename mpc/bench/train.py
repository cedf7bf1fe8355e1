"""`python -m mpc bench train`: DLRM training throughput, mpc vs plain PyTorch.

Same model, same initial weights, same batches (Zipf ids over full Kaggle-size tables by
default). The baseline is 26 `nn.EmbeddingBag(sparse=True)` + `torch.optim.SGD` over all
parameters (mpc.bench.baseline); mpc is the fused table-batched backend. Extra
configurations (e.g. `--embedding int8 --cache-fraction 0.05`) are timed in the same run
and reported against both. Rounds are interleaved and the median is reported.
"""

from __future__ import annotations

import numpy as np
import torch

from mpc.bench import record
from mpc.bench.baseline import baseline_dlrm, baseline_optimizer
from mpc.bench.common import median, print_table, random_batch, time_rounds
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import EmbeddingConfig, jagged_from_dense
from mpc.model import DLRM, DLRMConfig
from mpc.train import sgd_step


def _configs(args) -> dict[str, EmbeddingConfig]:
    from mpc.train import embedding_config_from_args

    cards = KAGGLE_CARDINALITIES if args.cardinalities == "kaggle" else tuple(
        max(1, round(c * float(args.cardinalities))) for c in KAGGLE_CARDINALITIES)
    fp32 = EmbeddingConfig(cardinalities=cards, kind="fp32", seed=args.seed)
    configs = {"mpc fp32": fp32}
    if args.embedding != "fp32":
        extra = embedding_config_from_args(args).replace(cardinalities=cards)
        name = f"mpc {extra.kind}" + (f"+{extra.cache.fraction:.0%} {extra.cache.policy.value}"
                                      if extra.cache.fraction else "")
        configs[name] = extra
    return configs


def run_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    configs = _configs(args)
    fp32_cfg = configs["mpc fp32"]
    models = {}
    for name, emb in configs.items():
        models[name] = DLRM(DLRMConfig.for_embedding(emb, seed=args.seed))
        models[name].embedding.set_learning_rate(args.lr)
    base_model = baseline_dlrm(models["mpc fp32"].config, models["mpc fp32"].embedding.to_float())
    base_model.load_state_dict({k: v for k, v in models["mpc fp32"].state_dict().items()
                                if not k.startswith("embedding.")}, strict=False)
    optimizers = {name: torch.optim.SGD(m.dense_parameters(), lr=args.lr) for name, m in models.items()}
    base_opt = baseline_optimizer(base_model, args.lr)

    rows, results = [], {}
    rng = np.random.default_rng(args.seed)
    for bs in args.batch_sizes:
        batches = []
        for _ in range(args.steps):
            dense, cat, label = random_batch(rng, fp32_cfg.cardinalities, bs, args.zipf)
            batches.append((dense, *jagged_from_dense(cat), label))

        fns = {"baseline": lambda: [sgd_step(base_model, base_opt, *b) for b in batches]}
        for name, m in models.items():
            fns[name] = (lambda m=m, o=optimizers[name]: [sgd_step(m, o, *b) for b in batches])
        for fn in fns.values():  # warm-up (kernel build, allocator, page faults)
            fn()
        times = time_rounds(fns, rounds=args.repeats, inner=1)
        sps = {name: bs * args.steps / median(t) for name, t in times.items()}
        for name in fns:
            row = {"batch": bs, "config": name, "samples/s": sps[name],
                   "ms/step": 1e3 * median(times[name]) / args.steps,
                   "vs baseline": sps[name] / sps["baseline"]}
            if name != "baseline":
                row["vs mpc fp32"] = sps[name] / sps["mpc fp32"]
            rows.append(row)
        results[str(bs)] = {"samples_per_second": sps, "seconds_per_round": times,
                            "ratio_vs_baseline": {n: sps[n] / sps["baseline"] for n in fns},
                            "ratio_vs_mpc_fp32": {n: sps[n] / sps["mpc fp32"] for n in fns}}
    print_table(rows, ["batch", "config", "samples/s", "ms/step", "vs baseline", "vs mpc fp32"])
    params = {k: v for k, v in vars(args).items() if k != "func"}
    params["configs"] = {n: c.to_json() | {"cardinalities": f"{len(c.cardinalities)} tables, "
                                            f"{c.total_rows} rows"} for n, c in configs.items()}
    from mpc import kernels
    params["kernels"] = "compiled" if any(c.use_kernels for c in configs.values()) and kernels.available() else "reference"
    return record(args.record_name, params, results)


def register_bench(sub) -> None:
    from mpc.cli import positive_int
    from mpc.train import add_embedding_arguments

    p = sub.add_parser("train", help="DLRM training step: mpc vs 26 nn.EmbeddingBag + SGD")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=positive_int, default=30, help="steps per timed round")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (median)")
    p.add_argument("--cardinalities", default="kaggle",
                   help="'kaggle' (full size) or a scale factor such as 0.01")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--record-name", default="train", help="results/bench/<name>.json")
    add_embedding_arguments(p)
    p.set_defaults(func=lambda a: (run_bench(a), 0)[1])
