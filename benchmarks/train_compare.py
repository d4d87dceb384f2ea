"""Train the demo Llama with bf16, quartet2 and sr-recipe on one GPU and compare the loss curves.

Each backend runs in its own process with the same seed, data order and learning-rate schedule
(``--steps`` sets its horizon), stopped by a wall-clock budget that includes compilation. The
first backend to run (quartet2, expected slowest) fixes how many steps the others run, so every
curve covers the same tokens; the table compares validation loss at the last step all reached.

Writes docs/loss_curves.png and the "## Training comparison" section of benchmarks/RESULTS.md.
Example (one ~9-minute device call):
``python benchmarks/train_compare.py --minutes-per-backend 2.5``; ``--corpus site-packages`` trains
on ~13x more text than the standard library, for runs long enough to overfit the latter.
Longer runs than one device call allows: train one backend per call (``--backends sr-recipe``,
same ``--steps``), bring the run folders back, then ``--collect`` builds the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quartet_demo.demo import PRESETS
from quartet_demo.run_log import read_log
from quartet_demo.sources import STDLIB
from quartet_demo.training import BACKENDS, LOG_NAME, SUMMARY_NAME
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Training comparison"
ENV_NAME = "machine.json"


@dataclass
class Run:
    """One backend's outcome: its validation curve (step -> (tokens, loss)), throughput and the
    corpus its log names (``corpus_*`` fields of log.csv's header; empty in older logs)."""

    backend: str
    val: dict[int, tuple[int, float]]
    tokens_per_s: float
    error: str | None = None
    corpus: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument(
        "--backends", nargs="+", choices=list(BACKENDS), default=["quartet2", "sr-recipe", "bf16"]
    )
    parser.add_argument(
        "--minutes-per-backend",
        type=float,
        default=2.5,
        help="wall-clock budget of each run, compilation included",
    )
    parser.add_argument("--steps", type=int, help="schedule horizon (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus",
        default=STDLIB,
        help="the demo's --corpus: stdlib, site-packages, a directory or a quoted glob",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: read the runs already in --runs-dir (one per backend)",
    )
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "train_compare")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "loss_curves.png")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    return parser.parse_args(argv)


