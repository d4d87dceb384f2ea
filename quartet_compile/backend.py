"""The ``quartet2`` torch.compile backend: Inductor with the NVFP4 rewrite on the joint graph.

How the pass is hooked in (verified on torch 2.13, CPU): Inductor's ``joint_custom_pre_pass``
config runs inside ``joint_graph_passes``, which ``compile_fx`` calls from its partition function
on the joint forward+backward graph when training, and from ``compile_fx_forward`` (the inference
compiler) on the forward graph under ``torch.no_grad()``/eval, so one pass sees both kinds. It is
given through ``compile_fx(..., config_patches=...)`` rather than a ``with config.patch`` block
because AOTAutograd compiles the backward lazily, at the first backward call, outside any
``with``. The same hook and call path exist on torch 2.11 (DESIGN.md: seen there too).

The pass is a ``CustomGraphPass`` whose ``uuid`` hashes the sources of every module of the
package (its subpackages included), the config and which inputs are parameters: Inductor's FX and
AOTAutograd caches stay on and are invalidated by any of them. On a cache hit the pass does not
run; the log says so.
"""

from __future__ import annotations

import logging
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import quartet_compile
from quartet_compile import kernel_analysis, kernels, passes, regional
from quartet_compile.config import QuartetConfig
from quartet_compile.passes import operands, rewrite
from quartet_compile.passes.report import GraphReport

log = logging.getLogger("quartet_compile")

# The package and the subpackages installed from directories of their own (pyproject.toml's
# package-dir): walking them finds every module, so a new one cannot serve stale compiled code.
_PACKAGES = (quartet_compile, passes, kernels)


def sources() -> tuple[str, ...]:
    """Every module file of the package: a change to any of them must miss Inductor's caches."""
    files = {
        module.module_finder.find_spec(module.name).origin
        for package in _PACKAGES
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    }
    files |= {package.__file__ for package in _PACKAGES}
    return tuple(sorted(f for f in files if f and f.endswith(".py")))


class QuartetPass(CustomGraphPass):
    """The joint-graph pass: rewrites linears in place and hands each graph's report on.

    ``skipped`` names the graph's modules that a skip pattern keeps in high precision: with the
    parameters' positions and the config it is all the rewrite depends on besides the graph, so
    the uuid holds those and not the parameter names, and repeated blocks share cache entries.
    """

    def __init__(
        self,
        config: QuartetConfig,
        params: dict[int, str],
        skipped: list[str],
        on_report: Callable[[GraphReport], None],
    ) -> None:
        self.config = config
        self.params = params
        self.skipped = skipped
        self.on_report = on_report

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.on_report(rewrite.rewrite(graph, self.config, self.params))

    def uuid(self) -> bytes:
        extra = f"{self.config.cache_key()}|{sorted(self.params)}|{self.skipped}"
        return get_hash_for_files(sources(), extra)


def _log_report(graph_report: GraphReport) -> None:
    log.info("%s", graph_report)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: QuartetConfig,
    on_report: Callable[[GraphReport], None] = _log_report,
    config_patches: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile a Dynamo graph with Inductor and the quartet2 pass on its AOTAutograd graphs
    (block by block when ``config.regional``)."""
    kernel_analysis.install()
    reports: list[GraphReport] = []
    cached = 0  # graphs that AOTAutograd's cache served: the pass did not run on them

    def record(graph_report: GraphReport) -> None:
        reports.append(graph_report)
        on_report(graph_report)

    def compile_piece(piece: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        nonlocal cached
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        params = {
            i: _source_name(node)
            for i, (node, x) in enumerate(zip(placeholders, inputs, strict=True))
            if isinstance(x, torch.nn.Parameter) and not _is_sharded(node, x)
        }
        modules = {operands.module_name(n) for n in piece.graph.nodes} - {""}
        skipped = sorted(m for m in modules if rewrite.skip_pattern(m, config))
        patches = {
            **(config_patches or {}),
            "joint_custom_pre_pass": QuartetPass(config, params, skipped, record),
        }
        inner = {} if config.inductor else {"inner_compile": _run_eagerly}
        reported = len(reports)
        compiled = compile_fx(piece, inputs, config_patches=patches, **inner)
        cached += len(reports) == reported
        return compiled

    if config.regional:
        compiled = regional.compile_regions(gm, example_inputs, compile_piece)
    else:
        compiled = compile_piece(gm, example_inputs)
    if cached:
        log.info(
            "quartet2: %d graph(s) came from the compile caches (a model's repeated blocks reuse "
            "the first block's), so their reports were not redone (options="
            "{'force_disable_caches': True} shows them)",
            cached,
        )
    return compiled


def _is_sharded(node: torch.fx.Node, x: torch.Tensor) -> bool:
    """A tensor-subclass parameter (FSDP2's sharded DTensor): AOTAutograd would hand the pass its
    local shard, whose NVFP4 groups need not run along the true K, so it is not a weight here."""
    if not is_traceable_wrapper_subclass(x):
        return False
    log.warning(
        "quartet2: parameter %s reached the graph as %s %s, not a plain tensor; its matmuls stay "
        "in high precision (with FSDP2 the weights must arrive all-gathered: keep Dynamo's "
        "skip_fsdp_hooks on)",
        _source_name(node),
        type(x).__name__,
        getattr(x, "placements", ""),
    )
    return True


def _run_eagerly(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Any:
    """Inductor's inner compiler replaced by the graph itself (AOTAutograd's boxed calling)."""
    return make_boxed_func(gm.forward)


def _source_name(node: torch.fx.Node) -> str:
    source = getattr(node.meta.get("grapharg"), "source", None)
    return (
        operands.dotted(source.name)
        if isinstance(getattr(source, "name", None), str)
        else node.name
    )


def _is_inductor(key: str) -> bool:
    """Whether ``key`` names an Inductor config entry (dotted for nested ones)."""
    return key in torch._inductor.config._config


def quartet2(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """torch.compile backend: ``torch.compile(model, backend="quartet2", options={...})``.

    Options are QuartetConfig fields (or ``config=QuartetConfig(...)``); Inductor config keys
    among them, and ``mode`` (e.g. "max-autotune"), go to Inductor. Unknown keys raise.
    """
    options = {**(options or {}), **kwargs}
    inductor_options = {
        k: v
        for k, v in options.items()
        if k not in QuartetConfig.option_names() and _is_inductor(k)
    }
    if mode is not None:
        inductor_options = {**torch._inductor.list_mode_options(mode), **inductor_options}
    config = QuartetConfig.from_options(
        {k: v for k, v in options.items() if k not in inductor_options}
    )
    return compile_graph(gm, example_inputs, config, config_patches=inductor_options)
