"""benchmarks/train_compare.py's bookkeeping: which step the backends are compared at."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_compare.py"


@pytest.fixture(scope="module")
def train_compare():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling results.py
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
