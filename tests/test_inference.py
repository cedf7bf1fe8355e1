"""Inference exports and the acceleration study (mpc.inference; PAPERS.md §3)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mpc.embedding import CacheConfig, EmbeddingConfig, jagged_from_dense, ops, quant
from mpc.embedding.config import Precision, Rounding
from mpc.errors import UserError
from mpc.inference import export as ex
from mpc.inference import costs, study, timing, workload
from mpc.inference.export import Runtime, compile_model, runtime_info, supports
from mpc.inference.module import GatherLookup, InferenceDLRM, LookupKind, TableStorage, pair_index, table_storage
from mpc.model import DLRM, DLRMConfig
from mpc.train import sgd_step

CARDS = (11, 5, 40, 3, 17)
DIM = 6
EXPORT_RUNTIMES = [Runtime.TORCH_EXPORT, Runtime.TORCH_COMPILE, Runtime.ONNXRUNTIME, Runtime.OPENVINO]


def _config(kind="fp32", dim=DIM, cards=CARDS, emb=None, **kw) -> DLRMConfig:
    """emb: EmbeddingConfig fields beyond kind (e.g. options, cache)."""
    n = len(cards) + 1
    emb = EmbeddingConfig(cardinalities=cards, dim=dim, kind=kind, seed=1, **(emb or {}))
    return DLRMConfig(embedding=emb, bottom_mlp=(13, 24, dim), top_mlp=(dim + n * (n - 1) // 2, 16, 1),
                      seed=2, **kw)


def _batch(B, seed=0, cards=CARDS):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, 13, generator=g) * 3
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in cards], 1)
    return dense, cat


def _trained(kind: str, steps: int = 2, **emb) -> DLRM:
    """A DLRM whose tables moved away from their initial bytes (fused SGD, stochastic rounding)."""
    model = DLRM(_config(kind, emb=emb))
    model.embedding.set_learning_rate(0.5)
    opt = torch.optim.SGD(model.dense_parameters(), lr=0.1)
    for s in range(steps):
        dense, cat = _batch(32, seed=10 + s)
        label = (torch.rand(32, generator=torch.Generator().manual_seed(s)) < 0.3).float()
        sgd_step(model, opt, dense, *jagged_from_dense(cat), label)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return {kind: _trained(kind) for kind in ("fp32", "int8", "int4")}


def _eager(model, dense, cat):
    """The training model's logits, its interaction in torch ops (bmm, as the inference
    module computes it; the compiled interaction differs in the last bits and is
    compared with those ops in tests/test_model.py)."""
    use = model.interaction.use_kernels
    model.interaction.use_kernels = False
    try:
        with torch.no_grad():
            return model.forward_onehot(dense, cat)
    finally:
        model.interaction.use_kernels = use


# --- the inference module ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("lookup", list(LookupKind))
def test_inference_module_equals_training_model(trained, kind, lookup):
    model = trained[kind]
    dense, cat = _batch(9, seed=3)
    want = _eager(model, dense, cat)
    module = InferenceDLRM.from_model(model, lookup=lookup)
    assert module.precision is Precision(kind) and module.lookup_kind is lookup
    with torch.no_grad():
        got = module(dense, cat)
    # gather and mpc's kernels do the same float operations as the training model (one
    # row per bag, scale * q + bias); FBGEMM's quantized ops may fuse the multiply-add.
    tol = {"rtol": 1e-5, "atol": 1e-6} if lookup is LookupKind.TORCH_OPS and kind != "fp32" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tables_keep_the_trained_bytes(trained, kind):
    backend = trained[kind].embedding
    tables = table_storage(backend)
    assert torch.equal(tables.storage, backend.weights)
    module = InferenceDLRM.from_model(trained[kind])
    values, scale, bias = quant.split_rows(backend.weights, Precision(kind), DIM)
    assert torch.equal(module.lookup.values, values)
    assert torch.equal(module.lookup.scale[:, 0], scale) and torch.equal(module.lookup.bias[:, 0], bias)


def test_fp32_model_is_quantized_post_training_like_the_lowp_backend(trained):
    from mpc.embedding.lowp import QuantizedEmbeddingBag

    model = trained["fp32"]
    w = model.embedding.to_float()
    assert torch.equal(table_storage(model.embedding, "int8").storage,
                       quant.quantize_rows(w, Precision.INT8, Rounding.NEAREST))
    lowp = DLRM(model.config, embedding=QuantizedEmbeddingBag.from_float(w, model.config.embedding.replace(kind="int4")))
    lowp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")}, strict=False)
    dense, cat = _batch(8, seed=4)
    with torch.no_grad():
        got = InferenceDLRM.from_model(model, "int4")(dense, cat)
        fp32 = model.forward_onehot(dense, cat)
    torch.testing.assert_close(got, _eager(lowp.eval(), dense, cat), rtol=0, atol=0)
    assert not torch.equal(got, fp32)  # it really is the INT4 model


# Backends that evaluate with something other than their stored buffer: QAT (the
# fake-quantized q * s, not the FP32 masters), PTQ (the quantized copy) and the cache
# (cached FP32 rows in front of the stored rows).
QUANTIZED_EVAL = {"qat4": ("qat", {"bits": 4, "scale_period": 1}), "qat8": ("qat", {"bits": 8}),
                  "qat16": ("qat", {"bits": 16}),
                  "ptq_row": ("ptq", {"bits": 4, "granularity": "row"}),
                  "ptq_table": ("ptq", {"bits": 4, "granularity": "table"})}
QUANTIZED_EVAL_PRECISION = {"qat4": Precision.INT4, "qat8": Precision.INT8, "qat16": Precision.FP32,
                            "ptq_row": Precision.INT4, "ptq_table": Precision.FP32}


@pytest.fixture(scope="module")
def quantized_eval():
    models = {name: _trained(kind, steps=3, options=opts) for name, (kind, opts) in QUANTIZED_EVAL.items()}
    models["cached"] = _trained("int8", steps=3, cache={"fraction": 0.1, "policy": "lru"})
    return models


def _state_copy(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module, before) -> bool:
    after = module.state_dict()
    return set(after) == set(before) and all(
        a.dtype == before[k].dtype and torch.equal(a, before[k]) for k, a in after.items())


@pytest.mark.parametrize("name", list(QUANTIZED_EVAL))
def test_qat_and_ptq_export_what_evaluation_reads(quantized_eval, name):
    model = quantized_eval[name]
    before = _state_copy(model)
    own, tables = model.embedding.inference_tables()
    assert own is QUANTIZED_EVAL_PRECISION[name]
    # the stored format holds the evaluated tables exactly (QAT: q * s, fp16-exact scales)
    if name.startswith("qat"):
        want_tables = model.embedding.to_float()
    else:
        want_tables = quant.dequantize_rows(model.embedding.quantized(), own, DIM)
    torch.testing.assert_close(quant.dequantize_rows(tables, own, DIM), want_tables, rtol=0, atol=0)
    dense, cat = _batch(64, seed=3)
    want = _eager(model, dense, cat)
    module = InferenceDLRM.from_model(model)                  # the default gather lookup
    assert module.precision is own
    with torch.no_grad():
        got = module(dense, cat)
        # FP32 asked: the same values, dequantized
        as_fp32 = InferenceDLRM.from_model(model, "fp32")(dense, cat)
    torch.testing.assert_close(got, want, **ex.OUTPUT_TOLERANCE)
    torch.testing.assert_close(got, want, rtol=0, atol=0)     # in fact the same float operations
    torch.testing.assert_close(as_fp32, want, **ex.OUTPUT_TOLERANCE)
    # another precision: post-training quantization of the evaluated tables, not of the masters
    other = Precision.INT4 if own is Precision.INT8 else Precision.INT8
    assert torch.equal(table_storage(model.embedding, other).storage,
                       quant.quantize_rows(want_tables, other, Rounding.NEAREST))
    assert torch.equal(table_storage(model.embedding, own).storage, tables)
    assert _same_state(model, before)


def test_qat_export_is_not_the_fp32_masters(quantized_eval):
    """The trap: QAT's `weights` buffer is FP32 of the right shape, but it is not what the
    model evaluates with."""
    model = quantized_eval["qat4"]
    masters = model.embedding.weights
    assert not torch.equal(quant.dequantize_rows(table_storage(model.embedding).storage, Precision.INT4, DIM),
                           masters)
    dense, cat = _batch(64, seed=3)
    from mpc.embedding.fp32 import FP32EmbeddingBag

    naive = DLRM(model.config, embedding=FP32EmbeddingBag(model.config.embedding.replace(kind="fp32"),
                                                          masters.clone()))
    naive.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")},
                          strict=False)
    assert (_eager(naive.eval(), dense, cat) - _eager(model, dense, cat)).abs().max() > ex.OUTPUT_TOLERANCE["atol"]


@pytest.mark.parametrize("name", ["qat4", "ptq_row"])
def test_quantized_eval_export_through_torch_export(quantized_eval, name):
    model = quantized_eval[name]
    compiled = compile_model(InferenceDLRM.from_model(model), Runtime.TORCH_EXPORT, _batch(4, seed=5), threads=1)
    dense, cat = _batch(7, seed=9)
    torch.testing.assert_close(compiled(dense, cat), _eager(model, dense, cat), **ex.OUTPUT_TOLERANCE)


def test_cached_backend_exports_its_written_back_rows_without_changing(quantized_eval):
    import copy

    from mpc.embedding.lowp import QuantizedEmbeddingBag

    model = quantized_eval["cached"]
    backend = model.embedding
    assert type(backend).__name__ == "CachedQuantizedEmbeddingBag"
    assert int((backend.cache.tags >= 0).sum()) > 0                       # the cache holds rows
    before = _state_copy(model)
    own, tables = backend.inference_tables()
    assert own is Precision.INT8 and not torch.equal(tables, backend.weights)  # cached rows moved on
    flushed = copy.deepcopy(backend)
    flushed.flush()
    assert torch.equal(tables, flushed.weights)                           # as flush() writes them
    module = InferenceDLRM.from_model(model)
    assert torch.equal(table_storage(backend).storage, tables)
    assert _same_state(model, before)                                     # nothing flushed
    # equal to an uncached INT8 DLRM holding those rows; exactly (tolerance 0): the gather
    # lookup does the INT8 pool's float operations
    plain = DLRM(model.config, embedding=QuantizedEmbeddingBag(backend.config.replace(cache=CacheConfig()),
                                                               tables.clone()))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")},
                          strict=False)
    dense, cat = _batch(64, seed=3)
    with torch.no_grad():
        got = module(dense, cat)
    torch.testing.assert_close(got, _eager(plain.eval(), dense, cat), rtol=0, atol=0)
    # and close to the cached model itself, whose cached rows are still FP32
    assert (got - _eager(model, dense, cat)).abs().max() < 0.05
    assert _same_state(model, before)


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("dim", [5, 8])
def test_gather_lookup_matches_the_reference_pool(precision, dim):
    cards = (7, 13, 4)
    g = torch.Generator().manual_seed(dim)
    weights = torch.randn(sum(cards), dim, generator=g)
    storage = quant.quantize_rows(weights, precision, Rounding.NEAREST)
    starts = torch.tensor([0, 7, 20, 24])
    cat = torch.stack([torch.randint(0, c, (6,), generator=g) for c in cards], 1)
    got = GatherLookup(TableStorage(precision, storage, starts, dim))(cat)
    want = ops.ReferenceOps.pool(precision, storage, starts, *jagged_from_dense(cat), dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pair_index_is_the_strict_lower_triangle_row_major():
    assert pair_index(4).tolist() == [1 * 4 + 0, 2 * 4 + 0, 2 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2]


def test_quantized_mlp_layers_become_plain_linear():
    model = DLRM(_config(mlp_bits=4)).eval()
    assert any(type(m).__name__ == "QuantLinear" for m in model.modules())
    module = InferenceDLRM.from_model(model)
    assert all(type(m) is nn.Linear for m in module.modules() if isinstance(m, nn.Linear))
    dense, cat = _batch(5)
    with torch.no_grad():
        torch.testing.assert_close(module(dense, cat), _eager(model, dense, cat), rtol=0, atol=0)


# --- exports ---------------------------------------------------------------------------

def _need(runtime: Runtime):
    info = runtime_info(runtime)
    if not info.available:
        pytest.skip(f"{runtime.value} not installed: {info.reason}")


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("runtime", EXPORT_RUNTIMES, ids=lambda r: r.value)
def test_export_equals_eager(trained, runtime, kind, tmp_path):
    _need(runtime)
    model = trained[kind]
    module = InferenceDLRM.from_model(model)
    compiled = compile_model(module, runtime, _batch(4, seed=5), workdir=tmp_path, threads=1)
    assert compiled.runtime is runtime and compiled.version == runtime_info(runtime).version
    # Batch sizes other than the example's: the batch axis is dynamic (torch.compile
    # builds for static shapes and recompiles once for a new size: one is enough here).
    for B in (7,) if runtime is Runtime.TORCH_COMPILE else (7, 1):
        dense, cat = _batch(B, seed=6 + B)
        got = compiled(dense, cat)
        assert got.shape == (B,) and got.dtype == torch.float32
        torch.testing.assert_close(got, _eager(model, dense, cat), **ex.OUTPUT_TOLERANCE)
    if runtime is not Runtime.TORCH_COMPILE:
        assert compiled.artifacts and all(p.exists() and p.parent == tmp_path / runtime.value
                                          for p in compiled.artifacts)
        assert [p.name for p in tmp_path.iterdir()] == [runtime.value]  # no partial folders left


@pytest.mark.parametrize("runtime", [Runtime.TORCH_EXPORT, Runtime.TORCH_COMPILE], ids=lambda r: r.value)
def test_torch_quantized_ops_export(trained, runtime):
    model = trained["int8"]
    module = InferenceDLRM.from_model(model, lookup=LookupKind.TORCH_OPS)
    compiled = compile_model(module, runtime, _batch(4, seed=5), threads=1)
    dense, cat = _batch(6, seed=8)
    torch.testing.assert_close(compiled(dense, cat), _eager(model, dense, cat), **ex.OUTPUT_TOLERANCE)


def test_onnx_weights_live_in_external_data(tmp_path):
    _need(Runtime.ONNXRUNTIME)
    import onnx

    cards = (20_000, 5)
    model = DLRM(_config(cards=cards, dim=8)).eval()
    module = InferenceDLRM.from_model(model)
    files = ex.export_onnx(module, _batch(2, cards=cards), tmp_path / "m.onnx")
    table_bytes = sum(cards) * 8 * 4
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert files[0].stat().st_size < table_bytes // 10 <= files[1].stat().st_size
    proto = onnx.load(str(files[0]), load_external_data=False)
    big = [t for t in proto.graph.initializer if list(t.dims) == [sum(cards), 8]]
    assert big and big[0].data_location == onnx.TensorProto.EXTERNAL


def test_failed_build_leaves_no_files(trained, tmp_path, monkeypatch):
    def broken(module, example, folder, threads):
        (folder / "model.pt2").write_bytes(b"half")
        raise RuntimeError("exporter crashed\nwith a long trace")

    monkeypatch.setitem(ex._BUILDERS, Runtime.TORCH_EXPORT, broken)
    module = InferenceDLRM.from_model(trained["fp32"])
    with pytest.raises(UserError, match="^export to torch_export failed for the gather lookup at fp32: "
                                        "exporter crashed$"):
        compile_model(module, Runtime.TORCH_EXPORT, _batch(2), workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_support_matrix_and_refusals(trained):
    assert supports(Runtime.EAGER, LookupKind.MPC_KERNELS, Precision.INT4)
    assert supports(Runtime.TORCH_EXPORT, LookupKind.TORCH_OPS, Precision.INT8)
    assert not supports(Runtime.TORCH_EXPORT, LookupKind.TORCH_OPS, Precision.INT4)
    assert not supports(Runtime.ONNXRUNTIME, LookupKind.TORCH_OPS, Precision.FP32)
    module = InferenceDLRM.from_model(trained["int8"], lookup=LookupKind.MPC_KERNELS)
    with pytest.raises(UserError, match="cannot run the mpc_kernels lookup at int8; choose one of gather"):
        compile_model(module, Runtime.TORCH_EXPORT, _batch(2))
    with pytest.raises(UserError, match="no FP16 embedding-bag op"):
        InferenceDLRM.from_model(trained["fp32"], "fp16", LookupKind.TORCH_OPS)


def test_absent_runtime_is_reported_and_refused(monkeypatch, trained):
    real = ex.importlib.import_module

    def fake_import(name, *a, **k):
        if name == "openvino":
            raise ModuleNotFoundError("No module named 'openvino'", name="openvino")
        return real(name, *a, **k)

    monkeypatch.setattr(ex.importlib, "import_module", fake_import)
    info = runtime_info(Runtime.OPENVINO)
    assert not info.available and info.version is None
    assert "openvino" in info.reason and "pip install -e .[inference]" in info.reason
    assert ex.available_runtimes()[Runtime.EAGER].available
    with pytest.raises(UserError, match="runtime openvino is not available"):
        compile_model(InferenceDLRM.from_model(trained["fp32"]), Runtime.OPENVINO, _batch(2))


# --- costs -----------------------------------------------------------------------------

def test_costs_by_hand():
    c = costs.inference_cost((13, 4, 2), (5, 3, 1), (6, 9), 2, Precision.INT8, batch=2)
    # per sample: bottom 2*13*4+4 + 2*4*2+2 = 126, top 2*5*3+3 + 2*3+1 = 40,
    # interaction 2*3*3*2 = 36, dequant 2 tables * 2 dims * 2 = 8
    assert (c.bottom_flops, c.top_flops, c.interaction_flops, c.dequant_flops) == (252, 80, 72, 16)
    assert c.flops == 420
    # params (66 + 22) * 4; rows 2*2*(2+8); inputs 2*(52+16); logits 8; activations 2*4*(6+4+6+9+5)
    assert (c.mlp_param_bytes, c.embedding_row_bytes, c.input_bytes, c.output_bytes, c.activation_bytes) == \
        (352, 40, 136, 8, 240)
    assert c.bytes == 776 and c.table_bytes == 15 * 10
    assert costs.inference_cost((13, 4, 2), (5, 3, 1), (6, 9), 2, Precision.INT4, 2).embedding_row_bytes == 2 * 2 * 5
    assert costs.inference_cost((13, 4, 2), (5, 3, 1), (6, 9), 2, Precision.FP32, 2).dequant_flops == 0


def test_cost_flops_match_torch_flop_counter(trained):
    from torch.utils.flop_counter import FlopCounterMode

    model = trained["fp32"]
    module = InferenceDLRM.from_model(model)
    B = 3
    c = costs.config_cost(model.config, Precision.FP32, B)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*_batch(B))
    bias_adds = B * (sum(model.config.bottom_mlp[1:]) + sum(model.config.top_mlp[1:]))
    assert counter.get_total_flops() == c.flops - bias_adds  # the counter counts matmuls only


# --- timing and workload -----------------------------------------------------------------

def test_llc_from_sysfs(tmp_path):
    for name, level, kind, size in [("index0", 1, "Data", "32K"), ("index1", 1, "Instruction", "32K"),
                                    ("index2", 2, "Unified", "512K"), ("index3", 3, "Unified", "32768K"),
                                    ("index4", 4, "Instruction", "1G")]:
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert timing.llc_bytes(tmp_path) == 32 << 20


class FakeClock:
    """perf_counter that advances only when a fake function 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_timing_schedule_and_stopping(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock))
    calls = []

    def fn(cost, name):
        def run(x):
            calls.append((name, x))
            clock.now += cost
        return run

    inputs = [(i,) for i in range(7)]
    a, b = timing.measure_interleaved([fn(1.0, "a"), fn(3.0, "b")], inputs, warmup=1, reps=100,
                                      min_reps=2, max_seconds=20, block=2, switch=1)
    # turns of (1 untimed + 2 timed): a 1+1+1, b 3+3+3 timed seconds ... stop once >= 20 s
    assert (a.reps, b.reps) == (6, 5)
    assert (a.median_s, b.median_s, a.spread, b.spread) == (1.0, 3.0, 0.0, 0.0)
    assert [x for _, x in calls] == [i % 7 for i in range(len(calls))]  # each call: the next batch
    assert [n for n, _ in calls[:8]] == ["a", "b", "a", "a", "a", "b", "b", "b"]
    single = timing.measure_latency(fn(2.0, "c"), inputs, warmup=0, reps=4)
    assert single.reps == 4 and single.median_s == 2.0


