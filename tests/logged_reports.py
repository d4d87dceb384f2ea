"""The training-graph reports and messages that the quartet2 backend logs, collected for
assertions: the log is what a trainer's user reads, so tests read it too (fresh reports and those
from the caches)."""

import contextlib
import logging
from collections.abc import Iterator

from quartet_compile.passes.report import GraphReport


@contextlib.contextmanager
def logged_reports() -> Iterator[list[GraphReport]]:
    """The joint-graph reports logged on ``quartet_compile`` inside the block, in order."""
    found: list[GraphReport] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            report = record.args[0] if isinstance(record.args, tuple) and record.args else None
            if isinstance(report, GraphReport) and report.kind.startswith("joint"):
                found.append(report)

    logger = logging.getLogger("quartet_compile")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def logged_messages(level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages logged on ``quartet_compile`` at ``level`` or above inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("quartet_compile")
    handler, saved = Collect(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), level))
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
