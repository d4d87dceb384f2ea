"""``explain``: what the quartet2 backend would do to a model, without training it."""

from __future__ import annotations

from typing import Any

import torch

from quartet_compile.backend import compile_graph
from quartet_compile.config import QuartetConfig
from quartet_compile.passes.report import Report


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """Compile ``model`` with quartet2 and run it once on ``example_inputs``; return the report.

    Grad mode decides which graph is explained: the joint training graph by default, the
    inference graph under ``torch.no_grad()``. A graph that Inductor's caches serve (a repeated
    block, a model compiled before) is explained by the report its pass stored, so warm and cold
    caches give the same report.
    """
    config = QuartetConfig.from_options(options)
    report = Report()

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        return compile_graph(gm, inputs, config, on_report=report.graphs.append)

    torch.compile(model, backend=backend)(*example_inputs)
    return report
