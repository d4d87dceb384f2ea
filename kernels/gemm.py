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
  ``tl.dot_scaled``. It has not run anywhere (no Blackwell GPU here; Triton 3.6 does not compile
  it for sm_90 and its interpreter does not implement dot_scaled); tests/test_kernels_gpu.py
  checks it against the reference on a capability-10 GPU, after which the ops can use it there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from quartet_compile.kernels.quantize import unit_tile


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
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)), acc)
    acc = acc * (tl.load(a_ts) * tl.load(b_ts))
    cn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rm < M) & (cn < N)
    tl.store(out_ptr + rm.to(tl.int64) * N + cn, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_scaled_kernel(
    a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out_ptr, M, N, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Blackwell: native NVFP4 MMA (E2M1 operands, E4M3 scales per 16). Never run (see top)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    byte = tl.arange(0, BLOCK_K // 2)[None, :]
    grp = tl.arange(0, BLOCK_K // 16)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_codes + rm * (K // 2) + k0 // 2 + byte, mask=rm < M, other=0)
        b = tl.load(b_codes + rn * (K // 2) + k0 // 2 + byte, mask=rn < N, other=0)
        sa = tl.load(a_scales + rm * (K // 16) + k0 // 16 + grp, mask=rm < M, other=0.0)
        sb = tl.load(b_scales + rn * (K // 16) + k0 // 16 + grp, mask=rn < N, other=0.0)
        acc = tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1", acc)
    acc = acc * (tl.load(a_ts) * tl.load(b_ts))
    cn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rm < M) & (cn < N)
    tl.store(out_ptr + rm.to(tl.int64) * N + cn, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_units(
    a_units: torch.Tensor,
    a_ts: torch.Tensor,
    b_units: torch.Tensor,
    b_ts: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """deq(a) @ deq(b).T in ``out_dtype`` from the operands' bf16 unit values [M, K], [N, K]."""
    if out_dtype == torch.bfloat16:
        # cuBLAS rounds its float32 accumulator to bf16 once; the tensor-scale product is a
        # pointwise op that Inductor fuses into the consumer (no float32 [M, N] round trip).
        return (torch.mm(a_units, b_units.T).float() * (a_ts * b_ts)).to(out_dtype)
    # CUDA only: there is no float32-out mm for bf16 on CPU.
    acc = torch.mm(a_units, b_units.T, out_dtype=torch.float32)
    return (acc * (a_ts * b_ts)).to(out_dtype)


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
        if not on_cuda or torch.cuda.get_device_capability(a_codes.device)[0] < 10:
            raise ValueError(
                'GEMM design "dot_scaled" needs a Blackwell GPU (capability >= 10); use "fused"'
            )
        out = torch.empty((M, N), dtype=out_dtype, device=a_codes.device)
        grid = (triton.cdiv(M, 128), triton.cdiv(N, 128))
        wrap_triton(_dot_scaled_kernel)[grid](
            a_codes, a_scales, a_ts, b_codes, b_scales, b_ts, out, M, N, K, 128, 128, 128
        )
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
