"""``log.csv``: one row per training step, under a header saying what the run trained on.

The header is ``# key: value`` lines (the corpus' name, root, file and byte counts and content
hash) before the CSV column names, so a log alone tells whether two runs saw the same data.
:func:`read_log` is the one reader of the format (the demo's resume, benchmarks, tests).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

CSV_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "elapsed")
_META_PREFIX = "# "


@dataclass(frozen=True)
class RunLog:
    """A log's header fields and its rows (column name -> text, ``val_loss`` "" when not run)."""

    metadata: dict[str, str]
    rows: list[dict[str, str]]


def read_log(path: Path) -> RunLog:
    """Parse a ``log.csv`` (a log without header lines has empty ``metadata``)."""
    lines = path.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith(_META_PREFIX)]
    metadata = dict(line[len(_META_PREFIX) :].rstrip("\n").split(": ", 1) for line in header)
    rows = list(csv.DictReader(io.StringIO("".join(lines[len(header) :]), newline="")))
    return RunLog(metadata, rows)


class CsvLog:
    """Writes ``log.csv`` with :data:`CSV_COLUMNS`; a resumed run keeps the rows up to its
    checkpoint and writes its own ``metadata``."""

    def __init__(self, path: Path, metadata: dict[str, str], keep_through_step: int) -> None:
        kept = []
        if keep_through_step and path.exists():
            kept = [row for row in read_log(path).rows if int(row["step"]) <= keep_through_step]
        self._file = path.open("w", newline="")
        self._file.writelines(f"{_META_PREFIX}{key}: {value}\n" for key, value in metadata.items())
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._writer.writeheader()
        self._writer.writerows(kept)

    def write(
        self, step: int, tokens: int, train_loss: float, val_loss: float | None, elapsed: float
    ) -> None:
        self._writer.writerow(
            {
                "step": step,
                "tokens": tokens,
                "train_loss": f"{train_loss:.6f}",
                "val_loss": "" if val_loss is None else f"{val_loss:.6f}",
                "elapsed": f"{elapsed:.3f}",
            }
        )
        self._file.flush()

    def close(self) -> None:
        self._file.close()
