"""One linear layer's forward+backward: torch.compile BF16 (Inductor) vs backend="quartet2".

Run on the GPU: median device-event time after warm-up, launched as a training loop launches it
and as CUDA-graph replays (the device time alone: at small shapes the difference is the host's
launch overhead, which ``mode="reduce-overhead"`` removes), TFLOP/s (6*T*K*N per fwd+bwd), peak
memory, compile time, a torch.profiler breakdown of quartet2's kernels (time and launches per
step, at the ``--breakdown`` shapes), and at the last shape the host's time per step with the
Python functions it is spent in (cProfile). ``--variants`` times several quartet2 option sets
against the same BF16 run, so that an option's effect is measured in one process. Writes the
table to benchmarks/RESULTS.md ("Linear layer", or ``--section``) with the headline line
``linear fwd+bwd quartet2/bf16 (T=16384, K=4096, N=4096): X.XXx on <GPU>``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shlex
import sys
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from results import markdown_table, write_section

SHAPES = [(16384, 4096, 4096), (16384, 4096, 14336), (16384, 14336, 4096), (8192, 2048, 2048)]


def make_step(backend: str, t: int, k: int, n: int, device: str, options: dict | None = None):
    """A compiled fwd+bwd closure on fresh random inputs, and its first-call (compile) time."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(layer, backend=backend, options=options)
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(t, n, device=device, dtype=torch.bfloat16)

    def step() -> None:
        compiled(x).backward(dy)

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return step, time.perf_counter() - start, [x, layer.weight]


def graph_replay_ms(step, grads: list[torch.Tensor]) -> float:
    """Median time of the step replayed from a CUDA graph. Gradients are freed before (so the
    capture writes them instead of accumulating) and after: captured in the graph's memory
    pool, they would count in the next case's peak memory."""
    for t in grads:
        t.grad = None
    try:
        return do_bench_cudagraph(step, rep=200, return_mode="median")
    except RuntimeError as error:  # a capture failure is a finding; the other columns stand
        print(f"CUDA-graph capture failed: {error}", flush=True)
        return float("nan")
    finally:
        for t in grads:
            t.grad = None


