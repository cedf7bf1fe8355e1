"""mpc.cpu_settings: applied once, recorded in every result's provenance, switchable off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SNIPPET = """
import json, torch
from mpc.cpu_settings import tune_cpu
from mpc.runinfo import provenance
before = float(torch.tensor([1e-30], dtype=torch.float32) * 1e-10)  # read before DAZ is on
info = tune_cpu()
after = torch.tensor([1e-30], dtype=torch.float32) * 1e-10
print(json.dumps({"info": info, "again": tune_cpu(), "before": before, "after": float(after),
                  "provenance": provenance()["cpu_settings"]}))
"""


def _run(tuning: str) -> dict:
    env = dict(os.environ, MPC_CPU_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuning_flushes_denormals_and_tunes_malloc():
    r = _run("1")
    assert r["info"]["malloc_tuned"] is True          # glibc on this machine
    assert r["info"]["flush_denormal"] is True
    assert r["before"] > 0.0 and r["after"] == 0.0     # 1e-40 is denormal: flushed once tuned
    assert r["again"] == r["info"] == r["provenance"]  # idempotent, and recorded


def test_tuning_can_be_switched_off():
    r = _run("0")
    assert r["info"] == {"malloc_tuned": False, "flush_denormal": False, "mmap_threshold": None}
    assert r["after"] > 0.0
