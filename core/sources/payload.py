"""Shape-tolerant reads of decoded store payloads, shared by the adapters.

Store bodies are JSON whose fields may be missing, null or of another type than documented; these
readers turn "not what we expected" into None (or an empty container) so each adapter decides, in
one place, whether that is an error.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from subledger.core.events import PeriodType, Reason, format_time


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def as_int(value: Any) -> int | None:
    """An int that is not a bool, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def dig(obj: Any, *keys: str) -> Any:
    """`obj[k1][k2]...`, or None as soon as a level is not an object."""
    for key in keys:
        obj = as_dict(obj).get(key)
    return obj


def fact_value(value: Any) -> Any:
    """A canonical-fact field as `parse_event` reads it back."""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Reason | PeriodType):
        return value.value
    return value
