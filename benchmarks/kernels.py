"""Throughput of the quartet2 kernels on the GPU; writes "## Kernels" in benchmarks/RESULTS.md.

Quantizer ops, compiled as in a user's graph (Inductor inlines the kernels and fuses the small
tensor-scale arithmetic), with eager timings beside them: achieved GB/s counting the fewest
bytes the op must move (input read once; codes, scales and the bf16 unit values the GEMM
multiplies written once), next to the device's measured copy bandwidth (bytes read + written by
a 1 GiB device-to-device copy). A profile of the compiled ops then gives each kernel's own time
and bandwidth on the bytes it actually reads and writes (MS-EDEN's two passes exchange codes and
bf16 corrected scales through memory, so the op moves more than its fewest bytes).
GEMM: TFLOP/s (2*M*N*K) of the op (cuBLAS on the quantizers' units, tensor-scale epilogue) and
of the fused design (NVFP4 triples dequantized in registers), next to torch.mm in BF16 (cuBLAS).
Every op figure is the median of triton.testing.do_bench_cudagraph on random data; the ops run
in CUDA graphs, so their few small launches cost device time only, as inside a compiled graph.
Capturing also proves the ops make no host synchronisation.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph

from quartet_compile import nvfp4 as q
from quartet_compile import ops  # noqa: F401  (registers the ops)
from quartet_compile.kernels import gemm, quantize, rht_eden
from results import markdown_table, write_section

OPS = torch.ops.quartet2
QUANT_SHAPES = [(16384, 4096), (16384, 14336)]
GEMM_SIZES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 16384, 16384), (16384, 14336, 4096)]


def median_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def copy_gbps() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


def quantizer_cases(t: int, k: int):
    """(name, callable, fewest bytes moved, bytes each kernel moves) for an input [t, k]."""
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    signs = q.random_signs(device="cuda")
    seed = torch.tensor(1234, device="cuda")
    xq = OPS.quantize_fwd(x, amax, True)[:3]
    n = t * k
    triple = n // 2 + n // 16  # codes + scales of one NVFP4 tensor of n elements
    out = triple + 2 * n  # and its bf16 units
    # The EDEN data pass writes codes and bf16 corrected scales; the scale pass reads them back
    # and writes scales and units.
    scales_pass = n // 2 + n // 8 + n // 16 + 2 * n
    fwd = {"_quantize_rtn_kernel": x.nbytes + out}
    eden = {"_eden_data_kernel": x.nbytes + n // 2 + n // 8, "_eden_scales_kernel": scales_pass}
    yield "quantize_fwd (amax given)", lambda: OPS.quantize_fwd(x, amax, True), x.nbytes + out, fwd
    yield (
        "amax + quantize_fwd",
        lambda: OPS.quantize_fwd(x, x.abs().amax(), True),
        x.nbytes + out,
        fwd,
    )
    for transpose in (False, True):
        name = f"rht_eden eden{' transposed' if transpose else ''}"
        fn = lambda tr=transpose: OPS.rht_eden(x, signs, seed, tr, "eden")  # noqa: E731
        yield name, fn, x.nbytes + out, eden
    yield (
        "rht_eden sr transposed",
        lambda: OPS.rht_eden(x, signs, seed, True, "sr"),
        x.nbytes + out,
        {"_absmax_kernel": x.nbytes, "_sr_kernel": x.nbytes + out},
    )
    requant = {"_eden_data_kernel": triple + n // 2 + n // 8, "_eden_scales_kernel": scales_pass}
    yield "requant eden", lambda: OPS.requant(*xq, signs, seed, "eden"), triple + out, requant


def kernel_times(fn, calls: int = 20) -> dict[str, float]:
    """Mean device time (us) per call of each kernel ``fn`` launches, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total}


def kernel_rows(op: str, shape: str, fn, kernel_bytes: dict[str, int], copy: float):
    """One row per kernel of a compiled op: our kernels with their bytes and % of copy, the
    small Inductor and torch kernels (tensor scale, Hadamard matrix) by time only."""
    rows = []
    for name, us in sorted(kernel_times(fn).items(), key=lambda kv: -kv[1]):
        ours = [k for k in kernel_bytes if k in name]
        if ours:
            gbps = kernel_bytes[ours[0]] / us / 1e3
            row = [ours[0], f"{us:.1f}", f"{kernel_bytes[ours[0]] / 1e6:.0f}", f"{gbps:.0f}"]
            rows.append([op, shape, *row, f"{100 * gbps / copy:.0f}%"])
        else:
            rows.append([op, shape, name[:48], f"{us:.1f}", "", "", ""])
    return rows


