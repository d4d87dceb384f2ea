"""Mixture-of-experts expert GEMMs: ``aten._grouped_mm(x[S, K], W[E, K, N], offs)``.

Tokens arrive sorted by expert; ``offs[e]`` is the end row of expert e's segment (rows past
``offs[-1]`` belong to no expert). Hugging Face's "grouped_mm" experts (bf16 weights) and
torchtitan's MoE reach the graph this way, with the parameter stored W[E, N, K] (read through a
transpose) or W[E, K, N]. Autograd's backward is two more ``_grouped_mm``: grad-input
``dy[S, N] @ W[e][N, K]`` per segment, and grad-weight, a 2-D x 2-D call whose reduction over the
tokens is segmented by ``offs`` and whose output is [E, N, K] (``dy.T @ x``) or [E, K, N].

Rewrite (Quartet II per expert): the forward quantizes x and all experts' weights as one [E*N, K]
tensor (one tensor scale; groups of 16 along K never cross experts) and multiplies with
``quartet2::grouped_gemm``. Grad-input rotates dy along N and requantizes the weights along E*N
(N is a multiple of 128, so no 128-block spans two experts). Grad-weight first moves each
expert's tokens to a 128-aligned, zero-padded segment (``quartet2::pad_segments``: static sizes
from the offsets, no host sync), so the rotation along the tokens never mixes two experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from quartet_compile.ops import Matmul
from quartet_compile.passes.emitter import Quantized
from quartet_compile.passes.forms.base import new_site
from quartet_compile.passes.forms.linear import untransposed
from quartet_compile.passes.layer import DY_NAME, LayerRewrite, Rotation
from quartet_compile.passes.operands import resolve, shape_of
from quartet_compile.passes.report import LinearReport, Status
from quartet_compile.passes.sites import BackwardMatmul, Linear

aten = torch.ops.aten
q2 = torch.ops.quartet2
# Dim labels of the weight read as [E, K, N] (forward) and as [E, N, K] (grad-input), for a
# parameter stored [E, N, K]; a parameter stored [E, K, N] swaps the last two.
_FORWARD_READ = (0, 2, 1)
_GRAD_INPUT_READ = (0, 1, 2)


def _swap(labels: tuple[int, ...]) -> tuple[int, ...]:
    return (labels[0], labels[2], labels[1])


@dataclass(frozen=True)
class GroupedExpertsForm:
    """3-D expert weights multiplied per token segment by ``aten._grouped_mm``."""

    name: str = "grouped experts"
    ops: tuple = (aten._grouped_mm.default,)

    def forward(self, node: fx.Node, weights: Mapping[fx.Node, str]) -> Linear | str | None:
        p, q = (resolve(a) for a in node.args[:2])
        if p.root in weights or q.root not in weights or len(shape_of(q.root)) != 3:
            return None
        if len(node.args) < 3 or len(shape_of(p.node)) != 2:
            return "grouped matmul without token offsets (batched 3-D x 3-D form)"
        if q.labels not in (_FORWARD_READ, _swap(_FORWARD_READ)):
            return None
        if len(node.args) > 3 or node.kwargs:
            return "grouped matmul with bias or out_dtype"
        return new_site(
            self, node, p, q, weights,
            weight_transposed=q.labels != _FORWARD_READ, bias=None, offsets=node.args[2],
        )  # fmt: skip

    def backward(self, node: fx.Node, site: Linear, from_tangents: set[fx.Node]) -> bool:
        if len(node.args) < 3 or node.args[2] is not site.offsets:
            return False
        p, q = (resolve(a) for a in node.args[:2])
        grad_input_read = _swap(_GRAD_INPUT_READ) if site.weight_transposed else _GRAD_INPUT_READ
        if (
            site.grad_input is None
            and p.root in from_tangents
            and q.root is site.weight
            and q.labels == grad_input_read
        ):
            site.grad_input = BackwardMatmul(
                node, p.node, dy_transposed=False, out_transposed=False
            )
            return True
        if site.grad_weight is None and len(shape_of(node)) == 3:
            # dy.T[N, S] @ x[S, K] -> [E, N, K], or x.T[K, S] @ dy[S, N] -> [E, K, N].
            for mine, other, on_right in ((q, p, True), (p, q, False)):
                want = site.x_labels if on_right else site.x_labels[::-1]
                if other.root in from_tangents and mine.root is site.x_root and mine.matrix == want:
                    site.grad_weight = BackwardMatmul(node, other.node, on_right, not on_right)
                    return True
        return False

    def ineligible(self, site: Linear) -> str | None:
        return None

    def rewrite(self, site: Linear, entry: LinearReport, layer: LayerRewrite) -> None:
        emit = layer.emit
        fwd = site.forward
        offs = site.offsets
        x = emit.current(site.x)
        experts, *_ = shape_of(site.weight)
        _, k, n = site.dims
        w_enk = site.weight
        if site.weight_transposed:
            w_enk = emit.call(fwd, aten.permute.default, w_enk, [0, 2, 1])
            w_enk = emit.call(fwd, aten.clone.default, w_enk, memory_format=torch.contiguous_format)
        w2d = emit.call(fwd, aten.view.default, w_enk, [experts * n, k])
        xq = wq = None
        if entry.forward.status is Status.NVFP4:
            xq, wq = layer.quantize_forward(x, "x"), layer.quantize_forward(w2d, "W")
            w_units = emit.call(fwd, aten.view.default, wq.units, [experts, n, k])
            out = emit.call(
                fwd, q2.grouped_gemm.default, xq.units, xq.tensor_scale, w_units,
                wq.tensor_scale, offs, fwd.meta["val"].dtype,
            )  # fmt: skip
            layer.check.gemm(fwd, Matmul.FORWARD, ("x (NVFP4)", xq), ("W (NVFP4)", wq), ("y", out))
            emit.replace(fwd, out)

        roles = [
            (mm, matmul)
            for mm, matmul, status in (
                (site.grad_input, Matmul.GRAD_INPUT, entry.grad_input),
                (site.grad_weight, Matmul.GRAD_WEIGHT, entry.grad_weight),
            )
            if status.status is Status.NVFP4
        ]
        if not roles:
            return
        rotations = layer.rotations([mm.node for mm, _ in roles])
        for (mm, matmul), rotation in zip(roles, rotations, strict=True):
            node = mm.node
            dy, holds_dy_t = untransposed(emit, node, emit.current(mm.dy), mm.dy_transposed)
            if matmul is Matmul.GRAD_INPUT:
                out = self._grad_input(layer, node, dy, holds_dy_t, wq, w2d, rotation, experts)
            else:
                if holds_dy_t:  # pad_segments moves token rows: dy[S, N]
                    dy = emit.call(node, aten.permute.default, dy, [1, 0])
                out = self._grad_weight(layer, node, dy, xq, x, rotation)
                if mm.out_transposed:
                    out = emit.call(node, aten.permute.default, out, [0, 2, 1])
            emit.replace(node, out)

    def _grad_input(
        self,
        layer: LayerRewrite,
        node: fx.Node,
        dy: fx.Node,
        holds_dy_t: bool,
        wq: Quantized | None,
        w2d: fx.Node,
        rotation: Rotation,
        experts: int,
    ) -> fx.Node:
        """dx[S, K]: dy rotated along N, each expert's W[e].T[K, N] rotated along N."""
        emit, offs = layer.emit, layer.site.offsets
        dyq = layer.rotate_dy(node, Matmul.GRAD_INPUT, dy, holds_dy_t, rotation)
        wr = layer.rotate_operand(node, Matmul.GRAD_INPUT, "W", wq, w2d, rotation)  # [K, E*N]
        k, en = shape_of(wr.units)
        per_expert = emit.call(node, aten.view.default, wr.units, [k, experts, en // experts])
        per_expert = emit.call(node, aten.permute.default, per_expert, [1, 0, 2])  # [E, K, N]
        out = emit.call(
            node, q2.grouped_gemm.default, dyq.units, dyq.tensor_scale, per_expert,
            wr.tensor_scale, offs, node.meta["val"].dtype,
        )  # fmt: skip
        layer.check.gemm(
            node, Matmul.GRAD_INPUT, (DY_NAME, dyq), ("W (rotated NVFP4)", wr), ("dx", out)
        )
        return out

    def _grad_weight(
        self,
        layer: LayerRewrite,
        node: fx.Node,
        dy: fx.Node,
        xq: Quantized | None,
        x: fx.Node,
        rotation: Rotation,
    ) -> fx.Node:
        """dW[E, N, K]: per expert, dy.T and x.T rotated along that expert's padded tokens."""
        emit, offs = layer.emit, layer.site.offsets

        def padded(t: fx.Node) -> tuple[fx.Node, fx.Node]:
            call = emit.call(node, q2.pad_segments.default, t, offs)
            rows, padded_offs = emit.outputs(node, call, 2)
            return rows, padded_offs

        dy_rows, padded_offs = padded(dy)
        dyq = layer.rotate_dy(node, Matmul.GRAD_WEIGHT, dy_rows, True, rotation)  # [N, P]
        if xq is not None:
            triple = (padded(xq.codes)[0], padded(xq.scales)[0], xq.tensor_scale)
            xr = layer.rotate_operand(node, Matmul.GRAD_WEIGHT, "x", triple, x, rotation)
        else:
            xr = layer.rotate_operand(node, Matmul.GRAD_WEIGHT, "x", None, padded(x)[0], rotation)
        out = emit.call(
            node, q2.grouped_gemm.default, dyq.units, dyq.tensor_scale, xr.units,
            xr.tensor_scale, padded_offs, node.meta["val"].dtype,
        )  # fmt: skip
        layer.check.gemm(
            node, Matmul.GRAD_WEIGHT, (DY_NAME, dyq), ("x (rotated NVFP4)", xr), ("dW", out)
        )
        return out


GROUPED_EXPERTS = GroupedExpertsForm()
