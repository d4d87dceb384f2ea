"""Data-parallel scaling of the demo: tokens/s at 1 vs N GPUs and peak memory per GPU.

For each backend (bf16, quartet2) it trains the demo once on one GPU and once per engine (DDP,
FSDP2) on ``--gpus`` GPUs under torchrun, each in a fresh process group, and reads the runs'
``summary.json`` (tokens/s after the first, compiling step; per-rank ``max_memory_allocated``).
Weak scaling: every GPU gets ``--per-gpu-batch`` sequences, so the global batch grows with the
GPU count. NVLink multicast stays off in every child (NCCL, PyTorch symmetric memory, NVSHMEM),
as the device machines require.

Writes the "## Multi-GPU" section of benchmarks/RESULTS.md. Example (2 GPUs, ~8 minutes):
``python benchmarks/multigpu.py --gpus 2 --steps 60``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quartet_demo.demo import PRESETS
from quartet_demo.distributed import NO_MULTICAST
from quartet_demo.training import SUMMARY_NAME
from results import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Multi-GPU"


@dataclass
class Run:
    """One configuration's outcome (``error`` set when it failed)."""

    backend: str
    engine: str
    gpus: int
    tokens_per_s: float = math.nan
    peak_memory_gib: tuple[float, ...] = ()
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel runs")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--backends", nargs="+", default=["bf16", "quartet2"])
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2"])
    parser.add_argument("--per-gpu-batch", type=int, help="default: the preset's batch size")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (first one compiles)")
    parser.add_argument("--timeout-minutes", type=float, default=10.0, help="per run")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "multigpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, backend: str, engine: str, gpus: int) -> Run:
    """Train one configuration in fresh processes; ``engine`` "none" is one plain process."""
    out = args.runs_dir / f"{backend}-{engine}-{gpus}gpu"
    per_gpu = args.per_gpu_batch or PRESETS[args.preset].batch_size
    launcher = (
        [sys.executable]
        if engine == "none"
        else [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    )
    command = [
        *launcher,
        "-m",
        "quartet_demo",
        "--preset",
        args.preset,
        "--backend",
        backend,
        "--distributed",
        engine,
        "--batch-size",
        str(per_gpu * gpus),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.steps),
        "--save-every",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    print("$", " ".join(command), flush=True)
    timeout = 60 * args.timeout_minutes
    try:
        completed = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **NO_MULTICAST},
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Run(backend, engine, gpus, error=f"killed after {timeout:.0f}s")
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        return Run(backend, engine, gpus, error=f"exit {completed.returncode}: {tail[0]}")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    return Run(backend, engine, gpus, summary["tokens_per_s"], tuple(summary["peak_memory_gib"]))


def section(runs: list[Run], args: argparse.Namespace, device: str) -> str:
    """The RESULTS.md section: set-up line and one row per run, scaling against 1 GPU."""
    single = {r.backend: r.tokens_per_s for r in runs if r.engine == "none" and not r.error}
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.backend, r.engine, str(r.gpus), f"failed: {r.error}", "", ""])
            continue
        speedup = r.tokens_per_s / single.get(r.backend, math.nan)
        memory = " / ".join(f"{m:.2f}" for m in r.peak_memory_gib)
        rows.append(
            [r.backend, r.engine, str(r.gpus), f"{r.tokens_per_s:,.0f}", f"{speedup:.2f}x", memory]
        )
    per_gpu = args.per_gpu_batch or PRESETS[args.preset].batch_size
    setup = (
        f"`python benchmarks/multigpu.py --gpus {args.gpus} --preset {args.preset} --steps "
        f"{args.steps}` on {device}, torch {torch.__version__}. Weak scaling: {per_gpu} "
        f"sequences per GPU per step; tokens/s of all GPUs together, over the steps after the "
        f"first (compiling) one; "
        f"peak memory is `torch.cuda.max_memory_allocated` per rank. NVLink multicast off "
        f"({', '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())})."
    )
    table = markdown_table(
        ["backend", "engine", "GPUs", "tokens/s", "vs 1 GPU", "peak GiB per GPU"], rows
    )
    return f"{setup}\n\n{table}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    device = f"{args.gpus}x {torch.cuda.get_device_name()}"
    runs: list[Run] = []
    for backend in args.backends:
        for engine, gpus in [("none", 1), *((engine, args.gpus) for engine in args.engines)]:
            runs.append(run(args, backend, engine, gpus))
            # Written after every run, so a session cut short still leaves its results behind.
            write_section(SECTION, section(runs, args, device))
    print(section(runs, args, device))


if __name__ == "__main__":
    main()
