"""tokenline's own log records in Ray Serve's replica log files.

Inside a replica only the ``ray.serve`` logger has handlers (Serve sets them up per
replica, with its format and files); records of other loggers reach no file but
stderr, and below WARNING not even that. Each deployment calls ``route_to_serve_logs``
once so that the ``services`` loggers write where Serve's own lines go.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"
OUR_LOGGER = "services"


class _ToServeLogs(logging.Handler):
    """Hands each record to Serve's logger as it is configured at that moment (Serve may
    replace its handlers when the logging config changes)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def route_to_serve_logs(level: int = logging.INFO) -> None:
    """Idempotent: our records at ``level`` and above go to the replica's Serve log."""
    logger = logging.getLogger(OUR_LOGGER)
    if not any(isinstance(handler, _ToServeLogs) for handler in logger.handlers):
        logger.addHandler(_ToServeLogs())
    logger.setLevel(level)
    logger.propagate = False
