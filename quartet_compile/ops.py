"""The ``quartet2::*`` operators: the only doorway between graphs and kernels.

Each op is a ``torch.library.triton_op``: Inductor traces into its body, so on CUDA the Triton
kernels of ``quartet_compile.kernels`` (launched through ``wrap_triton``) land in Inductor's
output code, and on CPU the reference PyTorch body (from nvfp4.py) is compiled to C++. Every op
takes and returns plain tensors, has an exact fake implementation and no host synchronisation.

Every quantizer returns ``codes, scales, tensor_scale, units``: the NVFP4 triple (flattened) and
its unit values e2m1 * e4m3 in bf16 (exact; ``nvfp4.units``), written by the same kernel pass.
The GEMM multiplies units on BF16 tensor cores and applies the tensor scales to the float32
accumulator, so no pass over the data sits between a quantizer and its GEMM (benchmarks/NOTES.md,
round 6). The triple is what the backward keeps of a forward operand (requant reads it).

Ops (all 2-D, quantization groups along the last dim of every output):
- ``quantize_fwd(x[R,C], amax[], four_over_six)``: RTN (+ four-over-six) forward operand.
- ``rht_eden(x[R,C], signs[128], seed[], transpose, method)``: rotate and quantize x (or x.T)
  along its last dim, reduction dim zero-padded to 128; ``method`` is "eden" (MS-EDEN) or "sr"
  (element-wise stochastic rounding, the comparison recipe).
- ``requant(codes, scales, tensor_scale, signs, seed, method)``: the same for deq(triple).T.
- ``gemm(a_units, a_tensor_scale, b_units, b_tensor_scale, out_dtype)``: deq(a) @ deq(b).T,
  float32 accumulation.
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


def _check_units(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
) -> None:
    for name, t, ts in (("a", a_units, a_tensor_scale), ("b", b_units, b_tensor_scale)):
        if t.dtype != torch.bfloat16 or t.dim() != 2:
            raise TypeError(
                f"gemm operand {name} must be the 2-D bfloat16 units of a quantizer op, got "
                f"{t.dtype}{tuple(t.shape)}"
            )
        if ts.dim() != 0 or ts.dtype != torch.float32:
            raise TypeError(f"{name}_tensor_scale must be a 0-d float32 tensor, got {ts.dtype}")
    if a_units.shape[1] != b_units.shape[1]:
        raise ValueError(f"gemm operands disagree on K: {a_units.shape[1]} vs {b_units.shape[1]}")


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
