"""The CUDA kernels on inputs built to break scale arithmetic (tests/adversarial.py), against the
reference run on the same GPU.

Bit for bit on the exact inputs, whose rotation sums do not depend on the tensor cores'
summation order: that includes bands of subnormal values, so these tests also show what the
GPU does with them. On the free inputs (Gaussian, Cauchy, decimal magnitudes down to 1e-40):
every output finite and nearly every code equal (rotation sums round in another order there).
"""

import adversarial
import pytest
import torch
from test_kernels_gpu import _differing_groups, _poison, _signs_and_seed, assert_same_quantized

from quartet_compile import nvfp4 as q
from quartet_compile import ops  # noqa: F401  (registers the ops)

pytestmark = pytest.mark.gpu
OPS = torch.ops.quartet2
COLS, REPEAT = 2048, 8  # 1280 rows: not a multiple of the kernels' 64-row tiles
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _sink(dtype: torch.dtype, exact: bool) -> torch.Tensor:
    x = adversarial.sink(COLS, seed=21, exact=exact, repeat=REPEAT).to(dtype).cuda()
    assert torch.isfinite(x).all()
    return x


def _bands(rows: torch.Tensor) -> list[str]:
    """Band names of the sink's rows ``rows``, for failure messages."""
    per = adversarial.BAND * len(adversarial.BANDS)
    return sorted({adversarial.BANDS[(r % per) // adversarial.BAND] for r in rows.tolist()})


def _assert_same_with_bands(got, ref: q.NVFP4Tensor) -> None:
    rows = _differing_groups(got, ref).any(-1).nonzero().flatten()
    assert rows.numel() == 0, f"{rows.numel()} rows differ, in bands {_bands(rows)}"
    assert_same_quantized(got, ref)


def _assert_finite(got) -> None:
    codes, scales, ts, units = got
    assert torch.isfinite(ts) and ts > 0
    assert torch.isfinite(scales.float()).all() and torch.isfinite(units.float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_quantizer_on_adversarial_input(dtype):
    for exact in (True, False):
        x = _sink(dtype, exact)
        amax = x.float().abs().amax()
        _poison()
        got = OPS.quantize_fwd(x, amax, False)  # six only: no error sums, bit for bit anywhere
        _assert_finite(got)
        _assert_same_with_bands(got, q.quantize_rtn(x, False, amax))
        # Four-over-six sums each candidate's error in Triton's order: near-ties may differ.
        got = OPS.quantize_fwd(x, amax, True)
        _assert_finite(got)
        diff = _differing_groups(got, q.quantize_rtn(x, True, amax))
        assert diff.sum() <= 1e-4 * diff.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", q.BACKWARD_METHODS)
@pytest.mark.parametrize("transpose", [False, True])
def test_rht_eden_on_adversarial_input(dtype, method, transpose):
    signs, seed = _signs_and_seed(22)
    for exact in (True, False):
        x = _sink(dtype, exact)
        x = x.T.contiguous() if transpose else x
        _poison()
        got = OPS.rht_eden(x, signs, seed, transpose, method)
        _assert_finite(got)
        ref = q.rht_quantize(x, signs, seed, transpose, method)
        if exact:
            _assert_same_with_bands(got, ref)
        else:
            assert (got[0] == ref.codes).float().mean() > 0.99


@pytest.mark.parametrize("method", q.BACKWARD_METHODS)
def test_requant_on_adversarial_input(method):
    x = _sink(torch.float32, exact=True).T.contiguous()
    amax = torch.exp2(torch.ceil(torch.log2(x.abs().amax() / 1536))) * 1536  # power-of-two ts
    fwd = q.quantize_rtn(x, True, amax)
    signs, seed = _signs_and_seed(23)
    _poison()
    got = OPS.requant(*fwd, signs, seed, method)
    _assert_finite(got)
    _assert_same_with_bands(got, q.requant(fwd, signs, seed, method))


@pytest.mark.parametrize("name", ["subnormal", "tiny-normal"])
def test_tiny_tensors(name):
    x = adversarial.whole(name, 4096, COLS, seed=24).cuda()
    signs, seed = _signs_and_seed(24)
    amax = x.abs().amax()
    assert_same_quantized(OPS.quantize_fwd(x, amax, False), q.quantize_rtn(x, False, amax))
    for method in q.BACKWARD_METHODS:
        got = OPS.rht_eden(x, signs, seed, False, method)
        assert_same_quantized(got, q.rht_quantize(x, signs, seed, False, method))
        if name == "subnormal":  # every group underflows: the tensor quantizes to zero
            assert (got[0] == 0).all() and (got[3] == 0).all()


def test_underflowing_groups_are_dropped_as_in_the_reference():
    x = torch.zeros(2, 128, device="cuda")
    x[0, 5], x[1, 5] = 2.0**-119, 2.0**-121  # MS-EDEN scale 2^-125.1 (kept), 2^-127.1 (dropped)
    signs, seed = _signs_and_seed(25)
    got = OPS.rht_eden(x, signs, seed, False, "eden")
    assert_same_quantized(got, q.rht_quantize(x, signs, seed))
    assert (got[0][1] == 0).all() and (got[0][0] != 0).any()


def test_gemm_applies_tiny_tensor_scales_one_after_the_other():
    three = torch.tensor(3.0, device="cuda")
    a = OPS.quantize_fwd(torch.full((256, 256), 3.0, device="cuda"), three, True)[3]
    b = OPS.quantize_fwd(torch.full((128, 256), 3.0, device="cuda"), three, True)[3]
    ts_a, ts_b = (torch.tensor(2.0**e, device="cuda") for e in (-90, -60))
    out = OPS.gemm(a, ts_a, b, ts_b, torch.float32)
    expected = ((a.double() @ b.double().T) * 2.0**-150).float()
    assert (out > 0).all() and torch.equal(out, expected)
