"""Find each linear layer's matmuls in an AOTAutograd graph and classify them.

The graphs come from AOTAutograd: the joint forward+backward graph when training, the forward
graph under no_grad. A forward matmul (``mm``, ``addmm``, or a batch-1 ``bmm`` after einsum's
views) whose right operand is a parameter, up to layout-only ops (views, transposes, dtype casts
from autocast), is a linear. Its backward twins are found structurally: the tangent-derived matmul
that consumes the same parameter is the grad-input, the one that consumes the same activation is
the grad-weight. AOTAutograd gives both the forward node's ``seq_nr``, which breaks ties when a
parameter or an activation feeds several linears.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
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


@dataclass
class BackwardMatmul:
    """A grad-input or grad-weight matmul, described relative to its canonical form.

    Canonical grad-input: dx[T,K] = dy[T,N] @ W[N,K]; canonical grad-weight: dW[N,K] =
    dy.T[N,T] @ x[T,K]. ``dy`` is the tangent-side operand; ``dy_transposed`` says whether it
    holds dy.T; ``out_transposed`` whether the node computes the transposed canonical result.
    """

    node: fx.Node
    dy: fx.Node
    dy_transposed: bool
    out_transposed: bool


@dataclass
class Linear:
    """One linear layer: y[T,N] = x[T,K] @ W.T, found from its forward matmul."""

    name: str
    forward: fx.Node
    x: fx.Node
    weight: fx.Node
    weight_name: str
    weight_transposed: bool  # the parameter is stored [K, N] (``x @ W``), not [N, K]
    bias: fx.Node | None
    x_root: fx.Node
    x_labels: Labels
    grad_input: BackwardMatmul | None = None
    grad_weight: BackwardMatmul | None = None

    @property
    def batched(self) -> bool:
        return self.forward.target is aten.bmm.default

    @property
    def dims(self) -> tuple[int | torch.SymInt, int | torch.SymInt, int | torch.SymInt]:
        """(T, K, N)."""
        t, k = shape_of(self.x)[-2:]
        return t, k, shape_of(self.forward)[-1]


@dataclass(frozen=True)
class OtherMatmul:
    """A matmul that is not part of any linear layer, with the reason."""

    node: fx.Node
    name: str
    reason: str
    backward: bool


@dataclass
class Matches:
    linears: list[Linear]
    others: list[OtherMatmul]
    joint: bool


def _input_index(node: fx.Node, position: int) -> int:
    """Index of a placeholder in the Dynamo graph's flat inputs (AOTAutograd's descriptor)."""
    idx = getattr(node.meta.get("desc"), "idx", None)
    return position if idx is None else idx


def _is_tangent(node: fx.Node) -> bool:
    desc = node.meta.get("desc")
    if desc is not None:
        return desc.is_tangent()
    return node.name.startswith("tangents")


def find_matmuls(graph: fx.Graph, params: Mapping[int, str]) -> Matches:
    """Classify every matmul of ``graph``; ``params`` maps the indices of the Dynamo graph's
    inputs that are nn.Parameters (frozen ones included) to their names."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tangents = {n for n in placeholders if _is_tangent(n)}
    primals = [n for n in placeholders if n not in tangents]
    weights = {
        n: params[_input_index(n, i)] for i, n in enumerate(primals) if _input_index(n, i) in params
    }
    from_tangents = set(tangents)
    for node in graph.nodes:
        if any(a in from_tangents for a in node.all_input_nodes):
            from_tangents.add(node)

    linears: list[Linear] = []
    others: list[OtherMatmul] = []
    backward = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in MATMULS:
            continue
        if node in from_tangents:
            backward.append(node)
            continue
        found = _forward_linear(node, weights)
        if isinstance(found, Linear):
            linears.append(found)
        else:
            others.append(OtherMatmul(node, module_name(node), found, backward=False))
    for node in backward:
        if not _assign_backward(node, linears, from_tangents):
            others.append(OtherMatmul(node, "", _backward_reason(node, weights), backward=True))
    return Matches(linears, others, joint=bool(tangents))


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    return (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]


def _forward_linear(node: fx.Node, weights: Mapping[fx.Node, str]) -> Linear | str:
    """A Linear when ``node`` is x @ (W or W.T) with W a parameter, else why not."""
    p, q = (resolve(a) for a in _operands(node))
    p_weight, q_weight = p.root in weights, q.root in weights
    if not p_weight and not q_weight:
        return "activation x activation"
    if p_weight and q_weight:
        return "weight x weight"
    if p_weight:
        return "weight is the left operand (W @ x): not handled"
    if q.matrix not in ((0, 1), (1, 0)) or len(shape_of(q.root)) != 2:
        return "weight operand is not a 2-D parameter or its transpose"
    if node.target is aten.bmm.default and shape_of(node)[0] != 1:
        return "batched matmul with batch > 1"
    bias = node.args[0] if node.target is aten.addmm.default else None
    return Linear(
        name=module_name(node) or weights[q.root].rpartition(".")[0],
        forward=node,
        x=p.node,
        weight=q.root,
        weight_name=weights[q.root],
        weight_transposed=q.matrix == (0, 1),
        bias=bias,
        x_root=p.root,
        x_labels=p.matrix,
    )


def _same_seq(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get("seq_nr"), b.meta.get("seq_nr")
    return sa is None or sb is None or sa < 0 or sb < 0 or sa == sb


def _assign_backward(node: fx.Node, linears: list[Linear], from_tangents: set[fx.Node]) -> bool:
    """Attach ``node`` to the linear whose grad-input or grad-weight it computes."""
    p, q = (resolve(a) for a in node.args[:2])
    for lin in sorted(linears, key=lambda lin: not _same_seq(lin.forward, node)):
        if not _same_seq(lin.forward, node):
            break
        # W as a matrix [N, K] has labels (n, k); x as [T, K] has lin.x_labels.
        w_nk = (0, 1) if not lin.weight_transposed else (1, 0)
        for mine, other, on_right in ((q, p, True), (p, q, False)):
            if other.root not in from_tangents:
                continue
            if lin.grad_input is None and mine.root is lin.weight:
                # dy @ W[N,K] (W right) or W.T[K,N] @ dy.T (W left, result dx.T).
                want = w_nk if on_right else w_nk[::-1]
                if mine.matrix == want:
                    lin.grad_input = BackwardMatmul(node, other.node, not on_right, not on_right)
                    return True
            if lin.grad_weight is None and mine.root is lin.x_root:
                # dy.T @ x[T,K] (x right) or x.T[K,T] @ dy (x left, result dW.T).
                want = lin.x_labels if on_right else lin.x_labels[::-1]
                if mine.matrix == want:
                    lin.grad_weight = BackwardMatmul(node, other.node, on_right, not on_right)
                    return True
    return False


def _backward_reason(node: fx.Node, weights: Mapping[fx.Node, str]) -> str:
    roots = {resolve(a).root for a in node.args[:2]}
    if roots & weights.keys():
        return "backward of a matmul that is not a handled linear"
    return "activation x activation (backward)"
