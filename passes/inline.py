"""Inline a quartet2 op's traced body in place of its call in an FX graph.

On CUDA the rewrite pass replaces each inserted quartet2 op by its body, as AOTAutograd's
functionalization would have traced a ``triton_op`` had it been in the user's program: the Triton
kernels become ``triton_kernel_wrapper_functional`` nodes, so Inductor launches them from its own
output code. On CPU the ops stay opaque calls of the eager reference bodies: lowering those to C++
costs minutes of compile time per graph, for no benefit.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch
from torch import fx
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from quartet_compile import ops  # noqa: F401  (registers torch.ops.quartet2)

log = logging.getLogger("quartet_compile")

# Traced op bodies by call signature (op, constant arguments, tensor metadata), for the whole
# process: a model's layers repeat the same few calls, and so do the blocks that regional
# compilation hands over as separate graphs. Signatures with symbolic sizes are not kept.
_TRACES: dict[Hashable, fx.GraphModule] = {}
# quartet2 ops that stay op calls on CUDA too: the debug check is no triton_op (it returns
# nothing and syncs).
_OPAQUE = (torch.ops.quartet2.check_finite.default,)
# Meta that describes where a node comes from (module, autograd seq_nr, forward/backward side,
# checkpoint tags): copies of a body's nodes inherit it from the op call they replace.
_NOT_INHERITED = ("val", "tensor_meta", "original_aten", "from_node")


def inherited_meta(anchor: fx.Node) -> dict[str, Any]:
    """The meta of ``anchor`` that a node standing in for it should carry."""
    return {k: v for k, v in anchor.meta.items() if k not in _NOT_INHERITED}


def decompose_on_cuda(
    graph: fx.Graph, node: fx.Node, fake_mode: Any, constants: dict[Hashable, str]
) -> None:
    """Inline a quartet2 op's body in place of the op call when it runs on CUDA."""
    if node.target in _OPAQUE:
        return
    if node.meta["val"] is None or not _first_tensor(node.meta["val"]).is_cuda:
        return
    try:
        inline_body(graph, node, fake_mode, constants)
    except Exception:  # noqa: BLE001  (an opaque op call still runs the same kernels)
        log.debug("quartet2: kept %s as an op call", node.format_node(), exc_info=True)


def _first_tensor(val: Any) -> torch.Tensor:
    return val[0] if isinstance(val, (tuple, list)) else val


def inline_body(
    graph: fx.Graph,
    node: fx.Node,
    fake_mode: Any,
    constants: dict[Hashable, str] | None = None,
) -> None:
    """Replace ``node`` by its op's traced body, as AOTAutograd's functionalization would have
    traced a triton_op (its Triton kernels become ``triton_kernel_wrapper_functional`` nodes).

    Traces are reused by call signature (``_TRACES``); ``constants`` names the module attributes
    already given to a body's constants in this graph."""
    constants = {} if constants is None else constants
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    signature = (
        node.target,
        tuple(None if isinstance(a, fx.Node) else a for a in node.args),
        tuple(_tensor_signature(t.meta["val"]) for t in tensors),
    )
    traced = _TRACES.get(signature)
    reused = traced is not None
    if traced is None:
        traced = _trace_body(node, [t.meta["val"] for t in tensors], fake_mode)
        if _concrete(signature[2]):
            _TRACES[signature] = traced
    env: dict[fx.Node, Any] = dict(
        zip((n for n in traced.graph.nodes if n.op == "placeholder"), tensors, strict=True)
    )
    with graph.inserting_before(node):
        for inner in traced.graph.nodes:
            if inner.op == "output":
                out = fx.map_arg(inner.args[0], env.__getitem__)
            elif inner.op == "get_attr":  # a constant of the body (e.g. a lookup table)
                key = (signature, inner.target)
                if key not in constants:
                    constants[key] = _fresh_attr(graph.owning_module, inner.target)
                    # A buffer, not a plain attribute: FX warns on a get_attr of anything else.
                    graph.owning_module.register_buffer(
                        constants[key], getattr(traced, inner.target), persistent=False
                    )
                env[inner] = graph.get_attr(constants[key])
                env[inner].meta.update(inner.meta)
                if reused:
                    constant = getattr(traced, inner.target)
                    env[inner].meta["val"] = fake_mode.from_tensor(constant, static_shapes=True)
            elif inner.op != "placeholder":
                env[inner] = copy = graph.node_copy(inner, env.__getitem__)
                copy.meta.update(inherited_meta(node))
                if reused:  # fresh fake values: no two nodes may seem to share a storage
                    args, kwargs = fx.map_arg((copy.args, copy.kwargs), lambda a: a.meta["val"])
                    with fake_mode:
                        copy.meta["val"] = copy.target(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        for user in list(node.users):
            user.replace_all_uses_with(out[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)


def _tensor_signature(t: torch.Tensor) -> Hashable:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _concrete(tensor_signatures: tuple[Hashable, ...]) -> bool:
    return all(
        isinstance(d, int) for shape, stride, *_ in tensor_signatures for d in (*shape, *stride)
    )


def _trace_body(node: fx.Node, values: list[torch.Tensor], fake_mode: Any) -> fx.GraphModule:
    def body(*values: torch.Tensor) -> Any:
        it = iter(values)
        return node.target(*(next(it) if isinstance(a, fx.Node) else a for a in node.args))

    # The joint graph is already decomposed for Inductor; the body must be too (Inductor refuses
    # ops such as aten.ones_like that it only knows through their decomposition).
    with fake_mode:
        return make_fx(dispatch_functionalize(body), decomposition_table=select_decomp_table())(
            *values
        )


def _fresh_attr(module: torch.nn.Module, base: str) -> str:
    name, i = f"quartet2{base}", 0
    while hasattr(module, name):
        i += 1
        name = f"quartet2{base}_{i}"
    return name
