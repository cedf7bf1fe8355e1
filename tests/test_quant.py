"""Row formats (mpc.embedding.quant) against PyTorch's own quantized-embedding ops, and
the statistics of stochastic rounding."""

from __future__ import annotations

import pytest
import torch

from mpc.embedding import quant, rng
from mpc.embedding.config import Precision, Rounding
from mpc.errors import UserError

INT_PRECISIONS = [Precision.INT8, Precision.INT4, Precision.INT2]
PREPACK = {
    Precision.INT8: torch.ops.quantized.embedding_bag_byte_prepack,
    Precision.INT4: torch.ops.quantized.embedding_bag_4bit_prepack,
    Precision.INT2: torch.ops.quantized.embedding_bag_2bit_prepack,
}
UNPACK = {
    Precision.INT8: torch.ops.quantized.embedding_bag_byte_unpack,
    Precision.INT4: torch.ops.quantized.embedding_bag_4bit_unpack,
    Precision.INT2: torch.ops.quantized.embedding_bag_2bit_unpack,
}


def hard_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random rows plus the awkward kinds: constant, huge and tiny ranges, offsets."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    parts = [
        r(n, dim),
        torch.rand(n, dim, generator=g) * 1e-3,
        r(n, dim) * 1e4,                       # huge range
        r(n, dim) * 1e-7,                      # tiny range (fp16 scale underflows)
        r(n, dim) * 1e-5 + 3.0,                # tiny range far from 0 (fp16 bias rounding)
        r(n, 1).expand(n, dim),                # constant rows
        torch.full((n, dim), 0.37),
        torch.zeros(n, dim),
        (torch.rand(n, dim, generator=g) - 0.5) * 2e-2,
        r(n, dim) * torch.rand(n, 1, generator=g) * 50,
    ]
    return torch.cat(parts).contiguous()


