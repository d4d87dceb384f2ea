"""Forward quantizer kernel (RTN + four-over-six, SPEC 2) and the NVFP4 helpers all kernels share.

Every helper mirrors one function of ``quartet_compile.nvfp4`` operation for operation (same
float32 roundings, IEEE divisions via ``div_rn``), so kernel outputs can be compared with the
reference bit-for-bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from quartet_compile import nvfp4

# (rows, columns, warps) per program of the forward quantizer: one 16-element group per thread
# (fewer groups than threads would duplicate work). The H200 sweep (NOTES round 10) found two
# warps over 4 x 256 as fast as (4, 512, 4) at 16384x4096 and 8192x2048 (143 vs 144 us, 37.7 us
# both) and faster at 8192x768 (14.3 vs 19.8 us): twice the programs fill the chip at small sizes.
TILE = (4, 256, 2)
# Triton decides when a kernel is decorated whether it runs in the interpreter; so does this.
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
MIN_NORMAL: tl.constexpr = tl.constexpr(nvfp4.MIN_NORMAL)

# ------------------------------------------------------------------------------------ helpers


@triton.jit
def nan_max(a, b):
    """max that propagates NaN (a quantizer must not turn NaN into finite numbers)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def group_absmax(g):
    """max|g| over the last axis of [rows, groups, 16], kept as [rows, groups, 1]."""
    return tl.reduce(tl.abs(g), 2, nan_max, keep_dims=True)


