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
    },
    "default": {
        "01_memory_reduction": {"MEASURE_SCALE": 1.0},
    },
    "paper": {
        "01_memory_reduction": {"MEASURE_SCALE": 1.0},
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
