"""Store adapters: one module per source, each doing parse → verify → map into canonical events.

Every adapter returns a `Notification`: one raw delivery with its idempotency key and the zero or
more canonical facts it states. Zero facts means "stored only" (informational or unknown types).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from subledger.core.errors import InvalidEvent
from subledger.core.events import CanonicalEvent, Source, parse_event
from subledger.core.safejson import find_problem, text_problem


@dataclass(frozen=True, slots=True)
class Notification:
    """One raw delivery from a source, mapped. The log stores one entry per (source, external_id)."""

    source: Source
    external_id: str
    app_id: str
    kind: str
    events: tuple[CanonicalEvent, ...] = ()
    subscription_key: str | None = None

    @classmethod
    def of(cls, event: CanonicalEvent) -> Notification:
        """A canonical event is its own notification."""
        return cls(
            source=event.source,
            external_id=event.id,
            app_id=event.app_id,
            kind=event.type.value,
            events=(event,),
            subscription_key=event.subscription_key,
        )

    @classmethod
    def from_facts(
        cls,
        source: Source,
        external_id: str,
        app_id: str,
        kind: str,
        facts: Iterable[dict[str, Any]],
        *,
        stored_key: str | None = None,
    ) -> Notification:
        """An adapter's result: its facts held to the canonical contract (`parse_event`), and the
        stream the raw entry belongs to: the first fact's, else `stored_key` (the subscription a
        stored-only delivery names, when it names one)."""
        events = tuple(parse_event(f, default_source=source) for f in facts)
        return cls(
            source=source,
            external_id=external_id,
            app_id=app_id,
            kind=kind,
            events=events,
            subscription_key=events[0].subscription_key if events else stored_key,
        )

    def key(self) -> str | None:
        if self.subscription_key is not None:
            return self.subscription_key
        return self.events[0].subscription_key if self.events else None


def refuse_unstorable(notification: Notification) -> None:
    """Raise InvalidEvent when anything the log would store as text or jsonb cannot be stored.

    Every field an adapter maps passes `parse_event`, which holds it to the limits; this is the
    last check before `ingest`, so a value an adapter carried over unchecked (the delivery's id,
    its kind) is a 422 naming the field, never a failed insert that loses the rest of a batch."""
    for name, text in (("id", notification.external_id), ("kind", notification.kind),
                       ("subscription_key", notification.subscription_key or "")):
        problem = text_problem(text)
        if problem is not None:
            raise InvalidEvent(problem, name)
    for event in notification.events:
        found = find_problem(event.to_facts())
        if found is not None:
            raise InvalidEvent(found[1], found[0] or None)