@triton.jit
def to_float32(x):
    """x as float32. The interpreter's bfloat16 -> float32 conversion loses subnormal values
    (3 * 2^-133 came back as 2^-127), so there it is done on the bits, exact for every value."""
    if INTERPRETED:
        if x.dtype == tl.bfloat16:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def flush_subnormal(x):
    """nvfp4.flush_subnormal: values below float32's smallest normal become zero (float16 has
    none). On the bits, so the interpreter (which stores bf16 as integers) does the same."""
    if x.dtype == tl.float16:
        return x
    elif x.dtype == tl.bfloat16:
        bits = x.to(tl.int16, bitcast=True)
        bits = tl.where((bits & 0x7F80) == 0, tl.zeros_like(bits), bits)
        return bits.to(tl.bfloat16, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7F800000) == 0, tl.zeros_like(bits), bits)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_bfloat16(x):
    """float32 x that bfloat16 holds exactly, as bfloat16 (on the bits in the interpreter, whose
    conversion mishandles subnormal values; see to_float32)."""
    if INTERPRETED:
        bits = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        return bits.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def divide(a, b):
    """IEEE a / b with broadcasting (Triton's ``/`` is an approximate division on CUDA)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def reciprocal(x):
    """nvfp4._reciprocal: IEEE 1 / x once per group; 0 where x is zero, NaN or below MIN_NORMAL
    (an underflowed group: its codes become 0)."""
    return tl.where(x >= MIN_NORMAL, tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x), 0.0)


@triton.jit
def e2m1_round(u, BELOW_8: tl.constexpr = False):
    """|RTN(u)| to E2M1 as a float32: midpoint ties to the even index, saturating at 6.

    The E2M1 spacing is 0.5 below 2, 1 below 4 and 2 above: adding and subtracting 2^22 times
    the binade of clamp(|u|, 1, 4), the float32 number whose own spacing that is, rounds to it
    (ties to even). NaN stays NaN. BELOW_8: the caller guarantees |u| < 8 or NaN (MS-EDEN's
    values are at most its FP4 maximum), so [4, 8) is already one binade and the upper clamp
    goes (one instruction of ~31 per element in the EDEN pass).
    """
    a = tl.abs(u)
    clamped = tl.maximum(a, 1.0)
    if not BELOW_8:
        clamped = tl.minimum(clamped, 4.0)
    clamped = clamped.to(tl.int32, bitcast=True)
    magic = (clamped & 0x7F800000).to(tl.float32, bitcast=True) * 4194304.0
    return tl.minimum((a + magic) - magic, 6.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def e2m1_code(u, magnitude):
    """4-bit code (sign of u << 3 | index) of an E2M1 magnitude from e2m1_round(u).

    From 1 up the index is the float32 exponent and top mantissa bit (bits >> 22) less 252;
    below 1 it is 1 for 0.5, else 0 (NaN included).
    """
    bits = magnitude.to(tl.int32, bitcast=True)
    idx = tl.where(magnitude >= 1.0, (bits >> 22) - 252, (magnitude == 0.5).to(tl.int32))
    return ((u < 0).to(tl.int32) << 3) | idx


@triton.jit
def e2m1_value(code):
    """Float32 value of int32 4-bit codes, by bit placement rather than a table.

    The code's sign and 3 magnitude bits become an fp16 pattern (exponent field = idx >> 1,
    mantissa top bit = idx & 1); times 2^14 that is exactly the E2M1 value, 0.5 included (an
    fp16 subnormal, which the fp16 -> fp32 conversion keeps).
    """
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def pack_nibbles(codes):
    """[rows, n] int32 codes -> [rows, n / 2] bytes, first element in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, (codes.shape[0], codes.shape[1] // 2, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def unit_tile(codes_ptr, scales_ptr, row, k0, rows, K, BLOCK_K: tl.constexpr):
    """Unit values e2m1 * e4m3 (float16, exact) of a [rows, K] triple's rows ``row`` ([B, 1]) and
    columns k0 + [0, BLOCK_K); zero outside the tensor."""
    byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
    grp = k0 // 16 + tl.arange(0, BLOCK_K // 16)[None, :]
    row64 = row.to(tl.int64)
    packed = tl.load(codes_ptr + row64 * (K // 2) + byte, mask=(row < rows) & (byte < K // 2))
    in_groups = (row < rows) & (grp < K // 16)
    scale = tl.load(scales_ptr + row64 * (K // 16) + grp, mask=in_groups, other=0.0)
    return scaled_units(packed, scale)


@triton.jit
def scaled_units(packed, scale):
    """Float16 unit values of [rows, n / 2] packed codes and their [rows, n / 16] E4M3 scales.

    Exact: e2m1 * e4m3 has at most 6 significant bits and lies in [2^-10, 2688]. The E2M1 values
    are built as e2m1_value builds them, times 2^-14 (fp16 subnormals for 0.5 and below); the
    product with the scale keeps every bit (multiples of 2^-24, the fp16 subnormal step), and the
    2^14 comes back last. Two elements per fp16x2 instruction, no float32 round trip.
    """
    rows: tl.constexpr = packed.shape[0]
    n: tl.constexpr = packed.shape[1] * 2
    x = packed.to(tl.int32) * 4097
    word = ((x << 9) & 0x0E000E00) | ((x << 12) & -0x7FFF8000)
    lo = word.to(tl.int16)
    hi = (word >> 16).to(tl.int16)
    tiny = tl.reshape(tl.join(lo, hi), (rows, n)).to(tl.float16, bitcast=True)
    values = tl.reshape(tiny, (rows, n // 16, 16)) * scale.to(tl.float16)[:, :, None]
    return tl.reshape(values * 16384.0, (rows, n))


@triton.jit
def product(a, b):
    """a * b rounded on its own, as torch rounds every product of the reference's sums: on the
    GPU ``mul.rn``, which the compiler never contracts into an FMA with the addition that
    follows; plain ``*`` in the interpreter (no libdevice there, and numpy never contracts)."""
    if INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def clamp_max(x, hi):
    """min(x, hi) that keeps NaN (tl.minimum would return hi)."""
    return tl.where(x > hi, hi, x)


@triton.jit
def e4m3_steps(x):
    """x >= 0 in units of the E4M3 spacing of its binade, and that spacing (both exact).

    floor(steps) * ulp is the largest E4M3 value <= x; steps - floor(steps) is how far x lies
    towards the next one (E4M3 subnormals share the spacing of the 2^-6 binade).
    """
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    ulp = ((exponent + 124) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((130 - exponent) << 23).to(tl.float32, bitcast=True)
    return x * inv_ulp, ulp


@triton.jit
def e4m3_rne(x):
    """Round-to-nearest-even of x >= 0 to E4M3, saturating at 448; returned as float32.

    Done by hand: the interpreter's float32 -> float8 cast does not round to nearest (the
    kernels only cast exact E4M3 values).
    """
    steps, ulp = e4m3_steps(clamp_max(x, 448.0))
    lo = tl.floor(steps)
    odd = (lo.to(tl.int32) & 1) == 1
    up = (steps - lo > 0.5) | ((steps - lo == 0.5) & odd)
    return tl.where(up, lo + 1.0, lo) * ulp


@triton.jit
def bf16_rne(x):
    """x rounded to nearest-even bfloat16, returned as float32 (so casting it to bf16 is exact).

    The interpreter's float32 -> bfloat16 cast truncates, so there it is done on the bits.
    """
    if INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def e4m3_ceil(x):
    """Smallest E4M3 value >= x, for x >= 0 (saturating at 448)."""
    steps, ulp = e4m3_steps(clamp_max(x, 448.0))
    return tl.ceil(steps) * ulp


@triton.jit
def e4m3_stochastic(x, uniform):
    """Round x >= 0 up to the next E4M3 value with probability (x - lo) / ulp (unbiased)."""
    steps, ulp = e4m3_steps(clamp_max(x, 448.0))
    lo = tl.floor(steps)
    return tl.where(uniform < steps - lo, lo + 1.0, lo) * ulp


@triton.jit
def philox_uniform4(seed, counters):
    """nvfp4.seeded_uniform's draws 4 * counters + [0, 4), shaped counters.shape + (2, 2):
    row-major in the offset, so reshaping the last three dims into one lines them up.

    One tl.randint4x per counter: its four words are the draws of four consecutive offsets.
    """
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return (words >> 8).to(tl.float32) * (2.0**-24)


# ------------------------------------------------------------------------------------ kernel


@triton.jit
def pairwise_sum16(t):
    """nvfp4.pairwise_sum over the last axis of [rows, groups, 16]: the same addition tree.

    Each level sums adjacent pairs (a two-element sum has one rounding in any order).
    """
    for _ in tl.static_range(4):
        t = tl.sum(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)), axis=3)
    return t


@triton.jit
def _rtn_candidate(g, gmax, ts, TARGET: tl.constexpr):
    """nvfp4.rtn_candidate: scaled values u, E2M1 magnitudes, E4M3 scale (float32), error."""
    scale = e4m3_rne(divide(gmax * (1.0 / TARGET), ts))
    real = scale * ts
    u = g * reciprocal(real)
    magnitude = e2m1_round(u)
    d = magnitude - tl.abs(u)
    err = tl.where(real >= MIN_NORMAL, scale * scale * pairwise_sum16(d * d), float("inf"))
    return u, magnitude, scale, err


@triton.jit
def _quantize_rtn_kernel(
    x_ptr,
    ts_ptr,
    codes_ptr,
    scales_ptr,
    units_ptr,
    rows,
    cols,
    FOUR_OVER_SIX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # x is contiguous and cols % 16 == 0 (checked by the launcher), written so the compiler knows
    # it too: in a graph compiled with symbolic sizes Triton is not told (tl.multiple_of does not
    # take on an argument), and would load x one bf16 at a time.
    cols = (cols // 16) * 16
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    # Each group is loaded as two 16-byte halves into the same thread: one thread per group, so
    # the group's max, scales and error sums need no shuffles and are computed once.
    grp = (tl.program_id(1) * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16))[None, :, None]
    first_half = grp * 16 + tl.arange(0, 8)[None, None, :]
    ptrs = x_ptr + row[:, :, None].to(tl.int64) * cols + first_half
    in_groups = (row[:, :, None] < rows) & (grp < cols // 16)
    halves = tl.join(
        tl.load(ptrs, mask=in_groups, other=0.0), tl.load(ptrs + 8, mask=in_groups, other=0.0)
    )
    g = tl.reshape(tl.permute(to_float32(halves), (0, 1, 3, 2)), (BLOCK_R, BLOCK_C // 16, 16))
    ts = tl.load(ts_ptr)
    gmax = group_absmax(g)
    u, magnitude, scale, err = _rtn_candidate(g, gmax, ts, 6.0)
    if FOUR_OVER_SIX:
        u4, magnitude4, scale4, err4 = _rtn_candidate(g, gmax, ts, 4.0)
        pick4 = err4 < err
        u = tl.where(pick4, u4, u)
        magnitude = tl.where(pick4, magnitude4, magnitude)
        scale = tl.where(pick4, scale4, scale)
    codes = e2m1_code(u, magnitude)
    scale = tl.where(gmax == 0, 1.0, scale)
    # Unit values (exact in bf16), stored in the two halves each group was loaded as.
    units = tl.where(u < 0, -magnitude, magnitude) * scale
    units = tl.permute(tl.reshape(units, (BLOCK_R, BLOCK_C // 16, 2, 8)), (0, 1, 3, 2))
    first, second = tl.split(units.to(tl.bfloat16))
    units_ptrs = units_ptr + row[:, :, None].to(tl.int64) * cols + first_half
    tl.store(units_ptrs, first, mask=in_groups)
    tl.store(units_ptrs + 8, second, mask=in_groups)
    # Columns past ``cols`` form whole masked groups (cols % 16 == 0): their stores are masked.
    byte = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)[None, :]
    packed = pack_nibbles(tl.reshape(codes, (BLOCK_R, BLOCK_C)))
    mask = (row < rows) & (byte < cols // 2)
    tl.store(codes_ptr + row.to(tl.int64) * (cols // 2) + byte, packed, mask=mask)
    grp = tl.program_id(1) * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16)[None, :]
    scale = tl.reshape(scale, (BLOCK_R, BLOCK_C // 16)).to(tl.float8e4nv)
    mask = (row < rows) & (grp < cols // 16)
    tl.store(scales_ptr + row.to(tl.int64) * (cols // 16) + grp, scale, mask=mask)


def check_quantizable(x: torch.Tensor, multiple: int, name: str = "x") -> None:
    """Clear errors for inputs the kernels cannot take (the reference raises the same)."""
    nvfp4.check_floating(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    nvfp4.check_2d_multiple(x, multiple, name)


def quantize_rtn(
    x: torch.Tensor, amax: torch.Tensor, four_over_six: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 triple of x [rows, cols] (groups along cols), equal to nvfp4.quantize_rtn's, and
    its bf16 unit values (nvfp4.units)."""
    check_quantizable(x, nvfp4.GROUP)
    x = x.contiguous()
    rows, cols = x.shape
    divisor = nvfp4.E2M1_MAX * (nvfp4.FWD_SCALE_MAX if four_over_six else nvfp4.E4M3_MAX)
    ts = nvfp4._safe_tensor_scale(amax, divisor)
    codes = x.new_empty((rows, cols // 2), dtype=torch.uint8)
    scales = x.new_empty((rows, cols // nvfp4.GROUP), dtype=torch.float8_e4m3fn)
    units = x.new_empty((rows, cols), dtype=torch.bfloat16)
    block_r, block_c, warps = TILE
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    wrap_triton(_quantize_rtn_kernel)[grid](
        x, ts, codes, scales, units, rows, cols, four_over_six, block_r, block_c,
        num_warps=warps,
    )  # fmt: skip
    return codes, scales, ts, units
