"""quartet2::pad_segments and quartet2::grouped_gemm on CUDA, small and at a real MoE size.

pad_segments must equal the CPU loop over the experts bit for bit. grouped_gemm (CUTLASS's
grouped kernel, bf16 result) is held to a loop over the experts of the dense gemm op (cuBLAS,
float32 accumulation in another order) and of float32 products: a few bf16 roundings apart, never
exactly equal. Outputs land in memory poisoned with NaN, so an unwritten element cannot pass.
"""

import pytest
import torch
from test_grouped_ops import (
    SEGMENT_CASES,
    assert_same_rows,
    grouped_loop,
    pad_reference,
    random_rows,
    reduction_grouped_operands,
    relative_error,
    rows_grouped_operands,
    segment_ends,
)
from test_kernels_gpu import _poison

from quartet_compile import nvfp4 as q
from quartet_compile import ops  # noqa: F401  (registers the ops)

pytestmark = pytest.mark.gpu
OPS = torch.ops.quartet2
# A real MoE layer: 16384 tokens, 8 experts (one without tokens), 100 dropped tokens past the
# last segment, hidden 1024, expert width 1536.
MOE_SIZES, MOE_PAST, HIDDEN, WIDTH = [2900, 0, 2047, 1, 4096, 2200, 1937, 3103], 100, 1024, 1536


def _cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def assert_matches_expert_loops(out: torch.Tensor, args, offs, out_dtype) -> None:
    """Within the bf16 roundings of a loop of the dense gemm op (cuBLAS) and of a float32 loop,
    and exactly zero wherever the loop's output is (no expert, empty segment)."""
    assert out.dtype == out_dtype and out.is_cuda
    cublas = grouped_loop(*args, offs, out_dtype, gemm=OPS.gemm)
    exact = grouped_loop(*args, offs, torch.float32)  # float32 products of units on the GPU
    assert relative_error(out, cublas) < 4e-3 and relative_error(out, exact) < 4e-3
    assert not out[cublas == 0].any(), "no expert, or an empty segment, gives zeros"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_pad_segments_equals_the_loop_over_the_experts(case, dtype):
    sizes, past = SEGMENT_CASES[case]
    x, offs = random_rows(sum(sizes) + past, 16, dtype, seed=len(case)), segment_ends(sizes)
    _poison()
    got = OPS.pad_segments(x.cuda(), offs.cuda())
    assert got[0].is_cuda
    assert_same_rows((got[0].cpu(), got[1].cpu()), pad_reference(x, offs))


@pytest.mark.parametrize(
    ("dtype", "cols"),
    [(torch.bfloat16, HIDDEN), (torch.uint8, HIDDEN // 2), (torch.float8_e4m3fn, 64)],
)
def test_pad_segments_at_moe_size(dtype, cols):
    x = random_rows(sum(MOE_SIZES) + MOE_PAST, cols, dtype, seed=1)
    offs = segment_ends(MOE_SIZES)
    _poison()
    got = OPS.pad_segments(x.cuda(), offs.cuda())
    assert_same_rows((got[0].cpu(), got[1].cpu()), pad_reference(x, offs))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_rows_grouped_gemm(out_dtype):
    _, _, args, offs = rows_grouped_operands([0, 130, 0, 77, 1], past=40, dtype=torch.int64)
    args, offs = _cuda(args), offs.cuda()
    _poison()
    out = OPS.grouped_gemm(*args, offs, out_dtype)
    assert not out[208:].any(), "rows past offs[-1] must be zero"
    assert out[:208].abs().min() >= q.MIN_NORMAL  # tensor scales 2^-90 and 2^-60
    assert_matches_expert_loops(out, args, offs, out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", [[128, 0, 256, 128], [48, 0, 32, 0, 80], [0, 0, 64]])
def test_reduction_grouped_gemm(sizes, out_dtype):
    _, _, args, offs = reduction_grouped_operands(sizes)
    args, offs = _cuda(args), offs.cuda()
    _poison()
    out = OPS.grouped_gemm(*args, offs, out_dtype)
    for e, size in enumerate(sizes):
        assert out[e].any() == (size > 0), f"expert {e} ({size} tokens)"
    assert_matches_expert_loops(out, args, offs, out_dtype)


def _moe_units(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, device="cuda").bfloat16()
    quantized = OPS.quantize_fwd(x, x.float().abs().amax(), True)
    return quantized[3], quantized[2]


def test_rows_grouped_gemm_at_moe_size():
    # The forward: tokens [S, HIDDEN] times each expert's [WIDTH, HIDDEN] weight.
    x_units, x_ts = _moe_units(sum(MOE_SIZES) + MOE_PAST, HIDDEN, seed=2)
    w_units, w_ts = _moe_units(len(MOE_SIZES) * WIDTH, HIDDEN, seed=3)
    args = (x_units, x_ts, w_units.view(len(MOE_SIZES), WIDTH, HIDDEN), w_ts)
    offs = segment_ends(MOE_SIZES).cuda()
    _poison()
    out = OPS.grouped_gemm(*args, offs, torch.bfloat16)
    assert out.shape == (16384, WIDTH) and not out[sum(MOE_SIZES) :].any()
    assert_matches_expert_loops(out, args, offs, torch.bfloat16)


def test_reduction_grouped_gemm_at_moe_size():
    # The weight gradient: the tokens padded per expert, both operands grouped along them.
    offs = segment_ends(MOE_SIZES).cuda()
    dy = torch.randn(sum(MOE_SIZES) + MOE_PAST, WIDTH, device="cuda").bfloat16()
    x = torch.randn(sum(MOE_SIZES) + MOE_PAST, HIDDEN, device="cuda").bfloat16()
    (dy_padded, padded_offs), (x_padded, _) = OPS.pad_segments(dy, offs), OPS.pad_segments(x, offs)
    dy_q = OPS.quantize_fwd(dy_padded.T.contiguous(), dy.float().abs().amax(), True)
    x_q = OPS.quantize_fwd(x_padded.T.contiguous(), x.float().abs().amax(), True)
    args = (dy_q[3], dy_q[2], x_q[3], x_q[2])
    _poison()
    out = OPS.grouped_gemm(*args, padded_offs, torch.float32)
    assert out.shape == (len(MOE_SIZES), WIDTH, HIDDEN) and not out[1].any()
    assert_matches_expert_loops(out, args, padded_offs, torch.float32)


def test_compiled_ops_match_eager():
    _, _, args, offs = rows_grouped_operands([0, 130, 0, 77, 1], past=40)
    args, offs = _cuda(args), offs.cuda()

    def moe(a_units, a_ts, b_units, b_ts, offs):
        # The forward product, then a weight-gradient-like product over the padded tokens.
        y = OPS.grouped_gemm(a_units, a_ts, b_units, b_ts, offs, torch.bfloat16)
        padded, padded_offs = OPS.pad_segments(a_units, offs)
        return y, OPS.grouped_gemm(padded.T, a_ts, padded.T, a_ts, padded_offs, torch.float32)

    compiled = torch.compile(moe, fullgraph=True)(*args, offs)
    for got, ref in zip(compiled, moe(*args, offs), strict=True):
        assert torch.equal(got, ref)
