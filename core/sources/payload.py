"""Shape-tolerant reads of decoded store payloads, shared by the adapters.

Store bodies are JSON whose fields may be missing, null or of another type than documented; these
readers turn "not what we expected" into None (or an empty container) so each adapter decides, in
one place, whether that is an error.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from subledger.core.errors import InvalidEvent
from subledger.core.events import EARLIEST_TIME, LATEST_TIME, MAX_ID_LENGTH, PeriodType, Reason, format_time

TimeUnit = Literal["milliseconds", "seconds"]
_PER_SECOND: dict[TimeUnit, int] = {"milliseconds": 1000, "seconds": 1}
# The canonical range (core.events) in whole units since the epoch: [1970, 2200).
_TIME_LIMIT = {unit: int((LATEST_TIME - EARLIEST_TIME).total_seconds()) * n for unit, n in _PER_SECOND.items()}


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


def unix_time(value: Any, name: str, *, unit: TimeUnit = "milliseconds", text: bool = False) -> datetime:
    """UNIX time in whole `unit`s → aware UTC datetime, held to the canonical range [1970, 2200).

    Integer arithmetic, so no float rounding; a bool is not a number. `text`: the integer may also
    come as a JSON string of digits (Google sends int64 fields that way). Every adapter reads its
    epoch times here, so one range rule holds them all; `name` is the adapter's own field name.
    """
    count = as_int(value)
    if count is None and text and isinstance(value, str) and value.isdigit() and len(value) <= 15:
        count = int(value)
    if count is None:
        raise InvalidEvent(f"must be UNIX {unit}", name)
    if not 0 <= count < _TIME_LIMIT[unit]:
        raise InvalidEvent(f"must be UNIX {unit} before 2200-01-01 (the accepted range)", name)
    return EARLIEST_TIME + timedelta(seconds=count // _PER_SECOND[unit], milliseconds=count % _PER_SECOND[unit])


def unix_time_or_none(value: Any, name: str, *, unit: TimeUnit = "milliseconds") -> datetime | None:
    """An optional epoch time: absent (None) is None, anything else must be a valid `unix_time`."""
    return None if value is None else unix_time(value, name, unit=unit)


def delivery_id(value: Any, name: str) -> str:
    """A delivery's idempotency key (notification UUID, event id): required, at most MAX_ID_LENGTH."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent("is required", name)
    if len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(f"longer than {MAX_ID_LENGTH} characters", name)
    return value


def fact_id(external_id: str, index: int) -> str:
    """The id of a delivery's `index`-th fact: the delivery's own id, then `id#1`, `id#2`, ...

    Facts of one delivery share its instant, so the suffix also orders them (`id` < `id#1`)."""
    return external_id if index == 0 else f"{external_id}#{index}"


def country_code(value: Any) -> str | None:
    """A two-letter country (upper-cased), else None: only informative, so dropped, never refused."""
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return None
