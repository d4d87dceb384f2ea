"""Quantization error of every quantizer of docs/numerics.md on Gaussian and heavy-tailed data.

Prints a markdown table (relative MSE and bias of R^T deq(Q(x R)) over many seeds), writes it
into benchmarks/RESULTS.md and ends with ``MS-EDEN vs SR MSE ratio: X.XX`` (rotated Gaussian
data, both with the same 128-block rotation). Runs on the CPU in well under a minute.
"""

from __future__ import annotations

import argparse

import torch

from quartet_compile import nvfp4
from results import markdown_table, write_section

QUANTIZERS = [
    ("RTN (six only)", "rtn", False),
    ("RTN four-over-six", "four_over_six", False),
    ("SR", "sr", False),
    ("SR + rotation", "sr", True),
    ("MS-EDEN (rotated)", "eden", True),
]


def make_data(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g)
    # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3).
    chi2 = torch.randn(3, rows, cols, generator=g).pow(2).sum(0)
    return torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()


def measure(x: torch.Tensor, method: str, rotated: bool, draws: int) -> tuple[float, float, float]:
    """Relative MSE, relative bias |mean error| / |x|, and bias ratio n|mean err|^2 / E|err|^2."""
    errors = torch.stack(
        [
            nvfp4.roundtrip(x, method, torch.Generator().manual_seed(10_000 + s), rotated) - x
            for s in range(draws)
        ]
    )
    mse = errors.pow(2).sum((1, 2)).mean()
    mean_error = errors.mean(0)
    norm2 = x.pow(2).sum()
    return (
        (mse / norm2).item(),
        (mean_error.pow(2).sum() / norm2).sqrt().item(),
        (draws * mean_error.pow(2).sum() / mse).item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--draws", type=int, default=200, help="seeds per quantizer")
    args = parser.parse_args()

    rows, mse = [], {}
    for data in ("gaussian", "student-t(3)"):
        x = make_data(data.split("(")[0], args.rows, args.cols, seed=0)
        for name, method, rotated in QUANTIZERS:
            rel_mse, rel_bias, ratio = measure(x, method, rotated, args.draws)
            mse[data, name] = rel_mse
            rows.append([data, name, f"{rel_mse:.5f}", f"{rel_bias:.5f}", f"{ratio:.1f}"])
    ratio = mse["gaussian", "SR + rotation"] / mse["gaussian", "MS-EDEN (rotated)"]
    table = markdown_table(
        ["data", "quantizer", "relative MSE", "relative bias", f"bias ratio (n={args.draws})"],
        rows,
    )
    summary = f"MS-EDEN vs SR MSE ratio: {ratio:.2f}"
    body = (
        f"`python benchmarks/quant_error.py` (x: {args.rows}x{args.cols}, {args.draws} seeds "
        f"each; CPU, float32 reference). Relative MSE = E|err|^2/|x|^2; relative bias = "
        f"|mean err|/|x|; bias ratio = n|mean err|^2/E|err|^2, about 1 for an unbiased "
        f"quantizer and about n for a biased one.\n\n{table}\n\n{summary}"
    )
    write_section("Quantization error", body)
    print(table)
    print(summary)


if __name__ == "__main__":
    main()
