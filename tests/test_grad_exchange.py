"""Error feedback on the INT8 MLP gradients (mpc.grad_exchange), its checkpoint, and the
choice of torch.distributed backend (mpc.distributed.select_backend).

One in-process gloo group of one rank: the exchange runs its real collectives, and what
a rank transmits is what comes back (the sum over one rank), so the residual can be
checked against the true gradient exactly. tests/test_distributed.py checks two ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mpc import distributed
from mpc.distributed import DistributedTrainer, select_backend
from mpc.embedding import EmbeddingConfig
from mpc.errors import UserError
from mpc.grad_exchange import INT8_MAX, DistributedConfig, GradientExchange
from mpc.train import TrainConfig

SIZES = [(6, 5), (6,), (3, 6)]   # a small MLP's parameter tensors


@pytest.fixture
def one_rank():
    """The default process group: gloo, one rank, an in-memory store (per test: cheap)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _exchange(error_feedback: bool) -> GradientExchange:
    config = DistributedConfig("sparse-int8", error_feedback=error_feedback)
    return GradientExchange(config, torch.tensor([0, 4]), 2)


def _params() -> list[torch.Tensor]:
    return [torch.zeros(s, requires_grad=True) for s in SIZES]


def _gradients(step: int) -> list[torch.Tensor]:
    """A gradient with one large entry per tensor (it sets the INT8 scale) and a steady
    small bias below half a quantization step: rounding alone would always drop it."""
    g = torch.Generator().manual_seed(step)
    out = []
    for s in SIZES:
        t = 0.001 * torch.randn(s, generator=g) + 0.002
        t.view(-1)[0] = 1.0
        out.append(t)
    return out


