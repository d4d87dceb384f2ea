"""benchmarks/grad_error.py on CPU with a tiny stock Llama: the hooks capture the real backward
operands of the layers they name, MS-EDEN's quantization MSE on them is below SR's, the GEMM
errors are sane, and the JSON record round-trips into the RESULTS.md section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import grad_error  # noqa: E402
import real_models  # noqa: E402

# T = 2 x 96 = 192 tokens: not a multiple of 128, so the quantizers pad T.
ARGV = ["--tiny", "--device", "cpu", "--steps", "1", "--seeds", "2"]
TOKENS = 192
# Every linear of the tiny Llama's two blocks (its first, middle and last).
PROJECTIONS = [f"self_attn.{n}_proj" for n in "qkvo"]
PROJECTIONS += [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
LINEARS = [f"model.layers.{block}.{part}" for block in (0, 1) for part in PROJECTIONS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the threads
    wait on each other (seen: measurements 4x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grad_error") / "grad_error.json"
    assert grad_error.main([*ARGV, "--json", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def record(saved: Path) -> dict:
    return json.loads(saved.read_text())


def test_hooks_capture_the_operands_of_the_weight_gradient():
    """x, W and dy have each layer's shapes, W is the weight of that forward, and dy.T @ x is the
    gradient autograd gives the weight: the captures are the backward's true operands."""
    settings = real_models.Settings(device="cpu", batch=2, seq=96, tiny=True)
    data = real_models.corpus.load_corpus()
    model = real_models.build_model("llama", tiny=True, seed=0)
    modules = dict(model.named_modules())
    initial = {name: modules[name].weight.detach().clone() for name in LINEARS}
    steps = []
    for step, loss, captures in grad_error.captured_steps(model, settings, [0, 1], data):
        steps.append(step)
        assert loss > 0 and sorted(c.name for c in captures) == sorted(LINEARS)
        for c in captures:
            module = modules[c.name]
            n, k = module.weight.shape
            assert c.kind == ("attention" if ".self_attn." in c.name else "mlp")
            assert (c.x.shape, c.w.shape, c.dy.shape) == ((TOKENS, k), (n, k), (TOKENS, n))
            assert c.x.dtype == c.w.dtype == c.dy.dtype == torch.bfloat16
            # The weight of this step's forward: the initial one, then moved by the optimizer.
            assert torch.equal(c.w, module.weight.detach().bfloat16())
            assert torch.equal(c.w, initial[c.name].bfloat16()) == (step == 0)
            # The weight's gradient (not yet applied) is autograd's bf16 dy.T @ x.
            reference = c.dy.float().T @ c.x.float()
            assert (module.weight.grad - reference).norm() / reference.norm() < 1e-2
    assert steps == [0, 1]


def test_ms_eden_has_lower_mse_than_sr_on_every_captured_operand(record: dict):
    layers = record["layers"]
    assert len(layers) == len(LINEARS)
    for layer in layers:
        assert layer["shapes"]["dy"][0] == TOKENS
        for key in grad_error.OPERANDS:
            eden, sr = (sum(layer[m][key]) / len(layer[m][key]) for m in ("eden", "sr"))
            assert len(layer["eden"][key]) == 2
            assert 0 < eden < sr < 0.1, (layer["name"], layer["step"], key, eden, sr)


def test_gemm_errors_lie_between_the_forward_floor_and_one(record: dict):
    for layer in record["layers"]:
        for key in ("dX", "dW"):
            floor = layer["forward_only"][key]
            eden, sr = (sum(layer[m][key]) / len(layer[m][key]) for m in ("eden", "sr"))
            assert 0 < floor < eden < sr < 1, (layer["name"], key, floor, eden, sr)


def test_the_record_round_trips_into_the_results_section(saved: Path, record: dict, tmp_path):
    copy = tmp_path / "copy.json"
    assert grad_error.main(["--from-json", str(saved), "--json", str(copy)]) == 0
    assert json.loads(copy.read_text()) == record
    results = tmp_path / "RESULTS.md"
    grad_error.write_results(record, results)
    text = results.read_text()
    assert f"## {grad_error.SECTION}\n" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 2 * len(grad_error.QUANTITIES)  # attention and MLP at step 1
    assert "SR/MS-EDEN operand MSE ratio on real gradients: geometric mean" in text