def torch_supports(precision: Precision, dim: int) -> bool:
    return dim % (8 // precision.bits) == 0


@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("dim", [1, 3, 4, 8, 13, 16, 17, 32, 40])
def test_nearest_rounding_gives_torch_prepack_bytes(precision, dim):
    x = hard_rows(200, dim, seed=dim)
    ours = quant.quantize_rows(x, precision, Rounding.NEAREST)
    assert ours.dtype == torch.uint8 and ours.shape == (len(x), precision.row_bytes(dim))
    if torch_supports(precision, dim):
        assert torch.equal(ours, PREPACK[precision](x))
        return
    # torch's 4/2-bit prepack needs dim % (8/bits) == 0: pad each row with copies of its
    # own minimum (min/max, hence scale/bias, unchanged) and compare all but the padding.
    per = 8 // precision.bits
    width = -(-dim // per) * per
    padded = torch.cat([x, x.amin(1, keepdim=True).expand(-1, width - dim)], 1).contiguous()
    theirs = PREPACK[precision](padded)
    nb = quant.packed_bytes(precision, dim)
    assert torch.equal(ours[:, nb:], theirs[:, nb:])                       # scale, bias
    codes_ours = quant.unpack_codes(ours[:, :nb], precision.bits, dim)
    codes_theirs = quant.unpack_codes(theirs[:, :nb], precision.bits, width)[:, :dim]
    assert torch.equal(codes_ours, codes_theirs)
    pad_bits = quant.unpack_codes(ours[:, :nb], precision.bits, width)[:, dim:]
    assert not pad_bits.any()


@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("dim", [4, 16, 32])
def test_dequantized_pooled_sums_match_torch_ops(precision, dim):
    x = hard_rows(60, dim, seed=7)[:-60]  # drop the zero rows' trivial bags
    storage = PREPACK[precision](x)
    ours = quant.dequantize_rows(storage, precision, dim)
    # torch dequantizes with a fused multiply-add: equal up to one rounding per element.
    scale = x.abs().amax(1, keepdim=True) + 1e-30
    assert ((ours - UNPACK[precision](storage)).abs() / scale).max() < 1e-6
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, len(x), (500,), generator=g)
    offsets = torch.tensor([0, 1, 1, 40, 41, 200, 350, 500])
    theirs = quant.torch_pool(storage, precision, indices, offsets)
    bags = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    mine = torch.stack([ours[indices[a:b]].sum(0) for a, b in bags])
    # tolerance per bag: float rounding relative to the sum of magnitudes added
    magnitude = torch.stack([ours[indices[a:b]].abs().sum(0) for a, b in bags])
    assert torch.all((mine - theirs).abs() <= 1e-5 * magnitude)
    assert (magnitude > 0).sum() >= 6 * dim    # non-trivial sums in every non-empty bag


@pytest.mark.parametrize("precision", list(Precision), ids=lambda p: p.value)
@pytest.mark.parametrize("dim", [1, 5, 16])
def test_roundtrip_error_within_half_a_step(precision, dim):
    x = torch.randn(300, dim, generator=torch.Generator().manual_seed(2))
    back = quant.dequantize_rows(quant.quantize_rows(x, precision, Rounding.NEAREST), precision, dim)
    err = (back - x).abs()
    if precision is Precision.FP32:
        assert torch.equal(back, x)
    elif precision is Precision.FP16:
        assert torch.all(err <= x.abs() * 2 ** -11 + 2 ** -25)
    else:
        storage = quant.quantize_rows(x, precision, Rounding.NEAREST)
        _, scale, bias = quant.split_rows(storage, precision, dim)
        # half a step, plus the fp16 rounding of the bias for the 4/2-bit formats
        slack = (x.amin(1) - bias).abs() if precision is not Precision.INT8 else 0
        bound = scale / 2 * 1.0001 + slack + 1e-7
        assert torch.all(err.amax(1) <= bound)
        assert dim == 1 or err.max() > 0  # (one value per row is stored exactly as bias)


def _draws(x: torch.Tensor, precision: Precision, n: int, seed: int = 3) -> torch.Tensor:
    """Dequantized stochastic roundings of the row x, n independent draws: (n, D)."""
    rows = torch.arange(n)
    u = rng.uniform(seed, 0, rows, x.shape[1], rng.PURPOSE_UPDATE)
    q = quant.quantize_rows(x.expand(n, -1).contiguous(), precision, Rounding.STOCHASTIC, u)
    return quant.dequantize_rows(q, precision, x.shape[1])


def _grid_row(precision: Precision, dim: int, seed: int) -> tuple[torch.Tensor, float]:
    """A row whose min and (max - min) / levels are exact in fp16, values off the grid."""
    levels = (1 << precision.bits) - 1
    step = 2.0 ** -5
    g = torch.Generator().manual_seed(seed)
    x = -0.5 + step * levels * torch.rand(1, dim, generator=g)
    x[0, 0], x[0, 1] = -0.5, -0.5 + step * levels
    return x, step


@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
def test_integer_stochastic_rounding_is_unbiased(precision):
    x, step = _grid_row(precision, 64, seed=precision.bits)
    interior = slice(2, None)
    few, many = _draws(x, precision, 256), _draws(x, precision, 16384)
    # every draw is one of the two grid points around x
    lo = torch.floor((x + 0.5) / step) * step - 0.5
    assert torch.all((many - lo >= -1e-6) & (many - lo <= step + 1e-6))
    err_few = (few.mean(0) - x[0])[interior].abs()
    err_many = (many.mean(0) - x[0])[interior].abs()
    assert err_many.max() < 0.05 * step                 # ~6 sigma at n = 16384
    assert err_many.pow(2).mean().sqrt() < err_few.pow(2).mean().sqrt() / 3   # ~1/sqrt(n)
    nearest = quant.dequantize_rows(quant.quantize_rows(x, precision, Rounding.NEAREST), precision, 64)
    bias_nearest = (nearest[0] - x[0])[interior].abs()
    assert bias_nearest.mean() > 0.15 * step            # nearest is biased per element
    assert bias_nearest.mean() > 10 * err_many.mean()


def test_int8_stochastic_rounding_unbiased_on_random_rows():
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(5))
    scale = float((x.max() - x.min()) / 255)
    draws = _draws(x, Precision.INT8, 16384)
    assert (draws.mean(0) - x[0]).abs().max() < 0.05 * scale


