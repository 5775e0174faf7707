"""Rollups: counts the console's overview and `audit stats` read instead of counting a million rows.

The overview asks "how many log entries, transitions and how much revenue per day in the last 30
days, how many messages pending and dead now". Counted exactly, that reads every index entry of
the window (about 2.8 s on the 1,000,000-event bench log). These tables hold the same counts,
kept by statement-level triggers with transition tables, so every writer (the unit of work's one
CTE statement, COPY, a bulk import's workers, replay, the relay) keeps them without knowing of
them, in the transaction that wrote the rows: a count is never ahead of or behind its rows.

- `rollup_log_days`: log entries per UTC day received, source, app, environment.
- `rollup_transition_days`: transitions per UTC day derived, app, kind, source, environment; live
  and superseded (an update of `superseded_at` moves a count from one to the other).
- `rollup_revenue_days`: live priced transitions per UTC day charged (occurred_at), app, currency
  and price text (summed as Decimals by the reader). 0009's index `transitions_revenue`, which
  served the same question by reading every priced transition, is dropped.
- `rollup_delivered_days`: delivered messages per UTC day delivered, app, destination.
- `rollup_outbox`: outbox rows now per app, destination, status (insert +, delete -, a status
  change by a row trigger that fires only when the status changes, so claims and leases cost
  nothing).

Every row carries `shard` = the writing backend's pid mod 64: concurrent writers (HTTP workers,
a bulk import's jobs, the relay) add to different rows instead of queueing on one hot row's lock
until commit; readers sum the shards. Each trigger's upsert is ordered by key, so two writers on
one shard lock in the same order. Counts are backfilled from the tables in this migration, after
the triggers exist (creating a trigger locks out writers until the migration commits).

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"
SHARD = "(pg_backend_pid() % 64)::smallint"

TABLES = f"""
CREATE TABLE rollup_log_days (
  day date NOT NULL, source text NOT NULL, app_id text NOT NULL, environment text NOT NULL,
  shard smallint NOT NULL, entries bigint NOT NULL,
  PRIMARY KEY (day, source, app_id, environment, shard)
);
CREATE TABLE rollup_transition_days (
  day date NOT NULL, app_id text NOT NULL, kind text NOT NULL, source text NOT NULL, environment text NOT NULL,
  shard smallint NOT NULL, live bigint NOT NULL, superseded bigint NOT NULL,
  PRIMARY KEY (day, app_id, kind, source, environment, shard)
);
CREATE TABLE rollup_revenue_days (
  day date NOT NULL, app_id text NOT NULL, currency text NOT NULL, price text NOT NULL,
  shard smallint NOT NULL, charges bigint NOT NULL,
  PRIMARY KEY (day, app_id, currency, price, shard)
);
CREATE TABLE rollup_delivered_days (
  day date NOT NULL, app_id text NOT NULL, destination text NOT NULL,
  shard smallint NOT NULL, delivered bigint NOT NULL,
  PRIMARY KEY (day, app_id, destination, shard)
);
CREATE TABLE rollup_outbox (
  app_id text NOT NULL, destination text NOT NULL, status text NOT NULL,
  shard smallint NOT NULL, rows bigint NOT NULL,
  PRIMARY KEY (app_id, destination, status, shard)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_log_days, rollup_transition_days, rollup_revenue_days,
  rollup_delivered_days, rollup_outbox TO {APP_ROLE};
"""


def _delta(rows: str) -> str:
    """The changed rows as (row, +1) for the new image and (row, -1) for the old one, by which
    transition tables the trigger's operation has."""
    return {"new": "SELECT *, 1 AS d FROM added",
            "old": "SELECT *, -1 AS d FROM removed",
            "both": "SELECT *, 1 AS d FROM added UNION ALL SELECT *, -1 FROM removed"}[rows]


def _transitions_upserts(rows: str) -> str:
    return f"""
    INSERT INTO rollup_transition_days AS r (day, app_id, kind, source, environment, shard, live, superseded)
    SELECT (t.created_at AT TIME ZONE 'UTC')::date, t.app_id, t.kind, coalesce(t.event_source, ''),
      coalesce(t.environment, ''), writer,
      coalesce(sum(t.d) FILTER (WHERE t.superseded_at IS NULL), 0),
      coalesce(sum(t.d) FILTER (WHERE t.superseded_at IS NOT NULL), 0)
    FROM ({_delta(rows)}) t GROUP BY 1, 2, 3, 4, 5
    HAVING coalesce(sum(t.d) FILTER (WHERE t.superseded_at IS NULL), 0) <> 0
        OR coalesce(sum(t.d) FILTER (WHERE t.superseded_at IS NOT NULL), 0) <> 0
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, app_id, kind, source, environment, shard)
      DO UPDATE SET live = r.live + excluded.live, superseded = r.superseded + excluded.superseded;
    INSERT INTO rollup_revenue_days AS r (day, app_id, currency, price, shard, charges)
    SELECT (t.occurred_at AT TIME ZONE 'UTC')::date, t.app_id, coalesce(t.currency, ''), t.price, writer, sum(t.d)
    FROM ({_delta(rows)}) t WHERE t.price IS NOT NULL AND t.superseded_at IS NULL
    GROUP BY 1, 2, 3, 4 HAVING sum(t.d) <> 0 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, app_id, currency, price, shard) DO UPDATE SET charges = r.charges + excluded.charges;
    """


def _outbox_upsert(rows: str) -> str:
    return f"""
    INSERT INTO rollup_outbox AS r (app_id, destination, status, shard, rows)
    SELECT t.app_id, t.destination, t.status, writer, sum(t.d)
    FROM ({_delta(rows)}) t GROUP BY 1, 2, 3 HAVING sum(t.d) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (app_id, destination, status, shard) DO UPDATE SET rows = r.rows + excluded.rows;
    """


def _function(name: str, body: str) -> str:
    """A trigger function of this migration: the writing backend's shard, the body, no row returned."""
    return f"""
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE writer smallint := {SHARD};
BEGIN
  {body}
  RETURN NULL;
END $$;
"""


def _count_added(table: str, day: str, keys: dict[str, str], measure: str) -> str:
    """Add the inserted rows (`added`) to `table` per UTC day of `day` and `keys` (column → expression)."""
    groups = ", ".join(str(i) for i in range(1, len(keys) + 2))
    return f"""
  INSERT INTO {table} AS r (day, {", ".join(keys)}, shard, {measure})
  SELECT ({day} AT TIME ZONE 'UTC')::date, {", ".join(keys.values())}, writer, count(*)
  FROM added GROUP BY {groups} ORDER BY {groups}
  ON CONFLICT (day, {", ".join(keys)}, shard) DO UPDATE SET {measure} = r.{measure} + excluded.{measure};"""


FUNCTIONS = (
    _function("subledger_rollup_log", _count_added(
        "rollup_log_days", "received_at",
        {"source": "source", "app_id": "app_id", "environment": "coalesce(environment, '')"}, "entries"))
    + _function("subledger_rollup_transitions", f"""
  IF TG_OP = 'INSERT' THEN {_transitions_upserts("new")}
  ELSIF TG_OP = 'UPDATE' THEN {_transitions_upserts("both")}
  ELSE {_transitions_upserts("old")}
  END IF;""")
    + _function("subledger_rollup_delivered", _count_added(
        "rollup_delivered_days", "delivered_at", {"app_id": "app_id", "destination": "destination"}, "delivered"))
    + _function("subledger_rollup_outbox", f"""
  IF TG_OP = 'INSERT' THEN {_outbox_upsert("new")}
  ELSE {_outbox_upsert("old")}
  END IF;""")
    # a row's status changed (dead-lettered, retried): rare, so one row at a time
    + _function("subledger_rollup_outbox_status", """
  INSERT INTO rollup_outbox AS r (app_id, destination, status, shard, rows)
  SELECT OLD.app_id, OLD.destination, s.status, writer, s.d
  FROM (VALUES (OLD.status, -1), (NEW.status, 1)) AS s(status, d) ORDER BY 3
  ON CONFLICT (app_id, destination, status, shard) DO UPDATE SET rows = r.rows + excluded.rows;""")
)

TRIGGERS = """
CREATE TRIGGER event_log_rollup AFTER INSERT ON event_log
  REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_log();
CREATE TRIGGER transitions_rollup_insert AFTER INSERT ON transitions
  REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_transitions();
CREATE TRIGGER transitions_rollup_update AFTER UPDATE ON transitions
  REFERENCING OLD TABLE AS removed NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_transitions();
CREATE TRIGGER transitions_rollup_delete AFTER DELETE ON transitions
  REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_transitions();
CREATE TRIGGER outbox_delivered_rollup AFTER INSERT ON outbox_delivered
  REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_delivered();
CREATE TRIGGER outbox_rollup_insert AFTER INSERT ON outbox
  REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_outbox();
CREATE TRIGGER outbox_rollup_delete AFTER DELETE ON outbox
  REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION subledger_rollup_outbox();
CREATE TRIGGER outbox_rollup_status AFTER UPDATE ON outbox
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION subledger_rollup_outbox_status();
"""

BACKFILL = """
INSERT INTO rollup_log_days (day, source, app_id, environment, shard, entries)
SELECT (received_at AT TIME ZONE 'UTC')::date, source, app_id, coalesce(environment, ''), 0, count(*)
FROM event_log GROUP BY 1, 2, 3, 4;
INSERT INTO rollup_transition_days (day, app_id, kind, source, environment, shard, live, superseded)
SELECT (created_at AT TIME ZONE 'UTC')::date, app_id, kind, coalesce(event_source, ''), coalesce(environment, ''), 0,
  count(*) FILTER (WHERE superseded_at IS NULL), count(*) FILTER (WHERE superseded_at IS NOT NULL)
FROM transitions GROUP BY 1, 2, 3, 4, 5;
INSERT INTO rollup_revenue_days (day, app_id, currency, price, shard, charges)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, app_id, coalesce(currency, ''), price, 0, count(*)
FROM transitions WHERE price IS NOT NULL AND superseded_at IS NULL GROUP BY 1, 2, 3, 4;
INSERT INTO rollup_delivered_days (day, app_id, destination, shard, delivered)
SELECT (delivered_at AT TIME ZONE 'UTC')::date, app_id, destination, 0, count(*)
FROM outbox_delivered GROUP BY 1, 2, 3;
INSERT INTO rollup_outbox (app_id, destination, status, shard, rows)
SELECT app_id, destination, status, 0, count(*) FROM outbox GROUP BY 1, 2, 3;
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)
    op.execute(BACKFILL)
    op.execute("DROP INDEX transitions_revenue")  # 0009's, for revenue per day: the rollup answers it now


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX transitions_revenue ON transitions (occurred_at)
          INCLUDE (app_id, price, currency, superseded_at) WHERE price IS NOT NULL;
        DROP TRIGGER outbox_rollup_status ON outbox;
        DROP TRIGGER outbox_rollup_delete ON outbox;
        DROP TRIGGER outbox_rollup_insert ON outbox;
        DROP TRIGGER outbox_delivered_rollup ON outbox_delivered;
        DROP TRIGGER transitions_rollup_delete ON transitions;
        DROP TRIGGER transitions_rollup_update ON transitions;
        DROP TRIGGER transitions_rollup_insert ON transitions;
        DROP TRIGGER event_log_rollup ON event_log;
        DROP FUNCTION subledger_rollup_outbox_status();
        DROP FUNCTION subledger_rollup_outbox();
        DROP FUNCTION subledger_rollup_delivered();
        DROP FUNCTION subledger_rollup_transitions();
        DROP FUNCTION subledger_rollup_log();
        DROP TABLE rollup_outbox, rollup_delivered_days, rollup_revenue_days, rollup_transition_days, rollup_log_days;
        """
    )
