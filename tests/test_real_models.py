"""benchmarks/real_models.py on CPU: tiny stock Hugging Face models train with finite gradients
under both backends from the same weights, quartet2 rewrites their linears, and a non-finite
gradient fails the run, names the parameter and sets the exit status."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real_models  # noqa: E402
from poisoned import POISONED, poisoned_builder  # noqa: E402

from quartet_demo import corpus  # noqa: E402

# --eager: bf16 under aot_eager, quartet2 with options inductor=False (same graphs, no codegen).
TINY = real_models.Settings(
    device="cpu", steps=3, batch=2, seq=64, warmup=1, val_batches=1, tiny=True, eager=True
)
# Matmuls of the tiny models' blocks (2 each) that quartet2 rewrites, forward and both backward:
# every linear but lm_head; tiny qwen3's k/v projections (N=64) are below min_dim=128.
NVFP4_MATMULS = {"llama": 2 * 7 * 3, "gpt2": 2 * 4 * 3, "qwen3": 2 * 5 * 3}


@pytest.fixture(scope="module")
def data() -> corpus.Corpus:
    return corpus.load_corpus()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops gain nothing from intra-op threads, and on a busy machine the threads
    wait on each other (seen: 5x slower training steps with 2 threads on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", real_models.DEFAULT_MODELS)
def test_tiny_models_train_finite_under_both_backends_from_the_same_weights(name, data):
    quartet2, bf16 = real_models.run_all(TINY, [name], ["quartet2", "bf16"], data, budget_s=None)
    for run in (quartet2, bf16):
        assert run.failure is None and run.steps == TINY.steps
        assert all(math.isfinite(x) for x in [*run.losses, run.val_loss])
    assert quartet2.weights_digest == bf16.weights_digest
    assert quartet2.losses[0] == pytest.approx(bf16.losses[0], rel=1e-2)
    assert quartet2.nvfp4_matmuls == NVFP4_MATMULS[name]
    assert bf16.nvfp4_matmuls == 0


def test_moe_models_are_refused_without_bf16_parameters(capsys) -> None:
    """tests/test_grouped_experts.py trains a tiny Qwen3-MoE; here only the CLI's guard."""
    with pytest.raises(SystemExit):
        real_models.parse_args(["--models", "qwen3_moe"])
    assert "--dtype bf16-params" in capsys.readouterr().err
    args = real_models.parse_args(["--models", "qwen3_moe", "--dtype", "bf16-params"])
    assert real_models.MODELS[args.models](True).num_experts == 8


def test_a_nan_gradient_fails_the_run_and_names_the_parameter(monkeypatch, tmp_path, capsys):
    poisoned = POISONED
    monkeypatch.setattr(real_models, "build_model", poisoned_builder(real_models.build_model))
    out = tmp_path / "runs.json"
    status = real_models.main(
        ["--device", "cpu", "--tiny", "--eager", "--models", "llama", "--backends", "bf16",
         "--steps", "3", "--batch", "2", "--seq", "64", "--no-write", "--json", str(out)]
    )  # fmt: skip
    assert status == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failure"] == f"NaN at step 2 in {poisoned}"
    assert run["non_finite"] == [poisoned]
    assert run["steps"] == 1 and run["val_loss"] is None
    printed = capsys.readouterr().out
    assert "| llama | bf16 | 0.5M | 1 | - |" in printed
    assert f"real models: FAILED 1 of 1 runs (llama/bf16: NaN at step 2 in {poisoned})" in printed


def test_a_failure_names_the_loss_and_the_last_parameters_in_model_order():
    names = [f"layers.{i}.weight" for i in range(6)]
    finite = torch.ones(7)
    assert real_models.non_finite(finite, names) == []
    inf = torch.tensor([math.inf, 1.0, math.inf, 1.0, 1.0, 1.0, 1.0])
    bad = real_models.non_finite(inf, names)
    assert real_models.failure_message(inf, bad, 5) == "Inf at step 5 in loss, layers.1.weight"
    nan = torch.tensor([math.nan, 1.0, *[math.nan] * 5])
    bad = real_models.non_finite(nan, names)
    assert real_models.failure_message(nan, bad, 7) == (
        "NaN at step 7 in 6 of the loss and gradients, the last in model order: "
        "layers.2.weight, layers.3.weight, layers.4.weight, layers.5.weight"
    )


def test_a_run_cut_by_the_time_budget_fixes_the_steps_of_the_models_later_backends(monkeypatch):
    calls = []

    def fake_run(name, backend, settings, data, deadline):
        calls.append((name, backend, settings.steps, deadline is not None))
        steps = 40 if backend == "quartet2" else settings.steps
        run = real_models.RunResult(name, backend, "", 1, "", steps=steps)
        run.stopped_early = steps < settings.steps
        return run

    monkeypatch.setattr(real_models, "train_run", fake_run)
    results = real_models.run_all(
        real_models.Settings(device="cpu", steps=300),
        ["llama", "gpt2"],
        ["quartet2", "bf16"],
        None,
        60,
    )
    assert calls == [
        ("llama", "quartet2", 300, True),
        ("llama", "bf16", 40, True),
        ("gpt2", "quartet2", 300, True),
        ("gpt2", "bf16", 40, True),
    ]
    assert "| 40 (time) |" in real_models.table(results)


def test_reduce_overhead_reaches_inductor_and_keeps_each_recipe_s_options() -> None:
    """--mode reduce-overhead: torch.compile refuses ``mode`` together with ``options``, so the
    quartet2 recipes get the mode's Inductor options (CUDA graphs) beside their own."""
    bf16 = real_models.compile_kwargs("bf16", eager=False, mode="reduce-overhead")
    assert bf16 == {"backend": "inductor", "mode": "reduce-overhead"}
    sr = real_models.compile_kwargs("sr-recipe", eager=False, mode="reduce-overhead")
    assert sr == {
        "backend": "quartet2",
        "options": {"four_over_six": False, "backward_method": "sr", "triton.cudagraphs": True},
    }
    for kwargs in (bf16, sr, real_models.compile_kwargs("quartet2", False, "reduce-overhead")):
        torch.compile(torch.nn.Linear(4, 4), **kwargs)  # raises on mode + options
    assert real_models.compile_kwargs("quartet2", False) == {"backend": "quartet2"}


@pytest.mark.parametrize(
    "name, layers, heads", [("gpt2_6l", 6, (12, 12)), ("qwen3_768", 6, (12, 4))]
)
def test_the_small_models_are_issue_16_s_768_wide_6_layer_ones(name, layers, heads) -> None:
    config = real_models.MODELS[name](tiny=False)
    assert (config.hidden_size, config.num_hidden_layers) == (768, layers)
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)  # GPT-2: MHA
    assert (config.num_attention_heads, kv_heads) == heads
    # The tiny variant (CPU tests) is the base model's.
    base = real_models.MODELS[name.split("_")[0]](tiny=True)
    assert real_models.MODELS[name](tiny=True).to_dict() == base.to_dict()
