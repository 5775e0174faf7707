"""Amazon SNS signing certificates as the webhook fetched them (0012), for re-verifying logged entries.

A URL names one certificate for its life (SNS publishes a new URL when it rotates keys), so a
second fetch of the same URL normally brings the same bytes: it only moves `last_fetched_at`. If
the bytes ever differ, the newest are kept, and the reader judges each entry at its own
`Timestamp`, which a certificate outside its validity then fails visibly rather than silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

SAVE_SQL = """
INSERT INTO sns_certificates (url, pem, first_fetched_at, last_fetched_at)
VALUES (%(url)s, %(pem)s, %(at)s, %(at)s)
ON CONFLICT (url) DO UPDATE SET pem = excluded.pem, last_fetched_at = excluded.last_fetched_at
"""
LOAD_SQL = "SELECT pem, first_fetched_at, last_fetched_at FROM sns_certificates WHERE url = %(url)s"


@dataclass(frozen=True, slots=True)
class Kept:
    pem: bytes
    first_fetched_at: datetime
    last_fetched_at: datetime


def save(conn: psycopg.Connection, url: str, pem: bytes, at: datetime) -> None:
    conn.execute(SAVE_SQL, {"url": url, "pem": pem, "at": at})


def load(conn: psycopg.Connection, url: str) -> Kept | None:
    row = conn.execute(LOAD_SQL, {"url": url}).fetchone()
    return None if row is None else Kept(bytes(row[0]), row[1], row[2])
