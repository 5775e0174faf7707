"""The schema, declared once: one SQLModel table model per table the migrations create.

The migrations (migrations/versions/0001..) stay the way the schema changes; these models say what
it is after the last of them, column for column: types, nullability, server defaults, primary keys
(and the sequences behind the two bigserial ones), unique and check constraints, indexes (partial
and covering ones included), generated columns and storage parameters. They are Alembic's
`target_metadata` (migrations/env.py), and tests/test_schema_models.py migrates a fresh database and
asserts that autogenerate finds no difference, so a migration without its model change (or the
reverse) fails a test instead of drifting.

What a model cannot say stays in the migrations alone: the plpgsql functions (`subledger_ingest_begin`,
`subledger_prune_duplicate_receipts`, `subledger_refuse_change`, the `subledger_rollup_*` family), the
triggers that make the log append-only and keep the rollups, the `subledger_app` role and its grants,
and the seed row of `log_head`.

Read-side code may query through these models; the hot write path stays on psycopg (COPY and the
one-statement batch writes), which neither maps rows to objects nor pays for the ORM.

Python-side types follow the columns: `jsonb` is `Any` (an object or an array), timestamps are aware
`datetime`s, `bytea` is `bytes`. A nullable column is `X | None`; a column the database fills (a
bigserial id, a generated column) is `X | None = None` on the model even where the column is NOT NULL.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from subledger.store.fact_references import FACT_REFERENCES

# Every column of the schema is one of these; naming them once keeps each model to what differs.
TEXT: Final = Text()
TIMESTAMPTZ: Final = DateTime(timezone=True)


def _text(*, nullable: bool = False, **kwargs: Any) -> Any:
    """A `text` column (SQLModel would make a `str` a VARCHAR)."""
    return Field(sa_type=TEXT, nullable=nullable, **kwargs)


def _timestamptz(*, nullable: bool = False) -> Any:
    return Field(sa_type=TIMESTAMPTZ, nullable=nullable)


def _jsonb(*, nullable: bool = False) -> Any:
    return Field(sa_type=JSONB(), nullable=nullable)


def _bigint(*, nullable: bool = False, **kwargs: Any) -> Any:
    return Field(sa_type=BigInteger(), nullable=nullable, **kwargs)


def _integer(*, nullable: bool = False, **kwargs: Any) -> Any:
    return Field(sa_type=Integer(), nullable=nullable, **kwargs)


def _boolean(*, nullable: bool = False, **kwargs: Any) -> Any:
    return Field(sa_type=Boolean(), nullable=nullable, **kwargs)


def _bytea() -> Any:
    return Field(sa_type=LargeBinary(), nullable=False)


def _serial() -> Any:
    """A `bigserial` primary key: SQLAlchemy renders BIGSERIAL, so the sequence is `<table>_id_seq`."""
    return Field(default=None, primary_key=True, sa_type=BigInteger())


# -- the log: its head, its entries, the receipts of duplicates (0001, 0003, 0005) -------------------


class LogHead(SQLModel, table=True):
    """The chain's head: one row (the migration seeds it), locked by every appender."""

    __tablename__ = "log_head"
    __table_args__ = (CheckConstraint("singleton", name="log_head_singleton_check"),)

    singleton: bool = Field(default=True, primary_key=True, sa_column_kwargs={"server_default": true()})
    position: int = _bigint()
    hash: bytes = _bytea()


class LogHeads(SQLModel, table=True):
    """The heads of chains 1..n-1 when the log is partitioned (0010); chain 0's head is `log_head`."""

    __tablename__ = "log_heads"
    __table_args__ = (CheckConstraint("chain > 0", name="log_heads_chain_check"),)

    chain: int = _integer(primary_key=True, sa_column_kwargs={"autoincrement": False})
    position: int = _bigint()
    hash: bytes = _bytea()


class LogEpoch(SQLModel, table=True):
    """A change of the number of chains (0010): none means the log has only ever had one."""

    __tablename__ = "log_epochs"
    __table_args__ = (
        CheckConstraint("epoch > 0", name="log_epochs_epoch_check"),
        CheckConstraint("chains > 0", name="log_epochs_chains_check"),
    )

    epoch: int = _integer(primary_key=True, sa_column_kwargs={"autoincrement": False})
    chains: int = _integer()
    first_position: int = _bigint()
    seal: bytes = _bytea()
    entries_before: int = _bigint()
    started_at: datetime = _timestamptz()


