"""The log's hash chain: each entry's hash covers the previous hash and the entry's canonical bytes.

Editing, removing or reordering any entry changes every hash after it, so `verify` can name the
first entry that no longer matches.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

GENESIS = b"\x00" * 32


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
) -> dict[str, Any]:
    """What the hash commits to: every column a reader relies on, the raw body by its digest."""
    return {
        "source": source,
        "external_id": external_id,
        "app_id": app_id,
        "subscription_key": subscription_key,
        "received_at": received_at,
        "historical": historical,
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
        "facts": facts,
    }
