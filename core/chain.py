"""The log's hash chain: each entry's hash covers the previous hash and the entry's canonical bytes.

Editing, removing or reordering any entry changes every hash after it, so `verify` can name the
first entry that no longer matches. A partitioned log (`[log] chains = N`) is N such chains, an
entry's chain fixed by its subscription key (`chain_of`); each hash covers the previous hash of the
same chain, in the same format.

Every column of `event_log` is tamper-evident in one of three ways (`COVERAGE`): hashed (the
canonical bytes below), chained (`position` by the gapless sequence, `hash` by recomputation), or
derived (denormalised copies of the hashed facts that readers filter and sort on; `verify`
re-derives them with `derived_columns` and compares). Deriving rather than hashing them keeps
every hash ever written valid: the hash format never changed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from subledger.core.events import parse_time

GENESIS = b"\x00" * 32


HASHED_COLUMNS = ("source", "external_id", "app_id", "subscription_key", "received_at", "historical", "raw",
                  "facts", "arrival")
# How a fact reached the log (event_log.arrival). A push is the hash format every entry had before
# reconciliation existed, so it is left out of the hashed bytes; any other arrival is hashed.
class Arrival(StrEnum):
    PUSH = "push"  # a webhook (or an API call) delivered it
    RECONCILIATION = "reconciliation"  # recovered from a store's API after push lost it
    IMPORT = "import"  # `subledger ingest` of a file (app/stream_ingest.py, app/bulk_import.py)


ARRIVALS = tuple(a.value for a in Arrival)
DEFAULT_ARRIVAL = Arrival.PUSH.value
CHAINED_COLUMNS = ("position", "hash")
DERIVED_COLUMNS = ("kind", "app_user_id", "environment", "occurred_at")
COVERAGE = {
    **{c: "hashed" for c in HASHED_COLUMNS},
    **{c: "chained" for c in CHAINED_COLUMNS},
    **{c: "derived" for c in DERIVED_COLUMNS},
}


def canonical_bytes(entry: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same entry always hashes the same way."""
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def chain_hash(previous: bytes, entry: dict[str, Any]) -> bytes:
    return hashlib.sha256(previous + canonical_bytes(entry)).digest()


def entry_for_hash(
    *,
    source: str,
    external_id: str,
    app_id: str,
    subscription_key: str,
    received_at: str,
    historical: bool,
    raw: bytes,
    facts: dict[str, Any],
    arrival: str = DEFAULT_ARRIVAL,
) -> dict[str, Any]:
    """What the hash commits to: every column a reader relies on, the raw body by its digest.

    `arrival` is committed to only when it is not a push, so the hashes written before the column
    existed (all pushes) stay valid, and an edit of the column either way changes the hash.
    """
    extra: dict[str, Any] = {} if arrival == DEFAULT_ARRIVAL else {"arrival": arrival}
    return {
        **extra,
        "source": source,
        "external_id": external_id,
        "app_id": app_id,
        "subscription_key": subscription_key,
        "received_at": received_at,
        "historical": historical,
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
        "facts": facts,
    }


def derived_columns(facts: dict[str, Any]) -> tuple[str, str | None, str | None, datetime | None]:
    """(kind, app_user_id, environment, occurred_at) as the append derives them from the facts.

    The same rules as `store.log.plan` applies to the notification's events (which the facts
    serialise one to one): the notification's kind, the first non-empty app user id, the first
    event's environment, the earliest occurrence; None where the entry states no events.
    Raises KeyError, TypeError or ValueError (InvalidEvent) when the facts are malformed.
    """
    events = facts["events"]
    first = events[0] if events else None
    return (
        facts["kind"],
        next((e["app_user_id"] for e in events if e.get("app_user_id")), None),
        None if first is None else first.get("environment", "production"),
        min((parse_time(e["occurred_at"], "occurred_at") for e in events), default=None),
    )


# orjson writes a float of magnitude >= 1e16 with an exponent ("1e+16"); jsonb keeps the number's
# value, not its spelling, and gives it back as "10000000000000000", which parses as an int. It has
# no negative zero either. The append hashed the float's spelling, so a reader of jsonb must try it.
_FLOAT_WITH_EXPONENT = 10**16
MAX_RESPELLINGS = 10


def respellings(facts: Any) -> Iterator[Any]:
    """The facts as the append may have hashed them, where jsonb rewrote how a number is spelt.

    Yields nothing when no number is ambiguous (the common case: one hash is the whole check);
    otherwise every combination of the ambiguous numbers read back as the float they may have
    been (at most 2**MAX_RESPELLINGS). Only the spelling changes, never a value, so accepting a
    respelling that matches the hash accepts no edit.
    """
    paths: list[tuple[tuple[Any, ...], float]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if len(paths) >= MAX_RESPELLINGS:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _FLOAT_WITH_EXPONENT:
            if float(value) == value:
                paths.append((path, float(value)))
        elif isinstance(value, float) and value == 0.0:
            paths.append((path, -value))

    walk(facts, ())
    for chosen in itertools.product((False, True), repeat=len(paths)):
        if not any(chosen):
            continue
        respelt = orjson.loads(orjson.dumps(facts))
        for (path, replacement), take in zip(paths, chosen, strict=True):
            if take:
                target = respelt
                for step in path[:-1]:
                    target = target[step]
                target[path[-1]] = replacement
        yield respelt


# -- partitioned chains --------------------------------------------------------------------------------
# The log may be N chains instead of one (store/log.py, docs/scale-out.md): an entry's chain is a
# stable hash of its subscription key, so all of one subscription's entries share a chain.

SLOT_BITS = 60  # fits a positive bigint, so SQL can take the same `slot % n`


def chain_slot(subscription_key: str | None) -> int:
    """The number an entry's chain is taken from, `slot % chains`: the first 60 bits of the key's
    SHA-256, fixed by the key's bytes alone (any process, any version, and SQL agree). An entry without
    a subscription key has slot 0, so it is in chain 0 whatever the number of chains."""
    if not subscription_key:
        return 0
    return int.from_bytes(hashlib.sha256(subscription_key.encode()).digest()[:8], "big") >> (64 - SLOT_BITS)


def chain_of(subscription_key: str | None, chains: int) -> int:
    """Which of `chains` chains an entry of `subscription_key` belongs to."""
    return chain_slot(subscription_key) % chains


def seal(heads: list[bytes]) -> bytes:
    """What every chain of a new epoch starts from: the closing epoch's last hashes, chain by chain,
    hashed together, so each new chain links the whole history before it."""
    return hashlib.sha256(b"".join(heads)).digest()


def first_positions(first_position: int, chains: int) -> list[int]:
    """The position before each chain's first one in an epoch starting at `first_position`: chain `c`
    takes `first_position + c`, then every `chains`-th position after it."""
    return [first_position + c - chains for c in range(chains)]
