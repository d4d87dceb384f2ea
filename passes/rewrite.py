"""Replace each eligible linear's matmuls by quartet2 ops (SPEC.md 2-4) and report what was done.

Forward: ``gemm(quantize_fwd(x), quantize_fwd(W))`` (+ bias). Grad-input: ``gemm(rht_eden(dy),
requant(W triple))``; grad-weight: ``gemm(rht_eden(dy.T), requant(x triple))``. Each quantizer
gives a triple and its bf16 unit values; gemm multiplies units and tensor scales. One fresh
set of random signs and seeds per linear and backward call drawn by in-graph ``aten.randint``
(Inductor's RNG: reproducible under ``torch.manual_seed``, no recompiles). Because the backward
reads only the forward's NVFP4 triples, the partitioner saves those instead of x.

On CUDA the inserted ops are decomposed into their Triton kernels (what AOTAutograd would have
done had they been in the traced program), so Inductor launches the kernels from its own output
code. On CPU they stay opaque calls of the eager reference bodies: lowering those bodies to C++
costs minutes of compile time per graph, for no benefit.

``config.check_finite`` adds a ``quartet2::check_finite`` after each inserted op
(passes/check_finite.py); that op is never inlined.
"""

from __future__ import annotations

import fnmatch
import logging
import operator
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from quartet_compile import ops  # noqa: F401  (registers torch.ops.quartet2)
from quartet_compile.config import QuartetConfig
from quartet_compile.nvfp4 import HADAMARD_BLOCK
from quartet_compile.ops import Matmul, Origin
from quartet_compile.passes import check_finite
from quartet_compile.passes.match import Labels, Linear, Matches, find_matmuls, resolve, shape_of
from quartet_compile.passes.report import (
    REWRITTEN,
    ROLES,
    GraphReport,
    LinearReport,
    OtherReport,
    format_graph,
)

log = logging.getLogger("quartet_compile")

aten = torch.ops.aten
prims = torch.ops.prims
q2 = torch.ops.quartet2
# A quantizer op's outputs: codes, scales, tensor_scale (the NVFP4 triple) and units.
Quantized = tuple[fx.Node, fx.Node, fx.Node, fx.Node]
# Traced op bodies by call signature (op, constant arguments, tensor metadata), for the whole
# process: a model's layers repeat the same few calls, and so do the blocks that regional
# compilation hands over as separate graphs. Signatures with symbolic sizes are not kept.
_TRACES: dict[Hashable, fx.GraphModule] = {}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Meta that describes where a node comes from (module, autograd seq_nr, forward/backward side,
# checkpoint tags): the replacement inherits it from the node it replaces.
_NOT_INHERITED = ("val", "tensor_meta", "original_aten", "from_node")
_SEED_HIGH = 2**31 - 1
# quartet2 ops that stay op calls on CUDA too.
_OPAQUE = (q2.check_finite.default,)


def rewrite(graph: fx.Graph, config: QuartetConfig, params: Mapping[int, str]) -> GraphReport:
    """Rewrite ``graph`` in place; never raises for a matmul it cannot handle."""
    try:
        matches = find_matmuls(graph, params)
    except Exception as exc:  # noqa: BLE001  (the pass must never fail a compile)
        log.warning("quartet2: graph left as it was: matching failed", exc_info=True)
        return GraphReport(kind=f"unrecognized ({type(exc).__name__}: {exc})")
    report = GraphReport(kind="joint (training)" if matches.joint else "forward (inference)")
    emitter = _Emitter(graph)
    # One forward quantization per tensor, shared by the linears that read it (q/k/v read the
    # same x; a tied or reused weight feeds several linears).
    quantized: dict[tuple[fx.Node, Labels, torch.dtype], Quantized] = {}
    for lin in matches.linears:
        entry = _describe(lin, matches, config)
        report.linears.append(entry)
        if not entry.rewritten():
            continue
        try:
            _rewrite_linear(lin, entry, config, emitter, quantized)
        except Exception as exc:  # noqa: BLE001  (the pass must never fail a compile)
            for key in [k for k, q in quantized.items() if q[0] in emitter.created]:
                del quantized[key]
            emitter.rollback()
            reason = f"rewrite failed ({type(exc).__name__}: {exc})"
            log.warning("quartet2: %s left as it was: %s", lin.name, reason, exc_info=True)
            for role in ROLES:
                if getattr(entry, role) == REWRITTEN:
                    setattr(entry, role, reason)
        emitter.commit()
    report.others = [
        OtherReport(o.node.name, o.name, _shape_text(o.node), o.reason) for o in matches.others
    ]
    graph.eliminate_dead_code()
    graph.lint()
    report.checks = check_finite.count(graph)
    report.graph = format_graph(graph)
    return report


def _shape_text(node: fx.Node) -> str:
    a, b = node.args[-2:] if node.target is aten.addmm.default else node.args[:2]
    return f"{list(shape_of(a))} @ {list(shape_of(b))}"


def skip_pattern(name: str, config: QuartetConfig) -> str | None:
    """The first of ``config.skip`` that keeps module ``name``'s linears in high precision."""
    last = name.rsplit(".", 1)[-1]
    return next(
        (p for p in config.skip if fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p)), None
    )


