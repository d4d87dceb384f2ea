"""benchmarks/train_compare.py's bookkeeping: which step a seed's runs are compared at, the paired
gaps and their ratio, and the table rebuilt from run folders."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_compare.py"
HEADER = (
    "# corpus: site-packages\n# corpus_root: /venv/site-packages\n# corpus_files: 25000\n"
    f"# corpus_bytes: 388123456\n# corpus_sha256: {'ab' * 32}\n"
    "step,tokens,train_loss,val_loss,elapsed\n"
)


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


def test_a_seed_pairs_its_runs_at_their_common_step_and_at_their_best(train_compare):
    Run = train_compare.Run
    runs = [
        Run("quartet2", {100: (10, 1.30), 200: (20, 1.21), 300: (30, 1.25)}, 1.0, seed=4),
        Run("sr-recipe", {100: (10, 1.40), 200: (20, 1.24)}, 1.0, seed=4),
        Run("bf16", {100: (10, 1.10), 200: (20, 1.20), 300: (30, 1.19)}, 1.0, seed=4),
    ]
    paired = train_compare.pair(runs)
    assert (paired.seed, paired.step, paired.tokens) == (4, 200, 20)
    assert paired.gap("quartet2") == pytest.approx(0.01)
    assert paired.gap("sr-recipe") == pytest.approx(0.04)
    assert paired.ratio() == pytest.approx(0.25)
    # best: each run's lowest loss up to step 200 (bf16's is 1.10, at step 100)
    assert paired.gap("quartet2", best=True) == pytest.approx(0.11)
    assert paired.ratio(best=True) == pytest.approx(0.11 / 0.14)
    failed = [*runs[:2], Run("bf16", {}, math.nan, error="exit 1", seed=4)]
    assert train_compare.pair(failed) is None


def test_the_ratio_line_is_mean_and_sample_std_of_the_per_seed_ratios(train_compare):
    Paired = train_compare.Paired

    def seed(seed: int, q2: float, sr: float):
        losses = {"bf16": 1.0, "quartet2": 1.0 + q2, "sr-recipe": 1.0 + sr}
        return Paired(seed, 10, 100, losses, losses)

    pairs = [seed(0, 0.01, 0.02), seed(1, 0.03, 0.04), seed(2, 0.02, 0.02)]
    line = train_compare.ratio_line(pairs)  # ratios 0.5, 0.75, 1.0: mean 0.75, std 0.25
    assert line == "val-loss gap ratio quartet2/sr-recipe (3 seeds, paired): 0.75 +- 0.25"
    verdict = train_compare.verdict(pairs)
    assert "in 2 of 3 seeds (final)" in verdict
    # sr - quartet2 gaps 0.01, 0.01, 0: mean 0.0067, std 0.0058, t = 0.0067 / (0.0058 / sqrt 3)
    assert "sr-recipe - quartet2: +0.0067 +- 0.0058 (" in verdict
    assert "t = 2.0 with 2 degrees of freedom" in verdict
    assert math.isnan(seed(3, 0.01, 0.0).ratio())


def test_collect_builds_the_table_from_seed_folders_and_flags_a_missing_run(
    train_compare, tmp_path
):
    losses = {  # seed -> backend -> (val at step 100, val at step 200)
        0: {"quartet2": (1.40, 1.52), "sr-recipe": (1.45, 1.54), "bf16": (1.30, 1.50)},
        1: {"quartet2": (1.40, 1.53), "bf16": (1.30, 1.50)},
    }
    for seed, backends in losses.items():
        for backend, (early, late) in backends.items():
            run = tmp_path / "runs" / f"seed{seed}" / backend
            run.mkdir(parents=True)
            rows = f"100,6400,2.0,{early},9.0\n200,12800,1.9,{late},18.0\n"
            (run / "log.csv").write_text(HEADER + rows)
            (run / "summary.json").write_text('{"tokens_per_s": 1234.0}\n')
            (run / "machine.json").write_text(
                '{"device": "GPU-X", "torch": "9.9", "concurrent_runs": 3}\n'
            )
    results = tmp_path / "RESULTS.md"
    train_compare.main(
        ["--collect", "--steps", "200", "--runs-dir", str(tmp_path / "runs"),
         "--plot", str(tmp_path / "curves.png"), "--results", str(results)]
    )  # fmt: skip
    text = results.read_text()
    assert "--corpus site-packages --steps 200 --jobs 3 --seeds 0 1` on GPU-X, torch 9.9" in text
    row = "| 0 | 200 (0.0M) | 1.5000 | +0.0200 (+1.33%) | +0.0400 (+2.67%) | 0.50 | 1.3000 |"
    assert row in text
    assert "- seed 1 sr-recipe: failed: no summary.json in" in text
    assert "val-loss gap ratio quartet2/sr-recipe (1 seeds, paired): 0.50 +- 0.00" in text
    assert "3 runs sharing the GPU, so not a speed measurement" in text
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
