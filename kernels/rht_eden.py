"""Fused 128-block randomized Hadamard rotation + MS-EDEN (SPEC 3-4), and the SR baseline.

One program owns BLOCK_R output rows x one 128-block of the reduction dim. It loads the block
(from x, from x.T, or from a forward NVFP4 triple dequantized in registers), mixes it with the
exact +-1 matrix diag(signs) · H_128 on the tensor cores (``tl.dot``, 16-bit operands, float32
accumulation: every product is exact) and scales by 1/sqrt(128) in float32. That matrix is built
once per call by torch ops (_signed_hadamard) and loaded by every program (cheaper than
rebuilding it in each).

MS-EDEN needs the largest corrected scale before any E4M3 scale exists, so it runs in two passes:
the data pass writes codes, bfloat16 corrected scales and one partial max per program; a torch
``amax`` over the partials gives the tensor scale; the scale pass rounds every scale
stochastically (nvfp4.seeded_uniform's draw for the scale's row-major index, as in
nvfp4.rht_quantize) and writes the unit values (codes times stored scales, bf16) that the GEMM
multiplies. The SR baseline needs the tensor amax before its scales too: an amax pass, then the
quantizing pass, which writes codes, scales and unit values at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from quartet_compile import nvfp4
from quartet_compile.kernels.quantize import (
    MIN_NORMAL,
    bf16_rne,
    check_quantizable,
    clamp_max,
    divide,
    e2m1_code,
    e2m1_round,
    e2m1_value,
    e4m3_ceil,
    e4m3_stochastic,
    flush_subnormal,
    group_absmax,
    pack_nibbles,
    pairwise_sum16,
    philox_uniform4,
    product,
    reciprocal,
    scaled_units,
    to_bfloat16,
    to_float32,
    unit_tile,
)

BLOCK: tl.constexpr = tl.constexpr(nvfp4.HADAMARD_BLOCK)
INV_SQRT_BLOCK: tl.constexpr = tl.constexpr(nvfp4.INV_SQRT_BLOCK)
INV_EDEN_FP4_MAX: tl.constexpr = tl.constexpr(1.0 / nvfp4.EDEN_FP4_MAX)
INV_E2M1_MAX: tl.constexpr = tl.constexpr(1.0 / nvfp4.E2M1_MAX)
# (rows per program, warps) of the data passes, for plain/transposed inputs and for NVFP4 ones
# (their rows are bytes: 64 columns make 32-byte loads). No register spills (ptxas: 110 and 128
# registers); the fastest of the sweep in benchmarks/kernels.py (168 / 190 us against 179 / 218
# us for 8 warps at 16384x4096).
TILES = {"x": (64, 4), "nvfp4": (64, 4)}
# Rows per program of the EDEN scale pass (x one 128-column block), and its launch order (its
# outputs are row-major: consecutive programs write consecutive blocks of the same rows).
SCALE_ROWS = 32
SCALE_COLS_FASTEST = True
# Tensor-core operand type that holds each source's values exactly (uint8 = NVFP4 unit values).
_MIX_OF_SOURCE = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "bf16x3",
    torch.uint8: "fp16",
}
_MIX_DTYPE = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "bf16x3": torch.bfloat16,
    "f32": torch.float32,
}


@triton.jit
def _mix(x, h_ptr, MIX: tl.constexpr):
    """x @ H for x whose values are exact in the MIX operand type (H = diag(signs) · H_128, in
    h_ptr's type).

    "bf16"/"fp16": one tensor-core dot; "bf16x3": three bf16 slices carry all 24 bits of a
    float32 input; "f32": a float32 dot, for the interpreter, whose tl.dot mishandles bf16.
    """
    h = tl.load(h_ptr + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    if MIX == "f32":
        return tl.dot(to_float32(x), h, input_precision="ieee")
    elif MIX == "bf16x3":
        hi = x.to(tl.bfloat16)
        mid = (x - hi.to(tl.float32)).to(tl.bfloat16)
        lo = (x - hi.to(tl.float32) - mid.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(hi, h, tl.dot(mid, h, tl.dot(lo, h)))
    else:
        return tl.dot(x.to(h.dtype), h)


@triton.jit
def _rotated_tile(
    src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, rows, red, stride_r, stride_k,
    FROM_NVFP4: tl.constexpr, MIX: tl.constexpr, BLOCK_R: tl.constexpr,
    COLS_FASTEST: tl.constexpr,
):  # fmt: skip
    """[BLOCK_R, 128] float32 rotated values of this program's rows and reduction block.

    Logical input X'[r, k] = src[r * stride_r + k * stride_k], zero beyond ``rows``/``red``.
    With FROM_NVFP4, X'[r, k] = deq(triple)[k, r]: the triple's rows are loaded as they lie
    (coalesced) and transposed in registers; the unit values e2m1 * e4m3 are exact in fp16, so
    the tensor scale is applied after the mix. Subnormal inputs and outputs are zero
    (nvfp4.flush_subnormal): what the tensor cores do with them is then irrelevant.
    """
    pid_r, pid_c = _tile(COLS_FASTEST)
    row = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    kk = pid_c * BLOCK + tl.arange(0, BLOCK)[None, :]
    if FROM_NVFP4:
        k_rows = (pid_c * BLOCK + tl.arange(0, BLOCK))[:, None]
        units = unit_tile(src_ptr, src_scales_ptr, k_rows, pid_r * BLOCK_R, red, rows,
                          BLOCK_R)  # fmt: skip
        acc = _mix(tl.trans(units), h_ptr, MIX)
        # One product for both factors: the same float32 as two when the tensor scale is a
        # power of two.
        scale = INV_SQRT_BLOCK * tl.load(src_ts_ptr)
    else:
        offs = row.to(tl.int64) * stride_r + kk.to(tl.int64) * stride_k
        x = tl.load(src_ptr + offs, mask=(row < rows) & (kk < red), other=0.0)
        acc = _mix(flush_subnormal(x), h_ptr, MIX)
        scale = INV_SQRT_BLOCK
    return flush_subnormal(_unpermute(acc, BLOCK_R) * scale)


@triton.jit
def _tile(COLS_FASTEST: tl.constexpr):
    """(row tile, column block) of this program. The launch grid is (column blocks, row tiles)
    with COLS_FASTEST, so that programs launched together cover consecutive addresses of
    row-major data, else (row tiles, column blocks) for data read down its columns."""
    if COLS_FASTEST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _aligned(padded):
    """The padded reduction length, written so the compiler knows it is a multiple of 128: in a
    graph compiled with symbolic sizes Triton is not told (tl.multiple_of does not take on an
    argument), and every row of codes, scales and units would be stored byte by byte."""
    return (padded // BLOCK) * BLOCK


@triton.jit
def _store_tile(ptr, values, rows, row_stride, BLOCK_R: tl.constexpr, COLS_FASTEST: tl.constexpr):
    """Store [BLOCK_R, n] at this program's rows, columns (column block) * n + [0, n)."""
    pid_r, pid_c = _tile(COLS_FASTEST)
    row = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    col = pid_c * values.shape[1] + tl.arange(0, values.shape[1])[None, :]
    tl.store(ptr + row.to(tl.int64) * row_stride + col, values, mask=row < rows)


@triton.jit
def _store_partial_max(partial_ptr, values):
    """One max per program (NaN counts as +inf, so the tensor scale becomes NaN as in torch)."""
    values = tl.where(values != values, float("inf"), values)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + pid, tl.max(tl.max(tl.max(values, 2), 1), 0))


