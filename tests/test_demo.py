"""The demo end to end on CPU: data split, schedule, training with each backend, exact resume.

The quartet2 and sr-recipe runs need the quartet2 backend; they train the same tiny model and must
show the same finite, dropping loss as BF16.

quartet2 and the sr recipe train as the demo runs them, through Inductor, and so does the resumed
run (quartet2's). BF16 trains under ``aot_eager``: Inductor would only compile plain PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quartet_demo import corpus, run_log, sources, training
from quartet_demo.demo import PRESETS, main
from quartet_demo.models.llama import Llama
from quartet_demo.training import (
    LOG_NAME,
    SUMMARY_NAME,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
)

STEPS = 12
EVAL_EVERY = 4
BATCH, SEQ = 8, 64
# The tiny preset, shortened (steps and sequence length): enough steps for the loss to fall well
# below ln(256) = 5.55.
ARGS = (
    f"--preset tiny --steps {STEPS} --batch-size {BATCH} --seq-len {SEQ} --lr 3e-3 "
    f"--eval-every {EVAL_EVERY} --save-every {EVAL_EVERY} --device cpu --no-progress"
).split()


FAST_BACKENDS = {"bf16": {"backend": "aot_eager"}}


@pytest.fixture(autouse=True, scope="module")
def fast_backends():
    with pytest.MonkeyPatch.context() as patch:
        for name, compile_kwargs in FAST_BACKENDS.items():
            patch.setitem(training.BACKENDS, name, compile_kwargs)
        yield


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each run compiles a new model: start from empty Dynamo caches (and their size limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def read_log(out: Path) -> list[dict[str, str]]:
    return run_log.read_log(out / LOG_NAME).rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``trained(backend)``: output directory of one uninterrupted run, trained once per module."""
    runs: dict[str, Path] = {}

    def run(backend: str) -> Path:
        if backend not in runs:
            torch._dynamo.reset()
            out = tmp_path_factory.mktemp(backend)
            main([*ARGS, "--backend", backend, "--out", str(out)])
            runs[backend] = out
        return runs[backend]

    return run


@pytest.fixture
def bf16_run(trained: Callable[[str], Path]) -> Path:
    return trained("bf16")


# --------------------------------------------------------------------------------------------
# Data and schedule (no training)
# --------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    files = list(sources.find_sources().files)
    train, val = corpus.split_files(files, 0.05)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == files
    assert 0.02 < len(val) / len(files) < 0.1
    assert not any("site-packages" in path.parts for path in files)
    # Same split in another interpreter with another string-hash seed: nothing process-dependent.
    script = (
        "from quartet_demo import corpus, sources; "
        "files = list(sources.find_sources().files); "
        "print('\\n'.join(map(str, corpus.split_files(files, 0.05)[1])))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert other.stdout.split() == [str(path) for path in val]


def test_train_batches_replay_by_step_and_shift_targets():
    stream = torch.arange(1000, dtype=torch.int64) % 256
    inputs, targets = corpus.train_batch(stream, 4, 16, seed=3, step=7)
    again, _ = corpus.train_batch(stream, 4, 16, seed=3, step=7)
    other, _ = corpus.train_batch(stream, 4, 16, seed=3, step=8)
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, other)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = PRESETS["tiny"]
    lrs = [lr_at(step, config) for step in range(config.steps + 1)]
    assert lrs[0] == 0.0
    assert lrs[config.warmup_steps] == pytest.approx(config.lr)
    assert lrs[-1] == pytest.approx(config.lr * config.min_lr_ratio)
    decay = torch.tensor(lrs[config.warmup_steps :])
    assert bool((decay.diff() <= 0).all())