def tile_sweep(t: int, k: int) -> list[list[str]]:
    """Time each candidate tile of the quantizers (module settings, read at launch)."""
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    signs = q.random_signs(device="cuda")
    seed = torch.tensor(1234, device="cuda")
    xq = OPS.quantize_fwd(x, amax, True)[:3]
    rows = []
    default = quantize.TILE
    for tile in [(4, 256, 2), (16, 256, 4), (2, 1024, 4), (4, 512, 4)]:
        quantize.TILE = tile
        rows.append(["quantize_fwd", str(tile), _us(lambda: OPS.quantize_fwd(x, amax, True))])
    quantize.TILE = default
    cases = {
        "x": lambda: OPS.rht_eden(x, signs, seed, True, "eden"),
        "nvfp4": lambda: OPS.requant(*xq, signs, seed, "eden"),
    }
    default = rht_eden.SCALE_ROWS
    for scale_rows in (16, 32, 64):
        rht_eden.SCALE_ROWS = scale_rows
        rows.append(["eden scale + units pass", f"rows {scale_rows}", _us(cases["x"])])
    rht_eden.SCALE_ROWS = default
    default = rht_eden.SCALE_COLS_FASTEST
    for cols_fastest in (False, True):
        rht_eden.SCALE_COLS_FASTEST = cols_fastest
        order = "column blocks fastest" if cols_fastest else "row tiles fastest"
        rows.append(["eden scale + units pass", order, _us(cases["x"])])
    rht_eden.SCALE_COLS_FASTEST = default
    for key, fn in cases.items():
        default = rht_eden.TILES[key]
        for tile in [(64, 8), (64, 4), (128, 8)]:
            rht_eden.TILES[key] = tile
            rows.append([f"eden data pass ({key})", str(tile), _us(fn)])
        rht_eden.TILES[key] = default
    return rows


def _us(fn) -> str:
    return f"{1000 * median_ms(fn):.0f}"


def gemm_row(m: int, n: int, k: int) -> list[str]:
    a = OPS.quantize_fwd(*_operand(m, k))
    b = OPS.quantize_fwd(*_operand(n, k))
    x, w = (torch.randn(s, k, device="cuda", dtype=torch.bfloat16) for s in (m, n))
    flops = 2 * m * n * k
    bf16 = flops / median_ms(lambda: torch.mm(x, w.T)) / 1e9
    row = [f"{m}x{n}x{k}", f"{bf16:.0f}"]
    # Compiled, as in a user's graph: Inductor fuses the op's epilogue into one pass (eager
    # PyTorch would run three).
    designs = {
        "op": lambda: OPS.gemm(a[3], a[2], b[3], b[2], torch.bfloat16),
        "fused": lambda: gemm.gemm_nvfp4(*a[:3], *b[:3], torch.bfloat16, "fused"),
    }
    for fn in designs.values():
        tflops = flops / median_ms(torch.compile(fn, dynamic=False)) / 1e9
        row += [f"{tflops:.0f} ({100 * tflops / bf16:.0f}%)"]
    return row


def _operand(rows: int, k: int):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    return x, x.float().abs().amax(), True


def main() -> None:
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy = copy_gbps()
    quant_rows, per_kernel = [], []
    for t, k in QUANT_SHAPES:
        for op, fn, nbytes, kernel_bytes in quantizer_cases(t, k):
            # Static shapes (every case is the same lambda: a second shape would otherwise be
            # recompiled with symbolic sizes), and symbolic sizes on purpose beside them.
            compiled = torch.compile(fn, dynamic=False)
            eager_ms, ms = median_ms(fn), median_ms(compiled)
            symbolic_ms = median_ms(torch.compile(fn, dynamic=True))
            gbps = nbytes / ms / 1e6
            shape = f"{t}x{k}"
            quant_rows.append(
                [op, shape, f"{1000 * eager_ms:.0f}", f"{1000 * ms:.0f}",
                 f"{1000 * symbolic_ms:.0f}", f"{gbps:.0f}", f"{100 * gbps / copy:.0f}%"]
            )  # fmt: skip
            print(quant_rows[-1], flush=True)
            if not op.startswith("amax"):
                per_kernel += kernel_rows(op, shape, compiled, kernel_bytes, copy)
    for row in per_kernel:
        print(row, flush=True)
    sweep_rows = tile_sweep(*QUANT_SHAPES[0])
    for row in sweep_rows:
        print(row, flush=True)
    gemm_rows = []
    for size in GEMM_SIZES:
        gemm_rows.append(gemm_row(*size))
        print(gemm_rows[-1], flush=True)
    body = "\n\n".join(
        [
            f"{name}, torch {torch.__version__}; medians of CUDA-graph replays, random inputs. "
            f"Device copy bandwidth (read + write): **{copy:.0f} GB/s**.",
            "Quantizer ops: us eager, compiled, and compiled with symbolic sizes "
            "(`dynamic=True`); GB/s and % of copy for the compiled op, on the fewest bytes it "
            "must move:",
            markdown_table(
                ["op", "shape", "us eager", "us compiled", "us symbolic", "GB/s", "% of copy"],
                quant_rows,
            ),
            "Each kernel of the compiled ops (torch.profiler, mean of 20 calls): its own time, "
            "the bytes it reads and writes, and its bandwidth:",
            markdown_table(
                ["op", "shape", "kernel", "us", "MB moved", "GB/s", "% of copy"], per_kernel
            ),
            f"Tile sweep at {QUANT_SHAPES[0][0]}x{QUANT_SHAPES[0][1]} (us per eager op call; "
            "the transposed rht_eden for plain inputs, requant for NVFP4 ones):",
            markdown_table(["kernel", "setting", "us"], sweep_rows),
            "NVFP4 GEMM under torch.compile (bf16 output, tensor-scale epilogue included), "
            "TFLOP/s and % of torch.mm BF16. The op multiplies the units its quantizers wrote "
            "(their cost is in the table above); the fused design reads NVFP4 triples:",
            markdown_table(["MxNxK", "torch.mm bf16", "op (units)", "fused design"], gemm_rows),
        ]
    )
    print(body)
    write_section("Kernels", body)


if __name__ == "__main__":
    main()