class EventLog(SQLModel, table=True):
    """The append-only, hash-chained log (its triggers live in migration 0001)."""

    __tablename__ = "event_log"
    __table_args__ = (
        UniqueConstraint("source", "external_id", name="event_log_source_external_id"),
        Index("event_log_subscription", "subscription_key", "occurred_at"),
        Index("event_log_app_user", "app_user_id", postgresql_where=text("app_user_id IS NOT NULL")),
        Index("event_log_received", "received_at", postgresql_include=["source", "app_id", "environment"]),
        Index("event_log_not_pushed", "arrival", "app_id", "source", postgresql_where=text("arrival <> 'push'")),
        # the store ids the facts name (0009; the console's search by transaction id, store/console.py)
        Index("event_log_references", literal_column(FACT_REFERENCES).label("refs"), postgresql_using="gin",
              postgresql_ops={"refs": "jsonb_path_ops"}),
    )

    position: int = Field(primary_key=True, sa_type=BigInteger(), sa_column_kwargs={"autoincrement": False})
    source: str = _text()
    external_id: str = _text()
    app_id: str = _text()
    kind: str = _text()
    subscription_key: str | None = _text(nullable=True)
    app_user_id: str | None = _text(nullable=True)
    environment: str | None = _text(nullable=True)
    occurred_at: datetime | None = _timestamptz(nullable=True)
    received_at: datetime = _timestamptz()
    historical: bool = _boolean(default=False, sa_column_kwargs={"server_default": false()})
    raw: bytes = _bytea()
    facts: Any = _jsonb()
    hash: bytes = _bytea()
    # push | reconciliation | import (0008); hashed when not `push` (core/chain.py)
    arrival: str = _text(default="push", sa_column_kwargs={"server_default": "push"})


class DuplicateReceipt(SQLModel, table=True):
    """One row per delivery of a notification the log already holds.

    The table has no primary key; the ORM needs one to map a class, so the mapper alone treats
    every column as the key (no constraint is declared, and none exists in the database)."""

    __tablename__ = "duplicate_receipts"
    __table_args__ = (
        Index("duplicate_receipts_key", "source", "external_id"),
        Index("duplicate_receipts_received", "received_at"),
    )
    __mapper_args__ = {"primary_key": ["source", "external_id", "received_at"]}

    source: str = _text()
    external_id: str = _text()
    received_at: datetime = _timestamptz()


# -- projections and transitions (0001, 0003) ---------------------------------------------------------


class Subscription(SQLModel, table=True):
    """The projection: each subscription's folded state."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        Index("subscriptions_app_user", "app_user_id"),
        Index(
            "subscriptions_due", "expires_at",
            postgresql_where=text("status IS NOT NULL AND status NOT IN ('expired', 'expired_promotional', 'paused')"),
        ),
    )

    key: str = _text(primary_key=True)
    app_id: str = _text()
    app_user_id: str | None = _text(nullable=True)
    status: str | None = _text(nullable=True)
    expires_at: datetime | None = _timestamptz(nullable=True)
    state: Any = _jsonb()
    last_position: int = _bigint()
    updated_at: datetime = _timestamptz()


class Transition(SQLModel, table=True):
    """A lifecycle transition; `event_source` and `environment` are generated from its body (0003)."""

    __tablename__ = "transitions"
    __table_args__ = (
        Index("transitions_subscription", "subscription_key"),
        Index("transitions_subscriber", "subscriber"),
        Index("transitions_created", "created_at",
              postgresql_include=["kind", "app_id", "event_source", "environment", "superseded_at"]),
    )

    id: str = _text(primary_key=True)
    subscription_key: str = _text()
    kind: str = _text()
    app_id: str = _text()
    subscriber: str = _text()
    occurred_at: datetime = _timestamptz()
    log_position: int = _bigint()
    historical: bool = _boolean()
    superseded_at: datetime | None = _timestamptz(nullable=True)
    created_at: datetime = _timestamptz()
    body: Any = _jsonb()
    event_source: str | None = Field(
        default=None, sa_column=Column("event_source", TEXT, Computed("body->>'event_source'", persisted=True)))
    environment: str | None = Field(
        default=None, sa_column=Column("environment", TEXT, Computed("body->>'environment'", persisted=True)))
    # the body's price and currency as the fold wrote them, text (0009): the revenue rollup (0011) reads them
    price: str | None = Field(
        default=None, sa_column=Column("price", TEXT, Computed("body->>'price'", persisted=True)))
    currency: str | None = Field(
        default=None, sa_column=Column("currency", TEXT, Computed("body->>'currency'", persisted=True)))


# -- the outbox, its attempts, delivered records and destinations' state (0001, 0002, 0005, 0006) ---


class Outbox(SQLModel, table=True):
    """A message waiting for (or given up on by) the relay."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("message_id", name="outbox_message_id_key"),
        CheckConstraint("status IN ('pending', 'dead')", name="outbox_status_check"),
        Index("outbox_due", "available_at", "id", postgresql_where=text("status = 'pending'")),
        Index("outbox_subscriber_order", "app_id", "destination", "subscriber", "id",
              postgresql_where=text("status = 'pending'")),
        Index("outbox_transition", "transition_id"),
        Index("outbox_dead", "app_id", "destination", postgresql_where=text("status = 'dead'")),
        # Vacuumed early: rows are claimed, updated and deleted all day long.
        {"postgresql_with": {"autovacuum_vacuum_scale_factor": 0.05}},
    )

    id: int | None = _serial()
    message_id: str = _text()
    transition_id: str = _text()
    destination: str = _text()
    app_id: str = _text()
    subscriber: str = _text()
    body: Any = _jsonb()
    status: str = _text(default="pending", sa_column_kwargs={"server_default": "pending"})
    attempts: int = _integer(default=0, sa_column_kwargs={"server_default": text("0")})
    available_at: datetime = _timestamptz()
    lease_until: datetime | None = _timestamptz(nullable=True)
    lease_owner: str | None = _text(nullable=True)
    first_attempt_at: datetime | None = _timestamptz(nullable=True)
    last_attempt_at: datetime | None = _timestamptz(nullable=True)
    last_status: int | None = _integer(nullable=True)
    last_error: str | None = _text(nullable=True)
    created_at: datetime = _timestamptz()