@triton.jit
def _eden_data_kernel(
    src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, codes_ptr, corrected_ptr, partial_ptr,
    rows, red, stride_r, stride_k, padded,
    FROM_NVFP4: tl.constexpr, MIX: tl.constexpr, BLOCK_R: tl.constexpr,
    COLS_FASTEST: tl.constexpr,
):  # fmt: skip
    """nvfp4.eden_codes_and_scales on one rotated tile: codes, corrected scales (rounded to the
    bf16 scratch), partial max."""
    padded = _aligned(padded)
    v = _rotated_tile(
        src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, rows, red, stride_r, stride_k,
        FROM_NVFP4, MIX, BLOCK_R, COLS_FASTEST,
    )  # fmt: skip
    g = tl.reshape(v, (BLOCK_R, BLOCK // 16, 16))
    s = group_absmax(g) * INV_EDEN_FP4_MAX
    u = g * reciprocal(s)
    magnitude = e2m1_round(u, BELOW_8=True)
    codes = e2m1_code(u, magnitude)
    uc = pairwise_sum16(product(tl.abs(u), magnitude))
    uu = pairwise_sum16(product(u, u))
    corrected = s * tl.where(uc != 0, divide(uu, uc), 1.0)
    # An underflowed group is a zero group ("s <" keeps a NaN s NaN), as in the reference.
    corrected = bf16_rne(tl.where(s < MIN_NORMAL, 0.0, corrected))
    _store_tile(codes_ptr, pack_nibbles(tl.reshape(codes, (BLOCK_R, BLOCK))), rows, padded // 2,
                BLOCK_R, COLS_FASTEST)  # fmt: skip
    scratch = to_bfloat16(tl.reshape(corrected, (BLOCK_R, BLOCK // 16)))
    _store_tile(corrected_ptr, scratch, rows, padded // 16, BLOCK_R, COLS_FASTEST)
    _store_partial_max(partial_ptr, corrected)


@triton.jit
def _eden_scales_kernel(
    corrected_ptr, codes_ptr, ts_ptr, seed_ptr, scales_ptr, units_ptr, rows, padded,
    BLOCK_R: tl.constexpr, COLS_FASTEST: tl.constexpr,
):  # fmt: skip
    """Stored E4M3 scale = SR(S / tensor_scale), 1 for an all-zero group, for BLOCK_R rows x one
    128-column block; then the block's unit values, codes times the stored scales (the GEMM's
    operand: this pass is the only one that knows both)."""
    padded = _aligned(padded)
    pid_r, pid_c = _tile(COLS_FASTEST)
    row = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    row64 = row.to(tl.int64)
    in_rows = row < rows
    groups = padded // 16
    grp = pid_c * (BLOCK // 16) + tl.arange(0, BLOCK // 16)[None, :]
    corrected = tl.load(corrected_ptr + row64 * groups + grp, mask=in_rows, other=0.0)
    corrected = to_float32(corrected)
    # The draw of the scale at row-major index i is word i % 4 of Philox counter i // 4.
    quad = pid_c * (BLOCK // 64) + tl.arange(0, BLOCK // 64)[None, :]
    uniform = philox_uniform4(tl.load(seed_ptr), row * (groups // 4) + quad)
    uniform = tl.reshape(uniform, (BLOCK_R, BLOCK // 16))
    stored = e4m3_stochastic(divide(corrected, tl.load(ts_ptr)), uniform)
    stored = tl.where(corrected == 0, 1.0, stored).to(tl.float8e4nv)
    tl.store(scales_ptr + row64 * groups + grp, stored, mask=in_rows)
    byte = pid_c * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    packed = tl.load(codes_ptr + row64 * (padded // 2) + byte, mask=in_rows)
    col = pid_c * BLOCK + tl.arange(0, BLOCK)[None, :]
    units = scaled_units(packed, stored).to(tl.bfloat16)
    tl.store(units_ptr + row64 * padded + col, units, mask=in_rows)


@triton.jit
def _absmax_kernel(
    src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, partial_ptr,
    rows, red, stride_r, stride_k,
    FROM_NVFP4: tl.constexpr, MIX: tl.constexpr, BLOCK_R: tl.constexpr,
    COLS_FASTEST: tl.constexpr,
):  # fmt: skip
    """max|v| of one rotated tile (the SR baseline's tensor amax, first pass)."""
    v = _rotated_tile(
        src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, rows, red, stride_r, stride_k,
        FROM_NVFP4, MIX, BLOCK_R, COLS_FASTEST,
    )  # fmt: skip
    _store_partial_max(partial_ptr, tl.reshape(tl.abs(v), (BLOCK_R, BLOCK, 1)))


@triton.jit
def _sr_kernel(
    src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, ts_ptr, seed_ptr, codes_ptr,
    scales_ptr, units_ptr, rows, red, stride_r, stride_k, padded,
    FROM_NVFP4: tl.constexpr, MIX: tl.constexpr, BLOCK_R: tl.constexpr,
    COLS_FASTEST: tl.constexpr,
):  # fmt: skip
    """nvfp4.sr_quantize on one rotated tile: ceil-E4M3 scales, element-wise SR to E2M1."""
    padded = _aligned(padded)
    v = _rotated_tile(
        src_ptr, src_scales_ptr, src_ts_ptr, h_ptr, rows, red, stride_r, stride_k,
        FROM_NVFP4, MIX, BLOCK_R, COLS_FASTEST,
    )  # fmt: skip
    g = tl.reshape(v, (BLOCK_R, BLOCK // 16, 16))
    ts = tl.load(ts_ptr)
    gmax = group_absmax(g)
    scale = e4m3_ceil(divide(gmax * INV_E2M1_MAX, ts))
    real = scale * ts
    u = g * reciprocal(real)
    u = tl.where(u < -6.0, -6.0, clamp_max(u, 6.0))
    a = tl.abs(u)
    lo_idx = (a >= 0.5).to(tl.int32) + (a >= 1.0).to(tl.int32) + (a >= 1.5).to(tl.int32)
    lo_idx += (a >= 2.0).to(tl.int32) + (a >= 3.0).to(tl.int32) + (a >= 4.0).to(tl.int32)
    lo = e2m1_value(lo_idx)
    # The step to the next E2M1 value is 0.5, 1 or 2: multiplying by its inverse is exact.
    frac = (a - lo) * tl.where(lo_idx < 4, 2.0, tl.where(lo_idx < 6, 1.0, 0.5))
    # Offset row * padded + col draws from counter row * padded / 4 + col / 4.
    pid_r, pid_c = _tile(COLS_FASTEST)
    row = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    quad = pid_c * (BLOCK // 4) + tl.arange(0, BLOCK // 4)[None, :]
    uniform = philox_uniform4(tl.load(seed_ptr), row * (padded // 4) + quad)
    idx = lo_idx + (tl.reshape(uniform, (BLOCK_R, BLOCK // 16, 16)) < frac).to(tl.int32)
    codes = ((u < 0).to(tl.int32) << 3) | idx
    scale = tl.where(gmax == 0, 1.0, scale)
    units = tl.reshape(e2m1_value(codes) * scale, (BLOCK_R, BLOCK))
    _store_tile(codes_ptr, pack_nibbles(tl.reshape(codes, (BLOCK_R, BLOCK))), rows, padded // 2,
                BLOCK_R, COLS_FASTEST)  # fmt: skip
    _store_tile(scales_ptr, tl.reshape(scale.to(tl.float8e4nv), (BLOCK_R, BLOCK // 16)), rows,
                padded // 16, BLOCK_R, COLS_FASTEST)  # fmt: skip
    _store_tile(units_ptr, units.to(tl.bfloat16), rows, padded, BLOCK_R, COLS_FASTEST)


@triton.jit
def _mma_column(j):
    """Column of the mix's output that holds rotated column j (a permutation of 0..127).

    The tensor-core accumulator gives each thread column pairs 8c + 2q + {0, 1} (c = 0..7 in each
    64-column warp half, q = lane % 4). Rotated column 16 (4 w + q) + 2c + e is placed at
    64 w + 8c + 2q + e, so every thread holds whole 16-groups: group maxima and sums need no
    shuffles and each group's divisions run once, not in four lanes. _unpermute undoes it.
    """
    w, q, c, e = j >> 6, (j >> 4) & 3, (j >> 1) & 7, j & 1
    return 64 * w + 8 * c + 2 * q + e


@triton.jit
def _unpermute(acc, BLOCK_R: tl.constexpr):
    """The rotated [BLOCK_R, 128] tile in column order, from the mix of _mma_column's layout
    (only reshapes and a permute: the registers stay where they are)."""
    t = tl.permute(tl.reshape(acc, (BLOCK_R, 2, 8, 4, 2)), (0, 1, 3, 2, 4))
    return tl.reshape(t, (BLOCK_R, BLOCK))


def _signed_hadamard(signs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """diag(signs) · H_128 (Sylvester: (-1)^popcount(i & j)) with its columns in _mma_column's
    order, for the data passes to load.

    Built by torch ops rather than a kernel of its own: in a compiled graph Inductor folds it
    into the kernels that draw the random signs (H200, one linear's fwd+bwd: 30 -> 24 Triton
    launches; benchmarks/NOTES.md, round 11). Eagerly it costs ~10 tiny kernels. Folding the
    signs into the matrix spares every tile an element-wise product; the entries stay +-1, so
    the mix is as exact as before.
    """
    i = torch.arange(nvfp4.HADAMARD_BLOCK, device=signs.device)[:, None]
    col = torch.arange(nvfp4.HADAMARD_BLOCK, device=signs.device)[None, :]
    # The rotated column that _mma_column places at ``col`` (its inverse).
    j = (col >> 6) * 64 + ((col >> 1) & 3) * 16 + ((col >> 3) & 7) * 2 + (col & 1)
    p = i & j
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return (signs[:, None] * (1 - 2 * (p & 1))).to(dtype)


def _grid(row_tiles: int, col_blocks: int, cols_fastest: bool) -> tuple[int, int]:
    """Launch grid of a tile kernel, in the order _tile reads it."""
    return (col_blocks, row_tiles) if cols_fastest else (row_tiles, col_blocks)


def _quantize_rotated(
    src: torch.Tensor,
    src_scales: torch.Tensor | None,
    src_ts: torch.Tensor | None,
    strides: tuple[int, int],
    rows: int,
    red: int,
    signs: torch.Tensor,
    seed: torch.Tensor,
    method: str,
    from_nvfp4: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch one method's passes over the logical [rows, red] input described by the args."""
    method = nvfp4.backward_method(method)
    device = src.device
    padded = red + (-red % nvfp4.HADAMARD_BLOCK)
    signs, seed = signs.to(device, torch.float32), seed.to(device)
    mix = _MIX_OF_SOURCE[src.dtype] if src.is_cuda else "f32"
    h = _signed_hadamard(signs, _MIX_DTYPE[mix])
    codes = torch.empty((rows, padded // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((rows, padded // nvfp4.GROUP), dtype=torch.float8_e4m3fn, device=device)
    block_r, warps = TILES["nvfp4" if from_nvfp4 else "x"]
    blocks = padded // nvfp4.HADAMARD_BLOCK
    # Programs launched together read consecutive addresses: along the rows of x when the
    # reduction dim is contiguous in memory, else down its columns (x.T, NVFP4 triples).
    cols_fastest = not from_nvfp4 and strides[1] == 1
    grid = _grid(triton.cdiv(rows, block_r), blocks, cols_fastest)
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device)
    source = (src, src_scales, src_ts, h)
    shape = (rows, red, *strides)
    consts = dict(FROM_NVFP4=from_nvfp4, MIX=mix, BLOCK_R=block_r, COLS_FASTEST=cols_fastest,
                  num_warps=warps)  # fmt: skip
    units = torch.empty((rows, padded), dtype=torch.bfloat16, device=device)
    if method is nvfp4.BackwardMethod.EDEN:
        corrected = torch.empty(scales.shape, dtype=torch.bfloat16, device=device)
        wrap_triton(_eden_data_kernel)[grid](
            *source, codes, corrected, partial, *shape, padded, **consts
        )
        ts = nvfp4._safe_tensor_scale(partial.amax(), nvfp4.EDEN_FP8_MAX)
        scale_grid = _grid(triton.cdiv(rows, SCALE_ROWS), blocks, SCALE_COLS_FASTEST)
        wrap_triton(_eden_scales_kernel)[scale_grid](
            corrected, codes, ts, seed, scales, units, rows, padded, SCALE_ROWS,
            SCALE_COLS_FASTEST,
        )  # fmt: skip
    else:
        wrap_triton(_absmax_kernel)[grid](*source, partial, *shape, **consts)
        ts = nvfp4._safe_tensor_scale(partial.amax(), nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
        wrap_triton(_sr_kernel)[grid](
            *source, ts, seed, codes, scales, units, *shape, padded, **consts
        )
    return codes, scales, ts, units


def rht_quantize(
    x: torch.Tensor, signs: torch.Tensor, seed: torch.Tensor, transpose: bool, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 triple and units of x · R (x.T · R when ``transpose``), as nvfp4.rht_quantize."""
    check_quantizable(x, 1)
    rows, red = (x.shape[1], x.shape[0]) if transpose else x.shape
    strides = (x.stride(1), x.stride(0)) if transpose else (x.stride(0), x.stride(1))
    # No NVFP4 scale / tensor-scale pointers on this path: None, not x again, because a graph
    # passing one tensor as three kernel arguments gets a copy of it for each (seen in
    # Inductor's output: six bf16 copies of dy per backward).
    return _quantize_rotated(x, None, None, strides, rows, red, signs, seed, method, False)


def requant(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    signs: torch.Tensor,
    seed: torch.Tensor,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 triple and units of deq(triple).T · R, as nvfp4.requant (exact when the tensor scale
    is a power of two; otherwise the scale is applied after the mix, one rounding away)."""
    codes, scales = codes.contiguous(), scales.contiguous()
    rows, red = codes.shape[1] * 2, codes.shape[0]
    return _quantize_rotated(
        codes, scales, tensor_scale, (0, 0), rows, red, signs, seed, method, True
    )
