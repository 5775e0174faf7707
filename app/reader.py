"""Streams canonical events from NDJSON or a JSON array in constant memory, with line numbers.

Every item is decoded by `core.safejson` and held to its limits on its own: a line that is not JSON,
is nested too deep or holds a value no store can hold (NaN, 2^64, a lone surrogate, NUL) comes back
as that line's error or `Refused` value, and the lines around it are still read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from subledger.core import safejson
from subledger.core.errors import PayloadRejected

CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Item:
    line: int
    raw: bytes
    value: Any
    error: str | None = None


def read_items(stream: IO[bytes]) -> Iterator[Item]:
    """Yield every item; one that cannot be parsed comes back with `error` set, not raised."""
    first = stream.read(1)
    while first and first.isspace():
        first += stream.read(1)
        if not first.strip():
            continue
        break
    head = first.lstrip()
    if head.startswith(b"["):
        yield from _array(stream, first)
    else:
        yield from _ndjson(stream, first)


def _ndjson(stream: IO[bytes], prefix: bytes) -> Iterator[Item]:
    line_no = 0
    first = True
    for line in stream:
        if first:
            line = prefix + line
            first = False
        line_no += 1
        text = line.strip()
        if not text:
            continue
        try:
            value = safejson.loads_item(text)
        except PayloadRejected as exc:
            yield Item(line_no, text, None, exc.reason)
            continue
        yield Item(line_no, text, value)
    if first and prefix.strip():
        yield from _ndjson_single(prefix)


def _ndjson_single(text: bytes) -> Iterator[Item]:
    try:
        yield Item(1, text.strip(), safejson.loads_item(text))
    except PayloadRejected as exc:
        yield Item(1, text.strip(), None, exc.reason)


def _array(stream: IO[bytes], prefix: bytes) -> Iterator[Item]:
    """Decode one element at a time with raw_decode; the buffer holds at most one element + a chunk."""
    buffer = prefix.decode("utf-8", errors="replace")
    line = 1 + buffer.count("\n", 0, buffer.index("["))
    buffer = buffer[buffer.index("[") + 1 :]
    expect_value = True
    eof = False
    while True:
        stripped = buffer.lstrip(" \t\r\n")
        line += buffer.count("\n", 0, len(buffer) - len(stripped))
        buffer = stripped
        if not buffer and not eof:
            chunk = stream.read(CHUNK)
            if not chunk:
                eof = True
            buffer += chunk.decode("utf-8", errors="replace")
            continue
        if not buffer and eof:
            yield Item(line, b"", None, "malformed JSON: the array is not closed with ]")
            return
        if buffer[0] == "]" and expect_value is not None:
            return
        if buffer[0] == "," and not expect_value:
            buffer = buffer[1:]
            expect_value = True
            continue
        try:
            value, end = safejson.raw_decode(buffer)
        except PayloadRejected as exc:  # too deep to decode: step over it, the next items still count
            skipped = safejson.skip_value(buffer)
            if skipped is None and not eof:
                chunk = stream.read(CHUNK)
                if chunk:
                    buffer += chunk.decode("utf-8", errors="replace")
                    continue
                eof = True
                continue
            end = len(buffer) if skipped is None else skipped
            text = buffer[:end]
            yield Item(line, text[:200].encode(), None, exc.reason)
            line += text.count("\n")
            buffer = buffer[end:]
            expect_value = False
            continue
        except json.JSONDecodeError as exc:
            if not eof:
                chunk = stream.read(CHUNK)
                if chunk:
                    buffer += chunk.decode("utf-8", errors="replace")
                    continue
                eof = True
                continue
            yield Item(line, buffer[:200].encode(), None, f"malformed JSON: {exc.msg}")
            return
        if end == len(buffer) and not eof:
            # A number or literal may continue in the next chunk; read more before trusting it.
            chunk = stream.read(CHUNK)
            if chunk:
                buffer += chunk.decode("utf-8", errors="replace")
                continue
            eof = True
        text = buffer[:end]
        yield Item(line, text.encode("utf-8", "surrogatepass"), safejson.checked_value(value))
        line += text.count("\n")
        buffer = buffer[end:]
        expect_value = False
