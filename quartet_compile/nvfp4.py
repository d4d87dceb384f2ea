"""NVFP4 format and the pure-PyTorch reference of every Quartet II quantizer (docs/numerics.md).

This module is the oracle: kernels and rewritten graphs are tested against it. Everything runs in
float32 on any device, vectorized, with no host synchronisation, so the same functions also serve
as the CPU bodies of the ``quartet2`` ops and trace cleanly under torch.compile.

Layout conventions: quantization groups run along the last dimension (the GEMM's reduction
dimension); a quantized tensor is ``NVFP4Tensor(codes, scales, tensor_scale)`` with
``codes: uint8[rows, cols / 2]`` (first element in the low nibble), ``scales: float8_e4m3fn[rows,
cols / 16]`` and ``tensor_scale: float32[]``.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch

GROUP = 16
HADAMARD_BLOCK = 128
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Forward tensor scale divisor: 256 rather than 448 leaves room for four-over-six's 1.5x scale.
FWD_SCALE_MAX = 256.0
# MS-EDEN constants: the authors' tuned scale override and the FP8 range used for alignment.
EDEN_RHO = (17.0 / 16.0) * 0.93
EDEN_FP4_MAX = E2M1_MAX / EDEN_RHO
EDEN_FP8_MAX = 256.0
# Per-element divisions by constants are written as products with float32 reciprocals: torch
# divides by a Python scalar exactly on CPU but through its reciprocal on CUDA (Inductor too), so
# only the product form gives one bit pattern on every device and in the kernels. (The 0-d tensor
# scale keeps its division: kernels compute it with this module's torch code on their device.)
INV_SQRT_BLOCK = 1.0 / math.sqrt(HADAMARD_BLOCK)
# FP32's smallest normal number. A group scale below it is an underflowed group (SPEC 1): its
# reciprocal may overflow to inf (and 0 * inf is NaN), and GPUs flush such values to zero, so
# the group is quantized to zero, decided on the same float32 value here and in the kernels.
MIN_NORMAL = 2.0**-126

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes, and whether a tie there rounds up: ties go to the
# even code index, as the hardware cvt.rn does.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)


class NVFP4Tensor(NamedTuple):
    """A quantized 2-D tensor; groups of 16 along the last (reduction) dimension."""

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[0], self.codes.shape[1] * 2))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def check_floating(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")


def check_2d_multiple(x: torch.Tensor, multiple: int, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if x.shape[-1] % multiple:
        raise ValueError(
            f"{name}'s last dimension ({x.shape[-1]}) must be a multiple of {multiple}; "
            f"pad it or leave this layer unquantized"
        )


def _check_signs(signs: torch.Tensor) -> None:
    if signs.shape != (HADAMARD_BLOCK,):
        raise ValueError(f"signs must have shape ({HADAMARD_BLOCK},), got {tuple(signs.shape)}")


# --------------------------------------------------------------------------------------------
# E2M1 elements and nibble packing
# --------------------------------------------------------------------------------------------


def e2m1_index(u: torch.Tensor) -> torch.Tensor:
    """Round |u| to the nearest E2M1 magnitude index (0..7): ties to even, saturating at 6."""
    a = u.abs()
    idx = torch.zeros(u.shape, dtype=torch.uint8, device=u.device)
    for mid, up in zip(_MIDPOINTS, _TIE_UP, strict=True):
        idx += (a >= mid) if up else (a > mid)
    return idx


def e2m1_encode(u: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes (sign << 3 | index) of RTN(u). NaN encodes as +0."""
    sign = (u < 0).to(torch.uint8) << 3
    return sign | e2m1_index(u)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit codes."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., C] 4-bit codes -> [..., C/2] bytes, first element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes ({codes.shape[-1]})")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------------
# E4M3 scales
# --------------------------------------------------------------------------------------------


