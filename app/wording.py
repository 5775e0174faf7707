"""Words an operator reads: counted nouns, lists of allowed values, and validation errors in plain terms.

Kept in one place so that the CLI, the HTTP errors and the configuration loader say things the
same way ("1 row", "must be one of: a, b"), and no library's phrasing ("Input should be ...",
"Field required") reaches a user.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

_IRREGULAR = {"entry": "entries", "is": "are", "was": "were", "request": "requests"}


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`plural(1, "row")` → "1 row"; `plural(2, "row")` → "2 rows"; thousands separated."""
    if count == 1:
        return f"{count:,} {noun}"
    if many is None:
        many = _IRREGULAR.get(noun) or (noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou"
                                        else noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s")
    return f"{count:,} {many}"


def choices(values: Iterable[Any]) -> str:
    """"a, b, c" from enum members or strings."""
    return ", ".join(str(v.value) if isinstance(v, Enum) else str(v) for v in values)


def one_of(value: str | None, allowed: type[Enum], what: str) -> str | None:
    """None when `value` is None or allowed; else the reason naming the allowed values."""
    if value is None or value in {m.value for m in allowed}:
        return None
    return f"{value!r} is not a known {what}; must be one of: {choices(allowed)}"


_QUOTED = re.compile(r"'([^']*)'")
_SIMPLE = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "dict_type": "must be a table",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "decimal_type": "must be a number",
    "decimal_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "datetime_type": "must be a date-time (RFC 3339)",
    "datetime_parsing": "must be a date-time (RFC 3339)",
    "datetime_from_date_parsing": "must be a date-time (RFC 3339)",
}
_BOUNDS = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
}


def validation_reason(error: Mapping[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) in the project's own words."""
    kind = str(error.get("type", ""))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    msg = str(error.get("msg", "is not valid"))
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if kind in _BOUNDS:
        try:
            return _BOUNDS[kind].format(**{k: _number(v) for k, v in ctx.items()})
        except KeyError:
            return plain(msg)
    if kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", ""))
        names = _QUOTED.findall(expected) or [expected]
        return f"must be one of: {', '.join(names)}"
    if kind == "string_too_short":
        least = int(ctx.get("min_length", 1))
        return "must not be empty" if least <= 1 else f"must be at least {least} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"must have at least {plural(int(ctx.get('min_length', 1)), 'item')}"
    if kind == "too_long":
        return f"must have at most {plural(int(ctx.get('max_length', 0)), 'item')}"
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", msg)
    return plain(msg)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def plain(message: str) -> str:
    """Library phrasing rewritten: "Input should be a valid integer, unable to parse ..." → "must be an integer"."""
    text = message.replace("Value error, ", "")
    text = re.sub(r"^Invalid value for '([^']+)'(?: / '[^']+')*: ", r"\1: ", text)  # '--jobs' / '-j' too
    text = re.sub(r"('[^']*') is not one of ((?:'[^']*'(?:, )?)+)\.?",
                  lambda m: f"{m.group(1)} is not allowed; must be one of: {', '.join(_QUOTED.findall(m.group(2)))}",
                  text)
    text = re.sub(r"Input should be a valid (integer|number|boolean|string|dictionary|list)[^.;]*",
                  lambda m: "must be " + {"integer": "an integer", "number": "a number", "boolean": "true or false",
                                          "string": "a string", "dictionary": "a table",
                                          "list": "a list"}[m.group(1)], text)
    if "Input should be " in text and "'" in text:
        tail = text.split("Input should be ", 1)[1]
        text = text.split("Input should be ", 1)[0] + "must be one of: " + ", ".join(_QUOTED.findall(tail))
    text = text.replace("Input should be", "must be").replace("Field required", "is required")
    return text.replace("Extra inputs are not permitted", "unknown key")
