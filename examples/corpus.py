"""Training text that every machine has offline: the CPython standard library's own sources.

Tokens are bytes (vocabulary 256). Files are assigned to train or validation by a hash of their
path relative to the stdlib root, so the split is deterministic, disjoint, and the same on any
machine with the same Python version, without any list to ship.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
# Separates files in the token stream; NUL does not occur in Python sources.
DOCUMENT_SEPARATOR = b"\0"
# Installed third-party packages differ between machines: only the standard library itself counts.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[Path]:
    """All ``.py`` files of the standard library, as sorted paths relative to ``root``."""
    root = root or stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in _EXCLUDED_DIRS]
        relative = Path(directory).relative_to(root)
        files.extend(relative / name for name in names if name.endswith(".py"))
    return sorted(files)


def is_validation(relative_path: Path, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split (stable hash of its relative path)."""
    digest = hashlib.sha256(relative_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def split_files(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) file lists; every file lands in exactly one of them."""
    train = [path for path in files if not is_validation(path, val_fraction)]
    val = [path for path in files if is_validation(path, val_fraction)]
    return train, val


def tokenize(root: Path, files: list[Path]) -> torch.Tensor:
    """The files' bytes, concatenated with separators, as one uint8 tensor."""
    data = DOCUMENT_SEPARATOR.join((root / path).read_bytes() for path in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass(frozen=True)
class Corpus:
    """Byte streams of the two splits."""

    train: torch.Tensor
    val: torch.Tensor


def load_corpus(val_fraction: float = 0.05, root: Path | None = None) -> Corpus:
    """Read and split the standard library; a few seconds for ~30 MB of sources."""
    root = root or stdlib_root()
    train_files, val_files = split_files(source_files(root), val_fraction)
    if not train_files or not val_files:
        raise RuntimeError(f"no Python sources to split under {root} (val_fraction={val_fraction})")
    return Corpus(train=tokenize(root, train_files), val=tokenize(root, val_files))


def train_batch(
    stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for one step: a pure function of (seed, step), so resuming replays the order.

    Returns int64 ``(inputs, targets)`` of shape [batch_size, seq_len], targets shifted by one.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=generator)
    return _windows(stream, starts, seq_len)


def eval_batches(
    stream: torch.Tensor, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evenly spaced windows covering the validation stream, same for every run."""
    count = batch_size * n_batches
    starts = torch.linspace(0, len(stream) - seq_len - 1, count).long()
    return [_windows(stream, chunk, seq_len) for chunk in starts.split(batch_size)]


def _windows(
    stream: torch.Tensor, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + torch.arange(seq_len + 1)
    window = stream[index].long()
    return window[:, :-1], window[:, 1:]
