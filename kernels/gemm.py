"""NVFP4 GEMM: out = deq(a) @ deq(b).T with float32 accumulation, both operands grouped along K.

E2M1 x E4M3 "unit" values (codes times group scales) are exact in bf16, and so are their
products, so a bf16 tensor-core GEMM on unit values with float32 accumulation is an exact NVFP4
GEMM up to summation order; the float32 tensor scales multiply the float32 accumulator once, in
the epilogue (folding them into the operands would round every element).

The op's design on Hopper (``gemm_units``): the quantizer kernels write each operand's unit
values next to its triple, in the same pass, and ``torch.mm`` (cuBLAS) multiplies them. For a
bf16 output cuBLAS rounds its float32 accumulator to bf16 and the tensor-scale epilogue rounds
once more (at most one bf16 ulp away from scaling the float32 accumulator; docs/numerics.md); it
is a pointwise op that Inductor fuses into whatever consumes the product.

The alternatives take NVFP4 triples (``gemm_nvfp4``), measured in benchmarks/kernels.py:
- "fused": one Triton GEMM that loads the packed codes and scales (a quarter of the bytes) and
  dequantizes them in registers with bit tricks before each ``tl.dot``: ~30% of BF16 cuBLAS on
  the H100, against 92-98% for a separate dequantize pass + cuBLAS (benchmarks/NOTES.md), whose
  pass the quantizers now absorb.
- "dot_scaled" (Blackwell, capability >= 10): the packed codes and E4M3 scales go straight to
  ``tl.dot_scaled``. No Blackwell GPU is at hand, so it is tested where it can be: compiled for
  sm_100 on the CPU, where Triton lowers it to the NVFP4 tensor-core MMA
  (``tcgen05.mma ... kind::mxf4nvf4.block_scale``), and run under the interpreter, which has no
  dot_scaled, with the product taken on decoded unit values instead (``_nvfp4_dot``), so its
  loads, masks and epilogue are checked against the reference. tests/test_kernels_gpu.py runs it
  on a capability-10 GPU; the ops can use it there once that passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from quartet_compile.kernels.quantize import INTERPRETED, scaled_units, unit_tile


@triton.jit
def _fused_gemm_kernel(
    a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out_ptr, M, N, K: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Tiled GEMM over NVFP4 operands dequantized in registers; grouped tile order for L2 reuse.

    K is a compile-time constant (a layer width: few distinct values; the interpreter also cannot
    loop to a run-time bound under NumPy 2).
    DOT_F32 multiplies in float32 (the interpreter's tl.dot mishandles bf16; products are exact
    either way).
    """
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_rows
    pid_n = (pid % (GROUP_M * grid_n)) // group_rows
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = unit_tile(a_codes, a_scales, rm, kb * BLOCK_K, M, K, BLOCK_K)
        b = unit_tile(b_codes, b_scales, rn, kb * BLOCK_K, N, K, BLOCK_K)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    acc = acc * tl.load(a_ts) * tl.load(b_ts)
    cn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rm < M) & (cn < N)
    tl.store(out_ptr + rm.to(tl.int64) * N + cn, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_scaled_kernel(
    a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out_ptr, M, N, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Blackwell: native NVFP4 MMA (E2M1 operands, E4M3 scales per 16); see the module docstring
    for where it has run."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
        grp = k0 // 16 + tl.arange(0, BLOCK_K // 16)[None, :]
        in_a, in_b = (rm < M) & (byte < K // 2), (rn < N) & (byte < K // 2)
        a = tl.load(a_codes + rm * (K // 2) + byte, mask=in_a, other=0)
        b = tl.load(b_codes + rn * (K // 2) + byte, mask=in_b, other=0)
        # A zero code times any scale is zero: masked scales only need to be finite.
        sa = tl.load(a_scales + rm * (K // 16) + grp, mask=(rm < M) & (grp < K // 16), other=0.0)
        sb = tl.load(b_scales + rn * (K // 16) + grp, mask=(rn < N) & (grp < K // 16), other=0.0)
        acc = _nvfp4_dot(a, sa, b, sb, acc)
    acc = acc * tl.load(a_ts) * tl.load(b_ts)
    cn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rm < M) & (cn < N)
    tl.store(out_ptr + rm.to(tl.int64) * N + cn, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nvfp4_dot(a, sa, b, sb, acc):
    """acc + deq(a) @ deq(b).T for packed [M, K / 2] and [N, K / 2] codes with E4M3 scales: the
    NVFP4 MMA on the GPU; in the interpreter (no dot_scaled) the same exact products of decoded
    unit values, in float32."""
    if INTERPRETED:
        a = scaled_units(a, sa).to(tl.float32)
        b = scaled_units(b, sb).to(tl.float32)
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        return tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1", acc)


def gemm_units(
    a_units: torch.Tensor,
    a_ts: torch.Tensor,
    b_units: torch.Tensor,
    b_ts: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """deq(a) @ deq(b).T in ``out_dtype`` from the operands' bf16 unit values [M, K], [N, K]."""
    if out_dtype == torch.bfloat16:
        # cuBLAS rounds its float32 accumulator to bf16 once; the tensor-scale products are a
        # pointwise op that Inductor fuses into the consumer (no float32 [M, N] round trip).
        # One scale after the other, as nvfp4.gemm_units: their product could underflow.
        return (torch.mm(a_units, b_units.T).float() * a_ts * b_ts).to(out_dtype)
    # CUDA only: there is no float32-out mm for bf16 on CPU.
    acc = torch.mm(a_units, b_units.T, out_dtype=torch.float32)
    return (acc * a_ts * b_ts).to(out_dtype)


def gemm_nvfp4(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_ts: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    b_ts: torch.Tensor,
    out_dtype: torch.dtype,
    design: str,
) -> torch.Tensor:
    """deq(a) @ deq(b).T in ``out_dtype``: a [M, K] and b [N, K] NVFP4 triples (contiguous)."""
    if a_codes.shape[1] != b_codes.shape[1]:
        raise ValueError(
            f"gemm operands disagree on K: {a_codes.shape[1] * 2} vs {b_codes.shape[1] * 2}"
        )
    M, N, K = a_codes.shape[0], b_codes.shape[0], a_codes.shape[1] * 2
    a_codes, a_scales = a_codes.contiguous(), a_scales.contiguous()
    b_codes, b_scales = b_codes.contiguous(), b_scales.contiguous()
    on_cuda = a_codes.is_cuda
    if design == "dot_scaled":
        if on_cuda and torch.cuda.get_device_capability(a_codes.device)[0] < 10:
            raise ValueError(
                'GEMM design "dot_scaled" needs a Blackwell GPU (capability >= 10); use "fused"'
            )
        out = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
        block_m, block_n, block_k = (128, 128, 128) if on_cuda else (32, 32, 64)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        wrap_triton(_dot_scaled_kernel)[grid](
            a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out, M, N, K,
            block_m, block_n, block_k,
        )  # fmt: skip
        return out
    if design != "fused":
        raise ValueError(f"unknown GEMM design {design!r}")
    out = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
    block_m, block_n, block_k = (128, 128, 128) if on_cuda else (32, 32, 64)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    wrap_triton(_fused_gemm_kernel)[grid](
        a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out, M, N, K,
        not on_cuda, block_m, block_n, block_k, 8, num_warps=8, num_stages=3,
    )  # fmt: skip
    return out