def peak_memory(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def kernel_breakdown(step, grads: list[torch.Tensor], top: int = 14) -> list[list[str]]:
    """Top CUDA kernels of one fwd+bwd by device time, with their launches per step (gradients
    reset as in the timing, so no accumulation kernel shows up)."""
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            for t in grads:
                t.grad = None
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1.0
    return [
        [
            e.key[:90],
            f"{e.device_time_total / steps / 1000:.3f}",
            f"{e.count / steps:.0f}",
            f"{100 * e.device_time_total / total:.0f}%",
        ]
        for e in events[:top]
    ]


def host_profile(step, grads: list[torch.Tensor], steps: int = 100, top: int = 12):
    """Host milliseconds per step (enqueueing only: at a launch-bound shape the device keeps up)
    and the Python functions with the most own time per step under cProfile."""

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            for t in grads:
                t.grad = None
            step()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed * 1000 / steps

    host_ms = run()
    profiler = cProfile.Profile()
    profiler.runcall(run)
    # pstats' entries: (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    entries = pstats.Stats(profiler).stats.items()
    hot = sorted(((own, calls, key) for key, (_, calls, own, _, _) in entries), reverse=True)
    rows = [
        [
            f"{name} ({os.path.basename(file)}:{line})",
            f"{own * 1000 / steps:.3f}",
            f"{calls / steps:.0f}",
        ]
        for own, calls, (file, line, name) in hot[:top]
    ]
    return host_ms, rows


def _shape(text: str) -> tuple[int, int, int]:
    t, k, n = (int(v) for v in text.split("x"))
    return t, k, n


def measure(
    backend: str, shape: tuple[int, int, int], options: dict | None, kernels: bool, host: bool
) -> dict:
    """Launched and graph-replayed median ms, peak GiB and compile s of one compiled step, and
    when asked its kernel breakdown and host profile. The step is dropped before the next
    measurement, so its tensors do not count in the next one's peak memory."""
    step, compile_s, grads = make_step(backend, *shape, "cuda", options)
    ms = do_bench(step, warmup=100, rep=500, grad_to_none=grads, return_mode="median")
    result = dict(ms=ms, compile_s=compile_s, peak=peak_memory(step),
                  graph_ms=graph_replay_ms(step, grads))  # fmt: skip
    if kernels:
        result["kernels"] = kernel_breakdown(step, grads)
    if host:
        result["host_ms"], result["hot"] = host_profile(step, grads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    parser.add_argument(
        "--variants",
        type=json.loads,
        default={"quartet2": {}},
        help="JSON object: name -> quartet2 options, each timed against the same BF16 run "
        "(A/B of an option in one process: the host's speed differs between processes)",
    )
    parser.add_argument(
        "--breakdown",
        default="16384x4096x4096",
        help="shapes whose kernels (first variant) are listed with time and launches per step",
    )
    parser.add_argument("--section", default="Linear layer", help="the RESULTS.md section")
    args = parser.parse_args()
    shapes = [_shape(s) for s in args.shapes.split(",")]
    profiled = {_shape(s) for s in args.breakdown.split(",") if s}
    gpu = torch.cuda.get_device_name()
    first = next(iter(args.variants))
    rows, headline, breakdown, host = [], None, "", ""
    for shape in shapes:
        t, k, n = shape
        last = shape == shapes[-1]
        bf16 = measure("inductor", shape, None, kernels=False, host=last)
        results = {
            name: measure("quartet2", shape, opts, shape in profiled and name == first, last)
            for name, opts in args.variants.items()
        }
        if shape in profiled:
            header = ["kernel", "ms / step", "launches / step", "share"]
            table = markdown_table(header, results[first]["kernels"])
            breakdown += f"{first} kernels at T={t}, K={k}, N={n}:\n\n{table}\n\n"
        if last:
            for name, result in (("inductor", bf16), *results.items()):
                host += f"{name} host time per step at T={t}, K={k}, N={n}: "
                host += f"{result['host_ms']:.3f} ms. "
            header = ["Python function", "own ms / step", "calls / step"]
            host += f"\n\n{first}'s host time by function (under cProfile, which slows it):"
            host += f"\n\n{markdown_table(header, results[first]['hot'])}\n"
        flops = 6 * t * k * n
        for name, result in results.items():
            ratio = result["ms"] / bf16["ms"]
            rows.append(
                [
                    f"{t}x{k}x{n}",
                    name,
                    f"{bf16['ms']:.3f}",
                    f"{result['ms']:.3f}",
                    f"{ratio:.2f}x",
                    f"{bf16['graph_ms']:.3f}",
                    f"{result['graph_ms']:.3f}",
                    f"{result['graph_ms'] / bf16['graph_ms']:.2f}x",
                    f"{flops / bf16['ms'] / 1e9:.0f}",
                    f"{flops / result['ms'] / 1e9:.0f}",
                    f"{bf16['peak']:.2f}",
                    f"{result['peak']:.2f}",
                    f"{bf16['compile_s']:.1f}",
                    f"{result['compile_s']:.1f}",
                ]
            )
            print(rows[-1], flush=True)
            if shape == (16384, 4096, 4096) and name == first:
                headline = (
                    f"linear fwd+bwd quartet2/bf16 (T={t}, K={k}, N={n}): {ratio:.2f}x on {gpu}"
                )
    table = markdown_table(
        [
            "T x K x N",
            "quartet2 variant",
            "bf16 ms",
            "quartet2 ms",
            "ratio",
            "bf16 graph ms",
            "quartet2 graph ms",
            "graph ratio",
            "bf16 TFLOP/s",
            "quartet2 TFLOP/s",
            "bf16 peak GiB",
            "quartet2 peak GiB",
            "bf16 compile s",
            "quartet2 compile s",
        ],
        rows,
    )
    variants = ", ".join(f"{name}: options={opts}" for name, opts in args.variants.items())
    # Inductor settings that reach its compile workers only through the environment.
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")]
    command = shlex.join([*env, "python", "benchmarks/linear.py", *sys.argv[1:]])
    body = f"`{command}` on {gpu}, torch {torch.__version__}; medians of "
    body += "device-event timings (triton do_bench), launched from the host each step (ms) and "
    body += "replayed from a CUDA graph (graph ms; do_bench_cudagraph); quartet2 variants "
    body += f"({variants}) against one BF16 run per shape."
    body += f"\n\n{table}\n\n{breakdown}{host}\n"
    if headline:
        body += f"\n{headline}\n"
    write_section(args.section, body)
    print(table)
    print(breakdown)
    print(host)
    if headline:
        print(headline)


if __name__ == "__main__":
    main()
