"""Exports of an inference DLRM to the runtimes of the acceleration study (PAPERS.md §3).

"Does Form Follow Function?" compares native frameworks with hardware-specific runtimes.
Here the native side is eager PyTorch and the runtimes are:

    torch_export   torch.export program, saved as .pt2 and loaded back (the deployable
                   graph format; TorchScript is deprecated in this torch and not used)
    torch_compile  torch.compile, inductor, CPU, weights frozen as constants
    onnxruntime    ONNX (dynamo exporter; weights in an external .onnx.data file, which
                   also lifts the 2 GB protobuf limit a full Kaggle model exceeds)
    openvino       OpenVINO's PyTorch frontend, CPU plugin, FP32 inference precision

ONNX Runtime and OpenVINO are optional (`pip install -e .[inference]`): `runtime_info`
says which are present and their versions, and asking for an absent one raises a
UserError saying what to install. Every built model is checked against the eager module
it came from (`check_outputs`, OUTPUT_TOLERANCE) before it is used.

Which lookup (mpc.inference.module.LookupKind) each runtime takes: all take GATHER; the
PyTorch runtimes also take TORCH_OPS where torch can trace the op (torch.export has no
shape function for the 4-bit/2-bit quantized ops); MPC_KERNELS is eager only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from mpc.embedding.config import Precision
from mpc.errors import UserError
from mpc.inference.module import InferenceDLRM, LookupKind
from mpc.runinfo import atomic_directory

log = logging.getLogger(__name__)


class Runtime(str, Enum):
    EAGER = "eager"
    TORCH_EXPORT = "torch_export"
    TORCH_COMPILE = "torch_compile"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


# Distribution (module) that provides each runtime; torch is a hard dependency.
_PROVIDER = {Runtime.EAGER: "torch", Runtime.TORCH_EXPORT: "torch", Runtime.TORCH_COMPILE: "torch",
             Runtime.ONNXRUNTIME: ("onnxruntime", "onnx", "onnxscript"), Runtime.OPENVINO: ("openvino",)}

SUPPORTED_LOOKUPS = {
    Runtime.EAGER: frozenset(LookupKind),
    Runtime.TORCH_EXPORT: frozenset({LookupKind.GATHER, LookupKind.TORCH_OPS}),
    Runtime.TORCH_COMPILE: frozenset({LookupKind.GATHER, LookupKind.TORCH_OPS}),
    Runtime.ONNXRUNTIME: frozenset({LookupKind.GATHER}),
    Runtime.OPENVINO: frozenset({LookupKind.GATHER}),
}
# torch's 4-bit/2-bit quantized embedding-bag ops have no fake-tensor (shape) function,
# so neither torch.export nor dynamo can trace them (the byte op has one).
_UNTRACEABLE_TORCH_OPS = frozenset({Precision.INT4, Precision.INT2})


def supports(runtime: Runtime | str, lookup: LookupKind | str, precision: Precision | str) -> bool:
    """Whether `runtime` can build a model with this lookup at this table precision."""
    runtime, lookup, precision = Runtime(runtime), LookupKind(lookup), Precision(precision)
    if lookup not in SUPPORTED_LOOKUPS[runtime]:
        return False
    if lookup is LookupKind.TORCH_OPS:
        if precision is Precision.FP16:
            return False  # torch has no FP16 embedding-bag op; TorchOpsLookup refuses it
        if runtime in (Runtime.TORCH_EXPORT, Runtime.TORCH_COMPILE):
            return precision not in _UNTRACEABLE_TORCH_OPS
    return True


# Exported logits vs the eager module's: the runtimes sum the MLP and interaction dot
# products in other orders (blocking, FMA), so equal up to float32 reassociation.
OUTPUT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}

ONNX_OPSET = 18


@dataclass(frozen=True)
class RuntimeInfo:
    runtime: Runtime
    available: bool
    version: str | None       # e.g. "onnxruntime 1.31.1; onnx 1.23.2; onnxscript 0.7.2"
    reason: str = ""          # why it is unavailable

    def to_json(self) -> dict:
        return {"runtime": self.runtime.value, "available": self.available,
                "version": self.version, "reason": self.reason}


def runtime_info(runtime: Runtime | str) -> RuntimeInfo:
    """Whether `runtime` can run here, with the versions of the packages behind it."""
    runtime = Runtime(runtime)
    provider = _PROVIDER[runtime]
    if runtime is Runtime.TORCH_COMPILE and not shutil.which(os.environ.get("CXX", "g++")):
        return RuntimeInfo(runtime, False, None, "inductor compiles C++ for the CPU: no C++ compiler "
                                                 "(g++, or $CXX) on PATH")
    if provider == "torch":
        return RuntimeInfo(runtime, True, f"torch {torch.__version__}")
    versions, missing = [], []
    for name in provider:
        try:
            importlib.import_module(name)
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except Exception as e:  # absent, or present but broken (a bad wheel)
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if missing:
        return RuntimeInfo(runtime, False, None,
                           f"missing {', '.join(missing)}; install with pip install -e .[inference]")
    return RuntimeInfo(runtime, True, "; ".join(versions))


def available_runtimes() -> dict[Runtime, RuntimeInfo]:
    """Every runtime, present or not, and why not."""
    return {r: runtime_info(r) for r in Runtime}


def require(runtime: Runtime | str) -> RuntimeInfo:
    info = runtime_info(runtime)
    if not info.available:
        raise UserError(f"runtime {info.runtime.value} is not available: {info.reason}")
    return info


@dataclass
class CompiledModel:
    """A built model: predict(dense (B, 13) float32, cat (B, T) int64) -> logits (B,)."""

    runtime: Runtime
    version: str
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build_seconds: float
    artifacts: list[Path] = field(default_factory=list)   # files written (model, weights)
    # The temporary folder holding `artifacts` when compile_model chose it: removed
    # when the model is garbage-collected (a full Kaggle export is gigabytes).
    tempdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def __call__(self, dense: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        return self.predict(dense, cat)

    def artifact_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.artifacts if p.exists())


def _batch_dims():
    batch = torch.export.Dim("batch", min=1)
    return {"dense": {0: batch}, "cat": {0: batch}}


def _eager(module: InferenceDLRM, example, workdir: Path, threads: int):
    def predict(dense, cat):
        with torch.inference_mode():
            return module(dense, cat)
    return predict, []


def _torch_export(module: InferenceDLRM, example, workdir: Path, threads: int):
    program = torch.export.export(module, example, dynamic_shapes=_batch_dims())
    path = workdir / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()

    def predict(dense, cat):
        with torch.inference_mode():
            return loaded(dense, cat)
    return predict, [path]


def _torch_compile(module: InferenceDLRM, example, workdir: Path, threads: int):
    # Dynamo caches compiled code per code object, shared by every InferenceDLRM; a
    # study builds dozens and would hit its recompile limit and silently run eager.
    torch._dynamo.reset()
    # freezing: weights become constants, so inductor folds them and prepacks the
    # Linear layers for the CPU (the documented setting for CPU inference).
    compiled = torch.compile(module, backend="inductor", dynamic=False, options={"freezing": True})

    def predict(dense, cat):
        with torch.inference_mode():
            return compiled(dense, cat)
    with _quiet("torch._inductor"):  # torch warns about its own deprecated internals
        predict(*example)  # compiles for the example's shapes now, not inside a timing loop
    return predict, []


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a library's warnings and its logger below ERROR for a block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(module: InferenceDLRM, example, path: Path) -> list[Path]:
    """ONNX file with a dynamic batch axis; weights in `path`.data (external data)."""
    require(Runtime.ONNXRUNTIME)
    # The exporter reports progress on stdout and warns about optional packages
    # (torchvision) it does not need; keep the library quiet.
    with _quiet("torch.onnx"), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, example, str(path), input_names=["dense", "cat"],
                          output_names=["logit"], dynamic_shapes=_batch_dims(), dynamo=True,
                          external_data=True, opset_version=ONNX_OPSET, verbose=False)
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


def _onnxruntime(module: InferenceDLRM, example, workdir: Path, threads: int):
    import onnxruntime as ort

    files = export_onnx(module, example, workdir / "model.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(files[0]), opts, providers=["CPUExecutionProvider"])

    def predict(dense, cat):
        out = session.run(None, {"dense": dense.numpy(), "cat": cat.numpy()})[0]
        return torch.from_numpy(out)
    return predict, files


def _openvino(module: InferenceDLRM, example, workdir: Path, threads: int):
    import openvino as ov

    with _quiet("openvino"):  # the frontend traces the module: TracerWarnings
        model = ov.convert_model(module, example_input=example)
    path = workdir / "model.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)  # the default would halve weights
    core = ov.Core()
    # FP32 inference: on CPUs with bf16 units the plugin would otherwise lower precision.
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def predict(dense, cat):
        request.infer([dense.numpy(), cat.numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return predict, [path, path.with_suffix(".bin")]


_BUILDERS = {Runtime.EAGER: _eager, Runtime.TORCH_EXPORT: _torch_export,
             Runtime.TORCH_COMPILE: _torch_compile, Runtime.ONNXRUNTIME: _onnxruntime,
             Runtime.OPENVINO: _openvino}


def _export_example(example) -> tuple[torch.Tensor, torch.Tensor]:
    """The example batch, doubled when it has one sample: exporters specialise a
    dimension of size 1 to a constant, and the batch axis must stay dynamic."""
    dense, cat = example
    if dense.shape[0] == 1:
        dense, cat = torch.cat([dense, dense]), torch.cat([cat, cat])
    return dense, cat


def compile_model(module: InferenceDLRM, runtime: Runtime | str, example: tuple[torch.Tensor, torch.Tensor],
                  workdir: str | Path | None = None, threads: int | None = None) -> CompiledModel:
    """Build `module` for `runtime`. example: (dense, cat) of the shapes it will serve;
    the batch axis stays dynamic except for torch_compile (static shapes, recompiled on
    the first call with a new batch size). Files go to `workdir`/<runtime>/, which
    appears only once the build succeeded (replacing an earlier one), or to a temporary
    folder that lives as long as the returned model when workdir is None."""
    runtime = Runtime(runtime)
    info = require(runtime)
    kind = module.lookup_kind
    if not supports(runtime, kind, module.precision):
        ok = sorted(k.value for k in LookupKind if supports(runtime, k, module.precision))
        raise UserError(f"runtime {runtime.value} cannot run the {kind.value} lookup at "
                        f"{module.precision.value}; choose one of {', '.join(ok)}")
    threads = threads or torch.get_num_threads()
    if runtime is not Runtime.TORCH_COMPILE:
        example = _export_example(example)
    module = module.eval()
    if workdir is None:
        tempdir = tempfile.TemporaryDirectory(prefix="mpc-export-")
        predict, files, seconds = _build(module, runtime, example, Path(tempdir.name), threads)
        return CompiledModel(runtime, info.version, predict, seconds, files, tempdir)
    final = Path(workdir) / runtime.value
    with atomic_directory(final, overwrite=True) as tmp:
        predict, files, seconds = _build(module, runtime, example, tmp, threads)
    # Sessions opened the files before the folder was renamed; open files stay valid.
    return CompiledModel(runtime, info.version, predict, seconds, [final / f.name for f in files])


def _build(module: InferenceDLRM, runtime: Runtime, example, folder: Path, threads: int):
    """(predict, files, seconds) from the runtime's builder; its failures as UserError."""
    start = time.perf_counter()
    try:
        predict, files = _BUILDERS[runtime](module, tuple(example), folder, threads)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"export to {runtime.value} failed for the {module.lookup_kind.value} lookup "
                        f"at {module.precision.value}: {first}") from e
    return predict, files, time.perf_counter() - start


def check_outputs(compiled: CompiledModel, reference: Callable, dense: torch.Tensor,
                  cat: torch.Tensor, tolerance: dict | None = None) -> float:
    """Max |compiled - reference| on a batch; AssertionError past the tolerance."""
    tolerance = tolerance or OUTPUT_TOLERANCE
    with torch.inference_mode():
        want = reference(dense, cat)
    got = compiled(dense, cat)
    torch.testing.assert_close(got, want, **tolerance,
                               msg=lambda m: f"{compiled.runtime.value} differs from eager: {m}")
    return float((got - want).abs().max()) if got.numel() else 0.0
