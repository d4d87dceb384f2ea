"""Dense weight matmuls: ``nn.Linear``/``F.linear`` (W[N, K], ``x @ W.T``) and the transposed
weights of GPT-2's ``Conv1D`` (W[K, N], ``x @ W``).

In the joint graph the forward is ``mm``/``addmm`` (or a batch-1 ``bmm`` after einsum's views)
with the weight, up to layout-only ops, as its right operand. Its backward twins are found
structurally: the tangent-derived matmul that reads the same weight is the grad-input, the one
that reads the same activation is the grad-weight.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from quartet_compile.ops import Matmul
from quartet_compile.passes.emitter import Emitter
from quartet_compile.passes.forms.base import new_site
from quartet_compile.passes.layer import DY_NAME, LayerRewrite
from quartet_compile.passes.operands import resolve, shape_of
from quartet_compile.passes.report import LinearReport, Status
from quartet_compile.passes.sites import BackwardMatmul, Linear

aten = torch.ops.aten


class WeightLayout(enum.Enum):
    """How a dense form's 2-D weight is stored: the dim labels of its [N, K] matrix."""

    NK = (0, 1)  # nn.Linear: W[N, K], y = x @ W.T
    KN = (1, 0)  # Conv1D: W[K, N], y = x @ W


def operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The two matrices of an mm/addmm/bmm/_grouped_mm (addmm's bias comes first)."""
    return (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]


@dataclass(frozen=True)
class DenseForm:
    """A 2-D weight read as ``layout`` by mm/addmm (or a batch-1 bmm)."""

    name: str
    layout: WeightLayout
    ops: tuple = (aten.mm.default, aten.addmm.default, aten.bmm.default)

    def forward(self, node: fx.Node, weights: Mapping[fx.Node, str]) -> Linear | str | None:
        p, q = (resolve(a) for a in operands(node))
        if p.root in weights or q.root not in weights or len(shape_of(q.root)) != 2:
            return None
        if q.matrix != self.layout.value[::-1]:  # x @ W.T reads W's labels (k, n) = (1, 0)
            return None
        if node.target is aten.bmm.default and shape_of(node)[0] != 1:
            return "batched matmul with batch > 1"
        return new_site(
            self, node, p, q, weights,
            weight_transposed=self.layout is WeightLayout.KN,
            bias=node.args[0] if node.target is aten.addmm.default else None,
        )  # fmt: skip

    def backward(self, node: fx.Node, site: Linear, from_tangents: set[fx.Node]) -> bool:
        p, q = (resolve(a) for a in operands(node))
        # W as a matrix [N, K] has labels (n, k); x as [T, K] has site.x_labels.
        w_nk = self.layout.value
        for mine, other, on_right in ((q, p, True), (p, q, False)):
            if other.root not in from_tangents:
                continue
            if site.grad_input is None and mine.root is site.weight:
                # dy @ W[N,K] (W right) or W.T[K,N] @ dy.T (W left, result dx.T).
                if mine.matrix == (w_nk if on_right else w_nk[::-1]):
                    site.grad_input = BackwardMatmul(node, other.node, not on_right, not on_right)
                    return True
            if site.grad_weight is None and mine.root is site.x_root:
                # dy.T @ x[T,K] (x right) or x.T[K,T] @ dy (x left, result dW.T).
                if mine.matrix == (site.x_labels if on_right else site.x_labels[::-1]):
                    site.grad_weight = BackwardMatmul(node, other.node, on_right, not on_right)
                    return True
        return False

    def ineligible(self, site: Linear) -> str | None:
        if site.forward.kwargs:
            return f"addmm with {dict(site.forward.kwargs)}"
        return None

    def rewrite(self, site: Linear, entry: LinearReport, layer: LayerRewrite) -> None:
        emit = layer.emit
        fwd = site.forward
        batched = fwd.target is aten.bmm.default
        x = emit.current(site.x)
        x2d = emit.call(fwd, aten.squeeze.dim, x, 0) if batched else x
        w_nk = (
            emit.call(fwd, aten.permute.default, site.weight, [1, 0])
            if self.layout is WeightLayout.KN
            else site.weight
        )
        xq = wq = None
        if entry.forward.status is Status.NVFP4:
            xq, wq = layer.quantize_forward(x2d, "x"), layer.quantize_forward(w_nk, "W")
            out = emit.gemm(fwd, xq, wq, fwd.meta["val"].dtype)
            layer.check.gemm(fwd, Matmul.FORWARD, ("x (NVFP4)", xq), ("W (NVFP4)", wq), ("y", out))
            if site.bias is not None:
                out = emit.call(fwd, aten.add.Tensor, out, emit.current(site.bias))
            if batched:
                out = emit.call(fwd, aten.unsqueeze.default, out, 0)
            emit.replace(fwd, out)

        roles = [
            (mm, matmul, fwd_q, operand, name, result)
            for mm, matmul, fwd_q, operand, name, result, status in (
                (site.grad_input, Matmul.GRAD_INPUT, wq, w_nk, "W", "dx", entry.grad_input),
                (site.grad_weight, Matmul.GRAD_WEIGHT, xq, x2d, "x", "dW", entry.grad_weight),
            )
            if status.status is Status.NVFP4
        ]
        if not roles:
            return
        rotations = layer.rotations([mm.node for mm, *_ in roles])
        for (mm, matmul, fwd_q, operand, name, result), rotation in zip(
            roles, rotations, strict=True
        ):
            node = mm.node
            dy, holds_dy_t = untransposed(emit, node, emit.current(mm.dy), mm.dy_transposed)
            # grad-input wants dy [T, N] rotated along N; grad-weight dy.T [N, T] along T.
            transpose = holds_dy_t if matmul is Matmul.GRAD_INPUT else not holds_dy_t
            dyq = layer.rotate_dy(node, matmul, dy, transpose, rotation)
            opq = layer.rotate_operand(node, matmul, name, fwd_q, operand, rotation)
            out = emit.gemm(node, dyq, opq, node.meta["val"].dtype)
            layer.check.gemm(
                node, matmul, (DY_NAME, dyq), (f"{name} (rotated NVFP4)", opq), (result, out)
            )
            if mm.out_transposed:
                out = emit.call(node, aten.permute.default, out, [1, 0])
            if batched:
                out = emit.call(node, aten.unsqueeze.default, out, 0)
            emit.replace(node, out)


def untransposed(
    emit: Emitter, anchor: fx.Node, dy: fx.Node, transposed: bool
) -> tuple[fx.Node, bool]:
    """The 2-D tensor that ``dy`` views, and whether it holds dy.T: rht_eden reads it in either
    orientation (its ``transpose`` flag), so a permuted view need not be materialized."""
    source = resolve(dy)
    if len(shape_of(source.root)) == 2 and source.matrix in ((0, 1), (1, 0)):
        return source.root, transposed != (source.matrix == (1, 0))
    return emit.call(anchor, aten.squeeze.dim, dy, 0) if len(shape_of(dy)) == 3 else dy, transposed


LINEAR = DenseForm("linear", WeightLayout.NK)
CONV1D = DenseForm("conv1d", WeightLayout.KN)