def _linear_reason(lin: Linear, config: QuartetConfig) -> str | None:
    """Why none of this linear's matmuls can be rewritten, or None."""
    pattern = skip_pattern(lin.name, config)
    if pattern is not None:
        return f"skipped by pattern {pattern!r}"
    t, k, n = lin.dims
    for dim, size in (("K", k), ("N", n)):
        if not isinstance(size, int):
            return f"dynamic {dim} ({size})"
        if size % HADAMARD_BLOCK:
            return f"{dim}={size} is not a multiple of {HADAMARD_BLOCK}"
        if size < config.min_dim:
            return f"{dim}={size} is below min_dim={config.min_dim}"
    for what, node in (("x", lin.x), ("W", lin.weight)):
        dtype = node.meta["val"].dtype
        if dtype not in _DTYPES:
            return f"{what} dtype {dtype} is not float32/bfloat16/float16"
    if lin.forward.kwargs:
        return f"addmm with {dict(lin.forward.kwargs)}"
    return None


def _describe(lin: Linear, matches: Matches, config: QuartetConfig) -> LinearReport:
    t, k, n = lin.dims
    entry = LinearReport(
        module=lin.name,
        weight=lin.weight_name,
        t=str(t),
        k=str(k),
        n=str(n),
        dtype=str(lin.forward.meta["val"].dtype).removeprefix("torch."),
        bias=lin.bias is not None,
    )
    reason = _linear_reason(lin, config)
    entry.forward = reason or (REWRITTEN if config.forward else "disabled (forward=False)")
    for role, found, absent in (
        ("grad_input", lin.grad_input, "the layer's input does not require grad"),
        ("grad_weight", lin.grad_weight, "the weight does not require grad"),
    ):
        if not matches.joint:
            status = "absent (inference graph)"
        elif found is None:
            status = f"absent ({absent})"
        else:
            status = reason or (REWRITTEN if config.backward else "disabled (backward=False)")
        setattr(entry, role, status)
    return entry


def _inherited(anchor: fx.Node) -> dict[str, Any]:
    return {k: v for k, v in anchor.meta.items() if k not in _NOT_INHERITED}


