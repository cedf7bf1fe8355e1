"""Provenance and safe output: git commit, machine, versions, atomic writes.

Every figure in results/ must say where it came from; every output file must be
either complete or absent. These helpers give both.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checked-out commit, with '-dirty' when the code has uncommitted changes.

    Changes under results/ do not count: they are this kind of record (a benchmark run
    rewrites the committed records one after the other).
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What ran it: CPU, core count, memory, OS, Python, torch, GPU if any."""
    import torch

    info = {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    ram = ram_bytes()
    if ram is not None:
        info["memory_gib"] = round(ram / 2**30, 1)
    return info


def ram_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def provenance() -> dict:
    """The block every result file carries."""
    return {
        "commit": git_commit(),
        "machine": machine_info(),
        "cpu_settings": _cpu_settings(),
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_settings() -> dict:
    from mpc.cpu_settings import cpu_settings

    return cpu_settings()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss as a fallback).

    ru_maxrss of a child started by fork+exec can include its parent's peak, so the
    kernel's own high-water mark is read first.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _default_mode() -> int:
    """0o666 minus the umask: what open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    if hasattr(o, "value"):  # enums
        return o.value
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder beside `final`; rename it to `final` only on success.

    An interrupted or failed run leaves no folder at `final` (and removes the
    temporary one), so nothing half-written ever looks complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        from mpc.errors import UserError

        raise UserError(f"{final}: output folder already exists (choose another --out or remove it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
