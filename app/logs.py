"""Logging for long-running commands: JSON lines for machines, plain text for a terminal.

A record's ids (`message_id`, `transition_id`, `log_position`, `app_id`, `destination`), passed
as `extra=`, become top-level keys, so a log search finds every line about one message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

IDS = ("message_id", "transition_id", "log_position", "app_id", "destination", "subscription_key")


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


def configure(level: int = logging.INFO, fmt: str | None = None) -> None:
    """`fmt` json|text; default from SUBLEDGER_LOG_FORMAT, else text on a terminal and JSON otherwise."""
    chosen = fmt or os.environ.get("SUBLEDGER_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler()
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