def _send(ex: GradientExchange, params, grads) -> torch.Tensor:
    """One exchange of `grads`: the flat gradient every rank applies (here: transmitted)."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ex.mlp_gradients(params)
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_residual_is_the_gradient_minus_what_was_transmitted(one_rank):
    ex, params = _exchange(True), _params()
    assert ex.residuals is None
    carried = torch.zeros(sum(torch.Size(s).numel() for s in SIZES))
    for step in range(5):
        true = torch.cat([g.reshape(-1) for g in _gradients(step)])
        sent = _send(ex, params, _gradients(step))
        residual = torch.cat(ex.residuals)
        # what was quantized is the gradient plus the carried error; the rest is carried on
        torch.testing.assert_close(residual, true + carried - sent, rtol=0, atol=1e-7)
        if step == 0:
            torch.testing.assert_close(residual, true - sent, rtol=0, atol=1e-7)
        assert bool(residual.ne(0).any())
        # per tensor, the carried error is at most half a step of that tensor's scale
        for part in torch.split(residual, [torch.Size(s).numel() for s in SIZES]):
            assert float(part.abs().max()) <= 0.5 * (1.0 + 0.01) / INT8_MAX   # max |g + carried| < 1.01
        carried = residual
    assert [r.numel() for r in ex.residuals] == [torch.Size(s).numel() for s in SIZES]


def test_with_feedback_the_sum_sent_tracks_the_sum_of_gradients(one_rank):
    steps = 300
    totals = {}
    for feedback in (True, False):
        ex, params = _exchange(feedback), _params()
        true_sum = sent_sum = 0
        for step in range(steps):
            grads = _gradients(step)
            true_sum = true_sum + torch.cat([g.reshape(-1) for g in grads])
            sent_sum = sent_sum + _send(ex, params, grads)
        totals[feedback] = (true_sum - sent_sum).abs()
        if feedback:
            # sum sent = sum of gradients - the last residual: bounded, whatever the steps
            torch.testing.assert_close(sent_sum, true_sum - torch.cat(ex.residuals), rtol=0, atol=1e-4)
        else:
            assert ex.residuals is None and ex.gather_residuals() is None
    half_step = 0.5 * 1.01 / INT8_MAX
    assert float(totals[True].max()) <= half_step + 1e-4
    # without it the small bias (0.002 < half a step) is rounded away every time: the
    # error grows with the steps, to about 0.002 x 300 = 0.6 per entry (0.5 when a
    # rare entry above half a step is sent)
    assert float(totals[False].max()) > 50 * half_step
    assert float(totals[False].median()) > 0.3


def test_gathered_residuals_are_this_ranks(one_rank):
    ex, params = _exchange(True), _params()
    assert len(ex.gather_residuals()[0]) == 0          # nothing carried yet
    _send(ex, params, _gradients(0))
    (gathered,) = ex.gather_residuals()
    assert torch.equal(gathered, torch.cat(ex.residuals))
    ex.set_residual(gathered * 2, [torch.Size(s).numel() for s in SIZES])
    assert torch.equal(torch.cat(ex.residuals), gathered * 2)


# --- DistributedTrainer checkpoints keep the residual ---------------------------------------

def _config(data, checkpoint=None) -> TrainConfig:
    return TrainConfig(data=str(data), embedding=EmbeddingConfig(kind="fp32", use_kernels=False), batch_size=64,
                       max_train_samples=640, max_eval_samples=500, max_test_samples=500, progress=False,
                       threads=1, checkpoint=checkpoint)


def _weights(trainer) -> dict[str, torch.Tensor]:
    with trainer._unwrapped():
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_residual_survives_a_checkpoint(one_rank, learnable_data, tmp_path):
    int8 = DistributedConfig("sparse-int8")
    whole = DistributedTrainer(_config(learnable_data), int8)
    whole.fit()
    want = _weights(whole)

    ck = tmp_path / "int8.pt"
    first = DistributedTrainer(_config(learnable_data, str(ck)), int8)
    assert first.fit(stop_after=4) == {"stopped_at": 4}
    saved = torch.load(ck, weights_only=False)["error_feedback"]
    assert len(saved) == 1 and torch.equal(saved[0], torch.cat(first.exchange.residuals))
    assert bool(saved[0].ne(0).any())

    # (own checkpoint paths: a finished run overwrites its checkpoint)
    resumed = DistributedTrainer(_config(learnable_data, str(tmp_path / "resumed.pt")), int8)
    resumed.load_checkpoint(ck)
    assert torch.equal(torch.cat(resumed.exchange.residuals), saved[0])
    resumed.fit()
    for k, v in _weights(resumed).items():
        assert torch.equal(v, want[k]), k      # the same run as without the interruption

    # ... which it would not be had the residual been lost
    lost = DistributedTrainer(_config(learnable_data, str(tmp_path / "lost.pt")), int8)
    lost.load_checkpoint(ck)
    lost.exchange.residuals = None
    lost.fit()
    got = _weights(lost)
    assert any(not torch.equal(got[k], want[k]) for k in want if not k.startswith("embedding"))


def test_no_error_feedback_keeps_and_saves_no_residual(one_rank, learnable_data, tmp_path):
    ck = tmp_path / "plain.pt"
    plain = DistributedConfig("sparse-int8", error_feedback=False)   # --no-error-feedback
    trainer = DistributedTrainer(_config(learnable_data, str(ck)), plain)
    trainer.fit(stop_after=3)
    assert trainer.exchange.residuals is None
    assert torch.load(ck, weights_only=False)["error_feedback"] is None


@pytest.mark.parametrize("flags, feedback", [([], True), (["--no-error-feedback"], False)])
def test_cli_flag_switches_error_feedback(learnable_data, tmp_path, monkeypatch, flags, feedback):
    from mpc.cli import main

    seen = []
    monkeypatch.setattr(distributed, "run_distributed", lambda config, dist_config, *a, **kw: seen.append(dist_config))
    code = main(["train", "--data", str(learnable_data), "--out", str(tmp_path / "r.json"), "--distributed",
                 "--grad-compression", "sparse-int8", *flags])
    assert code == 0 and seen == [DistributedConfig("sparse-int8", error_feedback=feedback)]


def test_trainer_refuses_an_nccl_group(one_rank, learnable_data, monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(UserError, match="NCCL"):
        DistributedTrainer(_config(learnable_data), DistributedConfig("sparse"))


# --- backend selection ----------------------------------------------------------------------

@pytest.fixture
def cuda(monkeypatch):
    """Pretend CUDA (and NCCL) are there or not: cuda(True) / cuda(False)."""
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)

    def set_available(available: bool, nccl: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    return set_available


def test_backend_is_gloo_on_cpu_and_nccl_on_cuda(cuda):
    cuda(False)
    assert select_backend() == "gloo" and select_backend("cpu") == "gloo"
    assert distributed.TRAIN_DEVICE == "cpu"
    cuda(True)
    assert select_backend("cpu") == "gloo"              # a CPU run stays on gloo with a GPU present
    assert select_backend("cuda") == "nccl" and select_backend(torch.device("cuda", 1)) == "nccl"
    assert select_backend("cuda", "gloo") == "gloo"      # the override wins
    cuda(True, nccl=False)
    assert select_backend("cuda") == "gloo"              # a torch without NCCL


def test_backend_override_from_the_environment(cuda, monkeypatch):
    cuda(True)
    monkeypatch.setenv(distributed.BACKEND_ENV, "GLOO")
    assert select_backend("cuda") == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    assert select_backend("cuda") == "nccl"
    assert select_backend("cuda", "auto") == "nccl" and select_backend("cpu", "auto") == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "mpi")
    with pytest.raises(UserError, match=r"MPC_DIST_BACKEND='mpi'.*auto, gloo, nccl"):
        select_backend()


@pytest.mark.parametrize("available, nccl, device, message", [
    (False, True, "cpu", "needs CUDA, which is not available"),
    (False, True, "cuda", "CUDA is not available"),
    (True, False, "cuda", "no NCCL"),
    (True, True, "cpu", "trains on cpu"),
])
def test_nccl_without_cuda_is_a_user_error(cuda, monkeypatch, available, nccl, device, message):
    cuda(available, nccl)
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    with pytest.raises(UserError, match=message):
        select_backend(device)
    with pytest.raises(UserError, match=message):
        select_backend(device, "nccl")


def test_cuda_device_without_cuda_is_a_user_error(cuda):
    cuda(False)
    with pytest.raises(UserError, match="CUDA is not available"):
        select_backend("cuda")
    with pytest.raises(UserError, match="not a torch device"):
        select_backend("tpu-ish")


def test_torchrun_start_refuses_nccl_before_the_rendezvous(cuda, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    cuda(False)
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match="nccl needs CUDA"):
        distributed.init_from_env()
    monkeypatch.delenv(distributed.BACKEND_ENV)
    with pytest.raises(UserError, match="RANK, WORLD_SIZE"):   # gloo: on to the environment check
        distributed.init_from_env()
    assert not dist.is_initialized()
    with pytest.raises(UserError, match="backend argument=nccl needs CUDA"):
        distributed.run_distributed(TrainConfig(data="unused"), DistributedConfig(), backend="nccl")
