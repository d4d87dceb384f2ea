"""The quartet2 ops' CUDA kernels at real sizes against the nvfp4.py reference run on the GPU.

Bit-for-bit wherever the arithmetic is order-independent; the two float32 sums whose order differs
from torch's are checked for what they can change (see each test). Outputs are allocated from
memory poisoned with NaN bytes, so an unwritten element cannot pass.
"""

import pytest
import torch

from quartet_compile import nvfp4 as q
from quartet_compile import ops  # noqa: F401  (registers the ops)
from quartet_compile.kernels import gemm

pytestmark = pytest.mark.gpu
OPS = torch.ops.quartet2
ROWS, COLS = 16384 - 40, 4096  # rows not a multiple of any block: padding and masks exercised


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _gaussian(rows: int, cols: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = _gen(seed)
    spread = torch.exp2(torch.randint(-4, 5, (rows, 1), generator=g, device="cuda").float())
    return (torch.randn(rows, cols, generator=g, device="cuda") * spread).to(dtype)


def _grid_values(rows: int, cols: int, seed: int) -> torch.Tensor:
    """bf16 multiples of 1/16 in [-4, 4): every 128-term rotation sum is exact in any order."""
    g = _gen(seed)
    return (torch.randint(-64, 64, (rows, cols), generator=g, device="cuda") / 16).bfloat16()


def _poison() -> None:
    """Leave NaN bytes in the caching allocator's free memory, where the ops' outputs land."""
    junk = torch.full((2**28,), float("nan"), device="cuda")
    del junk


def _signs_and_seed(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    signs = q.random_signs(torch.Generator().manual_seed(seed)).cuda()
    return signs, torch.tensor(7919 * seed, dtype=torch.int64, device="cuda")


def _differing_groups(got, ref: q.NVFP4Tensor) -> torch.Tensor:
    """Groups whose codes, scale or unit values differ from the reference's."""
    codes, scales, _, units = got
    rows = codes.shape[0]
    by_codes = (codes != ref.codes).view(rows, -1, q.GROUP // 2).any(-1)
    # NaN units (a NaN group) compare as equal to NaN reference units.
    ref_units = q.units(ref)
    by_units = ~((units == ref_units) | (units.isnan() & ref_units.isnan()))
    by_units = by_units.view(rows, -1, q.GROUP).any(-1)
    return by_codes | by_units | (scales.view(torch.uint8) != ref.scales.view(torch.uint8))


def assert_same_quantized(got, ref: q.NVFP4Tensor) -> None:
    diff = _differing_groups(got, ref)
    assert not diff.any(), f"{diff.sum()} of {diff.numel()} groups differ"
    assert torch.equal(got[2], ref.tensor_scale)
    assert got[3].dtype == torch.bfloat16 and got[3].shape == ref.shape


# ------------------------------------------------------------------------------ quantize_fwd


@pytest.mark.parametrize("four_over_six", [True, False])
def test_quantize_fwd_matches_reference(four_over_six):
    x = _gaussian(ROWS, COLS, seed=1)
    amax = x.float().abs().amax()
    _poison()
    got = OPS.quantize_fwd(x, amax, four_over_six)
    ref = q.quantize_rtn(x, four_over_six, amax)
    assert torch.equal(got[2], ref.tensor_scale)
    diff = _differing_groups(got, ref)
    if four_over_six:
        # The kernel sums each candidate's squared error in Triton's order, torch in its own:
        # a group may only differ where the two candidates' errors tie to float32 rounding.
        g = x.float().view(ROWS, -1, q.GROUP)
        gmax = g.abs().amax(-1, keepdim=True)
        err6 = q.rtn_candidate(g, gmax, ref.tensor_scale, 6.0)[2].squeeze(-1)
        err4 = q.rtn_candidate(g, gmax, ref.tensor_scale, 4.0)[2].squeeze(-1)
        near_tie = (err4 - err6).abs() <= 1e-5 * err6
        assert not (diff & ~near_tie).any(), f"{(diff & ~near_tie).sum()} groups differ"
        assert diff.sum() <= 1e-5 * diff.numel()
    else:
        assert not diff.any(), f"{diff.sum()} groups differ"


def test_quantize_fwd_propagates_nan():
    x = _gaussian(256, 1024, seed=2, dtype=torch.float32)
    x[3, 20] = float("nan")
    codes, scales, ts, units = OPS.quantize_fwd(x, x.abs().nan_to_num(0).amax(), True)
    deq = q.dequantize(q.NVFP4Tensor(codes, scales, ts))
    assert deq[3, 16:32].isnan().all() and not deq[4].isnan().any()
    assert units[3, 16:32].isnan().all() and not units[4].isnan().any()


# ------------------------------------------------------------------------- rht_eden / requant


@pytest.mark.parametrize("method", ["eden", "sr"])
@pytest.mark.parametrize("transpose", [False, True])
def test_rht_eden_matches_reference_bit_for_bit(method, transpose):
    x = _grid_values(ROWS, COLS, seed=3)
    signs, seed = _signs_and_seed(4)
    _poison()
    got = OPS.rht_eden(x, signs, seed, transpose, method)
    assert_same_quantized(got, q.rht_quantize(x, signs, seed, transpose, method))


@pytest.mark.parametrize("transpose", [False, True])
def test_rht_eden_on_gaussian_data_is_within_rotation_rounding(transpose):
    # The 128-term rotation sums round in the tensor cores' order, not cuBLAS's: a last-bit
    # difference can move a code across a midpoint or a scale's random rounding, rarely.
    x = _gaussian(ROWS, COLS, seed=5)
    signs, seed = _signs_and_seed(6)
    got = OPS.rht_eden(x, signs, seed, transpose, "eden")
    ref = q.rht_quantize(x, signs, seed, transpose, "eden")
    assert (got[0] == ref.codes).float().mean() > 0.9999
    assert (got[1].view(torch.uint8) == ref.scales.view(torch.uint8)).float().mean() > 0.999
    torch.testing.assert_close(got[2], ref.tensor_scale, rtol=1e-5, atol=0)


def test_rht_eden_propagates_nan():
    x = _gaussian(512, 256, seed=7)
    x[5, 9] = float("nan")
    signs, seed = _signs_and_seed(8)
    for method in ("eden", "sr"):
        assert OPS.rht_eden(x, signs, seed, True, method)[2].isnan()


@pytest.mark.parametrize("method", ["eden", "sr"])
def test_requant_matches_reference_bit_for_bit(method):
    x = _gaussian(ROWS, COLS, seed=9, dtype=torch.float32)
    fwd = q.quantize_rtn(x, True, torch.tensor(1536.0 * 16, device="cuda"))  # ts = 16: exact
    assert x.abs().max() <= 1536 * 16
    signs, seed = _signs_and_seed(10)
    _poison()
    got = OPS.requant(*fwd, signs, seed, method)
    assert got[0].shape == (COLS, 16384 // 2)
    assert_same_quantized(got, q.requant(fwd, signs, seed, method))


# ------------------------------------------------------------------------------------ gemm


def _blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10


def _gemm_operands():
    a = q.quantize_rtn(_gaussian(4096 - 24, 4096, seed=11, dtype=torch.float32))
    b = q.quantize_rtn(_gaussian(2048, 4096, seed=12, dtype=torch.float32))
    return a, b, q.gemm(a, b, torch.float32)


def test_gemm_op_on_units_matches_reference():
    a, b, ref = _gemm_operands()
    _poison()
    out = OPS.gemm(q.units(a), a.tensor_scale, q.units(b), b.tensor_scale, torch.float32)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    out = OPS.gemm(q.units(a), a.tensor_scale, q.units(b), b.tensor_scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 4e-3


@pytest.mark.parametrize(
    "design",
    [
        "fused",
        pytest.param(
            "dot_scaled",
            marks=pytest.mark.skipif(not _blackwell(), reason="tl.dot_scaled needs Blackwell"),
        ),
    ],
)
def test_gemm_on_triples_matches_reference(design):
    a, b, ref = _gemm_operands()
    _poison()
    out = gemm.gemm_nvfp4(*a, *b, torch.float32, design=design)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    out = gemm.gemm_nvfp4(*a, *b, torch.bfloat16, design=design)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 4e-3


@pytest.mark.skipif(_blackwell(), reason="checks the refusal on GPUs before Blackwell")
def test_dot_scaled_is_refused_before_blackwell():
    a, b, _ = _gemm_operands()
    with pytest.raises(ValueError, match=r"needs a Blackwell GPU \(capability >= 10\)"):
        gemm.gemm_nvfp4(*a, *b, torch.bfloat16, design="dot_scaled")


# ------------------------------------------------------------------------------ torch.compile


def _compiled_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    return out, "\n".join(code)


def test_compiled_ops_inline_the_kernels_and_match_eager():
    x = _gaussian(2048, 1024, seed=15)
    signs, seed = _signs_and_seed(16)
    amax = x.float().abs().amax()

    def fwd_bwd(x, amax, signs, seed):
        xq = OPS.quantize_fwd(x, amax, True)
        gq = OPS.rht_eden(x, signs, seed, True, "eden")
        rq = OPS.requant(*xq[:3], signs, seed, "eden")
        return xq, gq, rq, OPS.gemm(gq[3], gq[2], rq[3], rq[2], torch.bfloat16)

    out, code = _compiled_code(fwd_bwd, x, amax, signs, seed)
    for kernel in ("_quantize_rtn_kernel", "_eden_data_kernel", "_eden_scales_kernel"):
        assert kernel in code, f"{kernel} not in Inductor's output code"
    assert "extern_kernels.mm(" in code  # the units go to cuBLAS, with no pass in between
    eager = fwd_bwd(x, amax, signs, seed)
    for got, ref in zip(out[:3], eager[:3], strict=True):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
        assert torch.equal(got[1].view(torch.uint8), ref[1].view(torch.uint8))
        assert torch.equal(got[3], ref[3])
    assert torch.equal(out[3], eager[3])
