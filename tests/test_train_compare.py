"""benchmarks/train_compare.py's bookkeeping: which step the backends are compared at, and that
it rewrites only its own section of RESULTS.md."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_compare.py"


@pytest.fixture(scope="module")
def train_compare():
    spec = importlib.util.spec_from_file_location("train_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_common_step_is_the_last_one_every_successful_run_evaluated(train_compare):
    Run = train_compare.Run
    runs = [
        Run("quartet2", {100: (1, 3.0), 200: (2, 2.5), 234: (3, 2.4)}, 1.0),
        Run("sr-recipe", {100: (1, 3.1), 200: (2, 2.6), 234: (3, 2.5)}, 1.0),
        Run("bf16", {100: (1, 2.9), 200: (2, 2.4)}, 1.0),
        Run("failed", {}, math.nan, error="exit 1"),
    ]
    assert train_compare.common_step(runs) == 200
    assert train_compare.common_step(runs[:2]) == 234


def test_replace_section_keeps_the_rest_of_the_file(train_compare, tmp_path: Path):
    results = tmp_path / "RESULTS.md"
    train_compare.replace_section(results, "## Training comparison\n\nfirst")
    assert results.read_text() == "# Benchmark results\n\n## Training comparison\n\nfirst\n"

    results.write_text(results.read_text() + "\n## Kernels\n\nkeep me\n")
    train_compare.replace_section(results, "## Training comparison\n\nsecond")
    text = results.read_text()
    assert "first" not in text
    assert text.count("## Training comparison") == 1
    assert text.index("second") < text.index("## Kernels\n\nkeep me")