def _fp16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 values just below and above each float32 x (equal when x is exact)."""
    h = x.half()
    hf = h.float()
    other = torch.where(hf > x, torch.nextafter(h, torch.tensor(-float("inf"), dtype=torch.half)),
                        torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.half))).float()
    exact = hf == x
    lo = torch.where(exact, hf, torch.minimum(hf, other))
    hi = torch.where(exact, hf, torch.maximum(hf, other))
    return lo, hi


def test_fp16_stochastic_rounding_brackets_and_is_unbiased():
    g = torch.Generator().manual_seed(9)
    sign = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    mags = torch.cat([
        torch.rand(24, generator=g) * 10 + 0.1,              # normal
        torch.rand(16, generator=g) * 6e-5,                  # fp16 subnormal
        torch.rand(16, generator=g) * 5.9e-8,                # below the smallest subnormal
        torch.rand(8, generator=g) * 3e-4,                   # near DLRM's init range
    ])
    x = (sign * mags)[None, :]
    lo, hi = _fp16_neighbours(x[0])
    draws = _draws(x, Precision.FP16, 16384)
    assert torch.all((draws == lo) | (draws == hi))
    ulp = (hi - lo).clamp(min=2.0 ** -24)
    err = ((draws.mean(0) - x[0]) / ulp).abs()
    assert err.max() < 0.05
    nearest = x[0].half().float()
    near_err = ((nearest - x[0]) / ulp).abs()
    assert near_err.mean() > 0.15 and near_err.mean() > 10 * err.mean()


def test_fp16_stochastic_rounding_edges():
    x = torch.tensor([[0.0, -0.0, 1.0, 65504.0, 70000.0, -1e30, float("inf"), -float("inf"),
                       2.0 ** -24, 2.0 ** -14, float("nan")]])
    draws = _draws(x, Precision.FP16, 64)
    assert torch.equal(draws[:, :4], x[:, :4].expand(64, -1))           # exact values stay
    assert torch.equal(torch.signbit(draws[:, 1]), torch.ones(64, dtype=torch.bool))
    assert torch.all(draws[:, 4] == 65504.0) and torch.all(draws[:, 5] == -65504.0)  # saturate
    assert torch.all(draws[:, 6] == float("inf")) and torch.all(draws[:, 7] == -float("inf"))
    assert torch.all(draws[:, 8] == 2.0 ** -24) and torch.all(draws[:, 9] == 2.0 ** -14)
    assert torch.all(torch.isnan(draws[:, 10]))


def test_pack_unpack_roundtrip_all_widths():
    g = torch.Generator().manual_seed(4)
    for bits in (2, 4, 8):
        for dim in (1, 2, 3, 7, 9, 16):
            q = torch.randint(0, 1 << bits, (20, dim), generator=g, dtype=torch.int32)
            packed = quant.pack_codes(q, bits)
            assert packed.shape == (20, -(-dim * bits // 8))
            assert torch.equal(quant.unpack_codes(packed, bits, dim), q)
    # lowest bits first: codes 1, 2 -> byte 0x21 (INT4), codes 1, 2, 3, 0 -> 0b00111001 (INT2)
    assert quant.pack_codes(torch.tensor([[1, 2]]), 4).item() == 0x21
    assert quant.pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).item() == 0b00111001


def test_stochastic_needs_u_and_shapes_are_checked():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="stochastic"):
        quant.quantize_rows(x, Precision.INT8, Rounding.STOCHASTIC)
    with pytest.raises(ValueError, match="storage must be"):
        quant.dequantize_rows(torch.zeros(3, 5, dtype=torch.uint8), Precision.INT8, 4)


@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
def test_export_serves_in_torch_ops_and_imports_back(precision):
    cards, dim = [5, 40, 12], 8
    x = torch.randn(sum(cards), dim)
    storage = quant.quantize_rows(x, precision, Rounding.NEAREST)
    offsets = torch.tensor([0, 5, 45, 57])
    tables = quant.export_torch_quantized(storage, precision, offsets)
    assert [len(t) for t in tables] == cards
    idx = torch.tensor([3, 0, 4, 4])
    bag_offsets = torch.tensor([0, 1, 4])
    pooled = quant.torch_pool(tables[2], precision, idx, bag_offsets)
    deq = quant.dequantize_rows(tables[2], precision, dim)
    assert torch.allclose(pooled[0], deq[3], atol=1e-5)
    assert torch.allclose(pooled[1], deq[0] + deq[4] + deq[4], atol=1e-5)
    assert torch.equal(quant.import_torch_quantized(tables, precision, dim), storage)
    with pytest.raises(UserError, match="table 1"):
        quant.import_torch_quantized([tables[0], tables[1][:, :-1]], precision, dim)


def test_export_refuses_float_formats():
    with pytest.raises(UserError, match="fp16"):
        quant.export_torch_quantized(torch.zeros(2, 4, dtype=torch.half), Precision.FP16,
                                     torch.tensor([0, 2]))


def test_memory_components_sum_to_row_bytes():
    for p in Precision:
        for dim in (1, 13, 16):
            parts = quant.values_bytes(p, 7, dim)
            assert sum(parts.values()) == 7 * p.row_bytes(dim)
    assert quant.values_bytes(Precision.INT4, 10, 16) == {"values": 80, "scale_bias": 40}
    assert quant.values_bytes(Precision.INT8, 10, 16) == {"values": 160, "scale_bias": 80}


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.INT4, Precision.INT2])
@pytest.mark.parametrize("dim", [5, 13, 16])
def test_single_unaligned_rows_and_empty_batches(precision, dim):
    """A one-row slice at an odd byte offset, and zero rows, go through both directions."""
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(dim))
    storage = quant.quantize_rows(x, precision, Rounding.NEAREST)
    whole = quant.dequantize_rows(storage, precision, dim)
    for k in range(4):
        assert torch.equal(quant.dequantize_rows(storage[k:k + 1], precision, dim), whole[k:k + 1])
    assert quant.dequantize_rows(storage[:0], precision, dim).shape == (0, dim)
    empty = quant.quantize_rows(x[:0], precision, Rounding.STOCHASTIC, torch.rand(0, dim))
    assert empty.shape == (0, storage.shape[1]) and empty.dtype == storage.dtype
