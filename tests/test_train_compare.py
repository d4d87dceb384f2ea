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


def test_collect_builds_the_table_from_run_folders_and_flags_a_missing_run(train_compare, tmp_path):
    header = (
        "# corpus: site-packages\n# corpus_root: /venv/site-packages\n# corpus_files: 25000\n"
        f"# corpus_bytes: 388123456\n# corpus_sha256: {'ab' * 32}\n"
        "step,tokens,train_loss,val_loss,elapsed\n"
    )
    for backend, (early, late) in (("quartet2", (1.40, 1.60)), ("bf16", (1.30, 1.50))):
        run = tmp_path / "runs" / backend
        run.mkdir(parents=True)
        rows = f"100,6400,2.0,{early},9.0\n200,12800,1.9,{late},18.0\n"
        (run / "log.csv").write_text(header + rows)
        (run / "summary.json").write_text('{"tokens_per_s": 1234.0}\n')
        (run / "machine.json").write_text('{"device": "GPU-X", "torch": "9.9"}\n')
    results = tmp_path / "RESULTS.md"
    train_compare.main(
        ["--collect", "--steps", "200", "--runs-dir", str(tmp_path / "runs"),
         "--plot", str(tmp_path / "curves.png"), "--results", str(results),
         "--backends", "quartet2", "sr-recipe", "bf16"]
    )  # fmt: skip
    text = results.read_text()
    assert "on GPU-X, torch 9.9" in text and "compared at step 200" in text
    row = "| quartet2 | 1.6000 | +0.1000 (+6.67%) | 1.4000 (100) | +0.1000 (+7.69%) | 1,234 | 200 |"
    assert row in text
    assert "| sr-recipe | failed: no summary.json in" in text
    assert "Corpus `--corpus site-packages`: 25,000 files, 388 MB, sha256 abababababab." in text
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_runs_on_different_corpora_are_flagged(train_compare):
    Run = train_compare.Run

    def corpus(sha: str) -> dict[str, str]:
        return {"corpus": "site-packages", "corpus_files": "3", "corpus_bytes": "9",
                "corpus_sha256": sha}  # fmt: skip

    same = [Run("quartet2", {}, 1.0, corpus=corpus("a" * 64)), Run("bf16", {}, 1.0)]
    assert "Corpus `--corpus site-packages`: 3 files" in train_compare.corpus_sentence(same)
    differ = [*same, Run("sr-recipe", {}, 1.0, corpus=corpus("b" * 64))]
    sentence = train_compare.corpus_sentence(differ)
    assert "different corpora" in sentence and "sr-recipe: site-packages sha256 bbbb" in sentence
    assert train_compare.corpus_sentence([Run("bf16", {}, 1.0)]) == ""