def test_presets_are_sized_as_documented():
    sizes = {}
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in Llama(preset.model).parameters())
    assert sizes["tiny"] < 2e6
    assert 30e6 <= sizes["small"] <= 100e6
    assert 30e6 <= sizes["medium"] <= 100e6


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def assert_learns(out: Path) -> None:
    rows = read_log(out)
    losses = [float(row["train_loss"]) for row in rows]
    assert len(losses) == STEPS
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 1.0, f"loss did not drop: {first:.3f} -> {last:.3f}"
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["step"] == STEPS
    assert summary["val_loss"] < math.log(256) - 1.0


@pytest.mark.parametrize("backend", ["bf16", "quartet2", "sr-recipe"])
def test_backend_trains(backend: str, trained: Callable[[str], Path]):
    assert_learns(trained(backend))


def test_csv_log_has_one_row_per_step_under_the_corpus_header(bf16_run: Path):
    log = run_log.read_log(bf16_run / LOG_NAME)
    assert tuple(log.rows[0]) == run_log.CSV_COLUMNS
    assert log.metadata["corpus"] == "stdlib" and len(log.metadata["corpus_sha256"]) == 64
    rows = log.rows
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))
    assert all(int(row["tokens"]) == int(row["step"]) * BATCH * SEQ for row in rows)
    evaluated = [int(row["step"]) for row in rows if row["val_loss"]]
    assert evaluated == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    elapsed = [float(row["elapsed"]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_resume_reproduces_the_uninterrupted_run(trained: Callable[[str], Path], tmp_path: Path):
    # quartet2 through Inductor: the resumed session restores the random signs' and the rounding
    # draws' RNG too, and Inductor's CPU code (the embedding's scatter-add) is deterministic.
    half = STEPS // 2
    main([*ARGS, "--backend", "quartet2", "--out", str(tmp_path), "--stop-step", str(half)])
    assert len(read_log(tmp_path)) == half
    torch._dynamo.reset()
    main([*ARGS, "--backend", "quartet2", "--out", str(tmp_path), "--resume"])

    resumed, uninterrupted = read_log(tmp_path), read_log(trained("quartet2"))
    train_curve = ("step", "tokens", "train_loss")
    assert [[r[k] for k in train_curve] for r in resumed] == [
        [r[k] for k in train_curve] for r in uninterrupted
    ]
    # The interrupted session also evaluated at its last step; every shared evaluation matches.
    assert [r["val_loss"] for r in resumed if r["step"] != str(half)] == [
        r["val_loss"] for r in uninterrupted if r["step"] != str(half)
    ]
    assert resumed[half - 1]["val_loss"]


def test_checkpoint_restores_weights_optimizer_and_rng(tmp_path: Path):
    config = dataclasses.replace(PRESETS["tiny"], out_dir=tmp_path)

    def model_and_optimizer(seed: int) -> tuple[Llama, torch.optim.AdamW]:
        torch.manual_seed(seed)
        model = Llama(config.model)
        return model, make_optimizer(model, config)

    model, optimizer = model_and_optimizer(0)
    model(torch.zeros(2, 16, dtype=torch.long)).square().mean().backward()
    optimizer.step()
    save_checkpoint(tmp_path, config, model, optimizer, step=5, elapsed=1.5)
    noise = torch.rand(8)

    restored, restored_optimizer = model_and_optimizer(1)
    assert load_checkpoint(tmp_path, config, restored, restored_optimizer) == (5, 1.5)
    assert torch.equal(torch.rand(8), noise)
    for (name, param), other in zip(model.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(param, other), name
        moments, restored_moments = optimizer.state[param], restored_optimizer.state[other]
        assert torch.equal(moments["exp_avg_sq"], restored_moments["exp_avg_sq"]), name


def test_resume_refuses_a_different_run(bf16_run: Path):
    with pytest.raises(ValueError, match="lr: checkpoint 0.003 vs now 0.001"):
        main([*ARGS, "--backend", "bf16", "--out", str(bf16_run), "--lr", "1e-3", "--resume"])


def test_python_dash_m_quartet_demo_runs_the_demo():
    completed = subprocess.run(
        [sys.executable, "-m", "quartet_demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--backend {bf16,quartet2,sr-recipe}" in completed.stdout
