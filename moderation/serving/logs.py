"""structlog configuration: one JSON object per line on stderr (stdout stays for results)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by test capture)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _ToStructlog(logging.Handler):
    """Hands the engine's standard-library records (model/ knows no structlog) to structlog, so
    that its start-up memory line and its warnings come out as JSON lines like the rest."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger().log(record.levelno, record.getMessage(), logger=record.name)


def use_colour(stream: object) -> bool:
    """Colour only for a terminal, and never with NO_COLOR set (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Route structlog to stderr as JSON lines (or human-readable lines for a terminal)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=use_colour(sys.stderr))
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    engine_log = logging.getLogger("model")
    for handler in [h for h in engine_log.handlers if isinstance(h, _ToStructlog)]:
        engine_log.removeHandler(handler)
    engine_log.addHandler(_ToStructlog())
    engine_log.setLevel(level.upper())
    engine_log.propagate = False
