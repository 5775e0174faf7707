"""Reads of the rollups (0011): counts per UTC day and of the outbox now, kept by triggers.

The overview and `audit stats` over whole UTC days ask how many log entries, transitions, priced
transitions and deliveries there were, and how many messages wait or are dead now. Counted from
the tables, that is one index entry read per row (seconds on a million-event log); here it is a
primary-key range over a few rows per day, the same cost on a log of a thousand events or of a
million. The triggers that keep these tables are in migrations/versions/0011_rollups.py; each
row is one writer shard's share, so every read sums over `shard`.

`days` is a half-open range of UTC dates [first, last + 1 day): what [since, until) means when
both are UTC midnights (`whole_days` says whether they are). `verify` recounts the tables and
compares (`drift`), so a rollup that ever disagreed with its rows is reported, not believed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row


@dataclass(frozen=True, slots=True)
class Days:
    """UTC dates first..last, both included."""

    first: date
    last: date

    @classmethod
    def ending(cls, today: date, n: int) -> Days:
        """The `n` UTC days that end with `today` (the overview's "last 30 days")."""
        return cls(today - timedelta(days=n - 1), today)

    @property
    def since(self) -> datetime:
        return datetime.combine(self.first, time(), UTC)

    @property
    def until(self) -> datetime:
        return datetime.combine(self.last + timedelta(days=1), time(), UTC)

    def params(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last}


def whole_days(since: datetime, until: datetime) -> Days | None:
    """[since, until) as whole UTC days when both are UTC midnights (and the range is not empty)."""
    a, b = since.astimezone(UTC), until.astimezone(UTC)
    if a.timetz() != time(tzinfo=UTC) or b.timetz() != time(tzinfo=UTC) or b <= a:
        return None
    return Days(a.date(), (b - timedelta(days=1)).date())


# Each: a range of rollup_*_days' primary key (day leads), summed over shards; a group whose
# shards cancel out (a count moved away) is left out.
LOG_SQL = """
SELECT source, app_id, environment, sum(entries)::bigint AS entries FROM rollup_log_days
WHERE day BETWEEN %(first)s AND %(last)s GROUP BY 1, 2, 3 HAVING sum(entries) <> 0 ORDER BY 1, 2, 3
"""
TRANSITIONS_SQL = """
SELECT kind, app_id, nullif(source, '') AS source, nullif(environment, '') AS environment,
  sum(live)::bigint AS live, sum(superseded)::bigint AS superseded
FROM rollup_transition_days WHERE day BETWEEN %(first)s AND %(last)s
GROUP BY kind, app_id, source, environment HAVING sum(live) <> 0 OR sum(superseded) <> 0 ORDER BY 1, 2, 3, 4
"""
TRANSITIONS_BY_DAY_SQL = """
SELECT day, kind, sum(live)::bigint AS live FROM rollup_transition_days
WHERE day BETWEEN %(first)s AND %(last)s GROUP BY 1, 2 HAVING sum(live) <> 0 ORDER BY 1, 2
"""
REVENUE_SQL = """
SELECT day, app_id, nullif(currency, '') AS currency, price, sum(charges)::bigint AS n FROM rollup_revenue_days
WHERE day BETWEEN %(first)s AND %(last)s GROUP BY day, app_id, currency, price HAVING sum(charges) <> 0
"""
DELIVERED_SQL = """
SELECT coalesce(sum(delivered), 0)::bigint FROM rollup_delivered_days WHERE day BETWEEN %(first)s AND %(last)s
"""
# The outbox now: rollup_outbox is a few rows per (app, destination, status).
OUTBOX_SQL = """
SELECT app_id, destination, status, sum(rows)::bigint AS rows FROM rollup_outbox
GROUP BY 1, 2, 3 HAVING sum(rows) <> 0 ORDER BY 1, 2, 3
"""


def _dicts(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def log(conn: psycopg.Connection, days: Days) -> list[dict[str, Any]]:
    """Log entries received per (source, app, environment) over `days`; environment '' for none."""
    return _dicts(conn, LOG_SQL, days.params())


def transitions(conn: psycopg.Connection, days: Days) -> list[dict[str, Any]]:
    """Transitions derived per (kind, app, source, environment) over `days`, live and superseded."""
    return _dicts(conn, TRANSITIONS_SQL, days.params())


def transitions_by_day(conn: psycopg.Connection, days: Days) -> list[tuple[date, str, int]]:
    """(UTC day, kind, live transitions derived that day)."""
    return [(day, str(kind), int(n)) for day, kind, n in conn.execute(TRANSITIONS_BY_DAY_SQL, days.params())]


def revenue(conn: psycopg.Connection, days: Days) -> list[tuple[date, str, str | None, str, int]]:
    """(UTC day charged, app, currency, price text, live transitions with that price)."""
    return [(day, str(app), currency, str(price), int(n))
            for day, app, currency, price, n in conn.execute(REVENUE_SQL, days.params())]


def delivered(conn: psycopg.Connection, days: Days) -> int:
    row = conn.execute(DELIVERED_SQL, days.params()).fetchone()
    return int(row[0]) if row else 0


def outbox(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """(app_id, destination, status, rows) of the outbox now: pending and dead rows."""
    return _dicts(conn, OUTBOX_SQL, {})


@dataclass(frozen=True, slots=True)
class _Counted:
    """What one rollup holds, said as a count of its table: its key columns (each an expression
    over the table, the day first), its measures (each an aggregate) and which rows count."""

    rollup: str
    table: str
    keys: dict[str, str]
    measures: dict[str, str]
    where: str = "true"

    def drift_sql(self) -> str:
        """The rollup (summed over shards) beside a fresh count of the table, the differences only:
        `what` names the group (its keys, '/'-joined, empty ones left out), `kept` and `counted` its
        measures (`3 live + 0 superseded` when there are several)."""
        keys = ", ".join(self.keys)
        counted = ", ".join([f"{expr} AS {col}" for col, expr in self.keys.items()]
                            + [f"{agg}::bigint AS {m}" for m, agg in self.measures.items()])
        kept = ", ".join(list(self.keys) + [f"sum({m})::bigint AS {m}" for m in self.measures])
        groups = ", ".join(str(i) for i in range(1, len(self.keys) + 1))

        def shown(side: str) -> str:
            if len(self.measures) == 1:
                return f"coalesce({side}.{next(iter(self.measures))}, 0)::text"
            return "concat_ws(' + ', " + ", ".join(f"coalesce({side}.{m}, 0) || ' {m}'" for m in self.measures) + ")"

        differs = " OR ".join(f"coalesce(kept.{m}, 0) <> coalesce(counted.{m}, 0)" for m in self.measures)
        return f"""
          WITH counted AS (SELECT {counted} FROM {self.table} WHERE {self.where} GROUP BY {groups}),
          kept AS (SELECT {kept} FROM {self.rollup} GROUP BY {groups})
          SELECT concat_ws('/', {", ".join(f"nullif({k}::text, '')" for k in self.keys)}) AS what,
            {shown("kept")} AS kept, {shown("counted")} AS counted
          FROM counted FULL JOIN kept USING ({keys})
          WHERE {differs}"""


def _day(column: str) -> str:
    return f"({column} AT TIME ZONE 'UTC')::date"


# What verify recounts: each rollup as a count of its table (the triggers of 0011 keep the same).
COUNTED = (
    _Counted("rollup_log_days", "event_log",
             {"day": _day("received_at"), "source": "source", "app_id": "app_id",
              "environment": "coalesce(environment, '')"},
             {"entries": "count(*)"}),
    _Counted("rollup_transition_days", "transitions",
             {"day": _day("created_at"), "app_id": "app_id", "kind": "kind", "source": "coalesce(event_source, '')",
              "environment": "coalesce(environment, '')"},
             {"live": "count(*) FILTER (WHERE superseded_at IS NULL)",
              "superseded": "count(*) FILTER (WHERE superseded_at IS NOT NULL)"}),
    _Counted("rollup_revenue_days", "transitions",
             {"day": _day("occurred_at"), "app_id": "app_id", "currency": "coalesce(currency, '')", "price": "price"},
             {"charges": "count(*)"}, where="price IS NOT NULL AND superseded_at IS NULL"),
    _Counted("rollup_delivered_days", "outbox_delivered",
             {"day": _day("delivered_at"), "app_id": "app_id", "destination": "destination"},
             {"delivered": "count(*)"}),
    _Counted("rollup_outbox", "outbox",
             {"app_id": "app_id", "destination": "destination", "status": "status"},
             {"rows": "count(*)"}),
)
DRIFT_SQL = {c.rollup: c.drift_sql() for c in COUNTED}


@dataclass(frozen=True, slots=True)
class Drift:
    """One rollup group whose kept count is not what its table holds."""

    table: str
    what: str
    kept: str
    counted: str


def drift(conn: psycopg.Connection) -> list[Drift]:
    """Every rollup group that disagrees with a fresh count of its table (each table read once).
    Run in one snapshot (verify's repeatable-read transaction) the two sides see the same rows."""
    out = []
    for table, sql in DRIFT_SQL.items():
        for what, kept, counted in conn.execute(sql).fetchall():
            out.append(Drift(table, str(what), str(kept), str(counted)))
    return out
