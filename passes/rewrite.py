"""Replace each eligible weight matmul site by quartet2 ops (SPEC.md 2-4) and report what was
done.

Forward: ``gemm(quantize_fwd(x), quantize_fwd(W))`` (+ bias). Grad-input: ``gemm(rht_eden(dy),
requant(W triple))``; grad-weight: ``gemm(rht_eden(dy.T), requant(x triple))``. Each quantizer
gives a triple and its bf16 unit values; gemm multiplies units and tensor scales. One fresh set
of random signs and seeds per site and backward call, drawn in-graph (passes/layer.py). Because
the backward reads only the forward's NVFP4 triples, the partitioner saves those instead of x.
The matmul forms (passes/forms/) say how each kind of site is found and rewritten; this module
decides which sites and roles are rewritten, runs the forms, and writes the report.

On CUDA the inserted ops are then replaced by their bodies, so Inductor launches their Triton
kernels from its own output code; on CPU they stay opaque calls of the reference bodies
(passes/inline.py says why). ``config.check_finite`` adds a ``quartet2::check_finite`` after
each inserted op (passes/check_finite.py); that op is never inlined.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping

import torch
from torch import fx

from quartet_compile.config import QuartetConfig
from quartet_compile.nvfp4 import HADAMARD_BLOCK
from quartet_compile.passes import check_finite
from quartet_compile.passes.emitter import Emitter
from quartet_compile.passes.layer import LayerRewrite, QuantizedCache
from quartet_compile.passes.match import MATMUL_OPS, find_matmuls
from quartet_compile.passes.operands import shape_of
from quartet_compile.passes.report import (
    NVFP4,
    ROLES,
    GraphReport,
    LinearReport,
    OtherReport,
    RoleStatus,
    Status,
    format_graph,
)
from quartet_compile.passes.sites import Linear, Matches
from quartet_compile.passes.structure import Structure

log = logging.getLogger("quartet_compile")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rewrite(graph: fx.Graph, config: QuartetConfig, params: Mapping[int, str]) -> GraphReport:
    """Rewrite ``graph`` in place; never raises for a matmul it cannot handle."""
    try:
        matches = find_matmuls(graph, params)
    except Exception as exc:  # noqa: BLE001  (the pass must never fail a compile)
        log.warning("quartet2: graph left as it was: matching failed", exc_info=True)
        return GraphReport(kind=f"unrecognized ({type(exc).__name__}: {exc})")
    report = GraphReport(kind="joint (training)" if matches.joint else "forward (inference)")
    structure = Structure(graph, MATMUL_OPS, matches.backward)
    emitter = Emitter(graph)
    cache: QuantizedCache = {}
    for site in matches.linears:
        entry = _describe(site, matches, config, structure)
        report.linears.append(entry)
        if not entry.rewritten():
            continue
        try:
            site.form.rewrite(site, entry, LayerRewrite(site, config, emitter, cache))
        except Exception as exc:  # noqa: BLE001  (the pass must never fail a compile)
            for key in [k for k, q in cache.items() if q.codes in emitter.created]:
                del cache[key]
            emitter.rollback()
            failed = RoleStatus(Status.FAILED, f"rewrite failed ({type(exc).__name__}: {exc})")
            log.warning("quartet2: %s left as it was: %s", site.name, failed, exc_info=True)
            for role in ROLES:
                if getattr(entry, role).status is Status.NVFP4:
                    setattr(entry, role, failed)
        emitter.commit()
    emitter.decompose()
    report.others = [
        OtherReport(o.node.name, o.name, _shape_text(o.node), o.reason) for o in matches.others
    ]
    graph.eliminate_dead_code()
    graph.lint()
    report.checks = check_finite.count(graph)
    report.graph = format_graph(graph)
    return report


def _shape_text(node: fx.Node) -> str:
    a, b = node.args[-2:] if node.target is torch.ops.aten.addmm.default else node.args[:2]
    return f"{list(shape_of(a))} @ {list(shape_of(b))}"


def skip_pattern(name: str, config: QuartetConfig) -> str | None:
    """The first of ``config.skip`` that keeps module ``name``'s linears in high precision."""
    last = name.rsplit(".", 1)[-1]
    return next(
        (p for p in config.skip if fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p)), None
    )


def _site_status(site: Linear, config: QuartetConfig, structure: Structure) -> RoleStatus | None:
    """Why none of this site's matmuls can be rewritten, or None."""
    pattern = skip_pattern(site.name, config)
    if pattern is not None:
        return RoleStatus(Status.KEPT, f"skipped by pattern {pattern!r}")
    for rule, enabled in (
        (structure.output_head_reason, config.keep_output_head),
        (structure.router_reason, config.keep_router),
    ):
        reason = rule(site) if enabled else None
        if reason is not None:
            return RoleStatus(Status.KEPT, reason)
    t, k, n = site.dims
    for dim, size in (("K", k), ("N", n)):
        if not isinstance(size, int):
            return RoleStatus(Status.INELIGIBLE, f"dynamic {dim} ({size})")
        if size % HADAMARD_BLOCK:
            return RoleStatus(
                Status.INELIGIBLE, f"{dim}={size} is not a multiple of {HADAMARD_BLOCK}"
            )
        if size < config.min_dim:
            return RoleStatus(Status.INELIGIBLE, f"{dim}={size} is below min_dim={config.min_dim}")
    for what, node in (("x", site.x), ("W", site.weight)):
        dtype = node.meta["val"].dtype
        if dtype not in _DTYPES:
            return RoleStatus(
                Status.INELIGIBLE, f"{what} dtype {dtype} is not float32/bfloat16/float16"
            )
    reason = site.form.ineligible(site)
    return None if reason is None else RoleStatus(Status.INELIGIBLE, reason)


def _describe(
    site: Linear, matches: Matches, config: QuartetConfig, structure: Structure
) -> LinearReport:
    t, k, n = site.dims
    entry = LinearReport(
        module=site.name,
        weight=site.weight_name,
        t=str(t),
        k=str(k),
        n=str(n),
        dtype=str(site.forward.meta["val"].dtype).removeprefix("torch."),
        bias=site.bias is not None,
        experts=site.experts,
    )
    status = _site_status(site, config, structure)
    entry.forward = status or (
        NVFP4 if config.forward else RoleStatus(Status.DISABLED, "disabled (forward=False)")
    )
    for role, found, absent in (
        ("grad_input", site.grad_input, "the layer's input does not require grad"),
        ("grad_weight", site.grad_weight, "the weight does not require grad"),
    ):
        if not matches.joint:
            role_status = RoleStatus(Status.ABSENT, "absent (inference graph)")
        elif found is None:
            role_status = RoleStatus(Status.ABSENT, f"absent ({absent})")
        else:
            role_status = status or (
                NVFP4
                if config.backward
                else RoleStatus(Status.DISABLED, "disabled (backward=False)")
            )
        setattr(entry, role, role_status)
    return entry
