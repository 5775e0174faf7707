"""The outbox writer: a transition rendered into the outbox rows of its destinations.

A row holds the exact `track` + `identify` bodies of one transition for one destination; the
relay only ever sends what is written here, so a messageId's payload never changes. The rows are
plain `store.outbox.OutboxRow` values: the ingest's unit of work stages and writes them
(store/outbox.py holds the SQL), this module only decides what they say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from subledger.core.errors import MissingRate
from subledger.core.lifecycle import Transition
from subledger.core.render import Destination, render
from subledger.store.outbox import OUTBOX_CHANNEL, OutboxRow

__all__ = ["OUTBOX_CHANNEL", "OutboxRow", "rows_for"]


def rows_for(
    transition: Transition,
    destinations: Sequence[Destination],
    *,
    historical: bool,
    available_at: datetime,
    aliases: tuple[str, ...] = (),
    linked_user: str | None = None,
) -> list[OutboxRow]:
    """One row per destination that accepts the transition.

    `linked_user`: the app user an identity link attributes the subscription to; the messages go to
    that user and the identify lists every id the subscription was known by (`aliases`).
    """
    if linked_user and linked_user != transition.app_user_id:
        aliases = aliases or _aliases(transition, linked_user)
        transition = replace(transition, app_user_id=linked_user)
    rows: list[OutboxRow] = []
    for dest in destinations:
        if not dest.accepts(transition, historical=historical):
            continue
        dead: str | None = None
        try:
            body = render(transition, dest, aliases=aliases)
        except MissingRate as exc:
            # Nothing is lost: the row is kept, dead-lettered with the reason, retryable.
            dead = f"{exc}; fix the rates table, then `subledger outbox retry`"
            body = render(transition, _without_conversion(dest), aliases=aliases)
        rows.append(
            OutboxRow(
                message_id=body[0]["messageId"],
                transition_id=transition.id,
                destination=dest.name,
                app_id=transition.app_id,
                subscriber=transition.subscriber,
                body=body,
                available_at=available_at,
                dead_reason=dead,
            )
        )
    return rows


def _aliases(transition: Transition, linked_user: str) -> tuple[str, ...]:
    """The ids messages of this subscription carried before the link, then the linked user."""
    ids = [transition.subscriber, transition.app_user_id, linked_user]
    return tuple(dict.fromkeys(i for i in ids if i))


def _without_conversion(dest: Destination) -> Destination:
    return replace(dest, currency=None)
