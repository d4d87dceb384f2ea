"""Find the weight matmuls of an AOTAutograd graph and classify them, form by form.

The graphs come from AOTAutograd: the joint forward+backward graph when training, the forward
graph under no_grad. Each matmul op is offered to the forms (``passes/forms``) that use it: a
forward one becomes a site (a linear layer, or a layer's experts) or a reason; a tangent-derived
one is the grad-input or grad-weight of a site. AOTAutograd gives backward matmuls the forward
node's ``seq_nr``, which breaks ties when a weight or an activation feeds several sites.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx

from quartet_compile.passes.forms import FORMS
from quartet_compile.passes.forms.linear import operands
from quartet_compile.passes.operands import module_name, resolve
from quartet_compile.passes.sites import Linear, Matches, OtherMatmul

aten = torch.ops.aten

MATMUL_OPS = frozenset(op for form in FORMS for op in form.ops)
# Ops that pick a weight's slices by index: transformers' "batched_mm" experts gather each
# token's expert matrix (W[expert_ids]) and multiply them one token at a time with bmm.
_GATHERS = (aten.index.Tensor, aten.index_select.default, aten.select.int)
_GATHERED = (
    "expert weights gathered per token (transformers' batched_mm experts) stay in high "
    "precision: their weight gradient is a scatter-add of per-token outer products, with no "
    'token reduction to quantize; model.set_experts_implementation("grouped_mm") '
    "(transformers' default) runs them in NVFP4"
)


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
        if node.op != "call_function" or node.target not in MATMUL_OPS:
            continue
        if node in from_tangents:
            backward.append(node)
            continue
        found = _forward_site(node, weights)
        if isinstance(found, Linear):
            linears.append(found)
        else:
            others.append(OtherMatmul(node, module_name(node), found, backward=False))
    for node in backward:
        if not _assign_backward(node, linears, from_tangents):
            others.append(OtherMatmul(node, "", _backward_reason(node, weights), backward=True))
    return Matches(linears, others, joint=bool(tangents), backward=from_tangents)


def _forward_site(node: fx.Node, weights: Mapping[fx.Node, str]) -> Linear | str:
    """The site whose forward matmul ``node`` is, else why not."""
    for form in FORMS:
        if node.target in form.ops:
            found = form.forward(node, weights)
            if found is not None:
                return found
    p, q = (resolve(a) for a in operands(node))
    p_weight, q_weight = p.root in weights, q.root in weights
    if _gathers_weight(p.root, weights) or _gathers_weight(q.root, weights):
        return _GATHERED
    if not p_weight and not q_weight:
        return "activation x activation"
    if p_weight and q_weight:
        return "weight x weight"
    if p_weight:
        return "weight is the left operand (W @ x): not handled"
    return f"no matmul form reads a weight this way (a {len(q.labels)}-D view of the parameter)"


def _gathers_weight(node: fx.Node, weights: Mapping[fx.Node, str]) -> bool:
    """Whether ``node`` picks slices of a weight by index (one expert's matrix per token)."""
    return (
        node.op == "call_function"
        and node.target in _GATHERS
        and isinstance(node.args[0], fx.Node)
        and resolve(node.args[0]).root in weights
    )


def _same_seq(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get("seq_nr"), b.meta.get("seq_nr")
    return sa is None or sb is None or sa < 0 or sb < 0 or sa == sb


def _assign_backward(node: fx.Node, linears: list[Linear], from_tangents: set[fx.Node]) -> bool:
    """Attach ``node`` to the site whose grad-input or grad-weight it computes."""
    for site in sorted(linears, key=lambda site: not _same_seq(site.forward, node)):
        if not _same_seq(site.forward, node):
            break
        if node.target in site.form.ops and site.form.backward(node, site, from_tangents):
            return True
    return False


def _backward_reason(node: fx.Node, weights: Mapping[fx.Node, str]) -> str:
    roots = {resolve(a).root for a in operands(node)}
    if any(_gathers_weight(root, weights) for root in roots):
        return f"{_GATHERED} (backward)"
    if roots & weights.keys():
        return "backward of a matmul that is not a handled linear"
    return "activation x activation (backward)"
