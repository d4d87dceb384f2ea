"""Throughput of the quartet2 kernels on the GPU; writes "## Kernels" in benchmarks/RESULTS.md.

Quantizers: achieved GB/s (fewest bytes: input read once; codes, scales and the bf16 unit values
the GEMM multiplies written once) next to the device's measured copy bandwidth (bytes read +
written by a 1 GiB device-to-device copy).
GEMM: TFLOP/s (2*M*N*K) of the op (cuBLAS on the quantizers' units, tensor-scale epilogue) and
of the fused design (NVFP4 triples dequantized in registers), next to torch.mm in BF16 (cuBLAS).
Every figure is the median of triton.testing.do_bench_cudagraph on random data; the ops run in
CUDA graphs, so their few small torch launches (tensor scale, partial maxima) cost device time
only, as they do inside a compiled graph. Capturing also proves the ops make no host
synchronisation.
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
    """(name, callable, fewest bytes moved) for one activation-sized input [t, k]."""
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    signs = q.random_signs(device="cuda")
    seed = torch.tensor(1234, device="cuda")
    xq = OPS.quantize_fwd(x, amax, True)[:3]
    triple = t * k // 2 + t * k // 16  # codes + scales of one NVFP4 tensor of t*k elements
    out = triple + 2 * t * k  # and its bf16 units
    yield "quantize_fwd (amax given)", lambda: OPS.quantize_fwd(x, amax, True), x.nbytes + out
    yield (
        "amax + quantize_fwd",
        lambda: OPS.quantize_fwd(x, x.abs().amax(), True),
        x.nbytes + out,
    )
    for transpose in (False, True):
        name = f"rht_eden eden{' transposed' if transpose else ''}"
        yield name, lambda tr=transpose: OPS.rht_eden(x, signs, seed, tr, "eden"), x.nbytes + out
    yield "rht_eden sr transposed", lambda: OPS.rht_eden(x, signs, seed, True, "sr"), x.nbytes + out
    yield "requant eden", lambda: OPS.requant(*xq, signs, seed, "eden"), triple + out


def tile_sweep(t: int, k: int) -> list[list[str]]:
    """Time each candidate tile of the quantizers (module settings, read at launch)."""
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    signs = q.random_signs(device="cuda")
    seed = torch.tensor(1234, device="cuda")
    xq = OPS.quantize_fwd(x, amax, True)[:3]
    rows = []
    default = quantize.TILE
    for tile in [(8, 256, 4), (4, 256, 2), (16, 256, 4), (2, 1024, 4), (8, 512, 8), (4, 512, 4)]:
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
        rows.append(["eden scale + units pass", f"({scale_rows},)", _us(cases["x"])])
    rht_eden.SCALE_ROWS = default
    for key, fn in cases.items():
        default = rht_eden.TILES[key]
        for tile in [(64, 8), (64, 4), (128, 8), (128, 16), (32, 8)]:
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
        tflops = flops / median_ms(torch.compile(fn)) / 1e9
        row += [f"{tflops:.0f} ({100 * tflops / bf16:.0f}%)"]
    return row


def _operand(rows: int, k: int):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    return x, x.float().abs().amax(), True


def main() -> None:
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy = copy_gbps()
    quant_rows = []
    for t, k in QUANT_SHAPES:
        for kernel, fn, nbytes in quantizer_cases(t, k):
            ms = median_ms(fn)
            gbps = nbytes / ms / 1e6
            quant_rows.append(
                [kernel, f"{t}x{k}", f"{1000 * ms:.0f}", f"{gbps:.0f}", f"{100 * gbps / copy:.0f}%"]
            )
            print(quant_rows[-1], flush=True)
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
            markdown_table(["op", "shape", "us", "GB/s", "% of copy"], quant_rows),
            f"Tile sweep at {QUANT_SHAPES[0][0]}x{QUANT_SHAPES[0][1]} (us per op call; the "
            "transposed rht_eden for plain inputs, requant for NVFP4 ones):",
            markdown_table(["kernel", "tile (rows, [cols,] warps)", "us"], sweep_rows),
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
