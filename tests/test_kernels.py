"""The Triton kernels under Triton's interpreter (CPU) against the nvfp4.py reference.

Deterministic outputs must match bit-for-bit; MS-EDEN and SR draw the reference's Philox numbers
(same seed, same offsets), so they must match bit-for-bit too. Small shapes: the interpreter is
slow. The same checks at real sizes on the GPU are in test_kernels_gpu.py, with NaN propagation
(the interpreter casts float32 NaN to float8 as 384).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from quartet_compile import nvfp4 as q
from quartet_compile.kernels import gemm, quantize, rht_eden

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests (tests/conftest.py sets TRITON_INTERPRET=1 where CUDA is absent)",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian(rows: int, cols: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    # Row magnitudes spread over 2^-4..2^4, so groups use many scale binades.
    g = _gen(seed)
    spread = torch.exp2(torch.randint(-4, 5, (rows, 1), generator=g).float())
    return (torch.randn(rows, cols, generator=g) * spread).to(dtype)


def assert_same_quantized(got, ref: q.NVFP4Tensor) -> None:
    """A kernel's (codes, scales, tensor_scale, units) equal the reference triple and its units."""
    codes, scales, ts, units = got
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float8_e4m3fn
    assert torch.equal(codes, ref.codes), f"{(codes != ref.codes).sum()} code bytes differ"
    diff = scales.view(torch.uint8) != ref.scales.view(torch.uint8)
    assert not diff.any(), f"{diff.sum()} of {diff.numel()} scales differ"
    assert ts.dtype == torch.float32 and ts.shape == () and torch.equal(ts, ref.tensor_scale)
    assert units.dtype == torch.bfloat16 and units.shape == ref.shape
    assert torch.equal(units, q.units(ref)), f"{(units != q.units(ref)).sum()} units differ"


# ---------------------------------------------------------------------------------- helpers


@triton.jit
def _encode_kernel(u_ptr, out_ptr, N: tl.constexpr, BELOW_8: tl.constexpr):
    offs = tl.arange(0, N)
    u = tl.load(u_ptr + offs)
    tl.store(out_ptr + offs, quantize.e2m1_code(u, quantize.e2m1_round(u, BELOW_8)))


@pytest.mark.parametrize("below_8", [False, True])
def test_e2m1_rounding_bit_trick_equals_reference_encoding(below_8: bool):
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = torch.cat([mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(9.0))])
    special = torch.tensor([0.0, 0.5, 1.0, 1.5, 6.0, 6.5, 7.0, 1e30, 1e-30, float("inf")])
    values = torch.cat([near, special, torch.rand(1024 - 3 * 7 - 10, generator=_gen(0)) * 8])
    u = torch.cat([values, -values])
    u[-1] = float("nan")
    if below_8:  # the promise MS-EDEN's values keep (|u| <= its FP4 maximum, or NaN)
        u = torch.where(u.abs() < 8, u, u.nextafter(torch.tensor(0.0)) % 8)
    out = torch.empty(2048, dtype=torch.int32)
    _encode_kernel[(1,)](u, out, 2048, below_8)
    assert torch.equal(out.to(torch.uint8), q.e2m1_encode(u))


@triton.jit
def _uniform_kernel(seed_ptr, out_ptr, N: tl.constexpr):
    draws = quantize.philox_uniform4(tl.load(seed_ptr), tl.arange(0, N // 4))
    tl.store(out_ptr + tl.arange(0, N), tl.reshape(draws, (N,)))


@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7])  # the key's high word matters too
def test_kernel_draws_are_the_references_uniforms(seed: int):
    out = torch.empty(512)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    _uniform_kernel[(1,)](seed_t, out, 512)
    expected = q.seeded_uniform(seed_t, torch.Size((512,)), torch.device("cpu"))
    assert torch.equal(out, expected)
    # Four draws per Philox evaluation, all distinct: no word is repeated or left unused.
    assert out.unique().numel() == 512 and 0.0 <= out.min() and out.max() < 1.0


# ------------------------------------------------------------------------------ quantize_fwd


