"""The ``quartet2::*`` operators: the only doorway between graphs and kernels.

Each op is a ``torch.library.triton_op`` that runs the Triton kernels of
``quartet_compile.kernels`` (launched through ``wrap_triton``) on CUDA and the reference PyTorch
body (nvfp4.py) elsewhere. The rewrite pass inlines the bodies of the CUDA calls it inserts, so
their kernels land in Inductor's output code; on CPU the calls stay opaque and run the reference
(passes/inline.py says why). Every op takes and returns plain tensors, has an exact fake
implementation and no host synchronisation.

Every quantizer returns ``codes, scales, tensor_scale, units``: the NVFP4 triple (flattened) and
its unit values e2m1 * e4m3 in bf16 (exact; ``nvfp4.units``), written by the same kernel pass.
The GEMM multiplies units on BF16 tensor cores and applies the tensor scales to the float32
accumulator, so no pass over the data sits between a quantizer and its GEMM (benchmarks/NOTES.md,
round 6). The triple is what the backward keeps of a forward operand (requant reads it).

Ops (all 2-D, quantization groups along the last dim of every output):
- ``quantize_fwd(x[R,C], amax[], four_over_six)``: RTN (+ four-over-six) forward operand.
- ``rht_eden(x[R,C], signs[128], seed[], transpose, method)``: rotate and quantize x (or x.T)
  along its last dim, reduction dim zero-padded to 128; ``method`` is a ``nvfp4.BackwardMethod``
  value: "eden" (MS-EDEN) or "sr" (element-wise stochastic rounding, the comparison recipe).
- ``requant(codes, scales, tensor_scale, signs, seed, method)``: the same for deq(triple).T.
- ``gemm(a_units, a_tensor_scale, b_units, b_tensor_scale, out_dtype)``: deq(a) @ deq(b).T,
  float32 accumulation.
- ``pad_segments(x[S,C], offs[E]) -> (padded[P,C], padded_offs[E])``: mixture-of-experts rows
  (sorted by expert, segment e ending at offs[e]) moved to 128-aligned segments, zero-padded
  (P static: ``nvfp4.padded_segment_rows``), so the backward's token-dim rotations stay within
  one expert.
- ``grouped_gemm(a_units, a_tensor_scale, b_units, b_tensor_scale, offs, out_dtype)``: ``gemm``
  per expert segment in torch._grouped_mm's two forms: rows grouped (b [E, Nout, R] -> [S, Nout])
  or reduction grouped (b [M, P] -> [E, Nout, M]); zero outside every segment.
- ``check_finite(tensors, names, num_inputs, origin, layer, matmul, op)``: the debug check of
  ``options={"check_finite": True}``. Unlike the others it is a plain ``custom_op`` (Inductor
  keeps it as an extern call and never inlines it), returns nothing, is registered as
  side-effectful so that no dead-code elimination drops it, and syncs with the device.
"""

from __future__ import annotations

import enum

import torch
from torch.library import triton_op

