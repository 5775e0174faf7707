"""The one JSON decoder for input we did not write: every body, line and captured store payload.

Why not `json.loads`: it accepts `NaN`/`Infinity`, turns `1e400` into `inf`, builds integers of any
size, keeps lone surrogates (`"\\ud800"`) and raises `RecursionError` on deep nesting. None of that
can be stored (PostgreSQL jsonb refuses NUL and non-finite numbers, `orjson.dumps` refuses lone
surrogates and integers beyond 64 bits), and a `RecursionError` escapes every handler as a 500.

So every decoded value is held to these limits, and a value that breaks one is refused with the
path of the offending field (`attributes.a[3]`), before anything is stored:

    nesting         at most MAX_DEPTH (64) objects/arrays deep
    numbers         finite, and -2^63 <= n < 2^63 (PostgreSQL bigint); no NaN, no Infinity
    text            valid Unicode (no lone surrogate U+D800..U+DFFF) and no NUL (U+0000),
                    in keys as well as values

Fast path: orjson (strict: it already refuses NaN, Infinity, lone surrogates and depth > 1024);
only when it refuses is the body decoded again, by the standard library with hooks that mark
the offending values, so the answer can name the field instead of "malformed JSON".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from subledger.core.errors import InvalidEvent, MalformedPayload, TooDeep

MAX_DEPTH = 64
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
_LIMIT_FLOAT = float(2**63)


@dataclass(frozen=True, slots=True)
class Refused:
    """An item of a batch that broke a limit (the rest of the batch is still decoded)."""

    reason: str
    field: str | None = None
    id: str | None = None  # the item's `id`, when it is clean text, so the answer can say which item


@dataclass(frozen=True, slots=True)
class _Marked:
    """Stands in, while decoding leniently, for a value no store can hold (NaN, 1e400, 2^64)."""

    reason: str


def shown(text: str, limit: int = 80) -> str:
    """`text` safe to put in an error body or a terminal: NUL, controls and lone surrogates escaped
    (`\\x00`, `\\ud800`), long text cut."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def text_problem(value: str) -> str | None:
    """Why PostgreSQL text cannot hold `value`, or None."""
    if "\x00" in value:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains a lone surrogate (U+{ord(value[exc.start]):04X}); text must be valid Unicode"
    return None


