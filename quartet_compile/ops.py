"""The ``quartet2::*`` operators: the only doorway between graphs and kernels.

Each op is a ``torch.library.triton_op``: Inductor traces into its body, so on CUDA the Triton
kernels of ``quartet_compile.kernels`` (launched through ``wrap_triton``) land in Inductor's
output code, and on CPU the reference PyTorch body (from nvfp4.py) is compiled to C++. Every op
takes and returns plain tensors (NVFP4 triples are flattened to ``codes, scales, tensor_scale``),
has an exact fake implementation and no host synchronisation.

Ops (all 2-D, quantization groups along the last dim of every output triple):
- ``quantize_fwd(x[R,C], amax[], four_over_six)``: RTN (+ four-over-six) forward operand.
- ``rht_eden(x[R,C], signs[128], seed[], transpose, method)``: rotate and quantize x (or x.T)
  along its last dim, reduction dim zero-padded to 128; ``method`` is "eden" (MS-EDEN) or "sr"
  (element-wise stochastic rounding, the comparison recipe).
- ``requant(codes, scales, tensor_scale, signs, seed, method)``: the same for deq(triple).T.
- ``gemm(a triple, b triple, out_dtype)``: deq(a) @ deq(b).T, float32 accumulation.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from quartet_compile import nvfp4
from quartet_compile.kernels import gemm as gemm_kernels
from quartet_compile.kernels import quantize as quantize_kernels
from quartet_compile.kernels import rht_eden as rht_eden_kernels

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _triple_like(x: torch.Tensor, rows: int, cols: int) -> Triple:
    """Empty outputs of a quantizer producing a [rows, cols] NVFP4 tensor."""
    return (
        x.new_empty((rows, cols // 2), dtype=torch.uint8),
        x.new_empty((rows, cols // nvfp4.GROUP), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
    )


def _padded(n: int) -> int:
    return n + (-n % nvfp4.HADAMARD_BLOCK)


def _check_triple(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor) -> None:
    if codes.dtype != torch.uint8 or scales.dtype != torch.float8_e4m3fn:
        raise TypeError(
            f"NVFP4 triple must be (uint8 codes, float8_e4m3fn scales, float32 scalar), "
            f"got ({codes.dtype}, {scales.dtype}, {tensor_scale.dtype})"
        )
    if codes.dim() != 2 or scales.shape != (codes.shape[0], codes.shape[1] * 2 // nvfp4.GROUP):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not form an NVFP4 "
            f"tensor (scales must be [rows, 2 * codes.cols / 16])"
        )


def _rotation_inputs_check(signs: torch.Tensor, seed: torch.Tensor) -> None:
    if signs.shape != (nvfp4.HADAMARD_BLOCK,):
        raise ValueError(f"signs must have shape (128,), got {tuple(signs.shape)}")
    if seed.dim() != 0 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a 0-d int64 tensor, got {seed.dtype}{tuple(seed.shape)}")


# --------------------------------------------------------------------------------------------
# quantize_fwd
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::quantize_fwd", mutates_args=())
def quantize_fwd(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> Triple:
    nvfp4.check_floating(x)
    nvfp4.check_2d_multiple(x, nvfp4.GROUP)
    if x.is_cuda:
        return quantize_kernels.quantize_rtn(x, amax, four_over_six)
    return tuple(nvfp4.quantize_rtn(x, four_over_six, amax))


@quantize_fwd.register_fake
def _(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> Triple:
    nvfp4.check_2d_multiple(x, nvfp4.GROUP)
    return _triple_like(x, x.shape[0], x.shape[1])


# --------------------------------------------------------------------------------------------
# rht_eden
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::rht_eden", mutates_args=())
def rht_eden(
    x: torch.Tensor, signs: torch.Tensor, seed: torch.Tensor, transpose: bool, method: str
) -> Triple:
    _rotation_inputs_check(signs, seed)
    if x.is_cuda:
        return rht_eden_kernels.rht_quantize(x, signs, seed, transpose, method)
    return tuple(nvfp4.rht_quantize(x, signs, seed, transpose, method))


@rht_eden.register_fake
def _(x, signs, seed, transpose, method) -> Triple:
    rows, cols = (x.shape[1], x.shape[0]) if transpose else (x.shape[0], x.shape[1])
    return _triple_like(x, rows, _padded(cols))


# --------------------------------------------------------------------------------------------
# requant
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::requant", mutates_args=())
def requant(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    signs: torch.Tensor,
    seed: torch.Tensor,
    method: str,
) -> Triple:
    _check_triple(codes, scales, tensor_scale)
    _rotation_inputs_check(signs, seed)
    if codes.is_cuda:
        return rht_eden_kernels.requant(codes, scales, tensor_scale, signs, seed, method)
    return tuple(nvfp4.requant(nvfp4.NVFP4Tensor(codes, scales, tensor_scale), signs, seed, method))


@requant.register_fake
def _(codes, scales, tensor_scale, signs, seed, method) -> Triple:
    return _triple_like(codes, codes.shape[1] * 2, _padded(codes.shape[0]))


# --------------------------------------------------------------------------------------------
# gemm
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::gemm", mutates_args=())
def gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_triple(a_codes, a_scales, a_tensor_scale)
    _check_triple(b_codes, b_scales, b_tensor_scale)
    if a_codes.is_cuda:
        return gemm_kernels.gemm(
            a_codes, a_scales, a_tensor_scale, b_codes, b_scales, b_tensor_scale, out_dtype
        )
    a = nvfp4.NVFP4Tensor(a_codes, a_scales, a_tensor_scale)
    b = nvfp4.NVFP4Tensor(b_codes, b_scales, b_tensor_scale)
    return nvfp4.gemm(a, b, out_dtype)


@gemm.register_fake
def _(a_codes, a_scales, a_tensor_scale, b_codes, b_scales, b_tensor_scale, out_dtype):
    if a_codes.shape[1] != b_codes.shape[1]:
        raise ValueError(
            f"gemm operands disagree on K: {a_codes.shape[1] * 2} vs {b_codes.shape[1] * 2}"
        )
    return a_codes.new_empty((a_codes.shape[0], b_codes.shape[0]), dtype=out_dtype)