class OutboxDelivered(SQLModel, table=True):
    """A delivered message; past retention its body is pruned (NULL) and the row stays a tombstone."""

    __tablename__ = "outbox_delivered"
    __table_args__ = (
        Index("outbox_delivered_transition", "transition_id"),
        Index("outbox_delivered_at", "delivered_at"),
    )

    message_id: str = _text(primary_key=True)
    transition_id: str = _text()
    destination: str = _text()
    app_id: str = _text()
    subscriber: str = _text()
    body: Any | None = _jsonb(nullable=True)
    attempts: int = _integer()
    created_at: datetime = _timestamptz()
    first_attempt_at: datetime | None = _timestamptz(nullable=True)
    delivered_at: datetime = _timestamptz()
    status_code: int | None = _integer(nullable=True)


class OutboxAttempt(SQLModel, table=True):
    """One request's outcome for one message."""

    __tablename__ = "outbox_attempts"
    __table_args__ = (
        Index("outbox_attempts_message", "message_id"),
        Index("outbox_attempts_at", "attempted_at", "id"),
    )

    id: int | None = _serial()
    message_id: str = _text()
    attempted_at: datetime = _timestamptz()
    status_code: int | None = _integer(nullable=True)
    outcome: str = _text()
    response: str | None = _text(nullable=True)


class DestinationState(SQLModel, table=True):
    """A destination's pause (0001, 0002) and health during an outage (0006)."""

    __tablename__ = "destination_state"

    app_id: str = _text(primary_key=True)
    destination: str = _text(primary_key=True)
    paused: bool = _boolean(default=False, sa_column_kwargs={"server_default": false()})
    paused_reason: str | None = _text(nullable=True)
    paused_at: datetime | None = _timestamptz(nullable=True)
    retry_after: datetime | None = _timestamptz(nullable=True)
    paused_key: str | None = _text(nullable=True)
    failing_since: datetime | None = _timestamptz(nullable=True)
    failures: int = _integer(default=0, sa_column_kwargs={"server_default": text("0")})
    failing_reason: str | None = _text(nullable=True)
    probe_at: datetime | None = _timestamptz(nullable=True)


# -- identity links and retention (0001, 0003, 0005) --------------------------------------------------


class IdentityLink(SQLModel, table=True):
    """Which app user a store subscription belongs to."""

    __tablename__ = "identity_links"
    __table_args__ = (Index("identity_links_app_user", "app_user_id"),)

    app_id: str = _text(primary_key=True)
    store_subscription: str = _text(primary_key=True)
    app_user_id: str = _text()
    linked_at: datetime = _timestamptz()


class RetentionWatermark(SQLModel, table=True):
    """Per pruned table: nothing older than `pruned_before` is kept."""

    __tablename__ = "retention_watermarks"

    name: str = _text(primary_key=True)
    pruned_before: datetime = _timestamptz()
    pruned_at: datetime = _timestamptz()
    rows: int = _bigint(default=0, sa_column_kwargs={"server_default": text("0")})