def run_backend(args: argparse.Namespace, backend: str, stop_step: int | None) -> Run:
    """Train one backend in a fresh process (own compile caches and GPU memory)."""
    out = args.runs_dir / backend
    command = [
        sys.executable,
        "-m",
        "quartet_demo",
        "--backend",
        backend,
        "--preset",
        args.preset,
        "--seed",
        str(args.seed),
        "--corpus",
        args.corpus,
        "--out",
        str(out),
        "--max-minutes",
        str(args.minutes_per_backend),
        "--save-every",
        "0",
        "--no-progress",
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--eval-every", args.eval_every),
        ("--stop-step", stop_step),
    ):
        if value is not None:
            command += [flag, str(value)]
    print("$", " ".join(command), flush=True)
    # Grace beyond the budget for start-up, the final evaluation and the checkpoint.
    timeout = 60 * args.minutes_per_backend + 120
    try:
        completed = subprocess.run(
            command, cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Run(backend, {}, math.nan, error=f"killed after {timeout:.0f}s")
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        print(completed.stderr[-4000:], file=sys.stderr)
        return Run(backend, {}, math.nan, error=f"exit {completed.returncode}: {tail[0]}")
    (out / ENV_NAME).write_text(json.dumps(machine()) + "\n")
    return read_run(out, backend)


def machine() -> dict[str, str]:
    """What the table names as the run's machine: the GPU and the torch build."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "torch": torch.__version__}


def read_run(out: Path, backend: str) -> Run:
    """A finished run from its folder: the CSV log and the summary the demo writes."""
    if not (out / SUMMARY_NAME).exists():
        return Run(backend, {}, math.nan, error=f"no {SUMMARY_NAME} in {out}")
    summary = json.loads((out / SUMMARY_NAME).read_text())
    log = read_log(out / LOG_NAME)
    val = {
        int(row["step"]): (int(row["tokens"]), float(row["val_loss"]))
        for row in log.rows
        if row["val_loss"]
    }
    return Run(backend, val, summary["tokens_per_s"], corpus=log.metadata)


def common_step(runs: list[Run]) -> int | None:
    """The last step at which every successful run has a validation loss."""
    curves = [set(run.val) for run in runs if run.error is None]
    shared = set.intersection(*curves) if curves else set()
    return max(shared, default=None)


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.val:
            steps = sorted(run.val)
            ax.plot(
                [run.val[s][0] / 1e6 for s in steps],
                [run.val[s][1] for s in steps],
                marker=".",
                label=run.backend,
            )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def results_section(runs: list[Run], args: argparse.Namespace, env: dict[str, str]) -> str:
    """Markdown for the RESULTS.md section: setup, table and the claim's verdict.

    Losses are compared at the last step every backend reached and, since a long run can go past
    the point where the model starts to overfit the corpus, at each backend's best validation
    loss up to that step.
    """
    step = common_step(runs)
    by_name = {run.backend: run for run in runs}
    tokens = next((run.val[step][0] for run in runs if step in run.val), None)

    def loss_at(name: str) -> float:
        run = by_name.get(name)
        return run.val[step][1] if run and step in run.val else math.nan

    def best(name: str) -> tuple[float, int | None]:
        run = by_name.get(name)
        seen = [(loss, s) for s, (_, loss) in run.val.items() if s <= step] if run else []
        return min(seen, default=(math.nan, None))

    bf16, bf16_best = loss_at("bf16"), best("bf16")[0]
    how = (
        f"--steps {args.steps} --minutes-per-backend {args.minutes_per_backend}` (one device "
        f"call per backend with `--backends NAME`, then `--collect`)"
        if args.collect
        else f"--minutes-per-backend {args.minutes_per_backend}`"
    )
    lines = [
        f"`python benchmarks/train_compare.py --preset {args.preset} {how} on {env['device']}, "
        f"torch {env['torch']}; seed {args.seed} for "
        f"every backend (same init, data order and LR schedule). Validation loss is compared at "
        f"step {step}, the last one all backends reached"
        + (f" ({tokens:,} tokens)" if tokens else "")
        + ", and at each backend's best validation loss up to that step."
        + corpus_sentence(runs),
        "",
        "| backend | val loss | gap to BF16 | best val loss (step) | gap to BF16's best "
        "| tokens/s | steps run | seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.error:
            lines.append(f"| {run.backend} | failed: {run.error} | | | | | | {args.seed} |")
            continue
        loss, (low, low_step) = loss_at(run.backend), best(run.backend)
        lines.append(
            f"| {run.backend} | {loss:.4f} | {_gap(loss, bf16)} | {low:.4f} ({low_step}) | "
            f"{_gap(low, bf16_best)} | {run.tokens_per_s:,.0f} | {max(run.val)} | {args.seed} |"
        )
    for label, value, reference in (
        (f"at step {step}", loss_at, bf16),
        ("at the best validation losses", lambda name: best(name)[0], bf16_best),
    ):
        gaps = {name: value(name) - reference for name in ("quartet2", "sr-recipe")}
        if not any(math.isnan(gap) for gap in gaps.values()):
            holds = gaps["quartet2"] < gaps["sr-recipe"]
            lines += [
                "",
                f"Claim \"quartet2's gap to BF16 is smaller than sr-recipe's\" {label}: "
                f"{'holds' if holds else 'does not hold'} ({gaps['quartet2']:+.4f} vs "
                f"{gaps['sr-recipe']:+.4f}); one seed, so differences of a few 1e-3 are noise.",
            ]
    image = os.path.relpath(args.plot.resolve(), args.results.resolve().parent)
    lines += ["", f"![validation loss vs tokens]({image})", ""]
    return "\n".join(lines)


def corpus_sentence(runs: list[Run]) -> str:
    """What the runs trained on, from their logs' headers; says so when their corpora differ."""
    logged = [run for run in runs if run.corpus]
    if not logged:
        return ""
    if len({run.corpus["corpus_sha256"] for run in logged}) > 1:
        each = ", ".join(
            f"{run.backend}: {run.corpus['corpus']} sha256 {run.corpus['corpus_sha256'][:12]}"
            for run in logged
        )
        return f" The runs trained on different corpora ({each}): their losses do not compare."
    corpus = logged[0].corpus
    return (
        f" Corpus `--corpus {corpus['corpus']}`: {int(corpus['corpus_files']):,} files, "
        f"{int(corpus['corpus_bytes']) / 1e6:,.0f} MB, sha256 {corpus['corpus_sha256'][:12]}."
    )


def _gap(loss: float, reference: float) -> str:
    gap = loss - reference
    return f"{gap:+.4f} ({100 * gap / reference:+.2f}%)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = machine()
    if args.collect:
        env = json.loads((args.runs_dir / args.backends[0] / ENV_NAME).read_text())
    elif env["device"] == "CPU":
        print("warning: no CUDA device; this comparison is meant for a GPU", file=sys.stderr)
    runs: list[Run] = []
    stop_step = None
    for backend in args.backends:
        if args.collect:
            run = read_run(args.runs_dir / backend, backend)
        else:
            run = run_backend(args, backend, stop_step)
        runs.append(run)
        if run.val:
            stop_step = min(max(run.val), stop_step or max(run.val))
        print(
            f"[{backend}] {run.error or f'{max(run.val)} steps, {run.tokens_per_s:,.0f} tok/s'}",
            flush=True,
        )
        # Written after every backend, so a run cut short still leaves its results behind.
        plot(runs, args.plot, f"{args.preset} preset, seed {args.seed}, {env['device']}")
        section = results_section(runs, args, env)
        write_section(SECTION, section, args.results)
    print(section)


if __name__ == "__main__":
    main()
