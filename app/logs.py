"""Logging for long-running commands: JSON lines for machines, plain text for a terminal.

A record's ids (`message_id`, `transition_id`, `log_position`, `app_id`, `destination`, and the
`error_id` a 503 or 500 body gives the client), passed as `extra=`, become top-level keys, so a log
search finds every line about one message or one refused request.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

IDS = ("message_id", "transition_id", "log_position", "app_id", "destination", "subscription_key", "error_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in IDS if getattr(record, key, None) is not None})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def chosen_format(fmt: str | None = None) -> str:
    """json|text: `fmt`, else SUBLEDGER_LOG_FORMAT, else text on a terminal and JSON otherwise."""
    return fmt or os.environ.get("SUBLEDGER_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")


def configure(level: int = logging.INFO, fmt: str | None = None) -> None:
    """`fmt` json|text; default from SUBLEDGER_LOG_FORMAT, else text on a terminal and JSON otherwise."""
    chosen = chosen_format(fmt)
    handler = logging.StreamHandler()
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Alembic narrates each step at INFO; a start-up migration is told by one line of ours instead
    logging.getLogger("alembic").setLevel(logging.WARNING)


def uvicorn_log_config(fmt: str | None = None) -> dict[str, Any]:
    """uvicorn's `log_config`: its server and access lines in the same format as ours, on stderr.

    Without it uvicorn installs its own colourised plain-text handlers, so a JSON log pipeline
    would get lines it cannot parse from the same process.
    """
    json_lines = chosen_format(fmt) == "json"
    formatter: dict[str, Any] = {"()": JsonFormatter} if json_lines else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "subledger", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"subledger": formatter},
        "handlers": {"subledger": handler},
        "loggers": {
            "uvicorn": {"handlers": ["subledger"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["subledger"], "level": "INFO", "propagate": False},
        },
    }