@pytest.mark.parametrize("four_over_six", [True, False])
@pytest.mark.parametrize(
    ("rows", "cols", "dtype"), [(64, 256, torch.bfloat16), (50, 176, torch.float32)]
)
def test_quantize_matches_reference_bit_for_bit(four_over_six, rows, cols, dtype):
    x = _gaussian(rows, cols, seed=rows + cols, dtype=dtype)
    x[1, :16] = 0  # an all-zero group stores scale 1
    amax = x.float().abs().amax()
    got = quantize.quantize_rtn(x, amax, four_over_six)
    assert_same_quantized(got, q.quantize_rtn(x, four_over_six, amax))
    assert got[1][1, 0].float() == 1


def test_quantize_takes_the_graphs_amax():
    # A larger amax (e.g. from a fused reduction) changes the tensor scale and the scales with it.
    x = _gaussian(32, 128, seed=1)
    amax = torch.tensor(1536.0 * 4)
    got = quantize.quantize_rtn(x, amax, True)
    assert_same_quantized(got, q.quantize_rtn(x, True, amax))
    assert got[2] == 4.0


# ------------------------------------------------------------------------- rht_eden / requant


def _signs_and_seed(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return q.random_signs(_gen(seed)), torch.tensor(10_000_019 * seed, dtype=torch.int64)


@pytest.mark.parametrize("method", ["eden", "sr"])
@pytest.mark.parametrize("transpose", [False, True])
def test_rht_quantize_matches_reference_bit_for_bit(method, transpose):
    # 200 rows: transposed, the reduction dim is zero-padded from 200 to 256.
    x = _gaussian(200, 256, seed=3)
    signs, seed = _signs_and_seed(4)
    got = rht_eden.rht_quantize(x, signs, seed, transpose, method)
    ref = q.rht_quantize(x, signs, seed, transpose, method)
    assert got[0].shape == ((256, 128) if transpose else (200, 128))
    assert_same_quantized(got, ref)


def test_rht_quantize_float32_input_and_unpadded_plain_rows():
    x = _gaussian(48, 200, seed=5, dtype=torch.float32)  # plain: columns padded 200 -> 256
    signs, seed = _signs_and_seed(6)
    assert_same_quantized(
        rht_eden.rht_quantize(x, signs, seed, False, "eden"),
        q.rht_quantize(x, signs, seed, False, "eden"),
    )


def test_rht_quantize_depends_on_seed_and_signs():
    x = _gaussian(64, 128, seed=7)
    signs, seed = _signs_and_seed(8)
    base = rht_eden.rht_quantize(x, signs, seed, False, "eden")
    other_seed = rht_eden.rht_quantize(x, signs, seed + 1, False, "eden")
    assert torch.equal(base[0], other_seed[0])  # codes are RTN: only the scales are random
    assert not torch.equal(base[1].view(torch.uint8), other_seed[1].view(torch.uint8))
    other_signs = rht_eden.rht_quantize(x, -signs, seed, False, "eden")
    assert not torch.equal(base[0], other_signs[0])


@pytest.mark.parametrize("method", ["eden", "sr"])
def test_requant_matches_reference_bit_for_bit(method):
    # A power-of-two tensor scale (amax = 1536 * 2^-3) keeps deq(q) exact in the reference too.
    w = _gaussian(200, 384, seed=9, dtype=torch.float32)
    assert w.abs().max() <= 192
    fwd = q.quantize_rtn(w, True, torch.tensor(1536.0 * 2**-3))
    assert fwd.tensor_scale == 2**-3
    signs, seed = _signs_and_seed(10)
    got = rht_eden.requant(*fwd, signs, seed, method)
    assert got[0].shape == (384, 128)  # [cols, padded rows / 2]
    assert_same_quantized(got, q.requant(fwd, signs, seed, method))


def test_requant_with_any_tensor_scale_is_one_rounding_away():
    w = _gaussian(128, 256, seed=11, dtype=torch.float32)
    fwd = q.quantize_rtn(w, True)
    signs, seed = _signs_and_seed(12)
    got = q.NVFP4Tensor(*rht_eden.requant(*fwd, signs, seed, "eden")[:3])
    ref = q.requant(fwd, signs, seed, "eden")
    assert (got.codes == ref.codes).float().mean() > 0.99
    torch.testing.assert_close(got.tensor_scale, ref.tensor_scale, rtol=1e-6, atol=0)
    rel = (got.dequantize() - ref.dequantize()).norm() / ref.dequantize().norm()
    assert rel < 0.02


# ------------------------------------------------------------------------------------ gemm


def test_units_are_the_exact_dequantized_values_without_the_tensor_scale():
    # Amax 1536 * 2^-3: a power-of-two tensor scale, so deq = units * tensor_scale exactly.
    t = q.quantize_rtn(_gaussian(48, 256, seed=13, dtype=torch.float32), True, torch.tensor(192.0))
    units = q.units(t)
    assert units.dtype == torch.bfloat16
    assert torch.equal(units.float() * t.tensor_scale, t.dequantize())


@pytest.mark.parametrize("design", ["fused", "dot_scaled"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_on_triples_matches_reference(out_dtype, design):
    # K = 336: not a multiple of the K block (64 here), so the K masks are exercised.
    a = q.quantize_rtn(_gaussian(96, 336, seed=14, dtype=torch.float32))
    b = q.quantize_rtn(_gaussian(80, 336, seed=15, dtype=torch.float32))
    out = gemm.gemm_nvfp4(*a, *b, out_dtype, design=design)
    ref = q.gemm(a, b, torch.float32)
    assert out.dtype == out_dtype and out.shape == (96, 80)
    tol = 1e-6 if out_dtype == torch.float32 else 4e-3
    assert ((out.float() - ref).norm() / ref.norm()) < tol


def _spec(kernel: str, types: dict, consts: dict, aligned=(), capability: int = 90) -> dict:
    return dict(kernel=kernel, types=types, consts=consts, aligned=list(aligned),
                capability=capability)  # fmt: skip


_DOT_SCALED = _spec(
    "quartet_compile.kernels.gemm._dot_scaled_kernel",
    dict(a_codes="*u8", a_scales="*fp8e4nv", a_ts="*fp32", b_codes="*u8", b_scales="*fp8e4nv",
         b_ts="*fp32", out_ptr="*bf16", M="i32", N="i32"),
    dict(K=4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128),
    capability=100,
)  # fmt: skip


@pytest.fixture(scope="module")
def ptx() -> dict:
    """``ptx[name]``: the PTX of each kernel spec below (``_DOT_SCALED``; each of ``_SIZES``'
    kernels told and not told which sizes are aligned), compiled for a CUDA target in one
    process without the interpreter (no GPU needed: Triton's bundled ptxas); see tests/ptx.py."""
    specs = {"dot_scaled": _DOT_SCALED}
    for kernel, (types, consts, sizes) in _SIZES.items():
        specs[kernel, "told"] = _spec(kernel, types, consts, aligned=sizes)
        specs[kernel, "untold"] = _spec(kernel, types, consts)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "ptx.py")
    run = subprocess.run(
        [sys.executable, script, json.dumps(list(specs.values()))],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return dict(zip(specs, json.loads(run.stdout.splitlines()[-1]), strict=True))


def _compiled(ptx: dict, name) -> str:
    """The PTX compiled for ``name``; a kernel that did not compile fails the test asking for it."""
    assert "error" not in ptx[name], ptx[name]["error"][-2000:]
    return ptx[name]["ptx"]


def test_dot_scaled_gemm_lowers_to_the_blackwell_nvfp4_mma(ptx):
    # E2M1 operands with one E4M3 scale per 16 elements (scale_vec::4X per 64-element K step).
    mma = [line for line in _compiled(ptx, "dot_scaled").splitlines() if "tcgen05.mma" in line]
    assert mma and all("kind::mxf4nvf4.block_scale.scale_vec::4X" in line for line in mma)


def _global_accesses(ptx: str) -> list[str]:
    return sorted(re.findall(r"\b(ld\.global\S*|st\.global\S*)", ptx))


_SIZES = {
    "quartet_compile.kernels.quantize._quantize_rtn_kernel": (
        dict(x_ptr="*bf16", ts_ptr="*fp32", codes_ptr="*u8", scales_ptr="*fp8e4nv",
             units_ptr="*bf16", rows="i32", cols="i32"),
        dict(FOUR_OVER_SIX=True, BLOCK_R=4, BLOCK_C=512),
        ("rows", "cols"),
    ),
    "quartet_compile.kernels.rht_eden._eden_data_kernel": (
        dict(src_ptr="*bf16", src_scales_ptr="*bf16", src_ts_ptr="*fp32", h_ptr="*bf16",
             codes_ptr="*u8", corrected_ptr="*bf16", partial_ptr="*fp32", rows="i32",
             red="i32", stride_r="i32", padded="i32"),
        dict(stride_k=1, FROM_NVFP4=False, MIX="bf16", BLOCK_R=64, COLS_FASTEST=True),
        ("rows", "red", "padded"),
    ),
    "quartet_compile.kernels.rht_eden._eden_scales_kernel": (
        dict(corrected_ptr="*bf16", codes_ptr="*u8", ts_ptr="*fp32", seed_ptr="*i64",
             scales_ptr="*fp8e4nv", units_ptr="*bf16", rows="i32", padded="i32"),
        dict(BLOCK_R=32, COLS_FASTEST=True),
        ("rows", "padded"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("kernel", list(_SIZES))
def test_kernels_vectorize_without_being_told_sizes_are_aligned(kernel, ptx):
    """In a graph compiled with symbolic sizes, Triton is not told which integer arguments are
    multiples of 16; the kernels state the multiples they rely on themselves. Without that, the
    forward quantizer loaded x one bf16 at a time (2.4x slower on the H100)."""
    told = _compiled(ptx, (kernel, "told"))
    untold = _compiled(ptx, (kernel, "untold"))
    assert _global_accesses(untold) == _global_accesses(told)
    assert any(".v4." in access for access in _global_accesses(untold))


# ------------------------------------------------------------------------------- bad inputs


def test_no_launch_passes_one_tensor_as_two_arguments(monkeypatch: pytest.MonkeyPatch):
    """In a compiled graph each tensor argument of a user kernel is realized on its own: a tensor
    passed as two arguments became two copies of it (seen on the H100: six bf16 copies of dy per
    backward, ~4 ms of a 180 ms model step). Unused pointers must be None.

    Only the launches' arguments matter here, and the launchers read no kernel output on the
    host (the ops never sync), so the stand-in records them without running the kernels under
    the interpreter (every kernel runs, against the reference, in the tests above)."""
    launches = []

    class Recording:
        """wrap_triton's stand-in: records each launch's kernel and tensor arguments."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
                launches.append((self.kernel.fn.__name__, tensors))

            return launch

    for module in (quantize, rht_eden, gemm):
        monkeypatch.setattr(module, "wrap_triton", Recording)
    x = _gaussian(64, 256, seed=1)
    signs, seed = _signs_and_seed(2)
    xq = quantize.quantize_rtn(x, x.float().abs().amax(), True)
    for method in ("eden", "sr"):
        for transpose in (False, True):
            rht_eden.rht_quantize(x, signs, seed, transpose, method)
        rht_eden.requant(*xq[:3], signs, seed, method)
    wq = quantize.quantize_rtn(x[:32], x[:32].float().abs().amax(), True)
    gemm.gemm_nvfp4(*xq[:3], *wq[:3], torch.float32, design="fused")
    expected = {"_quantize_rtn_kernel", "_eden_data_kernel", "_eden_scales_kernel", "_sr_kernel",
                "_fused_gemm_kernel"}  # fmt: skip
    assert {name for name, _ in launches} >= expected
    for name, tensors in launches:
        storages = [t.untyped_storage().data_ptr() for t in tensors]
        assert len(storages) == len(set(storages)), f"{name} got one tensor twice"


def test_kernels_reject_bad_inputs_clearly():
    x = _gaussian(32, 128, seed=16)
    signs, seed = _signs_and_seed(17)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize.quantize_rtn(x[:, :120], x.abs().amax(), True)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        quantize.quantize_rtn(x.to(torch.int32), x.abs().amax(), True)
    with pytest.raises(ValueError, match="2-D"):
        rht_eden.rht_quantize(x[None], signs, seed, False, "eden")
    with pytest.raises(ValueError, match="method"):
        rht_eden.rht_quantize(x, signs, seed, False, "rtn")
    a, b = q.quantize_rtn(x), q.quantize_rtn(x[:, :64])
    with pytest.raises(ValueError, match="disagree on K"):
        gemm.gemm_nvfp4(*a, *b, torch.bfloat16, design="fused")
    with pytest.raises(ValueError, match="unknown GEMM design"):
        gemm.gemm_nvfp4(*a, *a, torch.bfloat16, design="cublas")
