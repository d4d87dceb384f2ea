"""``options={"check_finite": True}``: a ``quartet2::check_finite`` call after each quartet2 op
that the rewrite inserts, on the op's floating-point inputs and outputs. The op
(``quartet_compile.ops.check_finite``) raises at the first NaN or Inf, naming the layer, the
matmul (forward / grad-input / grad-weight), the operand, and whether the value came into the
op or the op made it.

The check returns nothing; FX's and Inductor's dead-code elimination keep it because ops.py
registers it as side-effectful (verified with Inductor on CPU and CUDA, forward and backward,
and with activation checkpointing). Each check is pinned to its side of the forward/backward
partition (``partitioner_tag``): the partitioner copies every node whose inputs the backward
can reach into the backward graph too, where dead-code elimination would then keep a forward
check whose inputs were all saved, and it would run twice. (The checks read the quantizers'
units, which are never saved, so this has not been seen; the tag makes it impossible.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from quartet_compile.ops import Matmul, Origin
from quartet_compile.passes.emitter import Quantized

q2 = torch.ops.quartet2
# passes/emitter.Emitter.call: ``call(anchor, target, *args)`` inserts a node before ``anchor``.
Call = Callable[..., fx.Node]
Named = tuple[str, fx.Node]
_SIDE = {
    Matmul.FORWARD: "must_be_in_forward",
    Matmul.GRAD_INPUT: "must_be_in_backward",
    Matmul.GRAD_WEIGHT: "must_be_in_backward",
}


class Checks:
    """Inserts the checks of one linear layer's quartet2 ops; does nothing when not enabled."""

    def __init__(self, call: Call, layer: str, enabled: bool) -> None:
        self.call = call
        self.layer = layer or "<root>"  # as the report names it
        self.enabled = enabled

    def quantizer(
        self,
        anchor: fx.Node,
        matmul: Matmul,
        inputs: Sequence[Named],
        origin: Origin,
        quantized: Quantized,
        name: str,
    ) -> None:
        """After a quantizer op whose getitems are ``quantized``: its ``inputs`` (from
        ``origin``) and its output ``name``'s tensor scale and units."""
        outputs = [(name, quantized.tensor_scale), (name, quantized.units)]
        self._insert(anchor, matmul, quantized.units.args[0], inputs, origin, outputs)

    def gemm(
        self,
        anchor: fx.Node,
        matmul: Matmul,
        a: tuple[str, Quantized],
        b: tuple[str, Quantized],
        out: Named,
    ) -> None:
        """After a gemm: its quantized operands ``a`` and ``b`` (name, getitems) and ``out``."""
        inputs = [(name, t) for name, q in (a, b) for t in (q.tensor_scale, q.units)]
        self._insert(anchor, matmul, out[1], inputs, Origin.QUARTET2, [out])

    def _insert(
        self,
        anchor: fx.Node,
        matmul: Matmul,
        op: fx.Node,
        inputs: Sequence[Named],
        origin: Origin,
        outputs: Sequence[Named],
    ) -> None:
        if not self.enabled:
            return
        # Integer and float8 operands (codes, group scales) have no isfinite; the float ones
        # they come with (units, tensor scale) carry any NaN or Inf.
        inputs = [(name, node) for name, node in inputs if _floating(node)]
        named = [*inputs, *outputs]
        node = self.call(
            anchor,
            q2.check_finite.default,
            [n for _, n in named],
            [name for name, _ in named],
            len(inputs),
            origin.value,
            self.layer,
            matmul.value,
            op.target._schema.name,
        )
        node.meta["partitioner_tag"] = _SIDE[matmul]


def count(graph: fx.Graph) -> int:
    """The checks in ``graph``."""
    return len(graph.find_nodes(op="call_function", target=q2.check_finite.default))


def _floating(node: fx.Node) -> bool:
    dtype = node.meta["val"].dtype
    return dtype.is_floating_point and dtype.itemsize > 1
