"""Paired, seeded comparison of bf16, quartet2 and sr-recipe: the demo Llama's loss curves.

Each (seed, backend) trains in its own process. For one seed every backend shares the
initialisation, the data order and the learning-rate schedule (``--steps`` sets its horizon), so
each NVFP4 recipe's gap to BF16 is measured pairwise, seed by seed; the seeds then give the
spread. A seed's runs are compared at the last step all of them evaluated, and at each run's best
validation loss up to that step (a long run can outlast a small corpus).

Writes docs/loss_curves.png (the seeds' spread as bands, and the paired gaps) and the
"## Training comparison" section of benchmarks/RESULTS.md, which carries the line
``val-loss gap ratio quartet2/sr-recipe (N seeds, paired): X.XX +- Y.YY``.

Examples:

- one seed, the three backends at once on one GPU, 100M tokens of site-packages each:
  ``python benchmarks/train_compare.py --corpus site-packages --steps 3052 --seeds 0 --jobs 3``
- runs spread over device calls: bring each call's ``--runs-dir`` back (a run keeps only
  ``log.csv``, ``summary.json`` and ``machine.json``; its checkpoint is deleted), gather them
  under one folder as ``seedN/BACKEND/``, then
  ``python benchmarks/train_compare.py --collect --runs-dir benchmarks/data/train_compare``.
- a quick look: ``--minutes-per-backend 2.5`` stops each run by wall clock; with ``--jobs 1`` the
  first backend to run (quartet2, the slowest) fixes how many steps the others run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quartet_demo.demo import PRESETS
from quartet_demo.run_log import read_log
from quartet_demo.sources import STDLIB
from quartet_demo.training import BACKENDS, CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME
from results import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Training comparison"
ENV_NAME = "machine.json"
REFERENCE = "bf16"
RECIPES = ("quartet2", "sr-recipe")  # the NVFP4 recipes whose gaps to the reference compare


@dataclass
class Run:
    """One (seed, backend) outcome: its validation curve (step -> (tokens, loss)), throughput,
    the corpus its log names (``corpus_*`` fields of log.csv's header; empty in older logs) and
    the machine it ran on (its ``machine.json``; empty for a failed run)."""

    backend: str
    val: dict[int, tuple[int, float]]
    tokens_per_s: float
    error: str | None = None
    corpus: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    machine: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Paired:
    """One seed's backends at the last step all of them evaluated (``final``) and at each one's
    lowest validation loss up to that step (``best``)."""

    seed: int
    step: int
    tokens: int
    final: dict[str, float]
    best: dict[str, float]

    def gap(self, backend: str, best: bool = False) -> float:
        losses = self.best if best else self.final
        return losses[backend] - losses[REFERENCE]

    def ratio(self, best: bool = False) -> float:
        """gap(quartet2) / gap(sr-recipe): below 1 when quartet2 is the closer to BF16 (NaN
        when sr-recipe's gap is exactly 0)."""
        denominator = self.gap(RECIPES[1], best)
        return self.gap(RECIPES[0], best) / denominator if denominator else math.nan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument(
        "--backends", nargs="+", choices=list(BACKENDS), default=[*RECIPES, REFERENCE]
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 (--collect: every seedN)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs training at once (on one GPU they share it)"
    )
    parser.add_argument(
        "--minutes-per-backend",
        type=float,
        help="wall-clock budget of each run, compilation included (default: run all --steps)",
    )
    parser.add_argument("--steps", type=int, help="schedule horizon (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="default: the preset's")
    parser.add_argument(
        "--corpus",
        default=STDLIB,
        help="the demo's --corpus: stdlib, site-packages, a directory or a quoted glob",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: read the runs already in --runs-dir (seedN/BACKEND/)",
    )
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "train_compare")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "loss_curves.png")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    return parser.parse_args(argv)


def run_dir(runs_dir: Path, seed: int, backend: str) -> Path:
    return runs_dir / f"seed{seed}" / backend


def run_backend(args: argparse.Namespace, seed: int, backend: str, stop_step: int | None) -> Run:
    """Train one backend in a fresh process (own compile caches and GPU memory)."""
    out = run_dir(args.runs_dir, seed, backend)
    command = [
        *(sys.executable, "-m", "quartet_demo", "--backend", backend, "--preset", args.preset),
        *("--seed", str(seed), "--corpus", args.corpus, "--out", str(out)),
        *("--save-every", "0", "--no-progress"),
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--eval-every", args.eval_every),
        ("--stop-step", stop_step),
        ("--max-minutes", args.minutes_per_backend),
    ):
        if value is not None:
            command += [flag, str(value)]
    print("$", " ".join(command), flush=True)
    try:
        completed = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    finally:
        # The comparison never resumes: keep the log, not ~0.4 GB of weights and moments.
        (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        print(completed.stderr[-4000:], file=sys.stderr)
        error = f"exit {completed.returncode}: {tail[0]}"
        return Run(backend, {}, math.nan, error=error, seed=seed)
    (out / ENV_NAME).write_text(json.dumps(machine(args.jobs)) + "\n")
    return read_run(out, backend, seed)


def train_seed(args: argparse.Namespace, seed: int) -> list[Run]:
    """One seed's backends: one after the other (the first one's last step caps the others'
    under a time budget), or ``--jobs`` at once."""
    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            return list(pool.map(lambda b: run_backend(args, seed, b, None), args.backends))
    runs: list[Run] = []
    stop_step = None
    for backend in args.backends:
        runs.append(run_backend(args, seed, backend, stop_step))
        if runs[-1].val and args.minutes_per_backend is not None:
            stop_step = min(max(runs[-1].val), stop_step or max(runs[-1].val))
    return runs


def machine(jobs: int) -> dict[str, str | int]:
    """What the table names as the run's machine: the GPU, the torch build, and how many runs
    shared it (their tokens/s then says little)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "torch": torch.__version__, "concurrent_runs": jobs}


def read_run(out: Path, backend: str, seed: int) -> Run:
    """A finished run from its folder: the CSV log and the summary the demo writes, and the
    machine.json that run_backend writes beside them."""
    if not (out / SUMMARY_NAME).exists():
        return Run(backend, {}, math.nan, error=f"no {SUMMARY_NAME} in {out}", seed=seed)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    env = json.loads((out / ENV_NAME).read_text()) if (out / ENV_NAME).exists() else {}
    log = read_log(out / LOG_NAME)
    val = {
        int(row["step"]): (int(row["tokens"]), float(row["val_loss"]))
        for row in log.rows
        if row["val_loss"]
    }
    return Run(backend, val, summary["tokens_per_s"], corpus=log.metadata, seed=seed, machine=env)


def collected_seeds(runs_dir: Path) -> list[int]:
    """The seeds that have a ``seedN`` folder under ``runs_dir``."""
    names = [path.name for path in runs_dir.glob("seed*") if path.is_dir()]
    return sorted(int(name[4:]) for name in names if name[4:].isdigit())


def common_step(runs: list[Run]) -> int | None:
    """The last step at which every successful run has a validation loss."""
    curves = [set(run.val) for run in runs if run.error is None]
    shared = set.intersection(*curves) if curves else set()
    return max(shared, default=None)


def pair(runs: list[Run]) -> Paired | None:
    """One seed's comparison, or None when the reference or a recipe has no curve."""
    by_name = {run.backend: run for run in runs if run.error is None and run.val}
    if not {REFERENCE, *RECIPES} <= set(by_name):
        return None
    step = common_step(list(by_name.values()))
    if step is None:
        return None
    final = {name: run.val[step][1] for name, run in by_name.items()}
    best = {
        name: min(loss for s, (_, loss) in run.val.items() if s <= step)
        for name, run in by_name.items()
    }
    return Paired(runs[0].seed, step, by_name[REFERENCE].val[step][0], final, best)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def ratio_line(pairs: list[Paired]) -> str:
    """The headline: mean +- std of the per-seed ratios of the final gaps."""
    mean, std = mean_std([p.ratio() for p in pairs])
    return (
        f"val-loss gap ratio {RECIPES[0]}/{RECIPES[1]} ({len(pairs)} seeds, paired): "
        f"{mean:.2f} +- {std:.2f}"
    )


def results_section(runs: list[Run], args: argparse.Namespace, env: dict) -> str:
    """Markdown for the RESULTS.md section: setup, per-seed table, mean +- std, verdict."""
    seeds = sorted({run.seed for run in runs})
    pairs = [p for seed in seeds if (p := pair([r for r in runs if r.seed == seed]))]
    shared = env.get("concurrent_runs", 1)
    corpus = next((run.corpus["corpus"] for run in runs if run.corpus), args.corpus)
    flags = f"--preset {args.preset} --corpus {corpus}"
    flags += (f" --steps {args.steps}" if args.steps else "") + f" --jobs {shared}"
    lines = [
        f"`python benchmarks/train_compare.py {flags} --seeds {' '.join(map(str, seeds))}` on "
        f"{env['device']}, torch {env['torch']}"
        + (f" ({shared} runs at a time on the one GPU)" if shared > 1 else "")
        + ". For each seed every backend shares the initialisation, data order and learning-rate "
        "schedule, so the gaps to BF16 are paired. Validation loss at the last step a seed's "
        "runs all reached (final) and each run's lowest up to it (best)." + corpus_sentence(runs),
        "",
    ]
    for run in runs:
        if run.error:
            lines.append(f"- seed {run.seed} {run.backend}: failed: {run.error}")
    if not pairs:
        return "\n".join([*lines, "", "No seed has all three backends: nothing to compare."])
    lines.append(per_seed_table(pairs))
    lines += ["", summary_table(pairs), "", ratio_line(pairs), "", verdict(pairs)]
    finished = [run for run in runs if not run.error]
    speeds = ", ".join(
        f"{b} {statistics.fmean(r.tokens_per_s for r in finished if r.backend == b):,.0f}"
        for b in args.backends
        if any(r.backend == b for r in finished)
    )
    note = f" ({shared} runs sharing the GPU, so not a speed measurement)" if shared > 1 else ""
    lines += ["", f"Training throughput, tokens/s, mean over seeds{note}: {speeds}."]
    image = os.path.relpath(args.plot.resolve(), args.results.resolve().parent)
    lines += ["", f"![validation loss vs tokens, and the paired gaps to BF16]({image})", ""]
    return "\n".join(lines)


def per_seed_table(pairs: list[Paired]) -> str:
    header = ["seed", "step (tokens)", f"{REFERENCE} val"]
    header += [f"{name} gap" for name in RECIPES] + ["ratio"]
    header += [f"best {REFERENCE}"] + [f"best {name} gap" for name in RECIPES] + ["best ratio"]
    rows = []
    for p in pairs:
        row = [str(p.seed), f"{p.step} ({p.tokens / 1e6:.1f}M)", f"{p.final[REFERENCE]:.4f}"]
        row += [_gap(p.gap(name), p.final[REFERENCE]) for name in RECIPES] + [f"{p.ratio():.2f}"]
        row += [f"{p.best[REFERENCE]:.4f}"]
        row += [_gap(p.gap(name, True), p.best[REFERENCE]) for name in RECIPES]
        rows.append([*row, f"{p.ratio(True):.2f}"])
    return markdown_table(header, rows)


def summary_table(pairs: list[Paired]) -> str:
    """Mean +- std over seeds of each recipe's gap, and of the per-seed ratio."""
    rows = []
    for label, best in (("final", False), ("best", True)):
        row = [label]
        for name in RECIPES:
            mean, std = mean_std([p.gap(name, best) for p in pairs])
            reference = statistics.fmean((p.best if best else p.final)[REFERENCE] for p in pairs)
            row.append(f"{mean:+.4f} +- {std:.4f} ({100 * mean / reference:+.2f}%)")
        mean, std = mean_std([p.ratio(best) for p in pairs])
        rows.append([*row, f"{mean:.2f} +- {std:.2f}"])
    header = ["val loss", *(f"{name} gap to {REFERENCE}" for name in RECIPES), "ratio"]
    return markdown_table(header, rows)


def verdict(pairs: list[Paired]) -> str:
    """Whether quartet2 was the closer to BF16, seed by seed, in words."""
    closer = sum(abs(p.gap(RECIPES[0])) < abs(p.gap(RECIPES[1])) for p in pairs)
    closer_best = sum(abs(p.gap(RECIPES[0], True)) < abs(p.gap(RECIPES[1], True)) for p in pairs)
    sentence = (
        f"{RECIPES[0]} ended closer to {REFERENCE} than {RECIPES[1]} in {closer} of {len(pairs)} "
        f"seeds (final) and {closer_best} of {len(pairs)} (best)."
    )
    if len(pairs) < 2:
        return sentence
    # Whether the margin is clear of seed noise: a paired t statistic on the final gaps.
    mean, std = mean_std([p.gap(RECIPES[1]) - p.gap(RECIPES[0]) for p in pairs])
    t = mean / (std / math.sqrt(len(pairs))) if std > 0 else math.inf
    return (
        f"{sentence} Paired difference of the final gaps, {RECIPES[1]} - {RECIPES[0]}: "
        f"{mean:+.4f} +- {std:.4f} (mean +- std over seeds; t = {t:.1f} with "
        f"{len(pairs) - 1} degrees of freedom)."
    )


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


def plot(runs: list[Run], path: Path, title: str) -> None:
    """Left: each backend's validation loss, mean over seeds with the min-max band. Right: the
    paired gaps to BF16, mean over seeds with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(11, 4.5))
    seeds = sorted({run.seed for run in runs})
    ok = [run for run in runs if run.error is None and run.val]
    steps = sorted(set.intersection(*(set(run.val) for run in ok))) if ok else []
    tokens = [ok[0].val[s][0] / 1e6 for s in steps] if ok else []

    def band(axis, name: str, value: Callable[[Run, int], float], label: str) -> list[float]:
        per_seed = [[value(r, s) for s in steps] for r in ok if r.backend == name]
        if not per_seed:
            return []
        columns = list(zip(*per_seed, strict=True))
        mean = [statistics.fmean(c) for c in columns]
        (line,) = axis.plot(tokens, mean, label=f"{label} ({len(per_seed)} seeds)")
        low, high = [min(c) for c in columns], [max(c) for c in columns]
        axis.fill_between(tokens, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        return mean

    backends = dict.fromkeys(run.backend for run in ok)
    _zoom(curves, [band(curves, name, lambda r, s: r.val[s][1], name) for name in backends])
    reference = {(r.seed, s): r.val[s][1] for r in ok if r.backend == REFERENCE for s in steps}
    gap_means = [
        band(gaps, name, lambda r, s: r.val[s][1] - reference.get((r.seed, s), math.nan), name)
        for name in RECIPES
    ]
    _zoom(gaps, [*gap_means, [0.0]])
    gaps.axhline(0, color="black", linewidth=0.8)
    curves.set_ylabel("validation loss (nats/byte)")
    gaps.set_ylabel(f"validation loss - {REFERENCE}'s, same seed")
    for axis in (curves, gaps):
        axis.set_xlabel("training tokens (millions)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{title}, seeds {', '.join(map(str, seeds))}; bands: min-max over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _zoom(axis, means: list[list[float]]) -> None:
    """Y limits from the curves past their first tenth, where early training would flatten the
    part where the backends differ."""
    tail = [m for mean in means for m in mean[len(mean) // 10 :] if not math.isnan(m)]
    if tail:
        margin = 0.1 * (max(tail) - min(tail)) or 0.01
        axis.set_ylim(min(tail) - margin, max(tail) + margin)


def _gap(gap: float, reference: float) -> str:
    return f"{gap:+.4f} ({100 * gap / reference:+.2f}%)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seeds = args.seeds or (collected_seeds(args.runs_dir) if args.collect else [0])
    if not seeds:
        sys.exit(f"--collect: no seedN folder in {args.runs_dir}")
    runs: list[Run] = []
    here = machine(args.jobs)
    if here["device"] == "CPU" and not args.collect:
        print("warning: no CUDA device; this comparison is meant for a GPU", file=sys.stderr)
    for seed in seeds:
        if args.collect:
            found = [read_run(run_dir(args.runs_dir, seed, b), b, seed) for b in args.backends]
        else:
            found = train_seed(args, seed)
        runs += found
        for run in found:
            done = f"{max(run.val)} steps, {run.tokens_per_s:,.0f} tok/s" if run.val else ""
            print(f"[seed {seed} {run.backend}] {run.error or done}", flush=True)
        # Written after every seed, so a call cut short still leaves its results behind.
        env = next((run.machine for run in runs if run.machine), here)
        plot(runs, args.plot, f"{args.preset} preset, {env['device']}")
        section = results_section(runs, args, env)
        write_section(SECTION, section, args.results)
    print(section)


if __name__ == "__main__":
    main()
