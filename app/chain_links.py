"""The `ChainLookup` the Google and Amazon adapters take, and the redelivery check both webhooks make.

Both stores name a subscription by an id that changes along its life (a Play purchase token, an
Amazon receipt); the adapter joins a new id to the chain through the id it replaced. This is where
that old id is looked up: first among the notifications of the same run (a captured file may hold
the whole chain before any of it is committed), then in the log (`store.lookups`). One class, with
the source and the fact attribute that carries the id as its only differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import psycopg

from subledger.core.events import Source
from subledger.core.sources import Notification
from subledger.store import log as event_log
from subledger.store import lookups


@dataclass
class LoggedChain:
    """`ChainLookup`: a store id → the subscription id its facts were logged under (subclasses name
    the source and the attribute)."""

    SOURCE: ClassVar[Source]
    ATTRIBUTE: ClassVar[str]

    conn: psycopg.Connection | None
    app_id: str
    seen: dict[str, str] = field(default_factory=dict)

    def remember(self, notification: Notification) -> None:
        for event in notification.events:
            value = event.attributes.get(self.ATTRIBUTE)
            if isinstance(value, str) and event.subscription_id:
                self.seen.setdefault(value, event.subscription_id)

    def __call__(self, value: str) -> str | None:
        found = self.seen.get(value)
        if found is not None or self.conn is None:
            return found
        return lookups.subscription_for_attribute(self.conn, self.app_id, self.SOURCE.value, self.ATTRIBUTE, value)


def already_logged(conn: psycopg.Connection, source: Source, external_id: str) -> bool:
    """A redelivered notification is answered from the log, without calling the store's API again."""
    with conn.transaction():  # short: no transaction left open in front of the ingest
        return event_log.contains(conn, source.value, external_id)
