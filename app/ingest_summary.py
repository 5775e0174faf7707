"""What a file import reports: counts, the first rejections by file and line, one line's verdict.

Shared by the single-process import (app/stream_ingest.py) and the parallel one
(app/bulk_import.py), so both count and word a rejection the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from subledger.app.canonical import Rejection, to_incoming
from subledger.app.settings import Settings
from subledger.core import safejson
from subledger.core.chain import Arrival
from subledger.core.errors import PayloadRejected
from subledger.outbox.ingest import Incoming

MAX_REJECTIONS_SHOWN = 20
# How `subledger ingest` records what it appends (event_log.arrival; hashed, as every non-push is).
IMPORT = Arrival.IMPORT.value


@dataclass
class Summary:
    new: int = 0
    duplicate: int = 0
    rejected: int = 0
    transitions: int = 0
    rejections: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "transitions": self.transitions,
            "rejections": self.rejections,
        }

    def reject(self, name: str, line: int, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS_SHOWN:
            self.rejections.append(f"{name}:{line}: {reason}")


def rejection_text(rejection: Rejection) -> str:
    """`field: reason`, as a rejected line is reported."""
    where = f"{rejection.field}: " if rejection.field else ""
    return where + rejection.reason


def canonical_line(text: bytes, settings: Settings, *, historical: bool) -> Incoming | str:
    """One NDJSON line of canonical input, decoded and checked as `POST /v1/events` checks an item:
    what to append (arrival `import`), or why the line is rejected."""
    try:
        value = safejson.loads_item(text)
    except PayloadRejected as exc:
        return exc.reason
    checked = to_incoming(value, text, settings, historical=historical)
    if isinstance(checked, Rejection):
        return rejection_text(checked)
    return Incoming(checked.notification, checked.raw, checked.historical, IMPORT)
