"""Trace a matmul operand back through layout-only ops (views, transposes, autocast's dtype
casts) to the tensor it holds, recording which of that tensor's dims each of its dims is: how the
matchers see that ``x @ W.T`` and ``W.t().unsqueeze(0)`` read the parameter ``W``.
Also the names Dynamo gives modules and parameters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that keep a tensor's values and only change dtype or identity.
_SAME_LAYOUT = (
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
)
# Ops that only insert/remove size-1 dims or regroup them: followed when the sequence of
# non-1 sizes is unchanged.
_RESHAPES = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
)
_TRANSPOSES = (aten.permute.default, aten.t.default, aten.transpose.int)

# A dim label: which dim of the root tensor a dim holds (None: a size-1 dim).
Labels = tuple[int | None, ...]


def shape_of(node: fx.Node) -> tuple[int | torch.SymInt, ...]:
    return tuple(node.meta["val"].shape)


def _non1(shape: Sequence[int | torch.SymInt]) -> list[int | torch.SymInt]:
    return [s for s in shape if not (isinstance(s, int) and s == 1)]


def _is_layout_only(node: fx.Node) -> bool:
    """True when ``node`` rearranges its first input's values without changing them."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return False
    if node.target in _SAME_LAYOUT or node.target in _TRANSPOSES:
        return True
    if node.target in _RESHAPES:
        return _non1(shape_of(node.args[0])) == _non1(shape_of(node))
    return False


def _relabel(node: fx.Node, labels: Labels) -> Labels:
    """Labels of ``node``'s dims given those of its input (``node`` is layout-only)."""
    ndim = len(labels)
    if node.target is aten.permute.default:
        return tuple(labels[d % ndim] for d in node.args[1])
    if node.target in (aten.t.default, aten.transpose.int):
        d0, d1 = (0, 1) if node.target is aten.t.default else node.args[1:3]
        swapped = list(labels)
        swapped[d0 % ndim], swapped[d1 % ndim] = labels[d1 % ndim], labels[d0 % ndim]
        return tuple(swapped) if ndim > 1 else labels
    if node.target in _RESHAPES:
        moving = iter(label for label in labels if label is not None)
        return tuple(None if s == 1 else next(moving) for s in shape_of(node))
    return labels


@dataclass(frozen=True)
class Operand:
    """A matmul operand traced back to the tensor it views: ``labels[i]`` is the root dim that
    the operand's dim i holds."""

    node: fx.Node
    root: fx.Node
    labels: Labels

    @property
    def matrix(self) -> Labels:
        """Labels of the two matrix dims (the last two)."""
        return self.labels[-2:]


def resolve(node: fx.Node) -> Operand:
    chain = []
    root = node
    while _is_layout_only(root):
        chain.append(root)
        root = root.args[0]
    labels: Labels = tuple(
        None if isinstance(s, int) and s == 1 else i for i, s in enumerate(shape_of(root))
    )
    for step in reversed(chain):
        labels = _relabel(step, labels)
    return Operand(node, root, labels)


def value_key(node: fx.Node) -> tuple:
    """A key equal for two nodes that hold the same values in the same layout.

    ``resolve`` stops at a reshape that merges dims (``x[B, S, H].view(B * S, H)``), and each
    linear that reads ``x`` makes its own such view; keyed by the reshape's input and its shape
    instead of the node, q/k/v's three views of one ``x`` share one forward quantization.
    """
    source = resolve(node)
    root = source.root
    merged = root.op == "call_function" and root.target in _RESHAPES
    if merged and isinstance(root.args[0], fx.Node):
        return (value_key(root.args[0]), tuple(map(str, shape_of(root))), source.labels)
    return (root, source.labels)


def dotted(path: str) -> str:
    """Dynamo's source path (``L['self']._modules['fc1']._parameters['weight']`` or
    ``L['self'].layers.0.fc1``) as a dotted name (``fc1.weight``, ``layers.0.fc1``)."""
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\[(['\"])(.*?)\1\]", r".\2", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")


def module_name(node: fx.Node) -> str:
    """Dotted path of the module that ran ``node`` ("" when Dynamo recorded none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return dotted(list(stack.values())[-1][0]) if stack else ""
