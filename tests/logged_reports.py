"""The training-graph reports and messages that the quartet2 backend logs, collected for
assertions: the log is what a trainer's user reads, so tests read it too (fresh reports and those
from the caches)."""

import contextlib
import logging
from collections.abc import Callable, Iterator

from quartet_compile.passes.report import GraphReport


@contextlib.contextmanager
def _handled(emit: Callable[[logging.LogRecord], None], level: int) -> Iterator[None]:
    """``emit`` gets each record logged on ``quartet_compile`` at ``level`` or above inside the
    block (the logger's own level is lowered to ``level`` meanwhile when it is higher)."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            emit(record)

    logger = logging.getLogger("quartet_compile")
    handler, saved = Handler(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


@contextlib.contextmanager
def logged_reports() -> Iterator[list[GraphReport]]:
    """The joint-graph reports logged on ``quartet_compile`` inside the block, in order."""
    found: list[GraphReport] = []

    def collect(record: logging.LogRecord) -> None:
        report = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(report, GraphReport) and report.kind.startswith("joint"):
            found.append(report)

    with _handled(collect, logging.INFO):
        yield found


@contextlib.contextmanager
def logged_messages(level: int = logging.INFO) -> Iterator[list[str]]:
    """The messages logged on ``quartet_compile`` at ``level`` or above inside the block."""
    messages: list[str] = []
    with _handled(lambda record: messages.append(record.getMessage()), level):
        yield messages
