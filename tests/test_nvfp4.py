"""The reference numerics of docs/numerics.md: exact format invariants and statistical facts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quartet_compile import nvfp4 as q

E2M1 = torch.tensor(q.E2M1_VALUES)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _unit_values(t: q.NVFP4Tensor) -> torch.Tensor:
    """e2m1 * e4m3 per element (the tensor scale left out)."""
    elems = q.e2m1_decode(q.unpack_nibbles(t.codes)).view(t.codes.shape[0], -1, q.GROUP)
    return (elems * t.scales.float().unsqueeze(-1)).view(t.codes.shape[0], -1)


def _group_sq_error(t: q.NVFP4Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t.dequantize() - x).pow(2).view(x.shape[0], -1, q.GROUP).sum(-1)


# ---------------------------------------------------------------------------- E2M1 elements


def test_every_code_decodes_to_its_e2m1_value_and_encodes_back():
    codes = torch.arange(16, dtype=torch.uint8)
    values = q.e2m1_decode(codes)
    expected = torch.cat((E2M1, -E2M1))
    assert torch.equal(values, expected)
    # -0 encodes as +0: the only code that does not round-trip.
    assert torch.equal(q.e2m1_encode(values)[1:8], codes[1:8])
    assert torch.equal(q.e2m1_encode(values)[9:], codes[9:])


@pytest.mark.parametrize(
    ("value", "index"),
    [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)],
)
def test_ties_round_to_the_even_code(value, index):
    u = torch.tensor([value, -value])
    assert q.e2m1_index(u).tolist() == [index, index]
    assert q.e2m1_encode(u).tolist() == [index, 8 | index]


def test_rtn_picks_the_nearest_value_and_saturates_at_six():
    u = torch.linspace(-9, 9, 4001)
    got = q.e2m1_decode(q.e2m1_encode(u))
    distance = (E2M1.view(1, -1) - u.abs().clamp(max=6).view(-1, 1)).abs()
    assert torch.allclose((got.abs() - u.abs().clamp(max=6)).abs(), distance.min(1).values)
    assert got.abs().max() == 6.0
    assert torch.equal(torch.sign(got[got != 0]), torch.sign(u[got != 0]))


def test_nibbles_pack_first_element_into_the_low_nibble():
    codes = torch.tensor([[0x1, 0xA, 0xF, 0x0]], dtype=torch.uint8)
    packed = q.pack_nibbles(codes)
    assert packed.tolist() == [[0xA1, 0x0F]]
    assert torch.equal(q.unpack_nibbles(packed), codes)


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_packing_round_trips(values):
    codes = torch.tensor(values, dtype=torch.uint8).view(1, -1)
    assert torch.equal(q.unpack_nibbles(q.pack_nibbles(codes)), codes)


# ---------------------------------------------------------------------------- E4M3 scales


def test_e4m3_floor_and_ceil_bracket_every_value_by_neighbours():
    x = torch.rand(5000, generator=_gen(1)) * 448
    floor, ulp = q.e4m3_floor_and_ulp(x)
    ceil = q.e4m3_ceil(x).float()
    assert torch.equal(floor.to(torch.float8_e4m3fn).float(), floor)  # floor is an E4M3 value
    assert (floor <= x).all() and (ceil >= x).all()
    assert ((ceil - floor == ulp) | (ceil == x)).all()


def test_e4m3_stochastic_rounding_is_unbiased_and_stays_on_neighbours():
    x = torch.tensor([0.001, 0.3, 1.1, 7.7, 100.0, 255.0])
    n = 20000
    draws = torch.rand(n, x.numel(), generator=_gen(2))
    rounded = q.e4m3_stochastic(x.expand(n, -1), draws).float()
    lo, ulp = q.e4m3_floor_and_ulp(x)
    assert ((rounded == lo) | (rounded == lo + ulp)).all()
    # Mean of n Bernoulli draws times ulp: standard error ulp * 0.5 / sqrt(n); allow 5 of them.
    assert ((rounded.mean(0) - x).abs() <= 5 * 0.5 * ulp / math.sqrt(n)).all()


def test_e4m3_stochastic_keeps_representable_values_exact():
    x = torch.tensor([0.5, 1.0, 1.125, 240.0, 256.0])
    draws = torch.rand(100, 5, generator=_gen(3))
    assert (q.e4m3_stochastic(x.expand(100, -1), draws).float() == x).all()


# ---------------------------------------------------------------------------- forward RTN


@pytest.mark.parametrize("four_over_six", [True, False])
def test_forward_values_are_e2m1_times_e4m3_times_tensor_scale(four_over_six):
    x = _randn(8, 256, seed=4) * 3
    t = q.quantize_rtn(x, four_over_six)
    assert t.codes.dtype == torch.uint8 and t.codes.shape == (8, 128)
    assert t.scales.dtype == torch.float8_e4m3fn and t.scales.shape == (8, 16)
    assert t.tensor_scale.dtype == torch.float32 and t.tensor_scale.dim() == 0
    divisor = 6 * (256 if four_over_six else 448)
    # amax / divisor, as amax times the float32 reciprocal (the form every device computes
    # alike: nvfp4._safe_tensor_scale), which is within one ulp of the quotient.
    assert t.tensor_scale == x.abs().max() * torch.tensor(1 / divisor, dtype=torch.float32)
    assert torch.isclose(t.tensor_scale, x.abs().max() / divisor, rtol=2**-23, atol=0)
    unit = _unit_values(t)
    assert torch.equal(unit.to(torch.bfloat16).float(), unit)  # exact in BF16
    assert torch.allclose(t.dequantize(), unit * t.tensor_scale, rtol=2**-23, atol=0)


def test_four_over_six_never_has_larger_group_error_than_six_only():
    x = _randn(32, 512, seed=5) * torch.rand(32, 1, generator=_gen(6)) * 10
    chosen = q.quantize_rtn(x, four_over_six=True)
    groups = x.view(32, -1, q.GROUP)
    gmax = groups.abs().amax(-1, keepdim=True)
    *_, err6 = q.rtn_candidate(groups, gmax, chosen.tensor_scale, 6.0)
    *_, err4 = q.rtn_candidate(groups, gmax, chosen.tensor_scale, 4.0)
    err = _group_sq_error(chosen, x)
    # rtn_candidate's error is scale^2 * sum((c - |u|)^2), in units of the tensor scale squared:
    # times that, equal to this one up to rounding.
    best = torch.minimum(err6, err4).squeeze(-1) * chosen.tensor_scale**2
    torch.testing.assert_close(err, best, rtol=1e-5, atol=0)
    assert (err <= err6.squeeze(-1) * (1 + 1e-5)).all()
    assert (err4 < err6).any()


def test_four_over_six_picks_four_for_some_groups_and_six_for_others():
    x = _randn(64, 256, seed=7)
    t = q.quantize_rtn(x, four_over_six=True)
    top = (q.unpack_nibbles(t.codes) & 7).view(64, 16, 16).amax(-1)
    assert (top == 6).any() and (top == 7).any()  # max on 4 (index 6) and max on 6 (index 7)


def test_zero_groups_store_scale_one_and_zero_codes():
    x = _randn(2, 64, seed=8)
    x[0, 16:32] = 0
    t = q.quantize_rtn(x)
    assert t.scales[0, 1].float() == 1.0
    assert (t.codes[0, 8:16] == 0).all()


def test_zero_tensor_has_tensor_scale_one():
    t = q.quantize_rtn(torch.zeros(4, 32))
    assert t.tensor_scale == 1.0
    assert (t.scales.float() == 1).all() and (t.codes == 0).all()
    assert (t.dequantize() == 0).all()


def test_saturating_inputs_keep_the_tensor_maximum():
    x = _randn(4, 64, seed=9)
    x[1, 3] = 1e4
    t = q.quantize_rtn(x, four_over_six=False)
    assert torch.isclose(t.dequantize()[1, 3], torch.tensor(1e4), rtol=1 / 16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_never_become_finite_numbers(bad):
    x = _randn(4, 64, seed=10)
    x[2, 5] = bad
    t = q.quantize_rtn(x)
    assert torch.isnan(t.tensor_scale)
    assert torch.isnan(t.dequantize()[2, 5])


def test_forward_quantization_is_deterministic():
    x = _randn(16, 256, seed=11)
    a, b = q.quantize_rtn(x), q.quantize_rtn(x.clone())
    assert all(
        torch.equal(u.view(torch.uint8), v.view(torch.uint8))
        for u, v in zip(a[:2], b[:2], strict=True)
    )


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.ones(4, 40), ValueError, "multiple of 16"),
        (torch.ones(4, 2, 32), ValueError, "2-D"),
        (torch.ones(4, 32, dtype=torch.int32), TypeError, "float"),
        (torch.ones(4, 32).to(torch.float8_e4m3fn), TypeError, "float"),
    ],
)
def test_bad_inputs_name_the_constraint(x, error, match):
    with pytest.raises(error, match=match):
        q.quantize_rtn(x)


def test_rht_rejects_wrong_sign_vectors_and_methods():
    x = _randn(4, 128)
    with pytest.raises(ValueError, match="signs"):
        q.rht_quantize(x, torch.ones(64), torch.tensor(0))
    with pytest.raises(ValueError, match="method"):
        q.rht_quantize(x, torch.ones(128), torch.tensor(0), method="rtn")


@settings(deadline=None, max_examples=40)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 12),
    log_scale=st.floats(-20, 20),
    four_over_six=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_forward_invariants_over_shapes_and_magnitudes(
    rows, groups, log_scale, four_over_six, seed
):
    x = _randn(rows, groups * q.GROUP, seed=seed) * 2.0**log_scale
    t = q.quantize_rtn(x, four_over_six)
    unit = _unit_values(t)
    assert torch.equal(unit.to(torch.bfloat16).float(), unit)
    assert torch.isfinite(t.dequantize()).all()
    # RTN error per element is at most half the widest E2M1 gap (1.0) times the group's scale,
    # and four-over-six's scale is at most max/4 (e4m3-rounded up by <= 1/16).
    real_scale = t.scales.float().repeat_interleave(q.GROUP, 1) * t.tensor_scale
    bound = torch.maximum(real_scale, x.abs().amax() * 2**-20)
    assert ((t.dequantize() - x).abs() <= bound + 1e-30).all()


# ---------------------------------------------------------------------------- rotation


def test_hadamard_is_exact_and_orthogonal_up_to_128():
    h = q.hadamard_matrix()
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, 128 * torch.eye(128))


def test_rotation_is_orthogonal_and_inverted_by_unrotate():
    x = _randn(8, 384, seed=12)
    signs = q.random_signs(_gen(13))
    v = q.rotate(x, signs)
    assert torch.allclose(v.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(q.unrotate(v, signs), x, atol=1e-5)
    # Blocks are independent: changing block 2 leaves blocks 0-1 unchanged.
    y = x.clone()
    y[:, 256:] = 0
    assert torch.equal(q.rotate(y, signs)[:, :256], v[:, :256])


def test_rotated_gemm_operands_cancel_the_rotation():
    a, b = _randn(8, 256, seed=14), _randn(16, 256, seed=15)
    signs = q.random_signs(_gen(16))
    assert torch.allclose(q.rotate(a, signs) @ q.rotate(b, signs).T, a @ b.T, atol=1e-4)


# ---------------------------------------------------------------------------- MS-EDEN


def test_eden_correction_satisfies_the_eden_identity():
    v = q.rotate(_randn(16, 256, seed=17), q.random_signs(_gen(18)))
    codes, scale = q.eden_codes_and_scales(v)
    g = v.view(16, -1, q.GROUP)
    inner = (g * scale * q.e2m1_decode(codes)).sum(-1)
    assert torch.allclose(inner, g.pow(2).sum(-1), rtol=1e-5)


def test_ms_eden_tensor_scale_aligns_the_largest_scale_to_256():
    v = q.rotate(_randn(16, 256, seed=19), q.random_signs(_gen(20)))
    _, corrected = q.eden_codes_and_scales(v)
    t = q.ms_eden(v, torch.rand(16, 16, generator=_gen(21)))
    # The corrected scales pass through the bfloat16 scratch first (rounding commutes with max).
    assert torch.equal(t.tensor_scale, corrected.max().to(torch.bfloat16).float() / 256)
    assert t.scales.float().max() == 256.0
    assert torch.equal(_unit_values(t).to(torch.bfloat16).float(), _unit_values(t))


def test_seeded_draws_are_reproducible_and_seed_dependent():
    x, signs = _randn(8, 256, seed=22), q.random_signs(_gen(23))
    a = q.rht_quantize(x, signs, torch.tensor(7))
    b = q.rht_quantize(x, signs, torch.tensor(7))
    c = q.rht_quantize(x, signs, torch.tensor(8))
    assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    assert not torch.equal(a.scales.view(torch.uint8), c.scales.view(torch.uint8))
    assert torch.equal(a.codes, c.codes)  # only the scale rounding is random


def test_transposed_quantization_zero_pads_the_reduction_dim():
    x = _randn(200, 128, seed=24)  # 200 tokens: not a multiple of 128
    signs, seed = q.random_signs(_gen(25)), torch.tensor(3)
    t = q.rht_quantize(x, signs, seed, transpose=True)
    assert t.shape == (128, 256)
    padded = torch.nn.functional.pad(x.T, (0, 56))
    assert torch.equal(t.codes, q.rht_quantize(padded, signs, seed).codes)


def test_requant_quantizes_the_transposed_dequantized_operand():
    w = q.quantize_rtn(_randn(256, 128, seed=26))
    signs, seed = q.random_signs(_gen(27)), torch.tensor(5)
    t = q.requant(w, signs, seed)
    ref = q.rht_quantize(w.dequantize().T.contiguous(), signs, seed)
    assert t.shape == (128, 256)
    assert torch.equal(t.codes, ref.codes) and torch.equal(t.tensor_scale, ref.tensor_scale)


# ---------------------------------------------------------------------------- statistics

N_SEEDS = 600
X_STAT = _randn(8, 256, seed=30)


def _estimates(method: str, rotated: bool = True) -> torch.Tensor:
    """N_SEEDS round trips of X_STAT, each with fresh signs and rounding draws."""
    return torch.stack(
        [q.roundtrip(X_STAT, method, _gen(1000 + s), rotated) for s in range(N_SEEDS)]
    )


@pytest.fixture(scope="module")
def estimates() -> dict[str, torch.Tensor]:
    return {
        "eden": _estimates("eden"),
        "sr": _estimates("sr"),
        "sr_plain": _estimates("sr", rotated=False),
        "rtn_plain": _estimates("rtn", rotated=False),
    }


def _bias_ratio(est: torch.Tensor) -> float:
    """n * |mean error|^2 / E|error|^2: about 1 for an unbiased estimator, about n if biased."""
    err = est - X_STAT
    return (len(est) * err.mean(0).pow(2).sum() / err.pow(2).sum((1, 2)).mean()).item()


@pytest.mark.parametrize("method", ["eden", "sr", "sr_plain"])
def test_unbiased_quantizers_mean_error_shrinks_like_one_over_sqrt_n(estimates, method):
    # Unbiased: n|mean err|^2 / E|err|^2 is a normalised chi-square-like statistic with mean 1
    # over 2048 coordinates; 1.5 is far in its tail, while any fixed bias would grow with n.
    assert _bias_ratio(estimates[method]) < 1.5
    first_half = _bias_ratio(estimates[method][: N_SEEDS // 2])
    assert first_half < 1.5


def test_rtn_is_biased(estimates):
    assert _bias_ratio(estimates["rtn_plain"]) > 0.5 * N_SEEDS


def test_ms_eden_mse_is_at_least_twice_below_stochastic_rounding(estimates):
    mse = {m: (estimates[m] - X_STAT).pow(2).mean() for m in ("eden", "sr")}
    assert mse["sr"] / mse["eden"] >= 2.0


# ---------------------------------------------------------------------------- GEMM


def test_gemm_equals_the_product_of_dequantized_operands():
    a, b = q.quantize_rtn(_randn(32, 256, seed=31)), q.quantize_rtn(_randn(64, 256, seed=32))
    out = q.gemm(a, b, torch.float32)
    assert out.shape == (32, 64)
    assert torch.allclose(out, a.dequantize() @ b.dequantize().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction dims"):
        q.gemm(a, q.quantize_rtn(_randn(4, 128)))


def test_round_to_bfloat16_is_torchs_cast_and_survives_inductor():
    g = _gen(40)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-60, 60, (4096,), generator=g))
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.3e38, 1e-40, float("inf"), -0.0])
    x = torch.cat([x, halfway, -halfway])  # ties go to even, the last finite binade overflows
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(q.round_to_bfloat16(x), expected)
    # Inductor would drop a float32 -> bfloat16 -> float32 cast pair; the bit version stays.
    compiled = torch.compile(lambda t: q.round_to_bfloat16(t * 3) / 3, backend="inductor")
    assert torch.equal(compiled(x), (x * 3).to(torch.bfloat16).float() / 3)
