"""Canonical input, shared by `POST /v1/events` and `subledger ingest`: validate, then hand over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from subledger.app.settings import Settings
from subledger.core.errors import InvalidEvent
from subledger.core.events import MAX_ID_LENGTH, Source, parse_event
from subledger.core.safejson import Refused, shown
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming


@dataclass(frozen=True, slots=True)
class Rejection:
    field: str | None
    reason: str
    id: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": "rejected", "reason": self.reason}
        if self.field:
            out["field"] = self.field
        if self.id is not None:
            out["id"] = self.id
        return out


def to_incoming(
    value: Any, raw: bytes, settings: Settings, *, historical: bool = False, default_source: Source = Source.CUSTOM
) -> Incoming | Rejection:
    """`value` is what `core.safejson` decoded: a `Refused` item (a limit broken) is rejected as is."""
    if isinstance(value, Refused):
        return Rejection(value.field, value.reason, value.id)
    ident = value.get("id") if isinstance(value, dict) and isinstance(value.get("id"), str) else None
    if ident is not None:  # echoed in the answer: never a NUL, a lone surrogate or a megabyte
        ident = shown(ident, MAX_ID_LENGTH)
    try:
        event = parse_event(value, default_source=default_source)
    except InvalidEvent as exc:
        return Rejection(exc.field, exc.reason, ident)
    if not settings.knows(event.app_id):
        return Rejection("app_id", f"app {event.app_id!r} is not configured (add [apps.\"{event.app_id}\"])", ident)
    return Incoming(Notification.of(event), raw, historical=historical)
