"""benchmarks/trainers.py on the CPU (--tiny): a stock HF Llama trains through HF's Trainer and
through Lightning under both backends, from the same weights and the same batches; every step is
checked finite, quartet2 rewrites the projections (and validation compiles no second graph), the
JSON record reads back into the printed table, and a trainer whose package is missing is
reported as skipped while the other trainer's runs still happen."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trainers  # noqa: E402
from poisoned import POISONED, poisoned_builder  # noqa: E402

RUNS = [("hf", "quartet2"), ("hf", "bf16"), ("lightning", "quartet2"), ("lightning", "bf16")]
# The tiny Llama's q/k/v/o/gate/up/down in its 2 blocks, forward, grad-input and grad-weight
# (lm_head stays in high precision). Exactly this many: a validation that compiled a second
# graph would report them again.
NVFP4_MATMULS = 2 * 7 * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--tiny --results --json`` run of all four (trainer, backend) pairs."""
    out = tmp_path_factory.mktemp("trainers") / "runs.json"
    sections: list[tuple[str, str]] = []
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(trainers, "write_section", lambda *section: sections.append(section))
        status = trainers.main(["--tiny", "--results", "--json", str(out)])
    saved = json.loads(out.read_text())
    return {
        "status": status,
        "saved": saved,
        "runs": {(r["trainer"], r["backend"]): r for r in saved["runs"]},
        "printed": printed.getvalue(),
        "sections": sections,
    }


def test_every_run_takes_its_steps_with_finite_losses_and_gradients(tiny):
    assert tiny["status"] == 0
    assert [(r["trainer"], r["backend"]) for r in tiny["saved"]["runs"]] == RUNS
    for run in tiny["runs"].values():
        assert run["failure"] is None and run["skipped"] is None and run["non_finite"] == []
        assert run["steps"] == 3 and len(run["losses"]) == 3
        assert all(math.isfinite(x) for x in [*run["losses"], run["val_loss"], run["train_loss"]])
        assert run["step_ms"] > 0 and run["compile_s"] > 0 and run["fused_adamw"] is True
    assert "trainers: every loss and gradient finite in all 4 runs" in tiny["printed"]


def test_all_runs_start_from_the_same_weights_and_see_the_same_batches(tiny):
    runs = tiny["runs"]
    assert len({run["weights_digest"] for run in runs.values()}) == 1
    first = runs["hf", "bf16"]["losses"][0]
    assert all(run["losses"][0] == pytest.approx(first, rel=1e-2) for run in runs.values())
    # bf16 is deterministic here: the two trainers' curves agree step by step, so they trained
    # on the same batches in the same order with the same optimizer.
    assert runs["lightning", "bf16"]["losses"] == pytest.approx(
        runs["hf", "bf16"]["losses"], rel=1e-4
    )


def test_quartet2_rewrites_the_projections_once_and_bf16_none(tiny):
    for trainer in ("hf", "lightning"):
        quartet2, bf16 = tiny["runs"][trainer, "quartet2"], tiny["runs"][trainer, "bf16"]
        assert quartet2["nvfp4_matmuls"] == NVFP4_MATMULS and quartet2["cached_graphs"] == 0
        assert bf16["nvfp4_matmuls"] == 0


def test_the_json_record_reads_back_into_the_printed_table_and_the_results_section(tiny):
    saved = tiny["saved"]
    assert saved["settings"]["steps"] == 3 and saved["settings"]["tiny"] is True
    assert saved["accelerate"] and saved["lightning"]
    table = trainers.table(trainers.runs_of(saved))
    assert table.count("\n") == 1 + len(RUNS)
    assert table in tiny["printed"]
    ((title, body),) = tiny["sections"]
    assert title == "Trainers (HF Trainer, Lightning)" and table in body


def test_a_trainer_whose_package_is_missing_is_skipped_and_the_other_still_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning raises ImportError
    ran = []

    def fake_run(trainer: str, backend: str, *_: Any) -> trainers.TrainerRun:
        ran.append((trainer, backend))
        return trainers.TrainerRun("llama", backend, "", 1, "", steps=3, trainer=trainer)

    monkeypatch.setattr(trainers, "train_run", fake_run)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = trainers.main(["--tiny"])
    assert status == 0
    assert ran == [("hf", "quartet2"), ("hf", "bf16")]
    out = printed.getvalue()
    assert "lightning: lightning not installed" in out
    assert out.count("| skipped: lightning not installed |") == 2
    assert "in all 2 runs; 2 skipped (lightning not installed)" in out


def test_missing_names_the_package_each_trainer_needs(monkeypatch):
    assert trainers.missing("hf") is None and trainers.missing("lightning") is None
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert trainers.missing("hf") == "accelerate not installed (the HF Trainer needs it)"


def test_a_nan_gradient_under_the_hf_trainer_fails_the_run_and_names_its_parameter(
    monkeypatch, tmp_path
):
    """HF's own gradient-norm step would spread one NaN gradient to all: the check runs first."""
    poisoned = POISONED
    models = trainers.real_models
    monkeypatch.setattr(models, "build_model", poisoned_builder(models.build_model))
    out = tmp_path / "runs.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = trainers.main(
            ["--tiny", "--trainers", "hf", "--backends", "bf16", "--json", str(out)]
        )
    assert status == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failure"] == f"NaN at step 2 in {poisoned}" and run["non_finite"] == [poisoned]
    assert run["steps"] == 1 and run["val_loss"] is None
    assert f"trainers: FAILED 1 of 1 runs (hf/bf16: NaN at step 2 in {poisoned})" in (
        printed.getvalue()
    )


def test_the_check_raises_before_the_update_and_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    run = trainers.TrainerRun("llama", "bf16", "", 1, "", trainer="hf")
    monitor = trainers.Monitor(run, model, trainers.TINY, None, deadline=None)
    monitor.step_begin()
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = math.nan
    monitor.loss = torch.tensor(1.0)
    with pytest.raises(trainers.NonFiniteStep):
        monitor.check_step()
    assert run.failure == "NaN at step 1 in 1.weight" and run.non_finite == ["1.weight"]
