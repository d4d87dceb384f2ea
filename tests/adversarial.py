"""Inputs built to break scale arithmetic, shaped like what real training feeds the quantizers.

A Hugging Face Llama's first-layer gradient held whole rows of zeros and rows of subnormal
values next to normal ones; one of our quantizers turned such a tensor into NaN. ``sink`` stacks
bands of 16 rows, each one such pattern, so one tensor exercises all of them:

| band | rows |
|---|---|
| normal | grid values |
| zeros | zero rows, zero 16-groups, a zero 128-block |
| huge | x 2^13 (~1e4) |
| tiny | x 2^-100 (~1e-30) |
| attention | alternating exactly-zero rows and rows at 2^-27 (~1e-8) of their neighbours |
| min-normal | x 2^-126: values at and below float32's smallest normal |
| subnormal | x 2^-129: mostly subnormal values |
| constant | one value per row |
| heavy-tail | each element x 2^(0..4) |
| outlier | normal rows, one element x 2^11 |

With ``exact=True`` every value is a grid value (a multiple of 1/16 in [-4, 4)) times a power
of two that is constant along each band's rows (heavy-tail and outlier stay within 2^11), so
each 128-term rotation sum along a row is exact in any summation order, and none of its partial
sums is subnormal (the min-normal band's normal values are multiples of 2^-126): a kernel can
then be compared with the reference bit for bit, whatever its accumulation order and whatever
the GPU does with subnormal values. Bands are 16 rows, so the transpose (``sink(...).T``) keeps
every 16-group inside one band: requant's input. With ``exact=False`` the bands hold Gaussian and
Cauchy values at non-power-of-two magnitudes (1e4, 1e-30, 1e-38, 1e-40): for properties that
must hold on any input (finite output, zeros stay zero).
"""

from __future__ import annotations

import torch

BAND = 16
BANDS = (
    "normal",
    "zeros",
    "huge",
    "tiny",
    "attention",
    "min-normal",
    "subnormal",
    "constant",
    "heavy-tail",
    "outlier",
)
# Magnitude of each band: a power of two (exact) or a decimal one (free).
_EXACT_SCALE = {"huge": 2.0**13, "tiny": 2.0**-100, "min-normal": 2.0**-126, "subnormal": 2.0**-129}
_FREE_SCALE = {"huge": 1e4, "tiny": 1e-30, "min-normal": 1e-38, "subnormal": 1e-40}


def _base(rows: int, cols: int, exact: bool, g: torch.Generator) -> torch.Tensor:
    if exact:
        return torch.randint(-64, 64, (rows, cols), generator=g).float() / 16
    return torch.randn(rows, cols, generator=g)


def band(name: str, cols: int, exact: bool, g: torch.Generator) -> torch.Tensor:
    """One band of BAND rows, float32."""
    x = _base(BAND, cols, exact, g)
    if name == "min-normal" and exact:
        # Values below 2^-126 are zero to the rotated quantizers; the rest are multiples of
        # 2^-126, so no partial sum of a rotation is subnormal either, whatever its order.
        return torch.where(x.abs() < 1, x, x.round()) * 2.0**-126
    if name in _EXACT_SCALE:
        return x * (_EXACT_SCALE if exact else _FREE_SCALE)[name]
    if name == "zeros":
        x[:4] = 0
        x[4:8].view(4, -1, 16)[:, ::2] = 0
        x[8:12, :128] = 0
    elif name == "attention":
        x[0::2] = 0
        x[1::4] *= 2.0**-27 if exact else 1e-8
    elif name == "constant":
        x = x[:, :1].expand(BAND, cols).clone()
    elif name == "heavy-tail":
        if exact:
            x *= torch.exp2(torch.randint(0, 5, x.shape, generator=g).float())
        else:  # Cauchy (Student-t with one degree of freedom), within float16's range
            x = torch.tan(torch.pi * (torch.rand(x.shape, generator=g) - 0.5)).clamp(-6e4, 6e4)
    elif name == "outlier":
        x[BAND // 2, cols // 3] = 4 * (2.0**11 if exact else 1e3)
    return x


def sink(cols: int, seed: int, exact: bool, repeat: int = 1) -> torch.Tensor:
    """Every band, ``repeat`` times in turn: [len(BANDS) * BAND * repeat, cols], float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([band(name, cols, exact, g) for _ in range(repeat) for name in BANDS])


def whole(name: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A whole tensor at one exact magnitude: "subnormal" (every group underflows: the tensor
    quantizes to zero), "tiny-normal" (2^-110: tiny, but every scale is a normal float32)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"subnormal": 2.0**-129, "tiny-normal": 2.0**-110}[name]
    return _base(rows, cols, True, g) * scale


def band_rows(name: str, repeat: int = 1) -> torch.Tensor:
    """Row indices of band ``name`` in ``sink(..., repeat)``."""
    i = BANDS.index(name)
    return torch.cat([torch.arange(BAND) + (r * len(BANDS) + i) * BAND for r in range(repeat)])
