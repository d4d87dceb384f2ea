"""The matmul-form extension point: what the matcher and the rewrite ask of each form.

A *form* is one way a model multiplies by a weight: ``F.linear``/``nn.Linear`` (``mm``/``addmm``
with W[N, K]), a transposed-weight ``Conv1D`` (W[K, N]), grouped expert GEMMs
(``aten._grouped_mm`` with W[E, N, K]). Each is one object in ``passes/forms/``, listed in
``FORMS``; the matcher, the report and the rewrite treat them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import fx
from torch._ops import OpOverload

from quartet_compile.passes.layer import LayerRewrite
from quartet_compile.passes.operands import Operand, module_name
from quartet_compile.passes.report import LinearReport
from quartet_compile.passes.sites import Linear


def new_site(
    form: MatmulForm,
    node: fx.Node,
    x: Operand,
    weight: Operand,
    weights: Mapping[fx.Node, str],
    **fields: Any,
) -> Linear:
    """The site of forward matmul ``node`` reading activation ``x`` and parameter ``weight``,
    named after the module that ran it (or the weight's owner)."""
    return Linear(
        form=form,
        name=module_name(node) or weights[weight.root].rpartition(".")[0],
        forward=node,
        x=x.node,
        weight=weight.root,
        weight_name=weights[weight.root],
        x_root=x.root,
        x_labels=x.matrix,
        **fields,
    )


class MatmulForm(Protocol):
    """One form of weight matmul: how to find it, pair its backward and rewrite it."""

    name: str
    ops: tuple[OpOverload, ...]  # the aten ops its forward and backward matmuls appear as

    def forward(self, node: fx.Node, weights: Mapping[fx.Node, str]) -> Linear | str | None:
        """The site whose forward matmul ``node`` is; a reason when ``node`` is of this form but
        cannot be handled; None when ``node`` is not of this form (another form may take it)."""

    def backward(self, node: fx.Node, site: Linear, from_tangents: set[fx.Node]) -> bool:
        """Attach ``node`` to ``site`` when it is the site's grad-input or grad-weight matmul."""

    def ineligible(self, site: Linear) -> str | None:
        """Why the ops cannot take this site's shapes (beyond the checks common to all forms)."""

    def rewrite(self, site: Linear, entry: LinearReport, layer: LayerRewrite) -> None:
        """Insert the quartet2 ops for the roles ``entry`` marks nvfp4 and schedule the
        replacement of the matmuls they stand for (``layer.emit.replace``)."""
