"""Training text as bytes (vocabulary 256): two token streams, train and validation, and a record
of exactly what was read.

Files are assigned to train or validation by a hash of their path relative to the corpus root
(:mod:`quartet_demo.sources`), so the split is deterministic, disjoint, and the same on any
machine holding the same files, without any list to ship. A corpus can be large (~390 MB for
site-packages): each split is one preallocated byte buffer that the files are read straight into,
never a Python list of ints, and the content hash is computed in the same pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from quartet_demo.sources import STDLIB, Sources, find_sources

VOCAB_SIZE = 256
# Separates files in the token stream; NUL does not occur in Python sources.
DOCUMENT_SEPARATOR = b"\0"


def is_validation(relative_path: Path, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split (stable hash of its relative path)."""
    digest = hashlib.sha256(relative_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def split_files(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) file lists; every file lands in exactly one of them."""
    train = [path for path in files if not is_validation(path, val_fraction)]
    val = [path for path in files if is_validation(path, val_fraction)]
    return train, val


@dataclass(frozen=True)
class Fingerprint:
    """What a run trained on, so that runs (and machines) can be checked to share a corpus.

    ``sha256`` covers, for every file in sorted order, its relative path, its length and its
    bytes: it changes when any file is added, removed, renamed or edited.
    """

    spec: str
    root: Path
    files: int
    bytes: int
    sha256: str
    val_files: int

    def describe(self) -> str:
        return (
            f"corpus {self.spec} ({self.root}): {self.files:,} files, {self.bytes:,} bytes, "
            f"sha256 {self.sha256} ({self.val_files:,} files for validation)"
        )

    def metadata(self) -> dict[str, str]:
        """The fields a run's log records (``log.csv``'s header)."""
        return {
            "corpus": self.spec,
            "corpus_root": str(self.root),
            "corpus_files": str(self.files),
            "corpus_bytes": str(self.bytes),
            "corpus_sha256": self.sha256,
        }


@dataclass(frozen=True)
class Corpus:
    """Byte streams of the two splits and what they were read from."""

    train: torch.Tensor
    val: torch.Tensor
    fingerprint: Fingerprint


def load_corpus(spec: str = STDLIB, val_fraction: float = 0.05) -> Corpus:
    """Read and split the corpus ``spec`` names (:func:`quartet_demo.sources.find_sources`).

    A few seconds for the stdlib's ~30 MB; site-packages' ~390 MB takes about as much memory.
    """
    sources = find_sources(spec)
    train_files, val_files = split_files(list(sources.files), val_fraction)
    if not train_files or not val_files:
        raise RuntimeError(
            f"--corpus {spec!r}: {len(sources.files)} file(s) under {sources.root} give "
            f"{len(train_files)} for training and {len(val_files)} for validation at "
            f"val_fraction={val_fraction}; name more files or change --val-fraction"
        )
    streams = {False: _Stream(sources, train_files), True: _Stream(sources, val_files)}
    in_val = set(val_files)
    digest = hashlib.sha256()
    for path in sources.files:
        content = streams[path in in_val].read(path)
        digest.update(path.as_posix().encode() + b"\0" + len(content).to_bytes(8, "little"))
        digest.update(content)
    fingerprint = Fingerprint(
        spec=spec,
        root=sources.root,
        files=len(sources.files),
        bytes=sum(stream.content_bytes for stream in streams.values()),
        sha256=digest.hexdigest(),
        val_files=len(val_files),
    )
    return Corpus(streams[False].tensor(), streams[True].tensor(), fingerprint)


class _Stream:
    """One split's files joined by :data:`DOCUMENT_SEPARATOR`, read into a preallocated buffer.

    Sized from the files' sizes up front; a file whose size changes while the corpus is read is
    an error rather than a silently different stream.
    """

    def __init__(self, sources: Sources, files: list[Path]) -> None:
        self._root = sources.root
        self._sizes = {path: (sources.root / path).stat().st_size for path in files}
        self.content_bytes = sum(self._sizes.values())
        separators = len(DOCUMENT_SEPARATOR) * (len(files) - 1)
        self._buffer = bytearray(self.content_bytes + separators)
        self._view = memoryview(self._buffer)
        self._offset = 0

    def read(self, path: Path) -> memoryview:
        """Append the next file (callers go in sorted order); returns its bytes in the buffer."""
        if self._offset:
            end = self._offset + len(DOCUMENT_SEPARATOR)
            self._view[self._offset : end] = DOCUMENT_SEPARATOR
            self._offset = end
        size = self._sizes[path]
        content = self._view[self._offset : self._offset + size]
        with (self._root / path).open("rb") as f:
            if f.readinto(content) != size or f.read(1):
                raise RuntimeError(f"{self._root / path} changed size while the corpus was read")
        self._offset += size
        return content

    def tensor(self) -> torch.Tensor:
        """The filled buffer as a uint8 tensor (shares its memory, no copy)."""
        assert self._offset == len(self._buffer)
        return torch.frombuffer(self._buffer, dtype=torch.uint8)


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
    """A fixed set of evenly spaced windows covering the validation stream, same for every run.

    The starts are computed in integers: float32 (linspace's default) rounds positions above
    2**24 (a site-packages validation stream is ~19M bytes) past the stream's end.
    """
    count = batch_size * n_batches
    starts = torch.arange(count) * (len(stream) - seq_len - 1) // max(count - 1, 1)
    return [_windows(stream, chunk, seq_len) for chunk in starts.split(batch_size)]


def _windows(
    stream: torch.Tensor, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + torch.arange(seq_len + 1)
    window = stream[index].long()
    return window[:, :-1], window[:, 1:]