def number_problem(value: int | float) -> str | None:
    """Why a number is refused (not finite, or outside the 64-bit signed range), or None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "must be a finite number (NaN and Infinity are refused)"
        if not -_LIMIT_FLOAT < value < _LIMIT_FLOAT:  # exclusive: -2^63 - 1 decodes to the float -2^63
            return "number out of range: -2^63 <= n < 2^63"
        return None
    if not MIN_INT <= value <= MAX_INT:
        return "integer out of range: -2^63 <= n < 2^63"
    return None


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    name = shown(part, 40)
    return f"{path}.{name}" if path else name


def _cut(path: str) -> str:
    return path if len(path) <= 60 else path[:60] + "…"


# A node's place is a link (parent link, key) built as the walk descends; the path text is only
# written for the node that broke a limit, so a clean document costs one tuple per node.
_Link = tuple[Any, str | int] | None


def _path(prefix: str, link: _Link) -> str:
    parts: list[str | int] = []
    while link is not None:
        link, part = link
        parts.append(part)
    where = prefix
    for part in reversed(parts):
        where = _join(where, part)
    return _cut(where)


def find_problem(
    value: Any, *, max_depth: int = MAX_DEPTH, max_text: int | None = None, max_key: int | None = None,
    path: str = "",
) -> tuple[str, str] | None:
    """The first (path, reason) of a value breaking a limit, or None. Iterative: depth costs no stack."""
    stack: list[tuple[Any, int, _Link]] = [(value, 0, None)]
    while stack:
        item, depth, link = stack.pop()
        kind = type(item)
        problem: str | None = None
        if kind is str:
            problem = text_problem(item)
            if problem is None and max_text is not None and len(item) > max_text:
                problem = f"longer than {max_text} characters"
        elif kind is dict:
            if depth >= max_depth:
                problem = f"nested deeper than {max_depth} levels (the JSON nesting limit)"
            else:
                for key, child in item.items():
                    if not isinstance(key, str):
                        return _path(path, link), "object keys must be strings"
                    bad = text_problem(key)
                    if bad is None and max_key is not None and len(key) > max_key:
                        bad = f"longer than {max_key} characters"
                    if bad is not None:
                        return _path(path, (link, key)), f"key {bad}"
                    stack.append((child, depth + 1, (link, key)))
        elif kind is list:
            if depth >= max_depth:
                problem = f"nested deeper than {max_depth} levels (the JSON nesting limit)"
            else:
                stack.extend((child, depth + 1, (link, i)) for i, child in enumerate(item))
        elif kind is bool or item is None:
            continue
        elif kind is int or kind is float:
            problem = number_problem(item)
        elif kind is _Marked:
            problem = item.reason
        elif isinstance(item, str):  # a StrEnum member of a fact
            problem = text_problem(item)
        else:
            problem = f"not a JSON value ({kind.__name__})"
        if problem is not None:
            return _path(path, link), problem
    return None


# --- decoding ----------------------------------------------------------------------------------


def _mark_int(text: str) -> Any:
    # decimal text of 20+ digits is out of range anyway: never build a huge int (CPU) from it
    if len(text.lstrip("-")) > 19:
        return _Marked("integer out of range: -2^63 <= n < 2^63")
    value = int(text)
    return value if MIN_INT <= value <= MAX_INT else _Marked("integer out of range: -2^63 <= n < 2^63")


def _mark_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Marked(f"number {shown(text, 24)} is not finite (overflows a double)")


def _mark_constant(text: str) -> Any:
    return _Marked(f"{text} is not a number JSON allows (NaN and Infinity are refused)")


_LENIENT = json.JSONDecoder(parse_int=_mark_int, parse_float=_mark_float, parse_constant=_mark_constant)


def _depth_error(what: str | None) -> MalformedPayload:
    return TooDeep(f"nested deeper than {MAX_DEPTH} levels (the JSON nesting limit)", what)


def _decode(data: bytes | str, what: str | None) -> Any:
    """Decode; syntax errors and pathological depth raise MalformedPayload, the rest may be _Marked."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise _depth_error(what) from None
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray | memoryview) else data
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"malformed JSON: not UTF-8 at byte {exc.start}", what) from None
    try:
        return _LENIENT.decode(text)
    except RecursionError:
        raise _depth_error(what) from None
    except json.JSONDecodeError as exc:
        raise MalformedPayload(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", what) from None
    except ValueError as exc:  # e.g. an int literal beyond the interpreter's digit limit
        raise MalformedPayload(f"malformed JSON: {shown(str(exc))}", what) from None


def raise_problem(problem: tuple[str, str] | None, prefix: str | None = None) -> None:
    """Raise the limit a value broke (422, naming the field), if any."""
    if problem is None:
        return
    where, reason = problem
    if reason.startswith("nested deeper"):
        raise TooDeep(reason, _field(prefix, where))
    raise InvalidEvent(reason, _field(prefix, where))


def _field(prefix: str | None, where: str) -> str | None:
    if prefix and where:
        return f"{prefix}{where}" if where.startswith("[") else f"{prefix}.{where}"
    return prefix or where or None


def loads(data: bytes | str, *, what: str | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a whole document and hold every value in it to the limits.

    Raises MalformedPayload (not JSON; nested too deep) or InvalidEvent (a value no store can hold,
    naming its path). `what` names the document in errors (e.g. `signedPayload`)."""
    value = _decode(data, what)
    raise_problem(find_problem(value, max_depth=max_depth), what)
    return value


def loads_item(data: bytes | str) -> Any:
    """One value (a line of NDJSON): the value, or a `Refused` naming the field that broke a limit.
    Syntax errors and pathological depth raise MalformedPayload."""
    return _checked(_decode(data, None))


def loads_each(data: bytes | str) -> tuple[bool, list[Any]]:
    """Decode one value or an array of values, holding each item to the limits on its own.

    Returns (was an array, items); an item that broke a limit is a `Refused` naming its field, so
    a batch can refuse one item and store the others. Syntax errors refuse the whole document."""
    value = _decode(data, None)
    if not isinstance(value, list):
        return False, [_checked(value)]
    return True, [_checked(item) for item in value]


def _checked(value: Any) -> Any:
    problem = find_problem(value, max_depth=MAX_DEPTH)
    if problem is None:
        return value
    where, reason = problem
    ident = value.get("id") if isinstance(value, dict) else None
    clean = isinstance(ident, str) and len(ident) <= 200 and text_problem(ident) is None
    return Refused(reason, where or None, ident if clean else None)


def raw_decode(text: str, start: int = 0) -> tuple[Any, int]:
    """One value starting at `text[start]` and the index where it ends.

    Like `json.JSONDecoder.raw_decode` (raises `json.JSONDecodeError` when incomplete), but
    NaN/Infinity/huge numbers come back marked (pass the value to `checked_value`) and a value too
    deep raises MalformedPayload instead of RecursionError (`skip_value` then finds its end)."""
    try:
        return _LENIENT.raw_decode(text, start)
    except RecursionError:
        raise _depth_error(None) from None


def skip_value(text: str, start: int = 0) -> int | None:
    """The end of the array or object starting at `text[start]`, or None if it does not end in `text`.

    Only brackets and strings are followed (no validation): it exists to step over one item that is
    too deep to decode, so the items after it can still be read."""
    depth = 0
    in_string = escaped = False
    for index in range(start, len(text)):
        ch = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def checked_value(value: Any) -> Any:
    """`value` (from `raw_decode`) or a `Refused` naming the field that broke a limit."""
    return _checked(value)
