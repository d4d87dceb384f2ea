"""``python -m quartet_demo``: train a small Llama on Python sources with one backend.

The one line that changes between backends is the ``torch.compile`` call (see
``quartet_demo.training.BACKENDS``). ``--preset tiny`` runs on a laptop CPU in about a minute;
``small`` (~34M parameters) and ``medium`` (~85M) are for a GPU. Several GPUs:
``torchrun --nproc-per-node 2 -m quartet_demo --distributed ddp`` (or ``fsdp2``). The text is the
standard library's sources unless ``--corpus`` names a larger one (``site-packages``, a directory
or a glob: :mod:`quartet_demo.sources`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from quartet_demo import distributed
from quartet_demo.models.llama import LlamaConfig
from quartet_demo.training import BACKENDS, TrainConfig, train

PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(),  # the defaults: 0.5M parameters, a laptop CPU
    "small": TrainConfig(
        model=LlamaConfig(d_model=512, n_layers=10, n_heads=8, ffn_hidden=1536, max_seq_len=512),
        steps=2000,
        batch_size=64,
        seq_len=512,
        lr=2e-3,
        warmup_fraction=0.05,
        eval_every=100,
        save_every=500,
        eval_batches=16,
    ),
    "medium": TrainConfig(
        model=LlamaConfig(d_model=768, n_layers=12, n_heads=12, ffn_hidden=2048, max_seq_len=1024),
        steps=4000,
        batch_size=32,
        seq_len=1024,
        lr=1e-3,
        warmup_fraction=0.05,
        eval_every=200,
        save_every=1000,
        eval_batches=16,
    ),
}

# Command-line flags that override a preset's field of the same name.
_OVERRIDES = (
    ("steps", int, "total steps; the learning-rate schedule spans them"),
    ("batch_size", int, "sequences per step"),
    ("seq_len", int, "tokens per sequence (at most the preset's max_seq_len)"),
    ("lr", float, "peak learning rate"),
    ("seed", int, "seed of the initialization, data order and backward randomness"),
    ("eval_every", int, "validation loss every N steps (and at the last one)"),
    ("save_every", int, "checkpoint every N steps (0: only at the end)"),
    ("stop_step", int, "stop after this step, keeping the schedule of --steps (resume later)"),
    ("max_minutes", float, "stop once this session has run this long (compilation included)"),
    ("device", str, "cpu, cuda, cuda:1, ... (default: cuda if available)"),
    (
        "corpus",
        str,
        "training text: stdlib (the Python standard library's sources), site-packages (every "
        ".py file of this interpreter's site-packages), a directory (its .py files) or a quoted "
        "glob ('/data/**/*.txt')",
    ),
    ("val_fraction", float, "share of the corpus' files held out for validation"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quartet-demo",
        description="Train a small Llama on Python sources with one torch.compile backend.",
    )
    parser.add_argument("--backend", choices=list(BACKENDS), default="bf16", help="default: bf16")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny", help="default: tiny")
    for name, kind, help_text in _OVERRIDES:
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, help=f"{help_text}; default: the preset's"
        )
    parser.add_argument(
        "--distributed",
        choices=distributed.MODES,
        default="none",
        help="data parallelism under torchrun: DDP, or FSDP2 (fully_shard); --batch-size is the "
        "global batch, split over the ranks (default: none)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: runs/PRESET-BACKEND)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with every given flag applied."""
    overrides = {
        name: getattr(args, name) for name, _, _ in _OVERRIDES if getattr(args, name) is not None
    }
    return dataclasses.replace(
        PRESETS[args.preset],
        backend=args.backend,
        out_dir=args.out or Path("runs") / f"{args.preset}-{args.backend}",
        resume=args.resume,
        progress=not args.no_progress,
        distributed=args.distributed,
        **overrides,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the demo from command-line arguments and print the summary line."""
    config = config_from_args(parse_args(argv))
    result = train(config)
    if distributed.is_main_process():
        print(f"[{config.backend}] {result.summary()}  (log: {config.out_dir}/log.csv)")