def e4m3_rne(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even to E4M3 (float32 in, float8_e4m3fn out), saturating at 448."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def e4m3_floor_and_ulp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For x >= 0: the largest E4M3 value <= x and the E4M3 spacing just above it."""
    _, exp = torch.frexp(x)
    exponent = (exp - 1).clamp(min=-6)  # E4M3 subnormals share the spacing of 2^-6's binade
    ulp = torch.ldexp(torch.ones_like(x), exponent - 3)
    return torch.floor(x / ulp) * ulp, ulp


def e4m3_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest E4M3 value >= x, for x in [0, 448]."""
    x = x.clamp(0, E4M3_MAX)
    lo, ulp = e4m3_floor_and_ulp(x)
    return torch.where(lo < x, lo + ulp, lo).to(torch.float8_e4m3fn)


def e4m3_stochastic(x: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of x in [0, 448] to E4M3: E[result] == x.

    Rounds up with probability (x - lo) / (hi - lo), using one uniform [0, 1) draw per element.
    """
    x = x.clamp(0, E4M3_MAX)
    lo, ulp = e4m3_floor_and_ulp(x)
    up = uniform < (x - lo) / ulp
    return torch.where(up, lo + ulp, lo).to(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# Random numbers: the counter-based Philox of triton.language.randint4x, so kernels and the
# reference draw the same numbers from the same (seed, offset).
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    # a, b < 2^32: split b so that partial products stay inside int64.
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo = a * b_lo
    mid = a * b_hi + (lo >> 16)
    return (mid >> 16) & _M32


def _umullo32(a: int, b: torch.Tensor) -> torch.Tensor:
    # The low word of a * b without the int64 overflow that compiled C++ must not rely on.
    return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & _M32


def philox_randint4(
    seed: torch.Tensor, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four uint32 words (as int64) of ``tl.randint4x(seed, counters)``, int32 counters."""
    seed = seed.to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counters.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        _c0, _c2 = c0, c2
        c0 = _umulhi32(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = _umulhi32(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = _umullo32(0xCD9E8D57, _c2)
        c3 = _umullo32(0xD2511F53, _c0)
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def seeded_uniform(seed: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """One uniform [0, 1) float32 per element of ``shape`` (row-major index i): the top 24 bits
    (exact in float32) of word i % 4 of Philox at counter i // 4.

    One Philox evaluation (ten rounds of 32-bit multiplies) serves four consecutive elements,
    which keeps the kernels' scale-rounding pass from being bound by its random numbers.
    """
    n = math.prod(shape)
    counters = torch.arange((n + 3) // 4, device=device, dtype=torch.int64)
    words = torch.stack(philox_randint4(seed.to(device), counters), dim=-1).flatten()[:n]
    return ((words >> 8).to(torch.float32) * (2.0**-24)).reshape(shape)


# --------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """value = e2m1 * (e4m3_scale * tensor_scale), computed in float32."""
    real_scales = q.scales.to(torch.float32) * q.tensor_scale.to(torch.float32)
    return _scaled_elements(q.codes, real_scales).to(dtype)


def units(q: NVFP4Tensor) -> torch.Tensor:
    """e2m1 * e4m3_scale per element, without the tensor scale, in bfloat16 (exact: 2 + 4
    significant bits): the operand a BF16 tensor-core GEMM multiplies (see ``gemm_units``)."""
    return _scaled_elements(q.codes, q.scales.to(torch.float32)).to(torch.bfloat16)


def _scaled_elements(codes: torch.Tensor, group_scales: torch.Tensor) -> torch.Tensor:
    """E2M1 values of packed ``codes`` times one float32 scale per group of 16, [rows, cols]."""
    rows = codes.shape[0]
    elems = e2m1_decode(unpack_nibbles(codes)).view(rows, -1, GROUP)
    return (elems * group_scales.unsqueeze(-1)).view(rows, -1)


def pairwise_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) in a fixed pairwise order, keeping the dim.

    The kernels reduce with the same tree, so their float32 sums agree with these bit-for-bit
    (torch's own .sum() order differs between devices, and from Triton's).
    """
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t


def _groups(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).reshape(x.shape[0], -1, GROUP)


def _safe_tensor_scale(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    """amax / divisor; 1 for an all-zero tensor, and for one so small that the quotient
    underflows to zero (every group of it underflows too); NaN when amax is not finite
    (SPEC 1).

    Computed as amax times the float32 reciprocal of ``divisor``: one correctly rounded
    multiplication gives the same bits on the CPU, in CUDA kernels and in Inductor's generated
    code, where a quotient does not (CUDA and Inductor divide by a constant as a product with
    its reciprocal; seen on the H200 for amax / 1536). For the divisors that are not powers of
    two (1536, 2688) it can differ from the IEEE quotient in the last bit.
    """
    scale = amax.to(torch.float32) * _float32(1.0 / divisor)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float (exact in every later cast)."""
    return torch.tensor(value, dtype=torch.float32).item()


def round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32.

    On the bits rather than ``x.to(bfloat16).to(float32)``: Inductor drops such a cast pair
    inside a fused kernel (it does not emulate intermediate precision), and the compiled
    reference would then differ from the eager one.
    """
    bits = x.to(torch.float32).view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
    return bits.view(torch.float32)


def _reciprocal(real: torch.Tensor) -> torch.Tensor:
    """1 / real per group (IEEE); 0 for a zero, NaN or underflowed (below MIN_NORMAL) scale, so
    that group's codes are 0 (NaN elements stay NaN: NaN * 0 is NaN).

    Each group's elements are multiplied by it rather than divided by ``real``: one division per
    group instead of sixteen, as in the kernels (docs/numerics.md).
    """
    return torch.where(real >= MIN_NORMAL, real.reciprocal(), 0.0)


def _pack(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor) -> NVFP4Tensor:
    rows = codes.shape[0]
    return NVFP4Tensor(pack_nibbles(codes.reshape(rows, -1)), scales, tensor_scale)


# --------------------------------------------------------------------------------------------
# Forward: RTN with four-over-six (SPEC 2)
# --------------------------------------------------------------------------------------------


def rtn_candidate(
    g: torch.Tensor, gmax: torch.Tensor, ts: torch.Tensor, target: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, E4M3 scales and squared error of one scale choice (group max lands on target).

    The error is in units of the tensor scale squared (the same for every candidate), so it
    cannot underflow for tiny tensors; a scale that is zero or underflows (``_reciprocal``)
    makes it +inf, a candidate no other should lose to.
    """
    scale = e4m3_rne(gmax * (1.0 / target) / ts).to(torch.float32)
    real = scale * ts
    u = g * _reciprocal(real)
    codes = e2m1_encode(u)
    d = e2m1_decode(codes & 7) - u.abs()
    err = torch.where(real >= MIN_NORMAL, scale * scale * pairwise_sum(d * d), float("inf"))
    return codes, scale.to(torch.float8_e4m3fn), err


def quantize_rtn(
    x: torch.Tensor, four_over_six: bool = True, amax: torch.Tensor | None = None
) -> NVFP4Tensor:
    """Deterministic forward quantizer: RTN codes, per-group E4M3 scales, FP32 tensor scale.

    With four_over_six each group keeps whichever of "max on 6" and "max on 4" has the smaller
    squared error (ties keep "six"). ``amax`` may be passed when the graph computed it already.
    """
    check_floating(x)
    check_2d_multiple(x, GROUP)
    g = _groups(x)
    if amax is None:
        amax = g.abs().amax()
    ts = _safe_tensor_scale(amax, E2M1_MAX * (FWD_SCALE_MAX if four_over_six else E4M3_MAX))
    gmax = g.abs().amax(-1, keepdim=True)
    codes, scale, err = rtn_candidate(g, gmax, ts, 6.0)
    if four_over_six:
        codes4, scale4, err4 = rtn_candidate(g, gmax, ts, 4.0)
        pick4 = err4 < err
        codes = torch.where(pick4, codes4, codes)
        scale = torch.where(pick4, scale4.to(torch.float32), scale.to(torch.float32))
        scale = scale.to(torch.float8_e4m3fn)
    scale = torch.where(gmax == 0, 1.0, scale.to(torch.float32)).to(torch.float8_e4m3fn)
    return _pack(codes, scale.squeeze(-1), ts)


# --------------------------------------------------------------------------------------------
# Randomized Hadamard rotation (SPEC 3)
# --------------------------------------------------------------------------------------------


def hadamard_matrix(n: int = HADAMARD_BLOCK, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester Hadamard matrix with exact ±1 float32 entries (unnormalized)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def random_signs(generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """A fresh ±1 float32 vector of length 128."""
    bits = torch.randint(0, 2, (HADAMARD_BLOCK,), generator=generator, device=device)
    return bits.to(torch.float32) * 2 - 1


def pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dimension up to a multiple (exact for both GEMM operands)."""
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Randomized Hadamard rotation of consecutive 128-blocks of the last dim.

    Each block b becomes R·b with R = H_128 · diag(signs) / sqrt(128): signs first, then the
    Hadamard mix (in row form, b · diag(signs) · H / sqrt(128); H is symmetric). The order
    matters: with the signs applied after H they would commute out of any sign-symmetric
    quantizer and the rotation would no longer randomize anything.
    """
    _check_signs(signs)
    check_2d_multiple(x, HADAMARD_BLOCK)
    h = hadamard_matrix(HADAMARD_BLOCK, x.device)
    blocks = x.to(torch.float32).reshape(x.shape[0], -1, HADAMARD_BLOCK)
    rotated = (blocks * signs.to(torch.float32)) @ h * INV_SQRT_BLOCK
    return rotated.reshape(x.shape)


def unrotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of rotate(): R^T on each block."""
    _check_signs(signs)
    check_2d_multiple(x, HADAMARD_BLOCK)
    h = hadamard_matrix(HADAMARD_BLOCK, x.device)
    blocks = x.to(torch.float32).reshape(x.shape[0], -1, HADAMARD_BLOCK)
    restored = (blocks @ h * INV_SQRT_BLOCK) * signs.to(torch.float32)
    return restored.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# MS-EDEN (SPEC 4) and the baselines
# --------------------------------------------------------------------------------------------


def eden_codes_and_scales(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN codes of each 16-group at scale max|g| / fp4_max, and the EDEN-corrected real scales.

    The correction k = <u,u>/<u,c> makes <v_g, S_g * c> == |v_g|^2 (the EDEN identity). A group
    whose s underflows (below MIN_NORMAL) is a zero group: codes 0, S 0. Returns codes [rows,
    groups, 16] (uint8, unpacked) and scales S [rows, groups, 1] (float32).
    """
    g = _groups(v)
    s = g.abs().amax(-1, keepdim=True) * (1.0 / EDEN_FP4_MAX)
    u = g * _reciprocal(s)
    codes = e2m1_encode(u)
    c = e2m1_decode(codes)
    uc = pairwise_sum(u * c)
    k = torch.where(uc != 0, pairwise_sum(u * u) / uc, torch.ones_like(uc))
    # "s < MIN_NORMAL" rather than "s >= MIN_NORMAL" keeps a NaN s (a NaN in the group) NaN.
    return codes, torch.where(s < MIN_NORMAL, 0.0, s * k)


def ms_eden(v: torch.Tensor, uniform: torch.Tensor) -> NVFP4Tensor:
    """MS-EDEN of already rotated values ``v`` [rows, cols]; ``uniform`` [rows, cols/16] in [0,1).

    EDEN codes and corrected scales, then post-hoc range alignment: tensor scale = max corrected
    scale / 256 and each E4M3 scale stochastically rounded, so E[stored * tensor_scale] equals
    the corrected scale.
    """
    check_floating(v, "v")
    check_2d_multiple(v, GROUP, "v")
    codes, corrected = eden_codes_and_scales(v)
    # Kept in bfloat16 between the passes (SPEC 4.3 allows FP32 or BF16 scratch): half the
    # scratch traffic; the expected stored scale moves by at most 2^-9 relative.
    corrected = round_to_bfloat16(corrected)
    ts = _safe_tensor_scale(corrected.amax(), EDEN_FP8_MAX)
    stored = e4m3_stochastic(corrected / ts, uniform.unsqueeze(-1))
    stored = torch.where(corrected == 0, 1.0, stored.to(torch.float32)).to(torch.float8_e4m3fn)
    return _pack(codes, stored.squeeze(-1), ts)


def sr_quantize(v: torch.Tensor, uniform: torch.Tensor) -> NVFP4Tensor:
    """Baseline: element-wise stochastic rounding to E2M1 with per-group E4M3 scales (max on 6).

    ``uniform`` has v's shape: one draw per element. The group scale is rounded up to E4M3 rather
    than to nearest: a scale rounded down would clip the group maximum above 6 and bias SR.
    """
    check_floating(v, "v")
    check_2d_multiple(v, GROUP, "v")
    g = _groups(v)
    ts = _safe_tensor_scale(g.abs().amax(), E2M1_MAX * E4M3_MAX)
    gmax = g.abs().amax(-1, keepdim=True)
    scale = e4m3_ceil(gmax * (1.0 / E2M1_MAX) / ts)
    real = scale.to(torch.float32) * ts
    u = (g * _reciprocal(real)).clamp(-E2M1_MAX, E2M1_MAX)
    table = torch.tensor(E2M1_VALUES, device=v.device)
    a = u.abs()
    lo_idx = (torch.bucketize(a, table, right=True) - 1).clamp(0, 6)
    lo, hi = table[lo_idx], table[lo_idx + 1]
    up = uniform.reshape(g.shape) < (a - lo) / (hi - lo)
    idx = (lo_idx + up.long()).to(torch.uint8)
    codes = ((u < 0).to(torch.uint8) << 3) | idx
    scale = torch.where(gmax == 0, 1.0, scale.to(torch.float32)).to(torch.float8_e4m3fn)
    return _pack(codes, scale.squeeze(-1), ts)


def rtn_backward(v: torch.Tensor) -> NVFP4Tensor:
    """Baseline for ablation: plain RTN (max on 6, no four-over-six). Biased."""
    return quantize_rtn(v, four_over_six=False)


# --------------------------------------------------------------------------------------------
# Composite references: the bodies of the quartet2 ops
# --------------------------------------------------------------------------------------------


class BackwardMethod(str, enum.Enum):
    """The backward quantizer (the ops take its value, a string, in their schema)."""

    EDEN = "eden"  # MS-EDEN: Quartet II
    SR = "sr"  # element-wise stochastic rounding with the same rotation: the comparison recipe


BACKWARD_METHODS = tuple(m.value for m in BackwardMethod)


def backward_method(method: str) -> BackwardMethod:
    """``method`` as a BackwardMethod; a ValueError naming the valid ones otherwise."""
    try:
        return BackwardMethod(method)
    except ValueError:
        raise ValueError(f"method must be one of {BACKWARD_METHODS}, got {method!r}") from None


def rht_quantize(
    x: torch.Tensor,
    signs: torch.Tensor,
    seed: torch.Tensor,
    transpose: bool = False,
    method: str = "eden",
) -> NVFP4Tensor:
    """Quantize x · R along the last dim (x.T when ``transpose``: reduction over rows).

    The reduction dim is zero-padded to a multiple of 128. ``method`` "eden" is MS-EDEN (one
    seeded_uniform draw per group, by its row-major index); "sr" is the element-wise
    stochastic-rounding baseline (one draw per element). Values of x below float32's smallest
    normal count as zero (``flush_subnormal``).
    """
    check_floating(x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    x = flush_subnormal(x.to(torch.float32))
    return _rotate_and_quantize(x.T if transpose else x, signs, seed, method)


def requant(
    q: NVFP4Tensor, signs: torch.Tensor, seed: torch.Tensor, method: str = "eden"
) -> NVFP4Tensor:
    """deq(q).T rotated and re-quantized: a forward operand grouped along its other dimension."""
    return _rotate_and_quantize(dequantize(q).T, signs, seed, method)


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """x with every value below float32's smallest normal (in magnitude) set to zero.

    Applied to the rotated quantizers' input and to the rotated values: the GPU's tensor cores
    flush such values themselves (seen on the H200), so the rotation's sums agree bit for bit
    only if neither side ever holds one. They are below 1.2e-38: no BF16 product next to
    normal-range values resolves them (docs/numerics.md). NaN and Inf are kept.
    """
    return torch.where(x.abs() < MIN_NORMAL, 0.0, x)


def _rotate_and_quantize(
    x: torch.Tensor, signs: torch.Tensor, seed: torch.Tensor, method: str
) -> NVFP4Tensor:
    method = backward_method(method)
    v = flush_subnormal(rotate(pad_last(x, HADAMARD_BLOCK), signs))
    if method is BackwardMethod.SR:
        return sr_quantize(v, seeded_uniform(seed, v.shape, v.device))
    uniform = seeded_uniform(seed, torch.Size((v.shape[0], v.shape[1] // GROUP)), v.device)
    return ms_eden(v, uniform)


def gemm(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """deq(a) @ deq(b).T with float32 accumulation: both operands grouped along K."""
    if a.codes.shape[1] != b.codes.shape[1]:
        raise ValueError(f"reduction dims differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (dequantize(a) @ dequantize(b).T).to(out_dtype)


def gemm_units(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``gemm`` from the operands' ``units``: the float32 product of the unit values times one
    tensor scale, then the other (the same values up to float32 rounding).

    Not times their product: two tiny tensor scales (e.g. of a small gradient and a small
    weight) multiply to zero or a subnormal while the output itself is well representable.
    """
    if a_units.shape[1] != b_units.shape[1]:
        raise ValueError(f"reduction dims differ: {tuple(a_units.shape)} vs {tuple(b_units.shape)}")
    acc = a_units.to(torch.float32) @ b_units.to(torch.float32).T
    return (acc * a_tensor_scale * b_tensor_scale).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Grouped (mixture-of-experts) GEMMs: torch._grouped_mm's segments of expert rows
# --------------------------------------------------------------------------------------------

# An integer dtype of each element size: pad_segments moves bits, so it serves every dtype
# (torch has no CPU index_copy or scatter for float8 scales).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def padded_segment_rows(rows: int, experts: int) -> int:
    """The static row count of ``pad_segments``' output, for ``rows`` rows and ``experts``
    segments: 128 * floor((S + 127 * min(E, S)) / 128).

    An upper bound of sum_e round_up(S_e, 128) over any segment sizes S_e with sum S_e <= S: at
    most k = min(E, S) segments are not empty, each of them gains fewer than 128 rows, so the sum
    is at most S + 127 k, and it is a multiple of 128. k - 1 segments of 129 rows and one of the
    rest reach it, whenever S leaves room for them. Symbolic sizes work too (torch.sym_min).
    """
    block = HADAMARD_BLOCK
    return block * ((rows + (block - 1) * torch.sym_min(experts, rows)) // block)


def check_offs(offs: torch.Tensor, device: torch.device) -> None:
    """``offs``: the segment ends of torch._grouped_mm, one per expert, next to the operand."""
    if offs.dim() != 1 or offs.shape[0] == 0 or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"offs must be a 1-D int32 or int64 tensor of segment ends, one per expert, got "
            f"{offs.dtype}{tuple(offs.shape)}"
        )
    if offs.device != device:
        raise ValueError(f"offs is on {offs.device}, its operand on {device}")


def check_segments(x: torch.Tensor, offs: torch.Tensor) -> None:
    if x.dim() != 2 or x.element_size() not in _BITS:
        raise ValueError(
            f"pad_segments takes 2-D rows of 1, 2, 4 or 8-byte elements, got "
            f"{x.dtype}{tuple(x.shape)}"
        )
    check_offs(offs, x.device)


def pad_segments(x: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's segment of rows of ``x`` (segment e ends at row ``offs[e]``) moved to a
    start that is a multiple of 128, zero rows between segments and after the last; returns the
    ``[padded_segment_rows(S, E), C]`` rows and the padded segment ends ``cumsum(round_up(S_e,
    128))`` (int32).

    So the backward's 128-row rotations along the token dim never mix two experts, and each
    expert's tokens are zero-padded to a multiple of 128 (exact: SPEC 3). Rows at or past
    ``offs[-1]`` belong to no expert and are dropped. A gather (each output row is a source row
    or zero) with a static shape and no host synchronisation; it moves bits as integers, so any
    dtype works (NVFP4 codes, float8 scales). Ends are clamped into [0, S] and segment sizes at
    0, so no ``offs`` makes it read outside ``x``.
    """
    check_segments(x, offs)
    rows, experts = x.shape[0], offs.shape[0]
    ends = offs.to(torch.int64).clamp(0, rows)
    sizes = ends.diff(prepend=ends.new_zeros(1)).clamp(min=0)
    padded_sizes = (sizes + HADAMARD_BLOCK - 1) // HADAMARD_BLOCK * HADAMARD_BLOCK
    padded_ends = padded_sizes.cumsum(0)
    out_row = torch.arange(padded_segment_rows(rows, experts), device=x.device)
    segment = torch.searchsorted(padded_ends, out_row, right=True)  # E: past the last segment
    e = segment.clamp(max=experts - 1)
    src = out_row - (padded_ends - padded_sizes)[e] + (ends - sizes)[e]
    inside = (segment < experts) & (src < ends[e])
    bits = x.view(_BITS[x.element_size()]).index_select(0, torch.where(inside, src, 0))
    padded = torch.where(inside[:, None], bits, 0).view(x.dtype)
    return padded, padded_ends.to(torch.int32)


def grouped_gemm_shape(
    a_units: torch.Tensor, b_units: torch.Tensor, offs: torch.Tensor
) -> list[int]:
    """Output shape of ``grouped_gemm_units``: [S, Nout] (rows grouped, b 3-D) or [E, Nout, M]
    (reduction grouped, b 2-D)."""
    if b_units.dim() == 3:
        return [a_units.shape[0], b_units.shape[1]]
    return [offs.shape[0], a_units.shape[0], b_units.shape[0]]


def finish_grouped(
    acc: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A torch._grouped_mm product of units times one tensor scale, then the other (in float32,
    as ``gemm_units``), in ``out_dtype``, zero outside every segment.

    torch._grouped_mm leaves the rows at or past ``offs[-1]`` unwritten, and CUTLASS's grouped
    kernels may write stale accumulators for an empty reduction segment (NVIDIA/cutlass#2674,
    pytorch/pytorch#172439): those outputs are selected away, never multiplied (they may be NaN).
    """
    ends = offs.to(torch.int64)
    if acc.dim() == 2:  # rows grouped: rows before offs[-1] belong to an expert
        inside = (torch.arange(acc.shape[0], device=acc.device) < ends[-1])[:, None]
    else:  # reduction grouped: one output per expert, zero for an empty segment
        inside = (ends.diff(prepend=ends.new_zeros(1)) > 0)[:, None, None]
    scaled = acc.to(torch.float32) * a_tensor_scale * b_tensor_scale
    return torch.where(inside, scaled, 0.0).to(out_dtype)


def grouped_gemm_units(
    a_units: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_units: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``gemm_units`` per expert segment, in torch._grouped_mm's two forms (offs: segment ends):

    - rows grouped: a [S, R], b [E, Nout, R] -> [S, Nout], rows of segment e = a[rows] @ b[e].T;
      rows at or past offs[-1] are zero.
    - reduction grouped: a [Nout, P], b [M, P] -> [E, Nout, M], out[e] = a[:, seg e] @
      b[:, seg e].T; zero for an empty segment.

    Exact float32 products of the unit values (float32 torch._grouped_mm), summed in float32.
    The reduction dim must not be empty (torch._grouped_mm rejects it; the op handles it).
    """
    a = a_units.to(torch.float32, memory_format=torch.contiguous_format)
    b = b_units.to(torch.float32, memory_format=torch.contiguous_format)
    acc = torch._grouped_mm(a, b.transpose(-2, -1), offs.to(torch.int32))
    return finish_grouped(acc, a_tensor_scale, b_tensor_scale, offs, out_dtype)


ROUNDTRIP_METHODS = ("rtn", "four_over_six", "sr", "eden")


def roundtrip(
    x: torch.Tensor, method: str, generator: torch.Generator, rotated: bool = True
) -> torch.Tensor:
    """R^T deq(Q(x R)) for one draw of signs and rounding noise: what a GEMM operand becomes.

    Compares quantizers on equal terms (tests and benchmarks/quant_error.py). ``rotated=False``
    skips the rotation; ``method`` is one of ROUNDTRIP_METHODS.
    """
    if method not in ROUNDTRIP_METHODS:
        raise ValueError(f"method must be one of {ROUNDTRIP_METHODS}, got {method!r}")
    signs = random_signs(generator, x.device)
    v = rotate(x, signs) if rotated else x.to(torch.float32)
    if method == "eden":
        draws = torch.rand(v.shape[0], v.shape[1] // GROUP, generator=generator)
        t = ms_eden(v, draws.to(v.device))
    elif method == "sr":
        t = sr_quantize(v, torch.rand(v.shape, generator=generator).to(v.device))
    elif method == "rtn":
        t = rtn_backward(v)
    else:
        t = quantize_rtn(v, four_over_six=True)
    d = t.dequantize()
    return unrotate(d, signs) if rotated else d