class ReconciliationCursor(SQLModel, table=True):
    """Per source and app: the store time a reconciler has read up to, so a run resumes (0008)."""

    __tablename__ = "reconciliation_cursors"

    source: str = _text(primary_key=True)
    app_id: str = _text(primary_key=True)
    read_until: datetime = _timestamptz()
    updated_at: datetime = _timestamptz()


class VerifyRun(SQLModel, table=True):
    """One `subledger verify` result, keyed by when it finished; the console shows the latest (0009)."""

    __tablename__ = "verify_runs"

    finished_at: datetime = Field(primary_key=True, sa_type=TIMESTAMPTZ)
    started_at: datetime = _timestamptz()
    ok: bool = _boolean()
    entries: int = _bigint()
    subscriptions: int = _bigint()
    problem_count: int = _bigint()
    first_bad_position: int | None = _bigint(nullable=True)


# -- rollups: counts kept by triggers for the overview and `audit stats` (0011, store/rollups.py) -----


def _day() -> Any:
    return Field(primary_key=True, sa_type=Date())


def _key() -> Any:
    return _text(primary_key=True)


def _shard() -> Any:
    """The writing backend's pid mod 64, so concurrent writers add to different rows."""
    return Field(primary_key=True, sa_type=SmallInteger())


class RollupLogDay(SQLModel, table=True):
    """Log entries per UTC day received, source, app and environment ('' for none)."""

    __tablename__ = "rollup_log_days"

    day: date = _day()
    source: str = _key()
    app_id: str = _key()
    environment: str = _key()
    shard: int = _shard()
    entries: int = _bigint()


class RollupTransitionDay(SQLModel, table=True):
    """Transitions per UTC day derived (created_at), app, kind, source and environment."""

    __tablename__ = "rollup_transition_days"

    day: date = _day()
    app_id: str = _key()
    kind: str = _key()
    source: str = _key()
    environment: str = _key()
    shard: int = _shard()
    live: int = _bigint()
    superseded: int = _bigint()


class RollupRevenueDay(SQLModel, table=True):
    """Live priced transitions per UTC day charged (occurred_at), app, currency and price text."""

    __tablename__ = "rollup_revenue_days"

    day: date = _day()
    app_id: str = _key()
    currency: str = _key()
    price: str = _key()
    shard: int = _shard()
    charges: int = _bigint()


class RollupDeliveredDay(SQLModel, table=True):
    """Messages delivered per UTC day, app and destination."""

    __tablename__ = "rollup_delivered_days"

    day: date = _day()
    app_id: str = _key()
    destination: str = _key()
    shard: int = _shard()
    delivered: int = _bigint()


class RollupOutbox(SQLModel, table=True):
    """Outbox rows now per app, destination and status."""

    __tablename__ = "rollup_outbox"

    app_id: str = _key()
    destination: str = _key()
    status: str = _key()
    shard: int = _shard()
    rows: int = _bigint()


class SnsCertificate(SQLModel, table=True):
    """An Amazon SNS signing certificate as fetched, by URL, for re-verifying logged envelopes (0012)."""

    __tablename__ = "sns_certificates"

    url: str = _text(primary_key=True)
    pem: bytes = _bytea()
    first_fetched_at: datetime = _timestamptz()
    last_fetched_at: datetime = _timestamptz()


metadata: Final[MetaData] = SQLModel.metadata


# -- how autogenerate compares these models with a database --------------------------------------------


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object | None) -> bool:
    """Whether autogenerate compares `obj`: every table, column, index and constraint but one.

    Skipped, because no model can describe it:
    - the `alembic_version` table: Alembic's bookkeeping, created by Alembic itself rather than by a
      migration (Alembic already leaves its version table out; named here so the rule is visible).
    Nothing else needs skipping: autogenerate reflects no functions, triggers, roles or grants, which
    are the parts of the schema that live in the migrations alone."""
    return not (type_ == "table" and name == "alembic_version")


# compare_type: a column's type (TEXT vs VARCHAR, timestamptz vs timestamp) is part of the schema.
# compare_server_default: so are its defaults; PostgreSQL's spelling (`'pending'::text`) is compared
# by asking the server whether both expressions are equal, and bigserial ids' nextval() is skipped.
COMPARISON: Final[dict[str, Any]] = {
    "compare_type": True,
    "compare_server_default": True,
    "include_object": include_object,
}
