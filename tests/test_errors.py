"""One exception tree (core/errors.py) and one door for driver errors (store/db.py).

The mapping from psycopg's errors onto subledger's tree is pinned row by row below: callers above
store/ decide on these types alone (503 or not, reconnect or not, retry or give up), so a change of
mapping is a change of behaviour and must show up here. The second half drives the door through
real connections (cursor, server cursor, COPY, commit, transaction, pool, LISTEN), the third checks
the rules the tree stands for: no exception class outside core/errors.py, no layer above store/
that knows psycopg's errors, and no `suppress(Exception)`.
"""

from __future__ import annotations

import ast
import builtins
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import psycopg_pool
import pytest
from psycopg import errors as pg

from subledger.core import errors
from subledger.core.errors import (
    Conflict,
    Locked,
    PermissionDenied,
    SchemaNotCurrent,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    SubledgerError,
    Transient,
    ValueRefused,
)
from subledger.store import db
from subledger.store.db import Connection, Pool, connect, translate, translate_errors

ROOT = Path(__file__).resolve().parent.parent
LOST = "consuming input failed: server closed the connection unexpectedly\n\tThis probably means..."

# (driver error, subledger type it becomes, transient?)
MAPPING: list[tuple[psycopg.Error, type[StoreError], bool]] = [
    (pg.UniqueViolation("duplicate key value violates unique constraint"), Conflict, True),
    (pg.SerializationFailure("could not serialize access"), Conflict, True),
    (pg.DeadlockDetected("deadlock detected"), Conflict, True),
    (psycopg.OperationalError(LOST), StoreUnavailable, True),  # connection lost: no SQLSTATE
    (psycopg.OperationalError("connection failed: Connection refused"), StoreUnavailable, True),
    (psycopg.OperationalError("the connection is closed"), StoreUnavailable, True),
    (psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"), StoreUnavailable, True),
    (pg.AdminShutdown("terminating connection due to administrator command"), StoreUnavailable, True),
    (pg.CrashShutdown("terminating connection because of crash of another server process"), StoreUnavailable,
     True),
    (pg.CannotConnectNow("the database system is starting up"), StoreUnavailable, True),
    (pg.TooManyConnections("sorry, too many clients already"), StoreUnavailable, True),
    (pg.DiskFull("could not extend file"), StoreUnavailable, True),
    (pg.IdleInTransactionSessionTimeout("terminating connection due to idle-in-transaction timeout"),
     StoreUnavailable, True),
    (pg.QueryCanceled("canceling statement due to statement timeout"), StoreTimeout, True),
    (pg.LockNotAvailable("canceling statement due to lock timeout"), Locked, True),
    (pg.InsufficientPrivilege("permission denied for table event_log"), PermissionDenied, False),
    (pg.UndefinedTable('relation "outbox" does not exist'), SchemaNotCurrent, False),  # not migrated
    (pg.UndefinedColumn('column "lease_owner" does not exist'), SchemaNotCurrent, False),
    (pg.UndefinedFunction("function subledger_x() does not exist"), SchemaNotCurrent, False),
    (psycopg.DataError("value out of range"), ValueRefused, False),  # a client-side dump
    (pg.NumericValueOutOfRange("integer out of range"), ValueRefused, False),
    (pg.InvalidTextRepresentation('invalid input syntax for type integer: "x"'), ValueRefused, False),
    (pg.UntranslatableCharacter("unsupported Unicode escape sequence"), ValueRefused, False),
    (pg.CharacterNotInRepertoire("invalid byte sequence"), ValueRefused, False),
    (pg.ForeignKeyViolation("violates foreign key constraint"), StoreError, False),
    (pg.CheckViolation("violates check constraint"), StoreError, False),
    (pg.NotNullViolation("null value in column"), StoreError, False),
    (pg.SyntaxError('syntax error at or near "SELEC"'), StoreError, False),
    (pg.InFailedSqlTransaction("current transaction is aborted"), StoreError, False),
    (pg.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"), StoreError, False),
    (psycopg.InternalError("internal"), StoreError, False),
]


@pytest.mark.parametrize(("driver", "expected", "transient"), MAPPING,
                         ids=[f"{type(d).__name__}-{i}" for i, (d, _, _) in enumerate(MAPPING)])
def test_each_driver_error_becomes_one_subledger_type(
    driver: psycopg.Error, expected: type[StoreError], transient: bool
) -> None:
    mapped = translate(driver)
    assert type(mapped) is expected, (type(driver).__name__, driver.sqlstate, type(mapped).__name__)
    assert isinstance(mapped, Transient) is transient
    assert "\n" not in str(mapped) and "\t" not in str(mapped)  # one line for a log or a CLI error
    with pytest.raises(expected) as raised, translate_errors():
        raise driver
    assert raised.value.__cause__ is driver  # the operator's log keeps the driver's own error


@pytest.mark.parametrize("bug", [psycopg.ProgrammingError("the last operation didn't produce records"),
                                 psycopg.InterfaceError("the cursor is closed")])
def test_a_driver_error_our_code_caused_is_left_as_a_bug(bug: psycopg.Error) -> None:
    """No SQLSTATE and a misuse class: a 503 would hide a bug; it must surface as a 500."""
    with pytest.raises(type(bug)) as raised, translate_errors():
        raise bug
    assert raised.value is bug


def test_transient_is_a_type_mixed_into_the_tree() -> None:
    transient = {name for name, value in vars(errors).items()
                 if isinstance(value, type) and issubclass(value, Transient) and value is not Transient}
    assert transient == {"Conflict", "StoreUnavailable", "StoreTimeout", "Locked", "SignatureUncheckable",
                         "SourceUnavailable"}
    assert issubclass(errors.SignatureUncheckable, errors.BadSignature)  # still a refusal of the body
    assert not issubclass(errors.SchemaNotCurrent, Transient) and not issubclass(errors.PermissionDenied, Transient)


def test_an_adapter_bug_on_a_captured_line_is_an_internal_error_with_an_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`ingest --format`: the import goes on, but the line is not called bad input: it names an error
    id, and the traceback is logged under it."""
    from subledger.app.canonical import Rejection
    from subledger.app.sources import captured_incoming

    class Broken:
        def parse_captured(self, *_: Any, **__: Any) -> Any:
            raise TypeError("unhashable type: 'list'")

    caplog.set_level(logging.ERROR, logger="subledger.ingest")
    refused = captured_incoming(cast(Any, Broken()), "revenuecat", b"{}", cast(Any, None), app_id="app")
    assert isinstance(refused, Rejection) and refused.reason.startswith("internal error"), refused
    logged = [r for r in caplog.records if r.exc_info is not None and r.exc_info[0] is TypeError]
    assert logged and getattr(logged[0], "error_id", "") in refused.reason and logged[0].levelno == logging.ERROR


# -- the door, through real connections ------------------------------------------------------------


@pytest.fixture
def door(db_url: str) -> Iterator[psycopg.Connection]:
    conn = connect(db_url, autocommit=True)
    try:
        conn.execute("CREATE TABLE door_probe (id int PRIMARY KEY, n int CHECK (n > 0))")
        yield conn
    finally:
        conn.close()


def test_every_connection_subledger_opens_is_the_translating_one(door: psycopg.Connection, db_url: str) -> None:
    assert isinstance(door, Connection)
    with Pool(db_url, timeout=2, max_size=1) as pool, pool.connection() as pooled:
        assert isinstance(pooled, Connection)


def test_statements_raise_the_tree(door: psycopg.Connection) -> None:
    door.execute("INSERT INTO door_probe VALUES (1, 1)")
    with pytest.raises(Conflict):
        door.execute("INSERT INTO door_probe VALUES (1, 1)")
    with pytest.raises(SchemaNotCurrent):
        door.execute("SELECT * FROM no_such_table")
    with pytest.raises(ValueRefused):
        door.execute("SELECT %s::int", ("x",))
    with pytest.raises(StoreError):
        door.cursor().executemany("INSERT INTO door_probe VALUES (%s, %s)", [(2, 1), (3, -1)])
    with pytest.raises(StoreTimeout):
        door.execute("SET statement_timeout = '50ms'")
        door.execute("SELECT pg_sleep(2)")
    door.execute("RESET statement_timeout")
    with pytest.raises(Conflict), door.cursor().copy("COPY door_probe (id, n) FROM STDIN") as copy:
        copy.write_row((1, 1))
    with pytest.raises(ValueRefused), door.transaction(), door.cursor(name="probe") as named:
        named.execute("SELECT 1 / (3 - g) FROM generate_series(1, 5) g")  # fails as it is fetched
        named.fetchall()
    with pytest.raises(ValueRefused):
        list(door.cursor().stream("SELECT 1 / (3 - g) FROM generate_series(1, 5) g"))


def test_commit_and_transaction_exit_raise_the_tree(db_url: str) -> None:
    with connect(db_url) as conn:
        conn.execute("CREATE TABLE door_late (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
        conn.commit()
        with pytest.raises(Conflict), conn.transaction():  # the violation surfaces at COMMIT
            conn.execute("INSERT INTO door_late VALUES (1), (1)")
        conn.execute("INSERT INTO door_late VALUES (2), (2)")
        with pytest.raises(Conflict):
            conn.commit()


def test_a_locked_row_is_locked(door: psycopg.Connection, db_url: str) -> None:
    door.execute("INSERT INTO door_probe VALUES (1, 1)")
    with connect(db_url) as holder:
        holder.execute("SELECT * FROM door_probe WHERE id = 1 FOR UPDATE")
        door.execute("SET lock_timeout = '50ms'")
        with pytest.raises(Locked):
            door.execute("UPDATE door_probe SET n = 2 WHERE id = 1")


def test_a_lost_connection_is_unavailable_everywhere(door: psycopg.Connection, db_url: str) -> None:
    door.execute("LISTEN door")
    with connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (door.info.backend_pid,))
    with pytest.raises(StoreUnavailable):
        for _ in door.notifies(timeout=2.0):
            pass
    with pytest.raises(StoreUnavailable):
        door.execute("SELECT 1")
    with pytest.raises(StoreUnavailable):
        door.cursor()


def test_an_exhausted_pool_is_unavailable(db_url: str) -> None:
    with Pool(db_url, timeout=0.2, max_size=1) as pool, pool.connection():
        got: list[BaseException] = []

        def other() -> None:
            try:
                with pool.connection():
                    pass
            except BaseException as exc:  # the assertion is on the type, in the main thread
                got.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
    assert len(got) == 1 and type(got[0]) is StoreUnavailable, got


def test_a_cursor_used_wrongly_is_not_disguised_as_a_database_failure(door: psycopg.Connection) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        door.execute("SET search_path = public").fetchall()


def test_unreachable_database_is_one_unavailable_line() -> None:
    with pytest.raises(StoreUnavailable) as raised:
        connect("postgresql://nobody@127.0.0.1:9/none", timeout=1)
    assert "\n" not in str(raised.value) and "127.0.0.1" in str(raised.value)


# -- the rules the tree stands for -----------------------------------------------------------------

LAYERS = ("core", "store", "outbox", "scheduler", "app")
ABOVE_STORE = ("outbox", "scheduler", "app")
BUILTIN_BASES = {name for name, value in vars(builtins).items()
                 if isinstance(value, type) and issubclass(value, BaseException)}


def _modules(*layers: str) -> Iterator[tuple[Path, ast.Module]]:
    for layer in layers:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path, ast.parse(path.read_text(), str(path))


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def test_every_exception_class_is_in_core_errors() -> None:
    tree = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}
    outside = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
        for path, module in _modules(*LAYERS) if path != ROOT / "core" / "errors.py"
        for node in ast.walk(module) if isinstance(node, ast.ClassDef)
        if any(_base_name(b) in tree | BUILTIN_BASES or _base_name(b).endswith(("Error", "Exception"))
               for b in node.bases)
    ]
    assert outside == []
    assert all(issubclass(getattr(errors, n), SubledgerError) for n in tree - BUILTIN_BASES - {"SubledgerError"})


def test_no_layer_above_store_knows_driver_errors() -> None:
    """store/db.py translates; above it, a failure is a StoreError (or Transient), never psycopg's."""
    found = []
    for path, module in _modules(*ABOVE_STORE):
        for node in ast.walk(module):
            text = ast.unparse(node) if isinstance(node, ast.ExceptHandler | ast.ImportFrom | ast.With) else ""
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("psycopg"):
                names = {a.name for a in node.names}
                if names & {"Error", "OperationalError", "errors", "DatabaseError", "InterfaceError"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {text}")
            elif isinstance(node, ast.ExceptHandler | ast.With) and (
                "psycopg." in text.split(":")[0] or "translate_errors" in text.split(":")[0]
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {text.splitlines()[0]}")
            elif isinstance(node, ast.ImportFrom) and "translate_errors" in {a.name for a in node.names}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {text}")
    assert found == []


def test_no_bare_suppress_of_every_exception() -> None:
    """Catch what is expected; the rest is logged with its traceback (never swallowed silently)."""
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path, module in _modules(*LAYERS)
        for node in ast.walk(module)
        if isinstance(node, ast.Call) and _base_name(node.func) == "suppress"
        and any(_base_name(a) in {"Exception", "BaseException"} for a in node.args)
    ]
    assert found == []


def test_transient_is_never_read_from_message_text() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path, module in _modules(*LAYERS)
        for node in ast.walk(module)
        if isinstance(node, ast.Call) and _base_name(node.func) in {"endswith", "startswith", "__contains__"}
        and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and "transient" in a.value for a in node.args)
    ]
    assert found == []
    assert db.translate is translate