class _Emitter:
    """Inserts nodes with fake values and inherited meta; can undo one linear's insertions."""

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

    def current(self, node: fx.Node) -> fx.Node:
        """What ``node`` became if an earlier linear's rewrite replaced it."""
        return self.replacements.get(node, node)

    def call(
        self, anchor: fx.Node, target: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> fx.Node:
        """``target(*args)`` inserted before ``anchor``, inheriting its meta."""
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        node.meta.update(_inherited(anchor))
        fake_args, fake_kwargs = fx.map_arg((args, kwargs), lambda a: a.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def quantize(self, anchor: fx.Node, target: Callable[..., Any], *args: Any) -> Quantized:
        node = self.call(anchor, target, *args)
        codes, scales, tensor_scale, units = (
            self.call(anchor, operator.getitem, node, i) for i in range(4)
        )
        return codes, scales, tensor_scale, units

    def gemm(self, anchor: fx.Node, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> fx.Node:
        """deq(a) @ deq(b).T from the operands' units and tensor scales."""
        return self.call(anchor, q2.gemm.default, a[3], a[2], b[3], b[2], out_dtype)

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        self.replaced.append((old, new))

    def rollback(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)
        self.created.clear()
        self.replaced.clear()

    def commit(self) -> None:
        """Swap in the replacements and decompose new CUDA ops into their kernels."""
        for old, new in self.replaced:
            old.replace_all_uses_with(new)
            self.graph.erase_node(old)
            self.replacements[old] = new
        for node in self.created:
            if (
                isinstance(node.target, torch._ops.OpOverload)
                and node.target.namespace == "quartet2"
            ):
                _decompose_on_cuda(self.graph, node, self.fake_mode, self.constants)
        self.created.clear()
        self.replaced.clear()


def _rewrite_linear(
    lin: Linear,
    entry: LinearReport,
    config: QuartetConfig,
    emit: _Emitter,
    quantized: dict[tuple[fx.Node, Labels, torch.dtype], Quantized],
) -> None:
    fwd = lin.forward
    out_dtype = fwd.meta["val"].dtype
    check = check_finite.Checks(emit.call, lin.name, config.check_finite)
    x = emit.current(lin.x)
    x2d = emit.call(fwd, aten.squeeze.dim, x, 0) if lin.batched else x
    w_nk = (
        emit.call(fwd, aten.permute.default, lin.weight, [1, 0])
        if lin.weight_transposed
        else lin.weight
    )

    def quantize(t: fx.Node, name: str) -> Quantized:
        source = resolve(t)
        key = (source.root, source.labels, t.meta["val"].dtype)
        if key not in quantized:
            amax = emit.call(fwd, aten.amax.default, emit.call(fwd, aten.abs.default, t), [])
            if amax.meta["val"].dtype != torch.float32:
                amax = emit.call(fwd, prims.convert_element_type.default, amax, torch.float32)
            q = emit.quantize(fwd, q2.quantize_fwd.default, t, amax, config.four_over_six)
            check.quantizer(fwd, Matmul.FORWARD, [(name, t)], Origin.MODEL, q, f"{name} (NVFP4)")
            quantized[key] = q
        return quantized[key]

    xq = wq = None
    if entry.forward == REWRITTEN:
        xq, wq = quantize(x2d, "x"), quantize(w_nk, "W")
        out = emit.gemm(fwd, xq, wq, out_dtype)
        check.gemm(fwd, Matmul.FORWARD, ("x (NVFP4)", xq), ("W (NVFP4)", wq), ("y", out))
        if lin.bias is not None:
            out = emit.call(fwd, aten.add.Tensor, out, emit.current(lin.bias))
        if lin.batched:
            out = emit.call(fwd, aten.unsqueeze.default, out, 0)
        emit.replace(fwd, out)

    roles = [
        (mm, source, matmul)
        for mm, source, matmul, status in (
            (lin.grad_input, (wq, w_nk, "W", "dx"), Matmul.GRAD_INPUT, entry.grad_input),
            (lin.grad_weight, (xq, x2d, "x", "dW"), Matmul.GRAD_WEIGHT, entry.grad_weight),
        )
        if status == REWRITTEN
    ]
    if not roles:
        return
    first = min((mm.node for mm, *_ in roles), key=_position(emit.graph))
    device = fwd.meta["val"].device
    bits = _randint(emit, first, 2, [len(roles), HADAMARD_BLOCK], torch.float32, device)
    signs = emit.call(first, aten.sub.Tensor, emit.call(first, aten.mul.Tensor, bits, 2.0), 1.0)
    seeds = _randint(emit, first, _SEED_HIGH, [2 * len(roles)], torch.int64, device)
    method = config.backward_method
    for i, (mm, (fwd_q, operand, name, result), matmul) in enumerate(roles):
        node = mm.node
        s = emit.call(node, aten.select.int, signs, 0, i)
        seed_dy = emit.call(node, aten.select.int, seeds, 0, 2 * i)
        seed_op = emit.call(node, aten.select.int, seeds, 0, 2 * i + 1)
        dy, holds_dy_t = _untransposed(emit, node, emit.current(mm.dy), mm.dy_transposed)
        # grad-input wants dy [T, N] rotated along N; grad-weight dy.T [N, T] along T.
        dy_transpose = holds_dy_t if mm is lin.grad_input else not holds_dy_t
        dyq = emit.quantize(node, q2.rht_eden.default, dy, s, seed_dy, dy_transpose, method)
        dyq_name, opq_name = "dy (rotated NVFP4)", f"{name} (rotated NVFP4)"
        check.quantizer(node, matmul, [("dy", dy)], Origin.GRADIENT, dyq, dyq_name)
        if fwd_q is not None:
            opq = emit.quantize(node, q2.requant.default, *fwd_q[:3], s, seed_op, method)
            from_forward = [(f"{name} (NVFP4 of the forward)", t) for t in fwd_q[:3]]
            check.quantizer(node, matmul, from_forward, Origin.QUARTET2, opq, opq_name)
        else:  # forward kept in high precision: rotate and quantize the operand itself
            opq = emit.quantize(node, q2.rht_eden.default, operand, s, seed_op, True, method)
            check.quantizer(node, matmul, [(name, operand)], Origin.MODEL, opq, opq_name)
        out = emit.gemm(node, dyq, opq, node.meta["val"].dtype)
        check.gemm(node, matmul, (dyq_name, dyq), (opq_name, opq), (result, out))
        if mm.out_transposed:
            out = emit.call(node, aten.permute.default, out, [1, 0])
        if lin.batched:
            out = emit.call(node, aten.unsqueeze.default, out, 0)
        emit.replace(node, out)


def _untransposed(
    emit: _Emitter, anchor: fx.Node, dy: fx.Node, transposed: bool
) -> tuple[fx.Node, bool]:
    """The 2-D tensor that ``dy`` views, and whether it holds dy.T: rht_eden reads it in either
    orientation (its ``transpose`` flag), so a permuted view need not be materialized."""
    source = resolve(dy)
    if len(shape_of(source.root)) == 2 and source.matrix in ((0, 1), (1, 0)):
        return source.root, transposed != (source.matrix == (1, 0))
    return emit.call(anchor, aten.squeeze.dim, dy, 0) if len(shape_of(dy)) == 3 else dy, transposed


def _randint(
    emit: _Emitter,
    anchor: fx.Node,
    high: int,
    size: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> fx.Node:
    """In-graph random draw for one backward call. Tagged so that the partitioner computes it in
    the backward graph: by default it would draw it in the forward and save it."""
    node = emit.call(anchor, aten.randint.low, 0, high, size, dtype=dtype, device=device)
    node.meta["partitioner_tag"] = "must_be_in_backward"
    return node


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _decompose_on_cuda(
    graph: fx.Graph, node: fx.Node, fake_mode: Any, constants: dict[Hashable, str]
) -> None:
    """Inline a quartet2 op's body in place of the op call when it runs on CUDA. The debug check
    is no triton_op and stays an op call (it returns nothing and syncs)."""
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
                    setattr(graph.owning_module, constants[key], getattr(traced, inner.target))
                env[inner] = graph.get_attr(constants[key])
                env[inner].meta.update(inner.meta)
                if reused:
                    constant = getattr(traced, inner.target)
                    env[inner].meta["val"] = fake_mode.from_tensor(constant, static_shapes=True)
            elif inner.op != "placeholder":
                env[inner] = copy = graph.node_copy(inner, env.__getitem__)
                copy.meta.update(_inherited(node))
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
