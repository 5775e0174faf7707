"""Bulk row writes: COPY for big batches, pipelined INSERTs for small ones.

COPY is the fastest way in for thousands of rows, but it cannot run inside a pipeline and costs
extra round trips to set up; a single webhook's handful of rows goes faster as INSERTs that share
one round trip with the rest of its transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

COPY_THRESHOLD = 64


def write_rows(
    conn: psycopg.Connection,
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    copy: bool,
) -> None:
    """Insert `rows`; JSON columns are given as JSON text and typed `text`, parsed once by the server."""
    if not rows:
        return
    names = ", ".join(columns)
    if copy:
        with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as cp:
            cp.set_types(["text" if t == "jsonb" else t for t in types])
            for row in rows:
                cp.write_row(row)
        return
    casts = ", ".join("%s::jsonb" if t == "jsonb" else "%s" for t in types)
    conn.cursor().executemany(f"INSERT INTO {table} ({names}) VALUES ({casts})", rows)

