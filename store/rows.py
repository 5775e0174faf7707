"""Bulk row writes for the table writers: COPY, or one prepared INSERT per row; and COPY's text encoding.

COPY is the fastest way in for thousands of rows but costs round trips to set up; a few rows go
faster as INSERTs. Which one a transaction uses is the unit of work's choice
(store/unit_of_work.py, which writes small batches as one statement instead).

A bulk import (app/bulk_import.py) encodes its rows in worker processes, so the one process that
holds the transaction only joins text and sends it: `encoder` writes COPY's text format for the
column types the tables use, `copy_encoded` sends rows encoded that way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
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


def copy_encoded(conn: psycopg.Connection, table: str, columns: Sequence[str], chunks: Iterable[bytes]) -> None:
    """COPY rows already in COPY's text format (`encoder`, one line each, UTF-8) into `table`."""
    names = ", ".join(columns)
    with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as cp:
        for chunk in chunks:
            if chunk:
                cp.write(chunk)


def _text(value: Any) -> str:
    """COPY text escapes: a backslash, tab, newline or carriage return would end the field or row."""
    s = value if value.__class__ is str else str(value)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def _int(value: Any) -> str:
    return str(int(value))


def _bool(value: Any) -> str:
    return "t" if value else "f"


_TIMES: dict[datetime, str] = {}


def _time(value: Any) -> str:
    """isoformat with its offset (the server reads back the same instant). A batch writes the same
    few instants over and over (its `now` in every row, a due time per app), so they are remembered."""
    if not isinstance(value, datetime):
        return _text(value)
    text = _TIMES.get(value)
    if text is None:
        if len(_TIMES) >= 4096:
            _TIMES.clear()
        text = value.isoformat()
        if value.utcoffset() == _ZERO:  # an equal instant in another offset finds this text: the same instant
            _TIMES[value] = text
    return text


_ZERO = timedelta(0)


def _bytea(value: Any) -> str:
    return "\\\\x" + bytes(value).hex()  # `\x…` hex input, its backslash escaped for COPY


_ENCODERS: dict[str, Callable[[Any], str]] = {
    "text": _text, "jsonb": _text, "int8": _int, "bool": _bool, "timestamptz": _time, "bytea": _bytea,
}


def encoder(types: Sequence[str], *, end: str = "\n") -> Callable[[Sequence[Any]], str]:
    """A function writing one row of `types` as a line of COPY's text format (None is `\\N`);
    JSON columns are given as JSON text, as `write_rows` takes them. `end` other than a newline
    leaves the row open for columns another process appends (the log's position and hash)."""
    encoders = tuple(_ENCODERS[t] for t in types)

    def encode(row: Sequence[Any]) -> str:
        return "\t".join([NULL if v is None else enc(v) for enc, v in zip(encoders, row, strict=True)]) + end

    return encode


NULL = "\\N"
