"""DDP and FSDP2 over NCCL on 2 GPUs: the demo launched with torchrun, as a user would.

The CPU suite (test_distributed.py) checks the same claims with gloo and eager graphs; here every
rank compiles with Inductor and the quartet2 Triton kernels. Tolerances: step-1 losses see the same
weights and tokens, but per-rank batches give cuBLAS and Inductor other shapes (other float32
summation orders), so they agree to 2e-3 rather than to rounding.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import losses, mean_rank_loss

from quartet_demo.demo import PRESETS
from quartet_demo.distributed import NO_MULTICAST
from quartet_demo.models.llama import Llama
from quartet_demo.training import compile_model, next_byte_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
GPUS = 2
STEPS = 8
CONFIG = dataclasses.replace(PRESETS["tiny"], steps=STEPS)


def demo(out: Path, backend: str, mode: str = "none") -> Path:
    """Train the tiny preset on CUDA, under torchrun on 2 GPUs unless ``mode`` is "none"."""
    launcher = [sys.executable]
    if mode != "none":
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={GPUS}"]
    command = [
        *launcher, "-m", "quartet_demo", "--backend", backend, "--distributed", mode,
        "--device", "cuda", "--steps", str(STEPS), "--eval-every", str(STEPS // 2),
        "--save-every", "0", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, env={**os.environ, **NO_MULTICAST}, check=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        f"{mode}-{backend}": demo(tmp_path_factory.mktemp(f"{mode}-{backend}"), backend, mode)
        for backend in ("bf16", "quartet2")
        for mode in ("none", "ddp", "fsdp2")
    }


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_bf16_first_step_matches_one_gpu(mode: str, runs: dict[str, Path]):
    assert losses(runs[f"{mode}-bf16"])[0] == pytest.approx(losses(runs["none-bf16"])[0], abs=2e-3)


def quartet2_rank_losses() -> float:
    """Mean over ranks of quartet2's step-1 loss on each rank's rows (its per-tensor scales see
    only those rows), computed on one GPU."""
    device = torch.device("cuda")
    torch.manual_seed(CONFIG.seed)
    model = Llama(CONFIG.model).to(device)
    return mean_rank_loss(next_byte_loss(compile_model(model, "quartet2"), device), CONFIG, GPUS)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_quartet2_first_step_is_the_mean_of_the_ranks_one_gpu_losses(
    mode: str, runs: dict[str, Path]
):
    assert losses(runs[f"{mode}-quartet2"])[0] == pytest.approx(quartet2_rank_losses(), abs=2e-3)


@pytest.mark.parametrize("mode", ["none", "ddp", "fsdp2"])
@pytest.mark.parametrize("backend", ["bf16", "quartet2"])
def test_runs_train(mode: str, backend: str, runs: dict[str, Path]):
    curve = losses(runs[f"{mode}-{backend}"])
    assert sum(curve[-2:]) / 2 < curve[0] - 0.5, curve


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", ["bf16", "quartet2"])
def test_curves_track_one_gpu(mode: str, backend: str, runs: dict[str, Path]):
    """Later steps differ by gradient reduction order (and quartet2's random rotations)."""
    for column in ("train_loss", "val_loss"):
        got, single = (
            losses(runs[f"{mode}-{backend}"], column),
            losses(runs[f"none-{backend}"], column),
        )
        assert got == pytest.approx(single, abs=5e-2), (column, got, single)
