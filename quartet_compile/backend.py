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
run; the report it wrote when it did is loaded instead (quartet_compile.report_cache).
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
from quartet_compile import kernel_analysis, kernels, passes, regional, report_cache
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

    ``modules`` are the module names the rewritten graph depends on: those a skip pattern keeps
    in high precision, and with ``check_finite`` every one (each check names its layer). With the
    parameters' positions and the config they are all the rewrite depends on besides the graph,
    so the uuid holds those and not the parameter names, and repeated blocks share cache entries
    (not under ``check_finite``: a block's checks must name its own layers).
    """

    def __init__(
        self,
        config: QuartetConfig,
        params: dict[int, str],
        modules: list[str],
        on_report: Callable[[GraphReport], None],
    ) -> None:
        self.config = config
        self.params = params
        self.modules = modules
        self.on_report = on_report

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.on_report(rewrite.rewrite(graph, self.config, self.params))

    def uuid(self) -> bytes:
        return _uuid(self.config, self.params, self.modules)


def _uuid(config: QuartetConfig, params: dict[int, str], modules: list[str]) -> bytes:
    extra = f"{config.cache_key()}|{sorted(params)}|{modules}"
    return get_hash_for_files(sources(), extra)


def _log_report(graph_report: GraphReport, cached: bool) -> None:
    if cached:
        log.info(
            "quartet2: compiled graph from the compile caches; its report, stored when the pass "
            "ran:\n%s",
            graph_report,
        )
    else:
        log.info("%s", graph_report)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: QuartetConfig,
    on_report: Callable[[GraphReport], None] | None = None,
    config_patches: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile a Dynamo graph with Inductor and the quartet2 pass on its AOTAutograd graphs
    (block by block when ``config.regional``).

    ``on_report`` receives each graph's report, written by the pass now or stored with a graph
    that the caches serve; by default it is logged, marked when it came from the caches.
    """
    kernel_analysis.install()

    def deliver(graph_report: GraphReport, cached: bool) -> None:
        if on_report is None:
            _log_report(graph_report, cached)
        else:
            on_report(graph_report)

    def compile_piece(piece: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        params = {
            i: _source_name(node)
            for i, (node, x) in enumerate(zip(placeholders, inputs, strict=True))
            if isinstance(x, torch.nn.Parameter) and not _is_sharded(node, x)
        }
        modules = sorted({operands.module_name(n) for n in piece.graph.nodes} - {""})
        if not config.check_finite:
            modules = [m for m in modules if rewrite.skip_pattern(m, config)]
        report_key = report_cache.key(piece, inputs, _uuid(config, params, modules))
        names = report_cache.names(piece, params)
        ran = False

        def record(graph_report: GraphReport) -> None:
            nonlocal ran
            ran = True
            report_cache.store(report_key, names, graph_report)
            deliver(graph_report, cached=False)

        quartet_pass = QuartetPass(config, params, modules, record)
        patches = {**(config_patches or {}), "joint_custom_pre_pass": quartet_pass}
        inner = {} if config.inductor else {"inner_compile": _run_eagerly}
        compiled = compile_fx(piece, inputs, config_patches=patches, **inner)
        if not ran:  # AOTAutograd's cache served the graph: the pass did not run
            graph_report = report_cache.load(report_key, names)
            if graph_report is not None:
                deliver(graph_report, cached=True)
        return compiled

    if config.regional:
        return regional.compile_regions(gm, example_inputs, compile_piece)
    return compile_piece(gm, example_inputs)


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
    among them, and ``mode`` (e.g. "max-autotune"), go to Inductor. Unknown keys raise. Inductor's
    compile workers do not see these patches: keys read while a kernel compiles, such as
    ``static_launch_user_defined_triton_kernels``, take effect through their TORCHINDUCTOR_*
    environment variables only.
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