def test_pinned_threads_restores(monkeypatch):
    before_threads, before_cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    with timing.pinned_threads(1):
        assert torch.get_num_threads() == 1 and len(os.sched_getaffinity(0)) == 1
    assert torch.get_num_threads() == before_threads and os.sched_getaffinity(0) == before_cpus
    with pytest.raises(ValueError):
        with timing.pinned_threads(len(before_cpus) + 1):
            pass


def test_zipf_ids_are_skewed_and_uniform_ids_are_not():
    rng = np.random.default_rng(0)
    n, size = 10_000, 50_000
    for dist, lo, hi in [("zipf", 0.35, 0.9), ("uniform", 0.0, 0.03)]:
        ids = workload.sample_ids(rng, n, size, dist)
        assert ids.min() >= 0 and ids.max() < n
        counts = np.sort(np.bincount(ids, minlength=n))[::-1]
        top1 = counts[: n // 100].sum() / size   # share of the hottest 1% of rows
        assert lo < top1 < hi, (dist, top1)


def test_input_pool_is_deterministic_and_bounded(monkeypatch):
    a = workload.input_pool((50, 7), 4, "zipf", batches=3, seed=1)
    b = workload.input_pool((50, 7), 4, "zipf", batches=3, seed=1)
    assert len(a) == 3 and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert a[0][0].shape == (4, 13) and a[0][1].shape == (4, 2) and a[0][1].dtype == torch.int64
    assert not torch.equal(a[0][1], a[1][1])
    monkeypatch.setattr(workload, "POOL_INDEX_BUDGET", 2 * 4 * 2 * 8)
    assert len(workload.input_pool((50, 7), 4, "uniform", batches=10)) == 2


# --- the study -----------------------------------------------------------------------------

def test_mlp_patterns():
    assert study.mlp_widths(4, 512, "funnel") == (512, 256, 128, 64)
    assert study.mlp_widths(2, 64, "constant") == (64, 64)
    with pytest.raises(UserError):
        study.mlp_widths(0, 64, "constant")


def test_full_and_quick_sets_cover_the_brief():
    full = study.full_study(llc=32 << 20)
    names = {s.name for s in full.sweeps}
    assert names == {"mlp_depth", "mlp_width", "dim", "table_size", "precision"}
    assert all(s.batches == (1, 128, 2048) for s in full.sweeps)
    sizes = next(s for s in full.sweeps if s.name == "table_size")
    ratios = [sp.num_tables * sp.rows_per_table * sp.dim * 4 / (32 << 20) for sp in sizes.specs]
    assert ratios == pytest.approx([0.125, 0.5, 2, 8, 16], rel=1e-3)
    prec = next(s for s in full.sweeps if s.name == "precision")
    assert set(prec.precisions) == {Precision.FP32, Precision.INT8, Precision.INT4}
    assert set(prec.lookups) == set(LookupKind) and len(prec.distributions) == 2
    for s in full.sweeps:
        for spec in s.specs:
            spec.dlrm_config()  # every shape is a valid DLRM
    quick = study.quick_study()
    assert {r for s in quick.sweeps for r in s.runtimes} == set(Runtime)
    assert {k for s in quick.sweeps for k in s.lookups} == set(LookupKind)


def _tiny_study(runtimes=(Runtime.EAGER, Runtime.TORCH_EXPORT)):
    spec = study.ModelSpec(bottom_hidden=(8,), top_hidden=(8,), dim=4, num_tables=3, rows_per_table=50)
    sweep = study.Sweep("tiny", "precision", (spec,), precisions=(Precision.FP32, Precision.INT8),
                        lookups=(LookupKind.GATHER, LookupKind.MPC_KERNELS),
                        distributions=tuple(workload.IndexDistribution), batches=(1, 3), runtimes=runtimes)
    return study.StudyConfig((sweep,), threads=1, warmup=1, reps=3, min_reps=2, max_seconds=None)


def test_study_rows(tmp_path):
    result = study.run_study(_tiny_study(), progress=False)
    rows = result.rows
    # per (batch, distribution) = 4: the baseline, and per precision gather on eager and
    # torch_export plus mpc_kernels on eager
    assert len(rows) == 4 * (1 + 2 * 3)
    assert {(s["lookup"], s["runtime"]) for s in result.skipped} == {("mpc_kernels", "torch_export")}
    frame = result.frame()
    assert set(frame.groupby(["precision", "lookup", "runtime"]).size()) == {4}
    for r in rows:
        assert r["latency_reps"] == 3 and r["latency_median_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_median_s"] / r["latency_median_s"])
        assert r["max_abs_diff"] <= 1e-4
        assert r["runtime_version"] == runtime_info(r["runtime"]).version
        assert r["commit"] == result.provenance["commit"] and r["threads"] == 1
        assert r["x"] == r["precision"] and r["llc_bytes"] == result.llc_bytes
        want = costs.inference_cost((13, 8, 4), (10, 8, 1), (50,) * 3, 4, r["precision"], r["batch"])
        assert r["cost_flops"] == want.flops and r["cost_bytes"] == want.bytes
    int8 = frame[frame.precision == "int8"]
    assert (int8.max_abs_diff_fp32 > 0).all()     # PTQ changes the logits, a little
    assert (int8.max_abs_diff_fp32 < 0.05).all()
    summary = study.speedup_summary(frame)
    assert len(summary) == 2 + 2 * 3 * 2 and set(summary["rows"]) == {2}
    result.save(tmp_path / "study.json")
    saved = json.loads((tmp_path / "study.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["provenance"]["commit"] == result.provenance["commit"]
    assert {r["runtime"] for r in saved["runtimes"]} == {r.value for r in Runtime}


def test_study_leaves_out_absent_runtimes(monkeypatch):
    real = ex.importlib.import_module

    def fake_import(name, *a, **k):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(ex.importlib, "import_module", fake_import)
    result = study.run_study(_tiny_study(runtimes=(Runtime.EAGER, Runtime.ONNXRUNTIME)), progress=False)
    assert {r["runtime"] for r in result.rows} == {"eager"}
    absent = {r["runtime"]: r for r in result.runtimes}["onnxruntime"]
    assert not absent["available"] and "onnxruntime" in absent["reason"]


def test_study_records_failed_builds_and_mismatches_and_goes_on(monkeypatch):
    real_compile, real_check = study.compile_model, study.check_outputs

    def failing_compile(module, runtime, *a, **k):
        if runtime is Runtime.TORCH_EXPORT:
            raise UserError("export to torch_export failed: simulated")
        return real_compile(module, runtime, *a, **k)

    def strict_check(compiled, module, *a, **k):
        if module.lookup_kind is LookupKind.MPC_KERNELS and module.precision is Precision.INT8:
            raise AssertionError("eager differs from eager: simulated\nmore lines")
        return real_check(compiled, module, *a, **k)

    monkeypatch.setattr(study, "compile_model", failing_compile)
    monkeypatch.setattr(study, "check_outputs", strict_check)
    result = study.run_study(_tiny_study(), progress=False)
    reasons = {}
    for s in result.skipped:
        reasons.setdefault((s["precision"], s["lookup"], s["runtime"]), []).append(s)
    failed = reasons[("fp32", "gather", "torch_export")]
    assert [s["batch"] for s in failed] == [1, 3] and "simulated" in failed[0]["reason"]
    mismatched = reasons[("int8", "mpc_kernels", "eager")]
    assert len(mismatched) == 4 and mismatched[0]["reason"] == "output mismatch: eager differs from eager: simulated"
    timed = {(r["precision"], r["lookup"], r["runtime"]) for r in result.rows}
    assert ("int8", "mpc_kernels", "eager") not in timed and ("fp32", "mpc_kernels", "eager") in timed
    assert not any(r["runtime"] == "torch_export" for r in result.rows)


def test_baseline_is_pure_pytorch_and_equals_the_training_model(monkeypatch):
    spec = study.ModelSpec(bottom_hidden=(8,), top_hidden=(8,), dim=4, num_tables=3, rows_per_table=50)
    model = DLRM(spec.dlrm_config(seed=3)).eval()
    dense, cat = _batch(6, seed=2, cards=spec.cardinalities)
    want = _eager(model, dense, cat)

    def no_kernels(*a, **k):
        raise AssertionError("the baseline must not use mpc's kernels")

    monkeypatch.setattr(ops.KernelOps, "pool", no_kernels)
    monkeypatch.setattr(ops.ReferenceOps, "pool", no_kernels)
    got = study._baseline(model)(dense, cat)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- study sets -------------------------------------------------------------------------

def test_default_set_keeps_every_sweep_and_batch_with_fewer_points():
    default, full = study.default_study(llc=32 << 20), study.full_study(llc=32 << 20)
    assert [s.name for s in default.sweeps] == [s.name for s in full.sweeps]
    assert all(s.batches == (1, 128, 2048) for s in default.sweeps)
    for d, f in zip(default.sweeps, full.sweeps):
        assert len(set(d.specs)) == len(d.specs) <= len(f.specs)   # no model measured twice
        assert (d.precisions, d.lookups, d.distributions) == (f.precisions, f.lookups, f.distributions)
    assert sum(len(s.specs) for s in default.sweeps) < sum(len(s.specs) for s in full.sweeps)
    sizes = next(s for s in default.sweeps if s.name == "table_size")
    ratios = [sp.num_tables * sp.rows_per_table * sp.dim * 4 / (32 << 20) for sp in sizes.specs]
    assert ratios == pytest.approx([0.125, 1, 8], rel=1e-3)     # inside, at, far beyond the LLC
    depth = next(s for s in default.sweeps if s.name == "mlp_depth")
    assert {(sp.mlp_pattern, sp.mlp_depth) for sp in depth.specs} == {
        ("constant", 1), ("constant", 3), ("constant", 6), ("funnel", 3), ("funnel", 6)}
    assert default.reps < full.reps and default.max_seconds < full.max_seconds


def test_table_sizes_capped_by_ram_and_deduplicated(monkeypatch):
    base = study.ModelSpec()
    per_row = 4 * base.dim * base.num_tables
    llc, ram = 480 << 20, 24 << 30                     # a VM reporting a 480 MB LLC, 24 GiB of RAM
    assert study._rows_for(base, llc, 0.125, ram=ram) == int(0.125 * llc / per_row)   # below the cap
    cap = int(ram * study.TABLE_RAM_SHARE / per_row)
    assert study._rows_for(base, llc, 8, ram=ram) == cap                     # 3.8 GB -> 1.5 GB
    assert study._rows_for(base, 32 << 20, 8, ram=ram) == int(8 * (32 << 20) / per_row)  # 32 MB LLC: as asked
    monkeypatch.setattr(study, "ram_bytes", lambda: ram)
    sizes = study._table_sizes(base, llc, (0.125, 8, 16))                 # 8x and 16x both capped: one point
    assert [s.rows_per_table for s in sizes] == [int(0.125 * llc / per_row), cap]


def test_study_config_narrows_and_overrides():
    cfg = study.study_config("quick", runtimes=["onnxruntime", "openvino"], batches=[4], threads=1, reps=7,
                             max_seconds=None)
    assert [s.name for s in cfg.sweeps] == ["quick_runtimes"]    # quick_lookups runs eager only: dropped
    assert cfg.sweeps[0].runtimes == (Runtime.ONNXRUNTIME, Runtime.OPENVINO) and cfg.sweeps[0].batches == (4,)
    assert (cfg.threads, cfg.reps, cfg.max_seconds) == (1, 7, study.quick_study().max_seconds)
    assert study.study_config("paper", llc=1 << 20) == study.full_study(llc=1 << 20)
    for kwargs, message in [({"study_set": "huge"}, "unknown study set 'huge'"),
                            ({"study_set": "quick", "runtimes": ["tvm"]}, "unknown runtime 'tvm'"),
                            ({"study_set": "quick", "batches": [0]}, "batch sizes must be >= 1"),
                            ({"study_set": "quick", "repeats": 3}, "unknown study setting"),
                            ({"study_set": "quick", "runtimes": []}, "no sweep of the quick set")]:
        with pytest.raises(UserError, match=message):
            study.study_config(**kwargs)


def test_foreign_load_counts_other_processes_only(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")

    def write(busy_ticks, idle_ticks):   # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {busy_ticks} 0 0 {idle_ticks} 7 0 0 0 0 0\ncpu0 1 2 3\n")

    clock = FakeClock()
    own = iter([10.0, 11.0, 0.0, 0.0])   # this process: 1 CPU second meanwhile
    monkeypatch.setattr(timing, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock))
    write(1000, 500)
    with timing.ForeignLoad(stat) as load:
        clock.now += 2.0                 # 2 s of wall time, 3 CPU seconds busy in all
        write(1000 + 3 * ticks, 500 + ticks)
    assert load.cores == pytest.approx(1.0)
    with timing.ForeignLoad(tmp_path / "absent") as load:
        pass
    assert load.cores is None


def test_study_result_records_time_and_load():
    result = study.run_study(_tiny_study(runtimes=(Runtime.EAGER,)), progress=False)
    assert result.seconds > 0 and (result.foreign_cpu_cores is None or result.foreign_cpu_cores >= 0)
    assert all(r["measure_seconds"] > 0 for r in result.rows)
    assert result.to_json()["seconds"] == result.seconds


# --- analysis -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template_row():
    """A real study row (its columns are the schema analysis reads)."""
    result = study.run_study(_tiny_study(runtimes=(Runtime.EAGER,)), progress=False)
    return next(r for r in result.rows if r["lookup"] == "gather" and r["precision"] == "fp32")


def _rows(template, specs):
    """Rows from (overrides, speed-up) pairs; the baseline median is 1 ms."""
    import pandas as pd

    out = []
    for over, speedup in specs:
        r = {**template, **over}
        r.update(speedup=speedup, baseline_median_s=1e-3, latency_median_s=1e-3 / speedup)
        r["throughput_sps"] = r["batch"] / r["latency_median_s"]
        out.append(r)
    return pd.DataFrame(out)


def _depth(d, pattern="constant"):
    return {"sweep": "mlp_depth", "vary": "mlp_depth", "x": d, "mlp_depth": d, "mlp_pattern": pattern,
            "spec_index": d}


def test_analysis_summaries(template_row):
    from mpc.inference import analysis

    rows = []
    for runtime, by_batch in [("openvino", {1: 2.0, 128: 8.0}), ("torch_compile", {1: 0.5, 128: 2.0})]:
        for b, s in by_batch.items():
            for dist, factor in [("uniform", 1.0), ("zipf", 4.0)]:      # geomean over id laws: x2
                rows.append(({**_depth(3), "runtime": runtime, "batch": b, "distribution": dist},
                             s * factor / 2))
    rows += [({**_depth(10), "runtime": "openvino", "batch": 1, "distribution": "uniform"}, 1.0),
             ({**_depth(10, "funnel"), "runtime": "openvino", "batch": 1, "distribution": "uniform"}, 1.0),
             ({**_depth(3), "lookup": study.BASELINE, "runtime": "eager", "batch": 1}, 0.8),
             ({**_depth(3), "lookup": study.BASELINE, "runtime": "eager", "batch": 128}, 1.25),
             ({**_depth(3), "precision": "int8", "lookup": "torch_ops", "runtime": "eager", "batch": 1}, 3.0)]
    frame = _rows(template_row, rows)

    summary = analysis.runtime_summary(frame).set_index("runtime")
    ov = summary.loc["openvino"]
    # openvino points: (1, 4), (4, 16), 1, 1 -> geomean of 1, 4, 4, 16, 1, 1 = 64^(1/3)... exactly:
    assert ov.points == 6 and ov.speedup_geomean == pytest.approx((1 * 4 * 4 * 16) ** (1 / 6))
    assert ov.speedup_max == 16 and ov.best_point == "mlp_depth: constant x3, batch 128, zipf"
    assert ov.geomean_batch_128 == pytest.approx(8.0) and ov.faster_share == pytest.approx(3 / 6)
    assert summary.loc["torch_compile"].speedup_geomean == pytest.approx(1.0)
    assert summary.loc[analysis.NOISE_LABEL].speedup_geomean == pytest.approx(1.0)
    assert "eager" not in summary.index          # the int8 row is not a runtime-only row

    patterns = analysis.pattern_summary(frame)
    p = patterns[(patterns.runtime == "openvino") & (patterns.point == "constant x3")].set_index("batch")
    assert p.speedup_geomean.to_dict() == pytest.approx({1: 2.0, 128: 8.0}) and set(p.rows) == {2}
    assert study.BASELINE not in set(patterns.lookup)
    # numeric order (3 before 10), constant before funnel; precision points after
    assert analysis.point_order(frame)[:3] == ["constant x3", "constant x10", "funnel x10"]

    checks = analysis.checks(frame)
    assert checks["speedup_is_ratio_of_medians"] and checks["throughput_is_batch_over_median"]
    assert checks["noise_geomean"] == pytest.approx(1.0) and checks["baseline_rows"] == 2
    tampered = frame.assign(speedup=frame.speedup * 1.5)
    assert not analysis.checks(tampered)["speedup_is_ratio_of_medians"]


def test_analysis_claim_and_paper_comparison(template_row):
    from mpc.inference import analysis
    from mpc.report import paper_numbers

    paper = paper_numbers()["form_follows_function"]
    rows = [({**_depth(3), "runtime": "openvino", "batch": 1, "distribution": "uniform"}, 8.0),
            ({**_depth(3), "runtime": "openvino", "batch": 2048, "distribution": "uniform"}, 2.0),
            ({**_depth(3), "runtime": "torch_export", "batch": 1, "distribution": "uniform"}, 0.5),
            ({**_depth(3), "runtime": "torch_export", "batch": 2048, "distribution": "uniform"}, 0.5),
            ({**_depth(3), "lookup": study.BASELINE, "runtime": "eager", "batch": 1}, 1.0)]
    frame = _rows(template_row, rows)
    table = analysis.paper_comparison(frame, paper).set_index("question")
    assert table.iloc[0]["paper (CNNs)"].startswith("380%")
    assert table.iloc[0]["ours (DLRM)"].startswith("OpenVINO 4.00x (400%), geomean of 2 points")
    assert table.loc["largest speed-up of one model", "ours (DLRM)"].startswith("8.00x (800%): openvino")
    assert table.loc["lowest latency of a reference model, one input", "ours (DLRM)"].startswith("0.125 ms: openvino")
    record = analysis.claim(frame, paper, "a test CPU", 2, "synthetic ids")
    assert set(record) == {"ours", "verdict", "data"} and record["data"] == "synthetic ids"
    assert "openvino 4.00x (best 8.00x)" in record["ours"] and "torch_export 0.50x" in record["ours"]
    assert "faster than eager on average: openvino; slower: torch_export" in record["verdict"]
    assert "OpenVINO's average (4.00x) is about equal compared with the paper's 380% read as 3.8x" \
        in record["verdict"]   # within 10%
    assert "Best of all: openvino 8.00x on mlp_depth constant x3, batch 1." in record["ours"]
    # the batch-size contrast is per runtime, never pooled
    assert ("Per runtime, geomean speed-up at batch 1 vs batch 2048: openvino 8.00x vs 2.00x; torch_export "
            "0.50x vs 0.50x; larger at batch 1: openvino; about equal (within 10%): torch_export.") \
        in record["verdict"]
    assert "Pooled" not in record["verdict"]        # no opposite trends here
    assert ("the batch size matters differently per runtime: for openvino the gain shrinks as the batch grows, "
            "so it comes mostly from removing per-call framework overhead") in record["verdict"]
    assert "for torch_export the speed-up hardly depends on the batch size." in record["verdict"]


def test_batch_contrast_is_per_runtime(template_row):
    """Opposite trends (as in the committed study: onnxruntime gains most at batch 1,
    torch_export and openvino only at large batches) must not pool into 'no effect'."""
    from mpc.inference import analysis
    from mpc.report import paper_numbers

    speedups = {"onnxruntime": (4.0, 1.0), "torch_export": (0.5, 1.0), "openvino": (0.5, 2.0),
                "torch_compile": (1.0, 1.05), "eager": (1.0, 1.0)}
    rows = [({**_depth(3), "runtime": r, "batch": b, "distribution": "uniform"}, s)
            for r, pair in speedups.items() for b, s in zip((1, 2048), pair)]
    rows += [({**_depth(3), "runtime": "onnxruntime", "batch": 128, "distribution": "uniform"}, 2.0)]
    frame = _rows(template_row, rows)
    trends = analysis.batch_trends(frame).set_index("runtime")
    assert "eager" not in trends.index                          # the baseline's own framework
    assert trends.trend.to_dict() == {"onnxruntime": "falls", "torch_export": "rises", "openvino": "rises",
                                      "torch_compile": "flat"}
    assert trends.loc["onnxruntime", ["batch_lo", "speedup_lo", "batch_hi", "speedup_hi"]].tolist() == \
        pytest.approx([1, 4.0, 2048, 1.0])
    verdict = analysis.claim(frame, paper_numbers()["form_follows_function"], "cpu", 2, "d")["verdict"]
    assert "onnxruntime 4.00x vs 1.00x; torch_export 0.50x vs 1.00x; openvino 0.50x vs 2.00x" in verdict
    assert ("larger at batch 1: onnxruntime; larger at batch 2048: torch_export, openvino; "
            "about equal (within 10%): torch_compile.") in verdict
    # pooled: geomean(4, .5, .5, 1) = 1 at batch 1, geomean(1, 1, 2, 1.05) at 2048
    assert f"opposite trends cancel (1.00x at batch 1, {(2 * 1.05) ** 0.25:.2f}x at batch 2048)" in verdict
    assert "for onnxruntime the gain shrinks as the batch grows" in verdict
    assert ("torch_export and openvino are slower than eager at batch 1, where the fixed cost of a call weighs "
            "most (so their per-call overhead is larger than eager's), and the gap closes as the batch grows "
            "(openvino ahead at batch 2048)") in verdict
    assert "for torch_compile the speed-up hardly depends on the batch size." in verdict
    assert "on DLRM the gain hardly depends" not in verdict


def test_labels_print_integers_and_single_llc_ratios(template_row):
    from mpc.inference import analysis
    from mpc.report import paper_numbers

    size = {"sweep": "table_size", "vary": "table_size", "mlp_depth": float("nan"), "mlp_pattern": None}
    rows = [({**_depth(6), "mlp_depth": 6.0, "x": 6.0, "runtime": "onnxruntime", "batch": 1}, 5.0),
            ({**size, "x": 8.0, "table_over_llc": 8.0, "spec_index": 7, "runtime": "onnxruntime", "batch": 1}, 1.0),
            ({**size, "x": 0.125, "table_over_llc": 0.125, "spec_index": 8, "runtime": "onnxruntime", "batch": 1},
             1.2)]
    frame = _rows(template_row, rows)
    assert frame.mlp_depth.dtype == float                       # as the committed study's frame
    points = analysis.label_points(frame).point.tolist()
    assert points == ["constant x6", "8x LLC", "0.125x LLC"]
    record = analysis.claim(frame, paper_numbers()["form_follows_function"], "cpu", 2, "d")
    assert "onnxruntime 5.00x on mlp_depth constant x6, batch 1" in record["ours"]
    assert "With tables far beyond the LLC (8x) the runtimes' speed-up (1.00x)" in record["verdict"]
    assert analysis._span(2, 8) == "2-8x" and analysis._span(8.0001, 8) == "8x"


def test_claim_flags_a_shared_machine(template_row):
    from mpc.inference import analysis
    from mpc.report import paper_numbers

    frame = _rows(template_row, [({**_depth(3), "runtime": "openvino", "batch": 1}, 2.0)])
    paper = paper_numbers()["form_follows_function"]
    assert analysis.claim(frame, paper, "cpu", 2, "d", foreign_cpu_cores=1.3)["verdict"].startswith(
        "UNRELIABLE: other processes used 1.30 CPU cores")
    assert analysis.claim(frame, paper, "cpu", 2, "d", foreign_cpu_cores=0.05)["verdict"].startswith("Not the same")
