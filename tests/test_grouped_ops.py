"""The mixture-of-experts ops (quartet2::pad_segments, quartet2::grouped_gemm) on the CPU:
against Python loops over the experts, fake implementations, input checks, Inductor.

The same comparisons on CUDA, at a real MoE size, are in test_grouped_ops_gpu.py.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from quartet_compile import nvfp4 as q
from quartet_compile import ops

OPS = torch.ops.quartet2
BLOCK = q.HADAMARD_BLOCK

# Tokens per expert, then rows past the last segment (rows that belong to no expert).
SEGMENT_CASES = {
    "empty experts": ([0, 5, 0, 300, 1, 0], 0),
    "segments of exactly 128": ([128, 128, 256], 0),
    "all tokens in one expert": ([0, 0, 391, 0], 0),
    "a single expert": ([200], 0),
    "rows past offs[-1]": ([70, 0, 129], 37),
    "no tokens at all": ([0, 0, 0], 0),
    "no rows": ([0, 0], 0),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def segment_ends(sizes: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(dtype)


def random_rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (uint8 codes, float8 scales, bf16...) with no zero row."""
    bits = torch.randint(1, 120, (rows, cols * torch.empty((), dtype=dtype).element_size()))
    return bits.to(torch.uint8).view(dtype)


def pad_reference(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pad_segments as a loop over the experts: segment e copied to the next multiple of 128."""
    out = torch.zeros((q.padded_segment_rows(x.shape[0], offs.shape[0]), x.shape[1]), dtype=x.dtype)
    start = padded = 0
    padded_ends = []
    for end in offs.tolist():
        out[padded : padded + end - start] = x[start:end]
        padded += -(-(end - start) // BLOCK) * BLOCK
        padded_ends.append(padded)
        start = end
    assert padded <= out.shape[0], "padded_segment_rows is not an upper bound"
    return out, torch.tensor(padded_ends, dtype=torch.int32)


def assert_same_rows(got: tuple[torch.Tensor, torch.Tensor], ref) -> None:
    assert got[0].dtype == ref[0].dtype and got[0].shape == ref[0].shape
    assert torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8))
    assert got[1].dtype == torch.int32 and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------------------ pad_segments


@pytest.mark.parametrize("offs_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_pad_segments_equals_a_loop_over_the_experts(case, dtype, offs_dtype):
    sizes, past = SEGMENT_CASES[case]
    x = random_rows(sum(sizes) + past, 16, dtype, seed=len(case))
    offs = segment_ends(sizes, offs_dtype)
    got = OPS.pad_segments(x, offs)
    assert_same_rows(got, pad_reference(x, offs))
    assert got[1].tolist() == segment_ends([-(-s // BLOCK) * BLOCK for s in sizes]).tolist()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=9),
    past=st.integers(0, 50),
    cols=st.sampled_from([2, 16, 64]),
)
def test_pad_segments_on_random_segments(sizes, past, cols):
    x = random_rows(sum(sizes) + past, cols, torch.uint8, seed=sum(sizes))
    offs = segment_ends(sizes)
    got = OPS.pad_segments(x, offs)
    assert_same_rows(got, pad_reference(x, offs))
    # Every kept row is a source row, and every row that belongs to an expert is kept.
    assert int(got[0].any(1).sum()) == offs[-1]


@pytest.mark.parametrize(("rows", "experts"), [(16384, 8), (129 * 63 + 1, 64), (5000, 1)])
def test_padded_segment_rows_is_reached(rows, experts):
    # k - 1 segments of 129 rows (each padded by 127) and one of the rest: the bound, exactly.
    sizes = [129] * (experts - 1) + [rows - 129 * (experts - 1)]
    padded_ends = OPS.pad_segments(torch.zeros(rows, 1), segment_ends(sizes))[1]
    assert padded_ends[-1] == q.padded_segment_rows(rows, experts)
    assert q.padded_segment_rows(rows, experts) <= -(-rows // BLOCK) * BLOCK + BLOCK * experts


def test_pad_segments_never_reads_outside_x_whatever_offs_holds():
    x = random_rows(50, 4, torch.uint8, seed=3)
    got, padded_ends = OPS.pad_segments(x, torch.tensor([-3, 900, 20], dtype=torch.int32))
    # Ends clamped to [0, 50] and sizes at 0: segments [0, 0), [0, 50), [50, 50).
    assert padded_ends.tolist() == [0, 128, 128]
    assert torch.equal(got[:50], x) and not got[50:].any()


# ------------------------------------------------------------------------------ grouped_gemm


def rows_grouped_operands(sizes: list[int], past: int, dtype=torch.int32, seed: int = 0):
    """Quantized activations [S, R] and E expert weights [E, Nout, R] (one tensor scale, as the
    forward quantizes the stacked weights), tiny enough that the product of the tensor scales
    (about 2^-90 * 2^-60) underflows float32 while the outputs are normal numbers."""
    g = _gen(seed)
    experts, red, out_features = len(sizes), 256, 24
    x = (torch.rand(sum(sizes) + past, red, generator=g) + 0.5) * 2.0**-80
    w = (torch.rand(experts * out_features, red, generator=g) + 0.5) * 2.0**-50
    a, b = q.quantize_rtn(x), q.quantize_rtn(w)
    b_units = q.units(b).view(experts, out_features, red)
    return a, b, (q.units(a), a.tensor_scale, b_units, b.tensor_scale), segment_ends(sizes, dtype)


def reduction_grouped_operands(sizes: list[int], seed: int = 0):
    """Quantized [Nout, P] and [M, P] operands whose reduction dim P holds the segments (the
    weight gradient's form)."""
    g = _gen(seed)
    a = q.quantize_rtn(torch.randn(24, sum(sizes), generator=g))
    b = q.quantize_rtn(torch.randn(32, sum(sizes), generator=g) * 1e3)
    return a, b, (q.units(a), a.tensor_scale, q.units(b), b.tensor_scale), segment_ends(sizes)


def grouped_loop(a_units, a_ts, b_units, b_ts, offs, out_dtype, gemm=q.gemm_units) -> torch.Tensor:
    """grouped_gemm as a loop of ``gemm`` (a dense gemm on units) over the experts."""
    bounds = list(zip([0, *offs.tolist()[:-1]], offs.tolist(), strict=True))
    if b_units.dim() == 3:
        out = a_units.new_zeros((a_units.shape[0], b_units.shape[1]), dtype=out_dtype)
        for e, (start, end) in enumerate(bounds):
            out[start:end] = gemm(a_units[start:end], a_ts, b_units[e], b_ts, out_dtype)
        return out
    return torch.stack(
        [
            gemm(a_units[:, start:end], a_ts, b_units[:, start:end], b_ts, out_dtype)
            for start, end in bounds
        ]
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| in float64: the squares of tiny outputs underflow float32."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offs_dtype", [torch.int32, torch.int64])
def test_rows_grouped_gemm_equals_a_loop_over_the_experts(offs_dtype, out_dtype):
    a, b, args, offs = rows_grouped_operands([0, 130, 0, 77, 1], past=40, dtype=offs_dtype)
    out = OPS.grouped_gemm(*args, offs, out_dtype)
    assert out.shape == (248, 24) and out.dtype == out_dtype
    torch.testing.assert_close(out, grouped_loop(*args, offs, out_dtype), rtol=1e-6, atol=0)
    assert not out[208:].any(), "rows past offs[-1] must be zero"


def test_tiny_tensor_scales_do_not_underflow():
    a, b, args, offs = rows_grouped_operands([100, 0, 156], past=0)
    assert a.tensor_scale * b.tensor_scale == 0  # their product alone underflows float32
    out = OPS.grouped_gemm(*args, offs, torch.float32)
    deq_a, deq_b = q.dequantize(a), q.dequantize(b).view(3, 24, -1)
    ref = torch.cat([deq_a[:100] @ deq_b[0].T, deq_a[100:] @ deq_b[2].T])
    assert out.abs().min() >= q.MIN_NORMAL
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[128, 0, 256, 128], [48, 0, 32, 0, 80], [0, 0, 64]])
def test_reduction_grouped_gemm_equals_a_loop_over_the_experts(sizes, out_dtype):
    _, _, args, offs = reduction_grouped_operands(sizes)
    out = OPS.grouped_gemm(*args, offs, out_dtype)
    assert out.shape == (len(sizes), 24, 32) and out.dtype == out_dtype
    torch.testing.assert_close(out, grouped_loop(*args, offs, out_dtype), rtol=1e-6, atol=0)
    for e, size in enumerate(sizes):
        assert out[e].any() == (size > 0), f"expert {e} ({size} tokens)"


