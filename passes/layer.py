"""The quartet2 ops of one weight matmul site, as every matmul form inserts them (SPEC 2-3).

Forward: each operand through ``quantize_fwd`` (amax, then RTN with four-over-six), shared by the
sites that read the same tensor (q/k/v read one x; a tied weight feeds several matmuls).
Backward: one fresh draw of 128 random signs and two seeds per backward matmul, from in-graph RNG;
dy through ``rht_eden``, the forward's triple through ``requant`` (or, when the forward stayed in
high precision, the operand itself through ``rht_eden``), then a GEMM on the units. Forms decide
the shapes and the GEMM; this module keeps the order and the debug checks in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx

from quartet_compile.config import QuartetConfig
from quartet_compile.nvfp4 import HADAMARD_BLOCK
from quartet_compile.ops import Matmul, Origin
from quartet_compile.passes import check_finite
from quartet_compile.passes.emitter import Emitter, Quantized
from quartet_compile.passes.operands import value_key
from quartet_compile.passes.sites import Linear

aten = torch.ops.aten
prims = torch.ops.prims
q2 = torch.ops.quartet2
_SEED_HIGH = 2**31 - 1
# Forward quantizations of this graph by (operands.value_key, dtype).
QuantizedCache = dict[tuple[tuple, torch.dtype], Quantized]


class Rotation(NamedTuple):
    """The randomness of one backward matmul: signs of the 128 rotation, a seed per operand."""

    signs: fx.Node
    seed_dy: fx.Node
    seed_operand: fx.Node


class LayerRewrite:
    """Inserts one site's quartet2 ops before the matmuls they replace."""

    def __init__(
        self, site: Linear, config: QuartetConfig, emit: Emitter, cache: QuantizedCache
    ) -> None:
        self.site = site
        self.config = config
        self.emit = emit
        self.cache = cache
        self.check = check_finite.Checks(emit.call, site.name, config.check_finite)

    def quantize_forward(self, t: fx.Node, name: str) -> Quantized:
        """RTN + four-over-six NVFP4 of the 2-D ``t``, once per tensor and dtype in the graph."""
        anchor = self.site.forward
        key = (value_key(t), t.meta["val"].dtype)
        if key not in self.cache:
            emit = self.emit
            amax = emit.call(anchor, aten.amax.default, emit.call(anchor, aten.abs.default, t), [])
            if amax.meta["val"].dtype != torch.float32:
                amax = emit.call(anchor, prims.convert_element_type.default, amax, torch.float32)
            q = emit.quantize(anchor, q2.quantize_fwd.default, t, amax, self.config.four_over_six)
            self.check.quantizer(
                anchor, Matmul.FORWARD, [(name, t)], Origin.MODEL, q, f"{name} (NVFP4)"
            )
            self.cache[key] = q
        return self.cache[key]

    def rotations(self, anchors: list[fx.Node]) -> list[Rotation]:
        """One rotation per backward matmul in ``anchors``, drawn before the first of them."""
        emit = self.emit
        first = min(anchors, key=emit.position())
        n = len(anchors)
        bits = emit.random(first, 2, [n, HADAMARD_BLOCK], torch.float32)
        signs = emit.call(first, aten.sub.Tensor, emit.call(first, aten.mul.Tensor, bits, 2.0), 1.0)
        seeds = emit.random(first, _SEED_HIGH, [2 * n], torch.int64)
        return [
            Rotation(
                emit.call(node, aten.select.int, signs, 0, i),
                emit.call(node, aten.select.int, seeds, 0, 2 * i),
                emit.call(node, aten.select.int, seeds, 0, 2 * i + 1),
            )
            for i, node in enumerate(anchors)
        ]

    def rotate_dy(
        self, anchor: fx.Node, matmul: Matmul, dy: fx.Node, transpose: bool, rotation: Rotation
    ) -> Quantized:
        """MS-EDEN (or SR) of ``dy`` (``dy.T`` with ``transpose``) rotated along its last dim."""
        q = self.emit.quantize(
            anchor,
            q2.rht_eden.default,
            dy,
            rotation.signs,
            rotation.seed_dy,
            transpose,
            self.config.backward_method.value,
        )
        self.check.quantizer(anchor, matmul, [("dy", dy)], Origin.GRADIENT, q, DY_NAME)
        return q

    def rotate_operand(
        self,
        anchor: fx.Node,
        matmul: Matmul,
        name: str,
        forward: Quantized | tuple[fx.Node, fx.Node, fx.Node] | None,
        operand: fx.Node,
        rotation: Rotation,
    ) -> Quantized:
        """The other operand rotated along the reduction dim: ``requant`` of the forward's
        triple (``forward``; a triple of padded codes and scales for grouped forms), or, when
        the forward stayed in high precision, ``rht_eden`` of ``operand.T``."""
        method = self.config.backward_method.value
        out_name = f"{name} (rotated NVFP4)"
        if forward is None:
            q = self.emit.quantize(
                anchor, q2.rht_eden.default, operand, rotation.signs, rotation.seed_operand, True,
                method,
            )  # fmt: skip
            self.check.quantizer(anchor, matmul, [(name, operand)], Origin.MODEL, q, out_name)
            return q
        triple = forward.triple if isinstance(forward, Quantized) else forward
        q = self.emit.quantize(
            anchor, q2.requant.default, *triple, rotation.signs, rotation.seed_operand, method
        )
        inputs = [(f"{name} (NVFP4 of the forward)", t) for t in triple]
        self.check.quantizer(anchor, matmul, inputs, Origin.QUARTET2, q, out_name)
        return q


DY_NAME = "dy (rotated NVFP4)"
