"""Insert nodes into a joint graph the way the rewrite needs: fake values computed, the replaced
node's meta inherited, one layer's insertions undone if its rewrite fails halfway, and the new
CUDA ops decomposed into their kernels once every layer is rewritten."""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import fx
from torch._guards import detect_fake_mode

from quartet_compile.passes.inline import decompose_on_cuda, inherited_meta

aten = torch.ops.aten
q2 = torch.ops.quartet2


class Quantized(NamedTuple):
    """The getitem nodes of one quantizer op call: the NVFP4 triple and its bf16 units."""

    codes: fx.Node
    scales: fx.Node
    tensor_scale: fx.Node
    units: fx.Node

    @property
    def triple(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        return self.codes, self.scales, self.tensor_scale


class Emitter:
    """Inserts nodes with fake values and inherited meta; can undo one layer's insertions."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.fake_mode = detect_fake_mode(
            [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        )
        self.created: list[fx.Node] = []
        self.replaced: list[tuple[fx.Node, fx.Node]] = []
        self.replacements: dict[fx.Node, fx.Node] = {}
        # Names given in this graph's module to the constants of inlined bodies.
        self.constants: dict[Hashable, str] = {}
        # Committed quartet2 op calls, inlined by ``decompose`` after the last layer: a later
        # layer may still use an earlier one's quantizer outputs (a shared forward quantization),
        # and inlining replaces those getitem nodes.
        self.committed_ops: list[fx.Node] = []

    def current(self, node: fx.Node) -> fx.Node:
        """What ``node`` became if an earlier layer's rewrite replaced it."""
        return self.replacements.get(node, node)

    def call(
        self, anchor: fx.Node, target: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> fx.Node:
        """``target(*args)`` inserted before ``anchor``, inheriting its meta."""
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        node.meta.update(inherited_meta(anchor))
        fake_args, fake_kwargs = fx.map_arg((args, kwargs), lambda a: a.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def outputs(self, anchor: fx.Node, node: fx.Node, count: int) -> list[fx.Node]:
        """The ``count`` getitems of a tuple-returning op call ``node``."""
        return [self.call(anchor, operator.getitem, node, i) for i in range(count)]

    def quantize(self, anchor: fx.Node, target: Callable[..., Any], *args: Any) -> Quantized:
        """A quantizer op call (quantize_fwd, rht_eden, requant) and its four outputs."""
        return Quantized(*self.outputs(anchor, self.call(anchor, target, *args), 4))

    def gemm(self, anchor: fx.Node, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> fx.Node:
        """deq(a) @ deq(b).T from the operands' units and tensor scales."""
        return self.call(
            anchor, q2.gemm.default, a.units, a.tensor_scale, b.units, b.tensor_scale, out_dtype
        )

    def random(self, anchor: fx.Node, high: int, size: list[int], dtype: torch.dtype) -> fx.Node:
        """In-graph random draw for one backward call (Inductor's RNG: reproducible under
        ``torch.manual_seed``, no recompiles). Tagged so that the partitioner computes it in the
        backward graph: by default it would draw it in the forward and save it."""
        device = anchor.meta["val"].device
        node = self.call(anchor, aten.randint.low, 0, high, size, dtype=dtype, device=device)
        node.meta["partitioner_tag"] = "must_be_in_backward"
        return node

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        self.replaced.append((old, new))

    def rollback(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)
        self.created.clear()
        self.replaced.clear()

    def commit(self) -> None:
        """Swap in the replacements; keep the new quartet2 op calls."""
        for old, new in self.replaced:
            old.replace_all_uses_with(new)
            self.graph.erase_node(old)
            self.replacements[old] = new
        self.committed_ops += [
            node
            for node in self.created
            if isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "quartet2"
        ]
        self.created.clear()
        self.replaced.clear()

    def decompose(self) -> None:
        """Decompose the committed CUDA ops into their kernels (after the last layer's commit)."""
        for node in self.committed_ops:
            decompose_on_cuda(self.graph, node, self.fake_mode, self.constants)
        self.committed_ops.clear()

    def position(self) -> Callable[[fx.Node], int]:
        """A sort key: a node's position in the graph."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return order.__getitem__
