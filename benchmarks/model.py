"""One training step of a Llama-style model: torch.compile BF16 (Inductor) vs backend="quartet2".

The step is the demo's (quartet_demo.training): BF16 autocast over FP32 master weights,
forward, backward, fused AdamW. Each backend runs in its own process with empty Inductor and
Triton caches, so "compile s" (the first step's wall time, compilation included) is a cold
compile for both. Step time is the median of CUDA-event timings after warm-up, over random
token batches (rotated, so no step reuses the previous one's inputs). Writes the "Model step"
section of benchmarks/RESULTS.md with the headline line
``model step quartet2/bf16 (<params>, seq 2048): X.XXx on <GPU>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quartet_demo.models.llama import Llama, LlamaConfig
from quartet_demo.training import TrainConfig, compile_model, make_optimizer, next_byte_loss
from results import markdown_table, write_section

BACKENDS = ("bf16", "quartet2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per backend")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_hidden=args.ffn,
        max_seq_len=args.seq,
    )


def measure(args: argparse.Namespace, backend: str) -> dict[str, float]:
    """Compile time, median step time and peak memory of one backend (in this process)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Llama(model_config(args)).to(device)
    train_config = TrainConfig(model=model.config, batch_size=args.batch, seq_len=args.seq)
    optimizer = make_optimizer(model, train_config)
    loss_fn = next_byte_loss(compile_model(model, backend), device)
    batches = [
        torch.randint(0, args.vocab, (2, args.batch, args.seq), device=device) for _ in range(4)
    ]

    def step(i: int) -> None:
        inputs, targets = batches[i % len(batches)]
        loss_fn(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step(0)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step(i)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "compile_s": compile_s,
        "step_ms": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run_worker(args: argparse.Namespace, backend: str, argv: list[str]) -> dict[str, float]:
    """``measure`` in a fresh process with empty compile caches (a cold compile each)."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=f"{cache}/triton")
        result = Path(out) / "result.json"
        command = [sys.executable, __file__, *argv, "--worker", backend, "--json", str(result)]
        subprocess.run(command, env=env, check=True, timeout=args.timeout)
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        args.json.write_text(json.dumps(measure(args, args.worker)))
        return
    results = {backend: run_worker(args, backend, argv) for backend in BACKENDS}
    gpu = torch.cuda.get_device_name()
    tokens = args.batch * args.seq
    bf16 = results["bf16"]
    rows = [
        [
            backend,
            f"{r['step_ms']:.1f}",
            f"{r['step_ms'] / bf16['step_ms']:.2f}x",
            f"{tokens / r['step_ms'] * 1e3:,.0f}",
            f"{r['peak_gib']:.2f}",
            f"{r['compile_s']:.1f}",
            f"{r['compile_s'] / bf16['compile_s']:.2f}x",
        ]
        for backend, r in results.items()
    ]
    params = f"{bf16['params'] / 1e6:.0f}M params"
    table = markdown_table(
        ["backend", "step ms", "vs bf16", "tokens/s", "peak GiB", "compile s", "vs bf16"], rows
    )
    ratio = results["quartet2"]["step_ms"] / bf16["step_ms"]
    headline = f"model step quartet2/bf16 ({params}, seq {args.seq}): {ratio:.2f}x on {gpu}"
    body = (
        f"`python benchmarks/model.py` on {gpu}, torch {torch.__version__}: Llama "
        f"(d_model {args.d_model}, {args.layers} layers, {args.heads} heads, SwiGLU {args.ffn}, "
        f"vocab {args.vocab}; {params}), batch {args.batch} x seq {args.seq} = {tokens:,} tokens "
        f"per step; forward + backward + fused AdamW under BF16 autocast with FP32 master "
        f"weights (lm_head stays BF16 in both). Median of {args.steps} CUDA-event-timed steps "
        f"after {args.warmup} warm-up steps; compile s = first step with empty caches.\n\n"
        f"{table}\n\n{headline}\n"
    )
    write_section("Model step", body)
    print(table)
    print(headline)


if __name__ == "__main__":
    main()
