"""Bulk row writes for the table writers: COPY, or one prepared INSERT per row.

COPY is the fastest way in for thousands of rows but costs round trips to set up; a few rows go
faster as INSERTs. Which one a transaction uses is the unit of work's choice
(store/unit_of_work.py, which writes small batches as one statement instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg


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

