"""Which files make the training corpus: ``--corpus stdlib | site-packages | DIRECTORY | GLOB``.

The standard library (the default) is small (~30 MB) and the same on every machine with the same
Python, so CPU runs and CI use it; a model that outgrows it can train on every ``.py`` file of the
running interpreter's site-packages (~390 MB on the GPU image) or on any files the user names.
Files are listed sorted and relative to a root, so the train/validation split (a hash of that
relative path) and the content hash do not depend on where the corpus lies or on the file system's
order.
"""

from __future__ import annotations

import glob
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"
SITE_PACKAGES = "site-packages"
# Installed third-party packages differ between machines: only the standard library itself counts.
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
_GLOB_MAGIC = re.compile(r"[*?[]")
_USAGE = (
    "name 'stdlib', 'site-packages', a directory (its .py files are read) or a quoted glob such "
    "as '/data/**/*.txt'"
)


@dataclass(frozen=True)
class Sources:
    """A corpus' files: sorted paths relative to ``root``."""

    spec: str
    root: Path
    files: tuple[Path, ...]


def find_sources(spec: str = STDLIB) -> Sources:
    """The files ``spec`` names; ``FileNotFoundError`` saying what to fix when there are none.

    ``stdlib`` and ``site-packages`` are names, not directories (``./stdlib`` is the directory).
    """
    if spec == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = python_files(root, _STDLIB_EXCLUDED)
    elif spec == SITE_PACKAGES:
        root = Path(sysconfig.get_paths()["purelib"])
        files = python_files(root)
    elif _GLOB_MAGIC.search(spec):
        root, files = glob_files(spec)
        if not files:
            raise FileNotFoundError(
                f"--corpus {spec!r}: the glob matches no file; check the pattern ('**' spans "
                f"directories) and quote it so the shell does not expand it"
            )
    else:
        root = Path(os.path.abspath(os.path.expanduser(spec)))
        if not root.is_dir():
            raise FileNotFoundError(f"--corpus {spec!r}: no such directory; {_USAGE}")
        files = python_files(root)
    if not files:
        raise FileNotFoundError(
            f"--corpus {spec!r}: no .py file under {root}; for other files name a quoted glob, "
            f"e.g. --corpus '{root}/**/*.txt'"
        )
    return Sources(spec, root, tuple(files))


def python_files(root: Path, excluded_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Every ``.py`` file under ``root`` (not entering ``excluded_dirs``), sorted, relative."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in excluded_dirs]
        relative = Path(directory).relative_to(root)
        files.extend(relative / name for name in names if name.endswith(".py"))
    return sorted(files)


def glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """The files a glob matches, relative to its longest directory prefix without wildcards."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    root = Path(*parts[:fixed])
    matches = (Path(match) for match in glob.glob(pattern, recursive=True))
    return root, sorted({match.relative_to(root) for match in matches if match.is_file()})
