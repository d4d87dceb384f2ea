"""One linear layer's forward+backward: torch.compile BF16 (Inductor) vs backend="quartet2".

Run on the GPU: median device-event time after warm-up, launched as a training loop launches it
and as CUDA-graph replays (the device time alone: at small shapes the difference is the host's
launch overhead, which ``mode="reduce-overhead"`` removes), TFLOP/s (6*T*K*N per fwd+bwd), peak
memory, compile time, a torch.profiler breakdown of quartet2's kernels, and at the last shape
the host's time per step with the Python functions it is spent in (cProfile). Writes the table to
benchmarks/RESULTS.md ("Linear layer") with the headline line
``linear fwd+bwd quartet2/bf16 (T=16384, K=4096, N=4096): X.XXx on <GPU>``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from results import markdown_table, write_section

SHAPES = [(16384, 4096, 4096), (16384, 4096, 14336), (16384, 14336, 4096), (8192, 2048, 2048)]


def make_step(backend: str, t: int, k: int, n: int, device: str):
    """A compiled fwd+bwd closure on fresh random inputs, and its first-call (compile) time."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(layer, backend=backend)
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
    """Top CUDA kernels of one fwd+bwd by device time (gradients reset as in the timing, so no
    accumulation kernel shows up)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for t in grads:
                t.grad = None
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1.0
    return [
        [
            e.key[:90],
            f"{e.device_time_total / 5 / 1000:.3f}",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    gpu = torch.cuda.get_device_name()
    rows, headline, breakdown, host = [], None, "", ""
    for t, k, n in shapes:
        result = {}
        for backend in ("inductor", "quartet2"):
            step, compile_s, grads = make_step(backend, t, k, n, "cuda")
            ms = do_bench(step, warmup=100, rep=500, grad_to_none=grads, return_mode="median")
            result[backend] = (ms, compile_s, peak_memory(step), graph_replay_ms(step, grads))
            if backend == "quartet2" and (t, k, n) == shapes[0]:
                top = kernel_breakdown(step, grads)
                table = markdown_table(["kernel", "ms / step", "share"], top)
                breakdown = f"quartet2 kernels at T={t}, K={k}, N={n}:\n\n{table}"
            if (t, k, n) == shapes[-1]:
                host_ms, hot = host_profile(step, grads)
                host += f"{backend} host time per step at T={t}, K={k}, N={n}: {host_ms:.3f} ms. "
                if backend == "quartet2":
                    header = ["Python function", "own ms / step", "calls / step"]
                    host += "\n\nquartet2's host time by function (under cProfile, which slows "
                    host += f"it):\n\n{markdown_table(header, hot)}\n"
        ratio = result["quartet2"][0] / result["inductor"][0]
        flops = 6 * t * k * n
        rows.append(
            [
                f"{t}x{k}x{n}",
                f"{result['inductor'][0]:.3f}",
                f"{result['quartet2'][0]:.3f}",
                f"{ratio:.2f}x",
                f"{result['inductor'][3]:.3f}",
                f"{result['quartet2'][3]:.3f}",
                f"{result['quartet2'][3] / result['inductor'][3]:.2f}x",
                f"{flops / result['inductor'][0] / 1e9:.0f}",
                f"{flops / result['quartet2'][0] / 1e9:.0f}",
                f"{result['inductor'][2]:.2f}",
                f"{result['quartet2'][2]:.2f}",
                f"{result['inductor'][1]:.1f}",
                f"{result['quartet2'][1]:.1f}",
            ]
        )
        if (t, k, n) == (16384, 4096, 4096):
            headline = f"linear fwd+bwd quartet2/bf16 (T={t}, K={k}, N={n}): {ratio:.2f}x on {gpu}"
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "T x K x N",
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
    body = f"`python benchmarks/linear.py` on {gpu}, torch {torch.__version__}; medians of "
    body += "device-event timings (triton do_bench), launched from the host each step (ms) and "
    body += "replayed from a CUDA graph (graph ms; do_bench_cudagraph)."
    body += f"\n\n{table}\n\n{breakdown}\n\n{host}\n"
    if headline:
        body += f"\n{headline}\n"
    write_section("Linear layer", body)
    print(table)
    print(breakdown)
    print(host)
    if headline:
        print(headline)


if __name__ == "__main__":
    main()