from quartet_compile import nvfp4
from quartet_compile.kernels import gemm as gemm_kernels
from quartet_compile.kernels import quantize as quantize_kernels
from quartet_compile.kernels import rht_eden as rht_eden_kernels

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _quantized_like(x: torch.Tensor, rows: int, cols: int) -> Quantized:
    """Empty outputs of a quantizer producing a [rows, cols] NVFP4 tensor."""
    return (
        x.new_empty((rows, cols // 2), dtype=torch.uint8),
        x.new_empty((rows, cols // nvfp4.GROUP), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((rows, cols), dtype=torch.bfloat16),
    )


def _with_units(q: nvfp4.NVFP4Tensor) -> Quantized:
    return (*q, nvfp4.units(q))


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
def quantize_fwd(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> Quantized:
    nvfp4.check_floating(x)
    nvfp4.check_2d_multiple(x, nvfp4.GROUP)
    if x.is_cuda:
        return quantize_kernels.quantize_rtn(x, amax, four_over_six)
    return _with_units(nvfp4.quantize_rtn(x, four_over_six, amax))


@quantize_fwd.register_fake
def _(x: torch.Tensor, amax: torch.Tensor, four_over_six: bool) -> Quantized:
    nvfp4.check_2d_multiple(x, nvfp4.GROUP)
    return _quantized_like(x, x.shape[0], x.shape[1])


# --------------------------------------------------------------------------------------------
# rht_eden
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::rht_eden", mutates_args=())
def rht_eden(
    x: torch.Tensor, signs: torch.Tensor, seed: torch.Tensor, transpose: bool, method: str
) -> Quantized:
    _rotation_inputs_check(signs, seed)
    if x.is_cuda:
        return rht_eden_kernels.rht_quantize(x, signs, seed, transpose, method)
    return _with_units(nvfp4.rht_quantize(x, signs, seed, transpose, method))


@rht_eden.register_fake
def _(x, signs, seed, transpose, method) -> Quantized:
    rows, cols = (x.shape[1], x.shape[0]) if transpose else (x.shape[0], x.shape[1])
    return _quantized_like(x, rows, _padded(cols))


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
) -> Quantized:
    _check_triple(codes, scales, tensor_scale)
    _rotation_inputs_check(signs, seed)
    if codes.is_cuda:
        return rht_eden_kernels.requant(codes, scales, tensor_scale, signs, seed, method)
    triple = nvfp4.NVFP4Tensor(codes, scales, tensor_scale)
    return _with_units(nvfp4.requant(triple, signs, seed, method))


@requant.register_fake
def _(codes, scales, tensor_scale, signs, seed, method) -> Quantized:
    return _quantized_like(codes, codes.shape[1] * 2, _padded(codes.shape[0]))


# --------------------------------------------------------------------------------------------
# gemm
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::gemm", mutates_args=())
def gemm(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_units(a_units, a_tensor_scale, b_units, b_tensor_scale)
    if a_units.is_cuda:
        return gemm_kernels.gemm_units(a_units, a_tensor_scale, b_units, b_tensor_scale, out_dtype)
    return nvfp4.gemm_units(a_units, a_tensor_scale, b_units, b_tensor_scale, out_dtype)


@gemm.register_fake
def _(a_units, a_tensor_scale, b_units, b_tensor_scale, out_dtype):
    _check_units(a_units, a_tensor_scale, b_units, b_tensor_scale)
    return a_units.new_empty((a_units.shape[0], b_units.shape[0]), dtype=out_dtype)


def _check_operand(
    op: str, name: str, units: torch.Tensor, tensor_scale: torch.Tensor, dims: tuple[int, ...]
) -> None:
    if units.dtype != torch.bfloat16 or units.dim() not in dims:
        rank = " or ".join(f"{d}-D" for d in dims)
        raise TypeError(
            f"{op} operand {name} must be the {rank} bfloat16 units of a quantizer op, got "
            f"{units.dtype}{tuple(units.shape)}"
        )
    if tensor_scale.dim() != 0 or tensor_scale.dtype != torch.float32:
        raise TypeError(
            f"{name}_tensor_scale must be a 0-d float32 tensor, got "
            f"{tensor_scale.dtype}{tuple(tensor_scale.shape)}"
        )


def _check_units(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
) -> None:
    _check_operand("gemm", "a", a_units, a_tensor_scale, (2,))
    _check_operand("gemm", "b", b_units, b_tensor_scale, (2,))
    if a_units.shape[1] != b_units.shape[1]:
        raise ValueError(f"gemm operands disagree on K: {a_units.shape[1]} vs {b_units.shape[1]}")


# --------------------------------------------------------------------------------------------
# pad_segments, grouped_gemm: mixture-of-experts expert GEMMs (torch._grouped_mm)
# --------------------------------------------------------------------------------------------


@triton_op("quartet2::pad_segments", mutates_args=())
def pad_segments(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Plain torch ops on every device: on CUDA Inductor compiles the gather into its own code.
    return nvfp4.pad_segments(x, offs)


@pad_segments.register_fake
def _(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nvfp4.check_segments(x, offs)
    rows = nvfp4.padded_segment_rows(x.shape[0], offs.shape[0])
    return x.new_empty((rows, x.shape[1])), offs.new_empty(offs.shape, dtype=torch.int32)


@triton_op("quartet2::grouped_gemm", mutates_args=())
def grouped_gemm(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_grouped_units(a_units, a_tensor_scale, b_units, b_tensor_scale, offs)
    if a_units.shape[1] == 0:  # empty sums, which torch._grouped_mm rejects
        shape = nvfp4.grouped_gemm_shape(a_units, b_units, offs)
        return a_units.new_zeros(shape, dtype=out_dtype)
    if a_units.is_cuda:
        acc = _grouped_mm_cuda(a_units, b_units, offs.to(torch.int32))
        return nvfp4.finish_grouped(acc, a_tensor_scale, b_tensor_scale, offs, out_dtype)
    return grouped_gemm_reference(a_units, a_tensor_scale, b_units, b_tensor_scale, offs, out_dtype)


@torch.library.custom_op("quartet2::grouped_gemm_reference", mutates_args=())
def grouped_gemm_reference(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``grouped_gemm``'s CPU body, ``nvfp4.grouped_gemm_units``, as an opaque op.

    The reference multiplies float32 units with torch._grouped_mm (the CPU op takes no float32
    output for bf16 inputs), and torch._grouped_mm's meta function takes bf16 inputs only
    (``_meta_grouped_mm_common`` in torch/_meta_registrations.py, torch 2.13): traced with fake
    tensors (torch.compile, AOTAutograd) the body would fail, the opaque call does not.
    """
    return nvfp4.grouped_gemm_units(
        a_units, a_tensor_scale, b_units, b_tensor_scale, offs, out_dtype
    )


@grouped_gemm.register_fake
@grouped_gemm_reference.register_fake
def _(a_units, a_tensor_scale, b_units, b_tensor_scale, offs, out_dtype):
    _check_grouped_units(a_units, a_tensor_scale, b_units, b_tensor_scale, offs)
    shape = nvfp4.grouped_gemm_shape(a_units, b_units, offs)
    return a_units.new_empty(shape, dtype=out_dtype)


def _check_grouped_units(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    offs: torch.Tensor,
) -> None:
    _check_operand("grouped_gemm", "a", a_units, a_tensor_scale, (2,))
    _check_operand("grouped_gemm", "b", b_units, b_tensor_scale, (2, 3))
    nvfp4.check_offs(offs, a_units.device)
    shapes = f"a {tuple(a_units.shape)}, b {tuple(b_units.shape)}"
    if a_units.shape[1] != b_units.shape[-1]:
        raise ValueError(f"grouped_gemm operands disagree on the reduction dim: {shapes}")
    if a_units.shape[1] % nvfp4.GROUP:
        raise ValueError(
            f"grouped_gemm's reduction dim must be a multiple of {nvfp4.GROUP}, as the units of "
            f"a quantizer op are: {shapes}"
        )
    if b_units.dim() == 3 and b_units.shape[0] != offs.shape[0]:
        raise ValueError(
            f"grouped_gemm: b holds {b_units.shape[0]} experts, offs {offs.shape[0]} segments"
        )
    if b_units.dim() == 2 and (a_units.shape[0] % 8 or b_units.shape[0] % 8):
        raise ValueError(
            f"grouped_gemm with the reduction grouped needs the rows of a and b in multiples of "
            f"8 (16-byte strides of the CUDA kernel's layout, see _grouped_mm_cuda): {shapes}"
        )


def _grouped_mm_cuda(
    a_units: torch.Tensor, b_units: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """torch._grouped_mm of the bf16 units (int32 ``offs``), in bf16.

    Its CUDA op takes no float32 output for bf16 inputs (torch 2.11 and since:
    ``_resolve_grouped_mm_out_dtype`` in aten/src/ATen/native/GroupedMMUtils.h), so the float32
    accumulator is rounded to bf16 before the tensor scales multiply it (``finish_grouped``):
    a bf16 output is rounded twice, as the dense gemm's, and a float32 one holds bf16
    precision. bf16 in and out on sm_90/sm_100 run CUTLASS's grouped kernel with no host
    synchronisation (GroupedBlas.cpp); on other GPUs torch loops over mm and syncs.

    Layouts (GroupMM.cu, GroupMMCommon.cuh): 16-byte aligned data, each operand with one unit
    stride and the other a multiple of 16 bytes. Rows grouped: a row-major, b [E, R, Nout]
    column-major (a linear weight's own layout). Reduction grouped: both operands with P
    outermost (a column-major, b row-major), torch's own weight-gradient layout; in every other
    one the kernel asserts on the device that no segment is empty and that all but the last are
    multiples of 8 elements, and a device assert ends the process. That costs a transposed copy
    of each operand, unless it is the transposed view of a P-major tensor already.
    """
    if b_units.dim() == 3:
        return torch._grouped_mm(a_units.contiguous(), b_units.contiguous().mT, offs)
    return torch._grouped_mm(a_units.T.contiguous().T, b_units.T.contiguous(), offs)


# --------------------------------------------------------------------------------------------
# check_finite (options={"check_finite": True})
# --------------------------------------------------------------------------------------------


class Matmul(enum.Enum):
    """Which of a linear layer's three matmuls a quartet2 op belongs to."""

    FORWARD = "forward"
    GRAD_INPUT = "grad-input"
    GRAD_WEIGHT = "grad-weight"


class Origin(enum.Enum):
    """Where a checked op's inputs come from, which says where a non-finite one was made."""

    MODEL = "model"  # a forward activation or weight: the model made it
    GRADIENT = "gradient"  # the gradient reaching the layer's output (dy)
    QUARTET2 = "quartet2"  # an earlier quartet2 op of the layer (a quantized operand)


@torch.library.custom_op(
    "quartet2::check_finite",
    mutates_args=(),
    # infer_schema does not take list[str]
    schema=(
        "(Tensor[] tensors, str[] names, int num_inputs, str origin, str layer, str matmul, "
        "str op) -> ()"
    ),
    tags=(torch.Tag.cudagraph_unsafe,),
)
def check_finite(
    tensors: list[torch.Tensor],
    names: list[str],
    num_inputs: int,
    origin: str,
    layer: str,
    matmul: str,
    op: str,
) -> None:
    """Raise ``FloatingPointError`` at the first of ``tensors`` that holds a NaN or an Inf.

    ``tensors`` are the inputs (the first ``num_inputs``, from ``origin``, an ``Origin`` value)
    and then the outputs of one quartet2 op call ``op`` in the ``matmul`` (a ``Matmul`` value) of
    linear layer ``layer``; ``names`` name them as operands. Inputs come first, so a bad output
    means that the op made it from finite inputs.
    One host synchronisation per call (the reason the check is off by default); tagged
    ``cudagraph_unsafe``, so Inductor runs it between CUDA graphs (graph partitions) or skips
    CUDA graphs for a graph that holds it.
    """
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()
    bad = next((i for i, ok in enumerate(finite) if not ok), None)
    if bad is not None:
        # A bad output was made by the op itself.
        made_by = Origin(origin) if bad < num_inputs else Origin.QUARTET2
        where = f"{op} {'input' if bad < num_inputs else 'output'}"
        raise FloatingPointError(
            _nonfinite_message(tensors[bad], names[bad], made_by, where, layer, Matmul(matmul))
        )


@check_finite.register_fake
def _(tensors, names, num_inputs, origin, layer, matmul, op) -> None:
    return None


# The op returns nothing that the graph uses: without this, FX's and Inductor's dead-code
# elimination (torch._library.utils.is_impure) would drop every call. torch's effect tokens
# (torch.library._register_effectful_op) are threaded through a program when AOTAutograd traces
# it; the quartet2 pass inserts this op after tracing, where no token exists.
torch.fx.node.has_side_effect(torch.ops.quartet2.check_finite.default)


def _nonfinite_message(
    t: torch.Tensor, name: str, made_by: Origin, where: str, layer: str, matmul: Matmul
) -> str:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    head = (
        f"quartet2 check_finite: non-finite value in {matmul.value} operand {name} of layer "
        f"{layer!r} ({where}): {nan} NaN, {inf} Inf of {t.numel()} elements."
    )
    if made_by is Origin.QUARTET2:
        return (
            f"{head} quartet2 made it from finite values: a quartet_compile bug (please report "
            f"it with the layer's shapes and dtype). Meanwhile options={{'skip': ({layer!r},)}} "
            f"keeps this layer in high precision."
        )
    if made_by is Origin.MODEL:
        return (
            f"{head} It entered this matmul from outside: the problem is upstream of the layer "
            f"in the forward (an earlier layer, the model's input, or a weight that the last "
            f"optimizer step made non-finite)."
        )
    return (
        f"{head} It entered this matmul from outside: the gradient reaching the layer's output "
        f"was already non-finite, so the problem is in the loss or in the backward of a later "
        f"op that quartet2 does not rewrite (attention, a norm, the lm_head): the quartet2 "
        f"matmuls that ran before this one in the backward passed their checks. To find the op, "
        f"run the model uncompiled under torch.autograd.detect_anomaly()."
    )
