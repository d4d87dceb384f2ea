"""The pass's reports kept beside Inductor's caches, for graphs the caches serve without the pass.

When AOTAutograd's cache holds a compiled graph, ``compile_fx`` loads it and the joint-graph pass
never runs, so it reports nothing: a second run of a training script, and (with regional
compilation) every block after the first, would log no report. So each report is written when
the pass runs, pickled (as Inductor's own entries are) under Inductor's cache directory, and read
back when a graph comes from the caches. The report's module is among the sources in the key, so
an entry is only ever read by the code that wrote it.

The key holds what AOTAutograd's cache key holds and the pass's output depends on: the pass's
uuid (its sources, config, parameter positions, skipped modules), the graph's code with its
placeholders numbered as AOTAutograd numbers them, the inputs' metadata and the grad and autocast
modes. Module and parameter names are not in the code, so graphs that differ only in them (a
model's repeated blocks, or two models' identical layers) share an entry; the report is stored
with the graph's names, by position, and its names are mapped to the loading graph's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._functorch._aot_autograd.autograd_cache import normalize_placeholder_names
from torch._inductor.runtime.cache_dir_utils import cache_dir

from quartet_compile.passes.operands import module_name
from quartet_compile.passes.report import GraphReport

log = logging.getLogger("quartet_compile")

_HINT = "options={'force_disable_caches': True} compiles it again and shows it"


def key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], pass_uuid: bytes) -> str:
    """Hex digest naming the report of ``gm`` compiled from ``example_inputs`` by that pass."""
    with normalize_placeholder_names(gm):
        code = [m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    autocast = {
        device: str(torch.get_autocast_dtype(device))
        for device in torch._C._autocast_supported_devices()
        if torch.is_autocast_enabled(device)
    }
    state = [pass_uuid.hex(), code, [_describe(x) for x in example_inputs]]
    state += [torch.is_grad_enabled(), autocast]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return [
            str(x.dtype),
            x.device.type,
            [str(s) for s in x.shape],
            [str(s) for s in x.stride()],
            x.requires_grad,
            isinstance(x, torch.nn.Parameter),
        ]
    return str(x) if isinstance(x, (int, float, bool, torch.SymInt)) else type(x).__name__


def names(gm: torch.fx.GraphModule, params: Mapping[int, str]) -> list[str]:
    """The names a report can hold, by position: each node's module, then each parameter."""
    return [module_name(n) for n in gm.graph.nodes] + [params[i] for i in sorted(params)]


def _path(report_key: str) -> Path:
    return Path(cache_dir()) / "quartet2" / f"{report_key}.pickle"


def store(report_key: str, graph_names: list[str], report: GraphReport) -> None:
    """Write the report (atomically: ranks of one job may write the same entry at once)."""
    path = _path(report_key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False) as f:
            pickle.dump((graph_names, report), f)
        os.replace(f.name, path)
    except OSError as exc:
        log.warning("quartet2: could not store the report at %s (%s)", path, exc)


def load(report_key: str, graph_names: list[str]) -> GraphReport | None:
    """The stored report with the names of the graph being loaded, or None (and a logged line)
    when it is missing or unreadable."""
    path = _path(report_key)
    try:
        stored_names, report = pickle.loads(path.read_bytes())
        renames = dict(zip(stored_names, graph_names, strict=True))
        for entry in [*report.linears, *report.others]:
            entry.module = renames.get(entry.module, entry.module)
        for lin in report.linears:
            lin.weight = renames.get(lin.weight, lin.weight)
    except FileNotFoundError:
        log.warning(
            "quartet2: a graph came from the compile caches but its report is missing (%s); %s",
            path,
            _HINT,
        )
        return None
    except Exception as exc:  # noqa: BLE001  (a bad entry must never fail a compile)
        log.warning(
            "quartet2: a graph came from the compile caches but its report %s is unreadable "
            "(%s: %s); %s",
            path,
            type(exc).__name__,
            exc,
            _HINT,
        )
        return None
    return report
