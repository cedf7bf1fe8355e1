"""CPU settings for training and benchmarks: keep freed memory, flush denormals.

Two process-wide settings that PyTorch's CPU performance guide recommends and that
`tune_cpu()` applies once (the trainer and every benchmark call it, so all contenders of
a benchmark run in one process under the same settings):

- malloc: a DLRM step at batch 2048 allocates and frees tens of MB of activations and
  gradients. With glibc's defaults, blocks above the (adaptive) mmap threshold go back
  to the kernel when freed and are page-faulted in again, zero-filled, on the next
  step: about a fifth of the step time here. The guide's answer is a caching allocator
  (jemalloc/tcmalloc via LD_PRELOAD); raising glibc's mmap and trim thresholds with
  mallopt(3) has the same effect in-process.
- denormals: as training goes on, some gradients and activations become denormal
  floats, which x86 handles in microcode: the MLP's matrix products of one run were
  seen to take 35-50% longer than another's of the same shape. torch.set_flush_denormal
  (FTZ/DAZ) treats them as zero; the change to the values is below 1e-38.

MPC_CPU_TUNING=0 leaves both as they are (the test suite runs that way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD_BYTES = 1 << 30    # free memory kept at the heap's top before returning it

_state: dict[str, object] = {"malloc_tuned": None, "flush_denormal": None}


def _tune_malloc() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def tune_cpu() -> dict:
    """Apply the settings once per process (see the module doc); what is in effect."""
    if _state["malloc_tuned"] is None:
        enabled = os.environ.get("MPC_CPU_TUNING", "1") != "0"
        _state["malloc_tuned"] = enabled and _tune_malloc()
        if enabled:
            import torch

            _state["flush_denormal"] = bool(torch.set_flush_denormal(True))
        else:
            _state["flush_denormal"] = False
    return cpu_settings()


def cpu_settings() -> dict:
    """What the run used, for the records."""
    return {"malloc_tuned": bool(_state["malloc_tuned"]), "flush_denormal": bool(_state["flush_denormal"]),
            "mmap_threshold": MMAP_THRESHOLD_BYTES if _state["malloc_tuned"] else None}
