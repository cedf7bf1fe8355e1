"""DLRM structure and the FP32 backend against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

from mpc.bench.baseline import baseline_dlrm, baseline_optimizer
from mpc.criteo import KAGGLE_CARDINALITIES
from mpc.embedding import EmbeddingConfig, build_embedding, jagged_from_dense
from mpc.embedding.base import check_indices
from mpc.model import DLRM, DLRMConfig, DotInteraction, dot_interaction, interaction_kernels
from mpc.train import sgd_step

CARDS = (11, 5, 40, 3, 17)


def _batch(cards, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, 13, generator=g) * 3
    cat = torch.stack([torch.randint(0, c, (B,), generator=g) for c in cards], 1)
    label = (torch.rand(B, generator=g) < 0.3).float()
    return dense, cat, label


def test_reference_shapes_for_kaggle():
    cfg = DLRMConfig(embedding=EmbeddingConfig(cardinalities=(4,) * 26))
    assert cfg.bottom_mlp == (13, 512, 256, 64, 16)
    assert cfg.top_mlp == (367, 512, 256, 1)
    model = DLRM(cfg)
    linears = [m for m in model.top if isinstance(m, torch.nn.Linear)]
    assert [l.in_features for l in linears] == [367, 512, 256]
    assert isinstance(model.top[-1], torch.nn.Linear)  # logit out; sigmoid lives in the loss
    assert sum(KAGGLE_CARDINALITIES) * 16 * 4 == 2_160_804_928  # the 2.161 GB of PAPERS.md


def test_interaction_matches_a_naive_loop():
    B, T, D = 3, 4, 5
    x, emb = torch.randn(B, D), torch.randn(B, T, D)
    li, lj = torch.tril_indices(T + 1, T + 1, offset=-1)
    out = dot_interaction(x, emb, li, lj)
    z = torch.cat([x[:, None], emb], 1)
    naive = [[float(z[b, i] @ z[b, j]) for i in range(T + 1) for j in range(i)] for b in range(B)]
    assert out.shape == (B, D + (T + 1) * T // 2)
    assert torch.allclose(out[:, :D], x)
    assert torch.allclose(out[:, D:], torch.tensor(naive), atol=1e-6)


@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("T,B,D", [(1, 7, 5), (4, 7, 5), (26, 7, 5), (26, 130, 16), (9, 1, 13), (3, 0, 8)])
def test_fast_interaction_matches_the_reference_with_gradients(T, B, D, use_kernels):
    if use_kernels:  # the compiled path must be the one under test (MPC_REQUIRE_KERNELS: a build error fails)
        assert interaction_kernels(torch.zeros(1, D), torch.zeros(1, T, D)) is not None
    g = torch.Generator().manual_seed(T * 1000 + B)
    x0, e0 = torch.randn(B, D, generator=g), torch.randn(B, T, D, generator=g)
    li, lj = torch.tril_indices(T + 1, T + 1, offset=-1)
    upstream = torch.randn(B, D + len(li), generator=g)
    fast_module = DotInteraction(T + 1, use_kernels=use_kernels)
    grads = []
    for f in (lambda x, e: dot_interaction(x, e, li, lj), fast_module):
        x, e = x0.clone().requires_grad_(), e0.clone().requires_grad_()
        out = f(x, e)
        out.backward(upstream)
        grads.append((out.detach(), x.grad, e.grad))
    for ref, fast in zip(grads[0], grads[1]):
        assert ref.shape == fast.shape
        assert torch.allclose(ref, fast, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the inference path gives the same values
        assert torch.allclose(fast_module(x0, e0), grads[0][0], atol=1e-6)
    # a non-contiguous embedding input (a transposed view) gives the same values too
    e_t = e0.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.allclose(fast_module(x0, e_t), grads[0][0], atol=1e-6)


def test_interaction_kernel_is_independent_of_the_thread_count():
    if interaction_kernels(torch.zeros(1, 16), torch.zeros(1, 26, 16)) is None:
        pytest.skip("no compiled kernels")
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(300, 16, generator=g), torch.randn(300, 26, 16, generator=g)
    up = torch.randn(300, 16 + 351, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xx, ee = x.clone().requires_grad_(), e.clone().requires_grad_()
            out = DotInteraction(27)(xx, ee)
            out.backward(up)
            results.append((out.detach(), xx.grad, ee.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_reference_initialisation_statistics():
    cfg = DLRMConfig.for_embedding(EmbeddingConfig(cardinalities=(10_000, 100), dim=16), seed=3)
    model = DLRM(cfg)
    w = model.embedding.to_float()
    assert w[:10_000].abs().max() <= math.sqrt(1 / 10_000) + 1e-7
    assert w[10_000:].abs().max() <= math.sqrt(1 / 100) + 1e-7
    assert float(w[:10_000].std()) == pytest.approx(math.sqrt(1 / 10_000) / math.sqrt(3), rel=0.05)
    lin = model.top[0]  # 19 -> 512 (2 tables: 16 + 3 dots): std sqrt(2 / (512 + 19))
    assert float(lin.weight.detach().std()) == pytest.approx(math.sqrt(2 / 531), rel=0.03)


def test_fp32_lookup_equals_embedding_bags_with_jagged_bags():
    cfg = EmbeddingConfig(cardinalities=CARDS, dim=6, use_kernels=False)
    backend = build_embedding(cfg)
    base = baseline_dlrm(DLRMConfig.for_embedding(cfg), backend.to_float()).embedding
    # Jagged: empty bags, repeated ids in a bag.
    g = torch.Generator().manual_seed(1)
    B = 4
    lengths = torch.randint(0, 4, (len(CARDS) * B,), generator=g)
    lengths[3] = 0
    tables = torch.arange(len(CARDS)).repeat_interleave(B).repeat_interleave(lengths)
    indices = (torch.rand(int(lengths.sum()), generator=g) * torch.tensor(CARDS)[tables]).long()
    indices[:2] = indices[0]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    check_indices(indices, offsets, CARDS)
    backend.eval()
    assert torch.allclose(backend(indices, offsets), base(indices, offsets), atol=1e-6)


def test_one_fused_step_equals_sparse_sgd_on_embedding_bags():
    """mpc's fused update is the same SGD as 26 EmbeddingBag(sparse=True) + torch SGD."""
    cfg = DLRMConfig.for_embedding(EmbeddingConfig(cardinalities=CARDS, dim=8, use_kernels=False), seed=2)
    ours = DLRM(cfg)
    theirs = baseline_dlrm(cfg, ours.embedding.to_float())
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("embedding.")},
                           strict=False)
    ours.embedding.set_learning_rate(0.1)
    opt_ours = torch.optim.SGD(ours.dense_parameters(), lr=0.1)
    opt_theirs = baseline_optimizer(theirs, 0.1)
    for step in range(3):
        dense, cat, label = _batch(CARDS, 16, seed=step)
        cat[:4, 2] = 7  # repeated ids across the batch
        idx, off = jagged_from_dense(cat)
        la = sgd_step(ours, opt_ours, dense, idx, off, label)
        lb = sgd_step(theirs, opt_theirs, dense, idx, off, label)
        assert float(la) == pytest.approx(float(lb), abs=1e-6)
    flat = torch.cat([b.weight for b in theirs.embedding.bags])
    assert torch.allclose(ours.embedding.to_float(), flat, atol=1e-6)
    assert not torch.allclose(ours.embedding.to_float(), DLRM(cfg).embedding.to_float())
    for (n, a), b in zip(ours.bottom.named_parameters(), theirs.bottom.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_out_of_range_ids_are_refused():
    idx, off = jagged_from_dense(torch.tensor([[0, 4, 39, 2, 16]]))
    check_indices(idx, off, CARDS)
    idx[1] = 5
    with pytest.raises(ValueError, match=r"id 5 out of range for table 1 \(C2, 5 rows\)"):
        check_indices(idx, off, CARDS)


def test_train_benchmark_times_both_baselines_on_the_same_weights(tmp_path, capsys):
    import json

    from mpc.bench.train import SPLIT_BASELINE, build_contenders
    from mpc.cli import main

    cards = (5, 40, 300)
    contenders = build_contenders(cards, ["int8"], seed=0, lr=0.1)
    assert list(contenders)[:2] == ["baseline", SPLIT_BASELINE]
    plain, split = contenders["baseline"][0], contenders[SPLIT_BASELINE][0]
    assert not plain.interaction.use_kernels and split.interaction.use_kernels
    g = torch.Generator().manual_seed(0)
    dense, cat = torch.randn(16, 13, generator=g), torch.randint(0, 5, (16, 3), generator=g)
    with torch.no_grad():
        outs = [m.forward_onehot(dense, cat) for m, _ in contenders.values()]
    for out in outs[1:3]:  # both baselines and mpc fp32: the same function of the same weights
        assert torch.allclose(outs[0], out, atol=1e-5)
    assert main(["bench", "train", "--cardinalities", "0.0002", "--batch-sizes", "8", "4", "--steps", "1",
                 "--repeats", "3", "1", "--settle-steps", "0", "--cache-warmup", "0", "--threads", "1",
                 "--record-name", str(tmp_path / "train")]) == 0
    rec = json.loads((tmp_path / "train.json").read_text())
    ratios = rec["results"]["8"]["ratio_vs_baseline"]
    assert set(ratios) == {"baseline", SPLIT_BASELINE, "mpc fp32"} and ratios["baseline"] == 1.0
    # one round count per batch size
    assert [len(rec["results"][b]["seconds_per_round"]["mpc fp32"]) for b in ("8", "4")] == [3, 1]
    assert [rec["results"][b]["rounds"] for b in ("8", "4")] == [3, 1]
    q25, q75 = rec["results"]["8"]["ratio_vs_baseline_quartiles"]["mpc fp32"]
    assert q25 <= ratios["mpc fp32"] <= q75
    assert "vs baseline" in capsys.readouterr().out


def test_train_benchmark_round_counts():
    from mpc.bench.train import repeats_per_batch
    from mpc.errors import UserError

    assert repeats_per_batch([128, 2048]) == [61, 21]  # the default, for any batch sizes
    assert repeats_per_batch([4096, 1024, 512]) == [21, 42, 61]
    assert repeats_per_batch([128, 2048], 5) == [5, 5]
    assert repeats_per_batch([128, 2048], [7]) == [7, 7]
    assert repeats_per_batch([128, 2048], [61, 21]) == [61, 21]
    with pytest.raises(UserError, match="one count or one per batch size"):
        repeats_per_batch([128, 2048, 4096], [61, 21])
