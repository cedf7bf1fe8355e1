"""Parameters of each notebook under each `reproduce` profile.

A notebook's own `parameters` cell holds its interactive defaults (a few minutes on a
laptop). The profiles override them:
    quick    tiny data, every notebook, a few minutes in all (the tests run it)
    default  full Kaggle-size tables, enough samples for meaningful deltas, < 1 hour on 2 cores
    paper    the paper's scale: full-size synthetic data with Kaggle's 45.8M lines, or the real
             prepared file given with --data; hours, for a bigger machine or a GPU
`--data DIR` replaces the synthetic data of every notebook that trains with a prepared
real Criteo folder.
"""

from __future__ import annotations

from mpc.errors import UserError

PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "01_memory_reduction": {"MEASURE_SCALE": 0.001},
        "02_accuracy": {"DATA": "synthetic:tiny", "SAMPLES": 20_000, "SEEDS": [0, 1], "EVAL_EVERY": 50,
                        "EVAL_SAMPLES": 2_000, "CONFIGS": ["fp32", "int8", "int8+5%lru", "int4+1%lfu"]},
        "03_speedup": {"DATA": "synthetic:tiny", "SAMPLES": 20_000, "BENCH_TABLES": "0.001",
                       "CONFIGS": ["fp32", "int8+5%lru"], "BATCH_SIZES": [128], "STEPS": 3, "REPEATS": 2, "CACHE_WARMUP": 20,
                       "LOOKUP_PRECISIONS": ["int8"], "LOOKUP_ROUNDS": 5, "TRAFFIC_BATCHES": 40,
                       "TRAFFIC_WARMUP": 10, "TRAFFIC_CONFIGS": [["int8", 0.05, "lru"]]},
        "04_cache_behaviour": {"DATA": "synthetic:tiny", "SAMPLES": 20_000, "BATCH_SIZE": 256, "BATCHES": 40,
                               "WARMUP": 8, "FRACTIONS": [0.01, 0.05, 0.2], "ASSOC_WAYS": [1, 8, 0],
                               "ZIPF_ROWS": 5_000, "ZIPF_EXPONENTS": [0.8, 1.2]},
        "05_dqrm": {"DATA": "synthetic:tiny", "SAMPLES": 20_000, "TRAIN_SAMPLES": 6_000, "EVAL_SAMPLES": 2_000,
                    "EMBEDDING_BITS": [8, 4], "PTQ_GRANULARITIES": ["row"], "SCALE_PERIODS": [1, 200],
                    "TIMING_ROUNDS": 2, "TIMING_MIN_STEPS": 200, "CURVE_SAMPLES": 8_000, "CURVE_EPOCHS": 2,
                    "COMM_MODES": ["sparse", "sparse-int8"], "COMM_TRAIN_SAMPLES": 1_000, "COMM_EVAL_SAMPLES": 1_000,
                    "SPEED_STEPS": 10, "MPC_CONFIGS": ["int8+5%lru"], "RUNS_DIR": ""},
        "06_inference_acceleration": {"STUDY": "quick"},
    },
    # Full Kaggle-size tables (33.8M rows) and 1M synthetic lines shared by every training
    # notebook; ~50 minutes on 2 cores (measured: see the README).
    "default": {
        "01_memory_reduction": {"MEASURE_SCALE": 1.0},
        "02_accuracy": {"DATA": "synthetic:full", "SAMPLES": 1_000_000, "TRAIN_SAMPLES": None, "SEEDS": [0, 1, 2],
                        "EVAL_EVERY": 1_000, "EVAL_SAMPLES": 20_000, "THREADS": 2,
                        "CONFIGS": ["fp32", "int8", "int4", "int8+5%lru", "int8+5%lfu", "int8+20%lru",
                                    "int4+1%lru", "int4+1%lfu", "int8+5%lru:nearest"]},
        "03_speedup": {"DATA": "synthetic:full", "SAMPLES": 1_000_000, "BENCH_TABLES": "kaggle", "REPEATS": 9},
        "04_cache_behaviour": {"DATA": "synthetic:full", "SAMPLES": 1_000_000},
        "05_dqrm": {"DATA": "synthetic:full", "SAMPLES": 1_000_000, "TRAIN_SAMPLES": 300_000, "EVAL_SAMPLES": None,
                    "THREADS": 2, "SCALE_PERIODS": [1, 200], "TIMING_ROUNDS": 4, "TIMING_MIN_STEPS": 400,
                    "CURVE_SAMPLES": 100_000, "CURVE_EPOCHS": 5, "COMM_MODES": ["none", "sparse", "sparse-int8"],
                    "COMM_TRAIN_SAMPLES": 10_000, "COMM_EVAL_SAMPLES": 20_000, "SPEED_STEPS": 40,
                    "RUNS_DIR": ""},
        "06_inference_acceleration": {"STUDY": "default"},
    },
    # The papers' scale: a full epoch of a Kaggle-size data set (45.8M lines), several seeds,
    # every configuration. Hours to days on 2 cores; meant for a bigger machine.
    "paper": {
        "01_memory_reduction": {"MEASURE_SCALE": 1.0},
        "02_accuracy": {"DATA": "synthetic:full", "SAMPLES": 45_840_617, "TRAIN_SAMPLES": None, "SEEDS": [0, 1, 2],
                        "EVAL_EVERY": 20_000, "EVAL_SAMPLES": 200_000},
        "03_speedup": {"DATA": "synthetic:full", "SAMPLES": 45_840_617, "BENCH_TABLES": "kaggle",
                       "REPEATS": 9, "TRAFFIC_BATCHES": 5_000, "TRAFFIC_WARMUP": 1_000},
        "04_cache_behaviour": {"DATA": "synthetic:full", "SAMPLES": 45_840_617, "BATCHES": 1_000, "WARMUP": 100},
        "05_dqrm": {"DATA": "synthetic:full", "SAMPLES": 45_840_617, "TRAIN_SAMPLES": None, "EVAL_SAMPLES": None,
                    "EPOCHS": 5, "SEEDS": [0, 1, 2], "THREADS": 0, "CURVE_SAMPLES": None, "CURVE_EPOCHS": 10,
                    "COMM_WORLD": 4, "COMM_TRAIN_SAMPLES": 1_000_000, "RUNS_DIR": "runs/05_dqrm_paper"},
        "06_inference_acceleration": {"STUDY": "paper"},
    },
}

# Notebooks whose DATA parameter --data replaces.
TAKES_DATA = {"02_accuracy", "03_speedup", "04_cache_behaviour", "05_dqrm"}


def parameters_for(notebook: str, profile: str, data: str | None = None) -> dict:
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    params = dict(PROFILES[profile].get(notebook, {}))
    if data is not None and notebook in TAKES_DATA:
        params["DATA"] = str(data)
        params.pop("SAMPLES", None)
    return params