def test_empty_reduction_dim_gives_zeros():
    a, b, args, offs = rows_grouped_operands([3, 0], past=2)
    units = (args[0][:, :0], args[1], args[2][..., :0], args[3])
    assert torch.equal(OPS.grouped_gemm(*units, offs, torch.float32), torch.zeros(5, 24))
    a_units, b_units = torch.zeros(24, 0, dtype=torch.bfloat16), torch.zeros(32, 0).bfloat16()
    out = OPS.grouped_gemm(a_units, args[1], b_units, args[3], segment_ends([0, 0]), torch.bfloat16)
    assert torch.equal(out, torch.zeros(2, 24, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("form", ["rows grouped", "reduction grouped"])
def test_cuda_operand_layouts_pass_the_grouped_mm_checks(form):
    # ops._grouped_mm_cuda where it can run: on the CPU, in bf16, through the same stride checks
    # and the meta function (bf16 only) that torch.compile traces it with on CUDA.
    if form == "rows grouped":
        _, _, (a_units, a_ts, b_units, b_ts), offs = rows_grouped_operands([0, 130, 77], past=9)
    else:
        _, _, (a_units, a_ts, b_units, b_ts), offs = reduction_grouped_operands([128, 0, 96])
    make_fx(ops._grouped_mm_cuda, tracing_mode="fake")(a_units, b_units, offs)
    acc = ops._grouped_mm_cuda(a_units, b_units, offs)
    out = q.finish_grouped(acc, a_ts, b_ts, offs, torch.float32)
    ref = OPS.grouped_gemm(a_units, a_ts, b_units, b_ts, offs, torch.float32)
    assert acc.dtype == torch.bfloat16 and relative_error(out, ref) < 4e-3


# ----------------------------------------------------------------- schemas, fakes and checks


def _opcheck_cases():
    _, _, rows_args, rows_offs = rows_grouped_operands([5, 0, 60], past=7)
    _, _, red_args, red_offs = reduction_grouped_operands([16, 0, 48])
    sizes = SEGMENT_CASES["rows past offs[-1]"][0]
    return {
        "pad_segments bf16": (
            OPS.pad_segments.default,
            (random_rows(250, 8, torch.bfloat16, 0), segment_ends(sizes)),
        ),
        "pad_segments float8": (
            OPS.pad_segments.default,
            (random_rows(250, 8, torch.float8_e4m3fn, 0), segment_ends(sizes, torch.int64)),
        ),
        "grouped_gemm rows": (OPS.grouped_gemm.default, (*rows_args, rows_offs, torch.bfloat16)),
        "grouped_gemm reduction": (
            OPS.grouped_gemm.default,
            (*red_args, red_offs, torch.float32),
        ),
    }


@pytest.mark.parametrize("case", _opcheck_cases())
def test_opcheck_schema_and_fake_implementation(case):
    op, args = _opcheck_cases()[case]
    # opcheck runs the op for real, under FakeTensorMode and through AOTAutograd with dynamic
    # shapes, comparing shapes, dtypes and strides. Its schema check does arithmetic on every
    # input, which float8 tensors do not support.
    has_fp8 = any(getattr(a, "dtype", None) == torch.float8_e4m3fn for a in args)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=checks if has_fp8 else ("test_schema", *checks))


def test_ops_trace_into_inductor_cpu_code_and_match_eager():
    _, _, args, offs = rows_grouped_operands([0, 70, 129], past=9)

    def moe(a_units, a_ts, b_units, b_ts, offs):
        # The forward product, then a weight-gradient-like product over the padded tokens.
        y = OPS.grouped_gemm(a_units, a_ts, b_units, b_ts, offs, torch.bfloat16)
        padded, padded_offs = OPS.pad_segments(a_units, offs)
        return y, OPS.grouped_gemm(padded.T, a_ts, padded.T, a_ts, padded_offs, torch.float32)

    eager = moe(*args, offs)
    compiled = torch.compile(moe, backend="inductor", fullgraph=True)(*args, offs)
    for got, ref in zip(compiled, eager, strict=True):
        assert torch.equal(got, ref)


def _bad_calls():
    _, _, (ua, ts, ub, _), offs = rows_grouped_operands([5, 0, 60], past=7)
    _, _, (ra, _, rb, _), red_offs = reduction_grouped_operands([16, 48])
    x = torch.zeros(10, 4)
    return {
        "pad_segments 3-D rows": (
            lambda: OPS.pad_segments(x[None], offs),
            ValueError,
            "2-D rows",
        ),
        "pad_segments float offs": (
            lambda: OPS.pad_segments(x, offs.float()),
            ValueError,
            "1-D int32 or int64",
        ),
        "pad_segments no experts": (
            lambda: OPS.pad_segments(x, offs[:0]),
            ValueError,
            "one per expert",
        ),
        "float32 units": (
            lambda: OPS.grouped_gemm(ua.float(), ts, ub, ts, offs, torch.bfloat16),
            TypeError,
            "operand a must be the 2-D bfloat16 units",
        ),
        "4-D b": (
            lambda: OPS.grouped_gemm(ua, ts, ub[None], ts, offs, torch.bfloat16),
            TypeError,
            "operand b must be the 2-D or 3-D bfloat16 units",
        ),
        "tensor scale of 1 element": (
            lambda: OPS.grouped_gemm(ua, ts[None], ub, ts, offs, torch.bfloat16),
            TypeError,
            "a_tensor_scale must be a 0-d float32",
        ),
        "2-D offs": (
            lambda: OPS.grouped_gemm(ua, ts, ub, ts, offs[None], torch.bfloat16),
            ValueError,
            "1-D int32 or int64",
        ),
        "reduction dims": (
            lambda: OPS.grouped_gemm(ua, ts, ub[..., :128], ts, offs, torch.bfloat16),
            ValueError,
            "disagree on the reduction dim",
        ),
        "reduction dim not of groups of 16": (
            lambda: OPS.grouped_gemm(ua[:, :40], ts, ub[..., :40], ts, offs, torch.bfloat16),
            ValueError,
            "multiple of 16",
        ),
        "experts": (
            lambda: OPS.grouped_gemm(ua, ts, ub[:2], ts, offs, torch.bfloat16),
            ValueError,
            "b holds 2 experts, offs 3 segments",
        ),
        "reduction grouped rows": (
            lambda: OPS.grouped_gemm(ra[:20], ts, rb, ts, red_offs, torch.bfloat16),
            ValueError,
            "multiples of 8",
        ),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_inputs_raise_clear_errors(case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()
