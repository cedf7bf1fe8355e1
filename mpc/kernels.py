"""The one loader of the C++/CUDA kernels in kernels/, compiled with load_inline.

- Compiles on first use (`load()`), never at import.
- Caches builds outside the repository: $MPC_BUILD_DIR, else ~/.cache/mpc/extensions,
  under a name that hashes the sources, flags, torch version and CPU, so a changed
  kernel or machine gets a fresh build and an unchanged one loads in a second.
- Falls back to the pure-PyTorch reference with a one-line warning when the build is
  impossible (no compiler, no ninja). Set MPC_REQUIRE_KERNELS=1 to make that an error
  instead (the tests do, where a compiler exists, so a broken kernel cannot hide).

Layout of kernels/:
    *.h          shared inline code (row formats, the rounding hash), included by both
                 the .cpp and .cu files (kernels/ is on the include path).
    *.cpp        CPU kernels and their Python bindings (always built). A line
                 `// export: name1 name2` declares the functions to bind.
    *.cu         CUDA kernels with plain C launchers (no torch headers: CI checks them
                 with `nvcc -c` on machines without a GPU).
    *_cuda.cpp   host-side bindings that call the .cu launchers; built only when
                 torch has CUDA and a GPU is present.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from mpc.runinfo import REPO_ROOT, _cpu_model

log = logging.getLogger(__name__)

KERNEL_DIR = REPO_ROOT / "kernels"
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=off", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "--fmad=false"]

_lock = threading.Lock()
_module = None
_error: str | None = None


def build_root() -> Path:
    root = os.environ.get("MPC_BUILD_DIR") or Path.home() / ".cache" / "mpc" / "extensions"
    return Path(root)


def _exports(source: str) -> list[str]:
    names = []
    for m in re.finditer(r"^//\s*export:\s*(.+)$", source, flags=re.M):
        names.extend(m.group(1).split())
    return names


def _with_cuda() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def sources() -> dict[str, list[Path]]:
    files = sorted(KERNEL_DIR.glob("*.cpp"))
    return {
        "cpp": [f for f in files if not f.name.endswith("_cuda.cpp")],
        "cuda_cpp": [f for f in files if f.name.endswith("_cuda.cpp")],
        "cu": sorted(KERNEL_DIR.glob("*.cu")),
        "h": sorted(KERNEL_DIR.glob("*.h")),
    }


def _build():
    from torch.utils.cpp_extension import load_inline

    src = sources()
    if not src["cpp"]:
        raise RuntimeError(f"no kernel sources in {KERNEL_DIR}")
    use_cuda = _with_cuda() and bool(src["cu"])
    cpp_files = src["cpp"] + (src["cuda_cpp"] if use_cuda else [])
    cpp = [f.read_text() for f in cpp_files]
    cu = [f.read_text() for f in src["cu"]] if use_cuda else []
    functions = [n for text in cpp for n in _exports(text)]
    h = hashlib.sha256()
    headers = [f.read_text() for f in src["h"]]
    for text in cpp + cu + headers + [" ".join(CFLAGS + CUDA_FLAGS), torch.__version__, _cpu_model()]:
        h.update(text.encode())
    name = f"mpc_kernels_{h.hexdigest()[:16]}"
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("building kernels %s in %s (first use; takes a minute)", name, build_dir)
    return load_inline(
        name=name,
        cpp_sources=cpp,
        cuda_sources=cu or None,
        functions=functions,
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        extra_cuda_cflags=CUDA_FLAGS if cu else None,
        build_directory=str(build_dir),
        extra_include_paths=[str(KERNEL_DIR)],
        with_cuda=use_cuda,
        verbose=False,
    )


def _put_venv_bin_on_path() -> None:
    """`pip install ninja` puts ninja beside the interpreter; find it there too."""
    bindir = Path(sys.executable).parent
    if shutil.which("ninja") is None and (bindir / "ninja").exists():
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def required() -> bool:
    return os.environ.get("MPC_REQUIRE_KERNELS", "") not in ("", "0")


def load():
    """The compiled kernel module, or None (with one warning) when it cannot be built."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is None:
            try:
                _put_venv_bin_on_path()
                if shutil.which("ninja") is None:
                    raise RuntimeError("ninja is not on PATH (pip install ninja; put the venv's bin on PATH)")
                _module = _build()
                return _module
            except Exception as e:  # compiler missing or build failed
                _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                if required():
                    raise RuntimeError(f"mpc kernels failed to build: {e}") from e
                warnings.warn(f"mpc: C++ kernels unavailable ({_error}); using the PyTorch reference",
                              RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    return load() is not None


def build_error() -> str | None:
    return _error
