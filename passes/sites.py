"""What the matchers find in a graph: weight matmul sites with their backward twins, and the
matmuls left alone with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from quartet_compile.passes.operands import Labels, shape_of

if TYPE_CHECKING:
    from quartet_compile.passes.forms.base import MatmulForm


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
    """One weight matmul site, y[T,N] = x[T,K] @ W.T, found from its forward matmul: a linear
    layer, or the E expert matmuls of a mixture-of-experts layer (``offsets`` set, W[E, N, K]).
    ``form`` is the matmul form that found it and rewrites it."""

    form: MatmulForm
    name: str
    forward: fx.Node
    x: fx.Node
    weight: fx.Node
    weight_name: str
    weight_transposed: bool  # the parameter stores each matrix [K, N] (``x @ W``), not [N, K]
    bias: fx.Node | None
    x_root: fx.Node
    x_labels: Labels
    offsets: fx.Node | None = None  # expert segments' end rows (grouped forms)
    grad_input: BackwardMatmul | None = None
    grad_weight: BackwardMatmul | None = None

    @property
    def dims(self) -> tuple[int | torch.SymInt, int | torch.SymInt, int | torch.SymInt]:
        """(T, K, N)."""
        t, k = shape_of(self.x)[-2:]
        return t, k, shape_of(self.forward)[-1]

    @property
    def experts(self) -> int | None:
        return shape_of(self.weight)[0] if self.offsets is not None else None


@dataclass(frozen=True)
class OtherMatmul:
    """A matmul that is not part of any weight matmul site, with the reason."""

    node: fx.Node
    name: str
    reason: str
    backward: bool


@dataclass
class Matches:
    linears: list[Linear]
    others: list[OtherMatmul]
    joint: bool
    backward: set[fx.Node]  # the nodes that depend on a tangent: the backward half
