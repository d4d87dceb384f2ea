"""Reports of graphs that the compile caches serve: the pass does not run on them, and the report
it stored when it did is logged (and explained) instead, with the names of the graph being loaded.

These compile with Inductor (the default): AOTAutograd's cache keeps only Inductor's output, so
with ``inductor=False`` every graph is compiled again and no report is ever loaded.
"""

import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cached_blocks import example, train_step
from logged_reports import logged_messages
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

import quartet_compile

SCRIPT = Path(__file__).with_name("cached_blocks.py")
FROM_CACHE = "quartet2: compiled graph from the compile caches"
FRESH = "quartet2: joint (training) graph"


def _train_in_a_fresh_process(cache: Path) -> list[str]:
    """The ``quartet_compile`` log messages of one training step run by a new interpreter."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    return [m.strip("\n") for m in run.stderr.split("@@ ")[1:]]


def _layers(message: str) -> list[str]:
    """Each linear layer of a logged report, with its status line."""
    return re.findall(r"^  (\S+: x\[.*\n    .*)$", message, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The training step that cached_blocks.py runs as a script, run here on empty caches: the
    cache directory it fills (compiled graphs and reports) and its ``quartet_compile`` log."""
    cache = tmp_path_factory.mktemp("inductor")
    try:
        with temporary_cache_dir(str(cache)), logged_messages() as messages:
            torch._dynamo.reset()
            train_step()
    finally:
        torch._dynamo.reset()
    return cache, messages


def test_a_second_run_logs_the_reports_stored_by_the_first(
    first_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    warm, first = first_run
    second = _train_in_a_fresh_process(Path(shutil.copytree(warm, tmp_path / "inductor")))
    reports = [m for m in first if m.startswith((FRESH, FROM_CACHE))]
    # The head and the first block are compiled; the second block is the first's cache entry,
    # reported with its own module names.
    assert [m.startswith(FROM_CACHE) for m in reports] == [False, False, True]
    for block, report in enumerate(reports[1:]):
        layer = f"blocks.{block}.fc: x[128, 128] @ W[128, 128].T (float32)\n    all: nvfp4"
        assert _layers(report) == [layer]
    cached = [m for m in second if m.startswith((FRESH, FROM_CACHE))]
    assert all(m.startswith(FROM_CACHE) for m in cached)
    assert [_layers(m) for m in cached] == [_layers(m) for m in reports]


@pytest.fixture
def cache_dir(first_run: tuple[Path, list[str]], tmp_path: Path) -> Iterator[Path]:
    """A copy of the warm cache, in use for the test."""
    cache = Path(shutil.copytree(first_run[0], tmp_path / "inductor"))
    with temporary_cache_dir(str(cache)):
        yield cache


def test_explain_gives_the_same_report_from_warm_caches(cache_dir: Path) -> None:
    model, x = example()
    counters = torch._dynamo.utils.counters["aot_autograd"]
    warm = quartet_compile.explain(model, x)
    assert counters["autograd_cache_hit"] == 3 and not counters["autograd_cache_miss"]
    # The pass runs on every graph when the graphs are not compiled by Inductor (nothing cached).
    cold = quartet_compile.explain(model, x, inductor=False)
    assert warm.graphs == cold.graphs
    assert [lin.module for g in warm.graphs for lin in g.linears] == ["blocks.0.fc", "blocks.1.fc"]


def test_a_missing_or_unreadable_report_is_logged_and_the_compile_goes_on(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = {
        bool(pickle.loads(path.read_bytes())[1].linears): path
        for path in (cache_dir / "quartet2").glob("*.pickle")
    }
    stored[False].unlink()  # the head's (no linear layer)
    stored[True].write_bytes(b"not a pickle")  # the blocks' (one entry for both)
    model, x = example()
    with caplog.at_level(logging.INFO, logger="quartet_compile"):
        report = quartet_compile.explain(model, x)
    assert not report.graphs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "report is missing" in warnings[0]
    assert all("is unreadable (UnpicklingError: " in w for w in warnings[1:])


def test_with_check_finite_each_block_compiles_its_own_checks(tmp_path: Path) -> None:
    """A check names its layer in the graph, so a block served by another block's cache entry
    would blame the other block's layer: under check_finite blocks do not share entries."""
    with temporary_cache_dir(str(tmp_path)):
        report = quartet_compile.explain(*example(), check_finite=True)
    for block, graph in enumerate(report.graphs[1:]):
        checks = [line for line in graph.graph.splitlines() if "check_finite" in line]
        assert checks and all(f"'blocks.{block}.fc'" in line for line in checks)
