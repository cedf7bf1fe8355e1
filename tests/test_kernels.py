"""Every table-batched kernel (kernels/tbe_cpu.cpp, kernels/tbe.cu) against its pure-PyTorch
twin (mpc.embedding.ops.ReferenceOps) on random inputs: bytes must be identical."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from mpc import kernels
from mpc.embedding import ops, rng
from mpc.embedding.base import table_offsets
from mpc.embedding.config import EmbeddingConfig, Precision, Rounding

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))
DEVICES = ["cpu", CUDA]
PRECISIONS = list(Precision)
DIMS = [1, 3, 13, 16, 17, 32]


@pytest.fixture(scope="module")
def kops():
    module = kernels.load()
    if module is None:
        pytest.fail(f"kernels did not build: {kernels.build_error()}")
    return ops.KernelOps(module)


REF = ops.ReferenceOps()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def make_tables(precision, cards, dim, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(cards), dim, generator=g) * torch.rand(sum(cards), 1, generator=g)
    storage = REF.quantize_rows(precision, x, Rounding.NEAREST, 0, 0, torch.arange(len(x)), 0)
    return storage.to(device), table_offsets(cards).to(device)


def make_batch(cards, batch, seed, max_len=3, device="cpu"):
    """Jagged batch with empty bags and ids repeated within and across bags."""
    g = torch.Generator().manual_seed(seed)
    idx, off = [], [0]
    for c in cards:
        for _ in range(batch):
            n = int(torch.randint(0, max_len + 1, (), generator=g))
            idx += torch.randint(0, c, (n,), generator=g).tolist()
            off.append(len(idx))
    return torch.tensor(idx, dtype=torch.int64, device=device), torch.tensor(off, device=device)


CARDS = [7, 1, 40, 300, 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
def test_pool_matches_reference(kops, precision, dim, device):
    w, toff = make_tables(precision, CARDS, dim, seed=dim, device=device)
    indices, offsets = make_batch(CARDS, 11, seed=dim + 1, device=device)
    out = kops.pool(precision, w, toff, indices, offsets, dim)
    ref = REF.pool(precision, w, toff, indices, offsets, dim)
    assert out.shape == (11, len(CARDS), dim) and out.device.type == device
    assert torch.equal(as_bytes(out), as_bytes(ref))
    assert out.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP16, Precision.INT2], ids=lambda p: p.value)
def test_pool_reads_cached_rows(kops, precision, slot_dtype, device):
    dim = 16
    w, toff = make_tables(precision, CARDS, dim, seed=3, device=device)
    indices, offsets = make_batch(CARDS, 9, seed=4, device=device)
    rows = ops.global_rows(indices, offsets, toff)
    cache = torch.randn(20, dim, device=device)
    # a fixed row -> slot map for some rows (the same slot for every occurrence)
    slot_of_row = torch.full((int(toff[-1]),), -1, dtype=torch.int64, device=device)
    cached_rows = torch.unique(rows)[::2][:20]
    slot_of_row[cached_rows] = torch.randperm(20, device=device)[:len(cached_rows)]
    slots = slot_of_row[rows].to(slot_dtype)
    out = kops.pool(precision, w, toff, indices, offsets, dim, cache, slots)
    ref = REF.pool(precision, w, toff, indices, offsets, dim, cache, slots)
    plain = REF.pool(precision, w, toff, indices, offsets, dim)
    assert torch.equal(as_bytes(out), as_bytes(ref))
    assert not torch.equal(out, plain)   # the cache was really read


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", list(Rounding), ids=lambda r: r.value)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
def test_sgd_update_matches_reference(kops, precision, dim, rounding, device):
    w, toff = make_tables(precision, CARDS, dim, seed=5, device=device)
    indices, offsets = make_batch(CARDS, 13, seed=dim, device=device)
    g = torch.Generator().manual_seed(dim)
    grad = torch.randn(13, len(CARDS), dim, generator=g).to(device)
    w_kernel, w_ref = w.clone(), w.clone()
    kops.sgd_update(precision, w_kernel, toff, indices, offsets, grad, 0.25, dim, rounding, 11, 3)
    REF.sgd_update(precision, w_ref, toff, indices, offsets, grad, 0.25, dim, rounding, 11, 3)
    assert torch.equal(as_bytes(w_kernel), as_bytes(w_ref))
    rows = torch.unique(ops.global_rows(indices, offsets, toff)).cpu()
    untouched = torch.ones(len(w), dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(as_bytes(w_kernel[untouched.to(device)]), as_bytes(w[untouched.to(device)]))
    changed = (as_bytes(w_kernel) != as_bytes(w)).any(1)
    assert changed.sum() >= len(rows) // 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", [Precision.INT4, Precision.FP32, Precision.FP16], ids=lambda p: p.value)
def test_sgd_update_of_cached_rows(kops, precision, device):
    dim = 13
    w, toff = make_tables(precision, CARDS, dim, seed=8, device=device)
    indices, offsets = make_batch(CARDS, 10, seed=9, device=device)
    rows = ops.global_rows(indices, offsets, toff)
    uniq = torch.unique(rows)
    slot_of_row = torch.full((int(toff[-1]),), -1, dtype=torch.int64, device=device)
    slot_of_row[uniq[1::3]] = torch.arange(len(uniq[1::3]), device=device) + 2
    slots = slot_of_row[rows]
    cache = torch.randn(len(uniq) + 2, dim, device=device)
    grad = torch.randn(10, len(CARDS), dim, device=device)
    results = []
    for impl in (kops, REF):
        wc, cc = w.clone(), cache.clone()
        impl.sgd_update(precision, wc, toff, indices, offsets, grad, 0.5, dim, Rounding.STOCHASTIC, 1, 2,
                        cc, slots)
        results.append((wc, cc))
    (wk, ck), (wr, cr) = results
    assert torch.equal(as_bytes(wk), as_bytes(wr)) and torch.equal(ck, cr)
    # cached rows changed in the cache only; their stored bytes are untouched
    cached_rows = uniq[1::3]
    assert torch.equal(as_bytes(wk[cached_rows]), as_bytes(w[cached_rows]))
    assert not torch.equal(ck[2:2 + len(cached_rows)], cache[2:2 + len(cached_rows)])
    assert torch.equal(ck[:2], cache[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", list(Rounding), ids=lambda r: r.value)
@pytest.mark.parametrize("dim", [1, 5, 16])
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
def test_quantize_and_dequantize_rows_match_reference(kops, precision, dim, rounding, device):
    x = (torch.randn(50, dim) * torch.rand(50, 1) * 3).to(device)
    x[3] = 0.7                                  # a constant row
    rows = torch.randint(0, 10**6, (50,)).to(device)
    q_kernel = kops.quantize_rows(precision, x, rounding, 5, 9, rows, rng.PURPOSE_WRITEBACK)
    q_ref = REF.quantize_rows(precision, x, rounding, 5, 9, rows, rng.PURPOSE_WRITEBACK)
    assert q_kernel.dtype == q_ref.dtype and torch.equal(as_bytes(q_kernel), as_bytes(q_ref))
    d_kernel = kops.dequantize_rows(precision, q_kernel, dim)
    assert torch.equal(d_kernel, REF.dequantize_rows(precision, q_ref, dim))


@pytest.mark.parametrize("rounding", list(Rounding), ids=lambda r: r.value)
@pytest.mark.parametrize("dim", [5, 8, 16, 24, 64])
@pytest.mark.parametrize("precision", [Precision.INT8, Precision.INT4], ids=lambda p: p.value)
def test_rows_match_reference_on_edge_values(kops, precision, dim, rounding):
    """Scalar and AVX2 paths (INT8/INT4, dim % 8 == 0) on rows that stress the rounding rules."""
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(64, dim, generator=g) * 10 ** torch.randint(-6, 4, (64, 1), generator=g).float()
    x[0] = 0.0
    x[1] = -0.0
    x[2, ::2] = -0.0                             # signed zeros: the bias keeps its sign
    x[3] = 1e-30                                 # a constant, tiny row
    x[4, 0], x[4, 1] = 3e38, -3e38               # range overflows to inf
    x[5, 3] = float("nan")                       # a NaN makes scale and bias NaN, every code 0
    x[6] = torch.arange(dim, dtype=torch.float32) # exact code boundaries (ties under nearest)
    rows = torch.randint(0, 2**40, (64,), generator=g)
    q_kernel = kops.quantize_rows(precision, x, rounding, 3, 7, rows, rng.PURPOSE_UPDATE)
    q_ref = REF.quantize_rows(precision, x, rounding, 3, 7, rows, rng.PURPOSE_UPDATE)
    assert torch.equal(as_bytes(q_kernel), as_bytes(q_ref))
    d_kernel = kops.dequantize_rows(precision, q_kernel, dim)
    d_ref = REF.dequantize_rows(precision, q_ref, dim)
    assert torch.equal(d_kernel.isnan(), d_ref.isnan())
    assert torch.equal(d_kernel.nan_to_num(), d_ref.nan_to_num())


def test_stochastic_rounding_depends_on_seed_step_row_and_purpose(kops):
    x = torch.randn(40, 16)
    rows = torch.arange(40)
    base = kops.quantize_rows(Precision.INT4, x, Rounding.STOCHASTIC, 1, 1, rows, 0)
    for args in [(2, 1, rows, 0), (1, 2, rows, 0), (1, 1, rows + 1, 0), (1, 1, rows, 1)]:
        assert not torch.equal(kops.quantize_rows(Precision.INT4, x, Rounding.STOCHASTIC, *args), base)
    assert torch.equal(kops.quantize_rows(Precision.INT4, x, Rounding.STOCHASTIC, 1, 1, rows, 0), base)


@pytest.mark.parametrize("batch", [37, 3000])  # 37: the pool's block size changes with the threads
def test_results_do_not_depend_on_thread_count(kops, batch):
    cards, dim = [50, 5000, 3], 16
    out = {}
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w, toff = make_tables(Precision.INT8, cards, dim, seed=1)
            indices, offsets = make_batch(cards, batch, seed=2, max_len=2)
            grad = torch.randn(batch, len(cards), dim, generator=torch.Generator().manual_seed(3))
            pooled = kops.pool(Precision.INT8, w, toff, indices, offsets, dim)
            kops.sgd_update(Precision.INT8, w, toff, indices, offsets, grad, 0.1, dim,
                            Rounding.STOCHASTIC, 0, 1)
            out[threads] = (pooled, w)
        finally:
            torch.set_num_threads(saved)
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_id", [300, -1, 10**12])
def test_out_of_range_ids_raise_and_change_nothing(kops, bad_id, device):
    dim = 4
    w, toff = make_tables(Precision.INT8, CARDS, dim, seed=0, device=device)
    indices, offsets = make_batch(CARDS, 5, seed=6, device=device)
    # put the bad id into table 3 (C4, 300 rows)
    pos = int(offsets[3 * 5])
    assert int(offsets[4 * 5]) > pos
    indices[pos] = bad_id
    msg = rf"id {bad_id} out of range for table 3 \(C4, 300 rows\)"
    for impl in (kops, REF):
        with pytest.raises(ValueError, match=msg):
            impl.pool(Precision.INT8, w, toff, indices, offsets, dim)
        before = w.clone()
        with pytest.raises(ValueError, match=msg):
            impl.sgd_update(Precision.INT8, w, toff, indices, offsets, torch.ones(5, 5, dim, device=device),
                            0.1, dim, Rounding.NEAREST, 0, 0)
        assert torch.equal(w, before)


def test_bad_offsets_and_shapes_raise(kops):
    dim = 4
    w, toff = make_tables(Precision.INT4, CARDS, dim, seed=0)
    indices, offsets = make_batch(CARDS, 5, seed=6)
    bad = offsets.clone()
    bad[7] = bad[9] + 1                             # decreasing inside
    with pytest.raises(ValueError, match="non-decreasing"):
        kops.pool(Precision.INT4, w, toff, indices, bad, dim)
    with pytest.raises(RuntimeError, match="T\\*B\\+1"):
        kops.pool(Precision.INT4, w, toff, indices, offsets[:-1], dim)
    with pytest.raises(RuntimeError, match="weights"):
        kops.pool(Precision.INT8, w, toff, indices, offsets, dim)          # wrong row width
    with pytest.raises(RuntimeError, match="indices"):
        kops.pool(Precision.INT4, w, toff, indices.int(), offsets, dim)
    with pytest.raises(RuntimeError, match="grad_out"):
        kops.sgd_update(Precision.INT4, w, toff, indices, offsets, torch.ones(5, 5, dim + 1), 0.1, dim,
                        Rounding.NEAREST, 0, 0)
    with pytest.raises(RuntimeError, match="slot"):
        kops.pool(Precision.INT4, w, toff, indices, offsets, dim, torch.zeros(3, dim),
                  torch.full((len(indices),), 3))


def test_inconsistent_slots_raise(kops):
    dim = 4
    w, toff = make_tables(Precision.INT8, [3], dim, seed=0)
    indices, offsets = torch.tensor([1, 1, 2]), torch.tensor([0, 2, 3])
    slots = torch.tensor([0, 1, -1])
    for impl in (kops, REF):
        with pytest.raises(ValueError, match="same slot"):
            impl.sgd_update(Precision.INT8, w, toff, indices, offsets, torch.ones(2, 1, dim), 0.1, dim,
                            Rounding.NEAREST, 0, 0, torch.zeros(2, dim), slots)


def test_empty_batch(kops):
    w, toff = make_tables(Precision.INT2, CARDS, 8, seed=0)
    indices, offsets = torch.zeros(0, dtype=torch.int64), torch.zeros(len(CARDS) * 4 + 1, dtype=torch.int64)
    out = kops.pool(Precision.INT2, w, toff, indices, offsets, 8)
    assert out.shape == (4, len(CARDS), 8) and not out.any()
    before = w.clone()
    kops.sgd_update(Precision.INT2, w, toff, indices, offsets, torch.ones(4, len(CARDS), 8), 0.1, 8,
                    Rounding.STOCHASTIC, 0, 0)
    assert torch.equal(w, before)


def test_loader_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setenv("MPC_REQUIRE_KERNELS", "0")

    def broken_build():
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(kernels, "_build", broken_build)
    config = EmbeddingConfig(cardinalities=CARDS, dim=4, kind="int8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.for_config(config)
        second = ops.for_config(config)
    assert isinstance(first, ops.ReferenceOps) and isinstance(second, ops.ReferenceOps)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "compiler exploded" in str(runtime[0].message)
    w, toff = make_tables(Precision.INT8, CARDS, 4, seed=0)
    indices, offsets = make_batch(CARDS, 3, seed=1)
    assert torch.equal(first.pool(Precision.INT8, w, toff, indices, offsets, 4),
                       REF.pool(Precision.INT8, w, toff, indices, offsets, 4))
    # and when kernels are required, the failure is an error
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setenv("MPC_REQUIRE_KERNELS", "1")
    with pytest.raises(RuntimeError, match="failed to build"):
        kernels.load()


def test_use_kernels_false_selects_reference():
    config = EmbeddingConfig(cardinalities=CARDS, dim=4, kind="int8", use_kernels=False)
    assert isinstance(ops.for_config(config), ops.ReferenceOps)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    sources = kernels.sources()["cu"]
    assert any(f.name == "tbe.cu" for f in sources)
    for src in sources:
        result = subprocess.run(["nvcc", "-c", "-arch=sm_90", *kernels.CUDA_FLAGS, "-I", str(kernels.KERNEL_DIR),
                                 str(src), "-o", str(tmp_path / (src.stem + ".o"))],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{src.name}:\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None or sys.platform != "linux", reason="needs a C++ compiler")
def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """tbe_cuda.cpp is only built with a CUDA torch; check its syntax here anyway.

    The CPU wheel ships the c10/cuda headers but not the one CMake generates; an empty
    stand-in suffices for a syntax check. Needs the CUDA runtime headers (nvcc's).
    """
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip("no CUDA toolkit headers")
    cuda_include = found[0]
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from torch.utils.cpp_extension import include_paths

    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-I", str(tmp_path)]
    for path in include_paths() + [sysconfig.get_paths()["include"], str(cuda_include), str(kernels.KERNEL_DIR)]:
        cmd += ["-I", str(path)]
    for src in [kernels.KERNEL_DIR / "tbe_cuda.cpp"]:
        result = subprocess.run(cmd + ["-include", "torch/extension.h", str(src)], capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{src.name}:\n{result.stderr[-3000:]}"


def test_lookup_benchmark_runs_and_records_ratios(tmp_path, capsys):
    import json

    from mpc.cli import main

    out = tmp_path / "lookup"
    assert main(["bench", "lookup", "--cardinalities", "0.0002", "--batch", "64", "--rounds", "2",
                 "--warmup", "1", "--threads", "1", "--bandwidth-mib", "16", "--precisions", "int8", "fp32",
                 "--record-name", str(out)]) == 0
    rec = json.loads((tmp_path / "lookup.json").read_text())
    for p in ("int8", "fp32"):
        r = rec["results"][p]
        assert r["ratio_vs_torch"] > 0 and r["lookup_per_second"]["mpc"] > 0
        assert set(r["update_ratio"]) >= {"mpc", "pytorch reference"}
    assert "torch index_add_" in rec["results"]["fp32"]["update_ratio"]
    assert "lookup vs torch" in capsys.readouterr().out
    assert main(["bench", "lookup", "--cardinalities", "lots"]) == 2
    assert "--cardinalities must be" in capsys.readouterr().err
