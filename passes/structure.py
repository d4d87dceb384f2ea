"""Weight matmuls kept in high precision for what they do, whatever they are called.

NVFP4 recipes (Quartet II, Transformer Engine's, torchao's) keep the output head in high
precision, and the router of a mixture of experts decides which experts run: a 4-bit error there
changes the routing, not only the value. Names vary (``lm_head``, ``cls.predictions.decoder``,
``mlp.gate``, ``router``), so these rules read the graph:
- output head: the weight is also an embedding table (tied embeddings), or N is the vocabulary
  size of the graph's embedding and no other weight matmul reads the output;
- router: the output reaches ``topk`` before any other matmul.
"""

from __future__ import annotations

from collections.abc import Collection, Set
from typing import Any

import torch
from torch import fx

from quartet_compile.passes.operands import resolve, shape_of
from quartet_compile.passes.sites import Linear

aten = torch.ops.aten
_EMBEDDINGS = (aten.embedding.default,)
_TOPK = (aten.topk.default,)
_ROUTER_DEPTH = 8  # a router's logits reach topk through a few casts, a softmax or a sigmoid


class Structure:
    """What the rules need to know of one graph: its embeddings, matmul ops, backward nodes."""

    def __init__(self, graph: fx.Graph, matmuls: Collection[Any], backward: Set[fx.Node]) -> None:
        self.embeddings = [
            n for n in graph.nodes if n.op == "call_function" and n.target in _EMBEDDINGS
        ]
        self.matmuls = matmuls
        self.backward = backward

    def output_head_reason(self, site: Linear) -> str | None:
        """Why ``site`` is the model's output head, or None."""
        for emb in self.embeddings:
            table = resolve(emb.args[0]).root
            if table is site.weight:
                return "output head: its weight is tied to an input embedding"
            if site.experts is None and shape_of(table)[0] == site.dims[2]:
                if not self._reaches(site.forward, self.matmuls, depth=None):
                    return (
                        f"output head: N={site.dims[2]} is the embedding's vocabulary size "
                        f"and no other matmul reads its output"
                    )
        return None

    def router_reason(self, site: Linear) -> str | None:
        """Why ``site`` is a mixture-of-experts router, or None."""
        if self._reaches(site.forward, _TOPK, depth=_ROUTER_DEPTH):
            return "router: its output picks the experts (topk)"
        return None

    def _reaches(self, start: fx.Node, targets: Collection[Any], depth: int | None) -> bool:
        """Whether a forward node calling one of ``targets`` uses ``start``'s value, directly or
        through other forward nodes (at most ``depth`` steps, never through a matmul)."""
        frontier, seen, steps = list(start.users), set(), 0
        while frontier and (depth is None or steps < depth):
            following = []
            for node in frontier:
                if node in seen or node in self.backward:
                    continue
                seen.add(node)
                if node.target in targets:
                    return True
                if node.target not in self.matmuls:
                    following.extend(node.users)
            frontier, steps = following, steps + 1
        return False
