"""Recovery: after a destination outage (per-destination backoff, probes) and after a killed relay
(a short lease, renewed while a relay works).

The outage test uses the production relay (RelayConfig(): row backoff 1 s doubling to 5 min, probe
backoff capped at 5 s) against a real fake Segment that answers 500 for `OUTAGE` seconds. Set
SUBLEDGER_TEST_OUTAGE_SECONDS=60 to measure the README's 60 s figure by hand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fake_segment import (
    APP,
    FakeSegment,
    ingest_events,
    lifecycle,
    outbox_counts,
    routes_for,
    settings_for,
    write_config,
)
from typer.testing import CliRunner

from subledger.app.cli import app as cli
from subledger.core.delivery import (
    PROBE_CAP_SECONDS,
    Backoff,
    Delivered,
    RetryAt,
    destination_failed,
    next_probe,
)
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.sink import Reply, Request, Reset
from subledger.scheduler.service import Scheduler, SchedulerConfig
from subledger.store import audit

SUBLEDGER = str(Path(sys.executable).parent / "subledger")
OUTAGE = float(os.environ.get("SUBLEDGER_TEST_OUTAGE_SECONDS", "8"))

_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _stop_what_was_started() -> Iterator[None]:
    """Every relay process a test starts is killed at its end, pass or fail."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _start(db_url: str, config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A real `subledger relay` with the default lease (10 s): what production runs."""
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(config.parent / "data")}
    env.pop("SUBLEDGER_CONFIG", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [SUBLEDGER, "relay", "--config", str(config), "--database-url", db_url, "--no-expirations",
             "--interval", "0.2", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    _started.append(proc)
    return proc


def _wait(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def _pending(db_url: str) -> int:
    return outbox_counts(db_url).get("pending", 0)


# -- pure rules ---------------------------------------------------------------------------------


def test_only_a_failure_of_the_destination_backs_the_destination_off() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert destination_failed(RetryAt(now, "500: boom", 500))
    assert not destination_failed(RetryAt(now, "429", 429, destination_wide=True))  # an answer, with a wait
    assert not destination_failed(Delivered(200))
    capped = Backoff(1.0, PROBE_CAP_SECONDS)
    # 1 s doubling, capped at 5 s: a recovered destination waits at most the cap for its next probe
    assert [next_probe(now, n, 1.0, capped) - now for n in (1, 2, 3, 4, 9, 30)] == [
        timedelta(seconds=s) for s in (1, 2, 4, 5, 5, 5)
    ]
    asked = now + timedelta(seconds=30)  # a 503's Retry-After is honoured
    assert next_probe(now, 1, 0.0, capped, asked) == asked


# -- a destination outage -----------------------------------------------------------------------


@pytest.mark.slow
def test_backlog_drains_within_seconds_after_an_outage(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        transitions = ingest_events(db_url, settings, [e for n in range(200) for e in lifecycle(n)])
        lock = threading.Lock()
        seen: dict[str, Any] = {"until": None, "failed": [], "first_success": None}

        def outage(request: Request) -> Reply | None:
            with lock:
                now = time.monotonic()
                if seen["until"] is None:
                    seen["until"] = now + OUTAGE  # the outage starts with the relay's first request
                if now < seen["until"]:
                    seen["failed"].append(request)
                    return Reply(500, {"error": "internal server error"})
                if seen["first_success"] is None:
                    seen["first_success"] = now
            return None

        fake.hook = outage
        relay = Relay(db_url, routes_for(settings), RelayConfig())  # production backoff, lease, probe cap
        jobs = Scheduler(db_url, relay, config=SchedulerConfig(expirations=False))
        caplog.set_level(logging.INFO, logger="subledger.relay")
        jobs.start()
        try:
            drained = _wait(lambda: _pending(db_url) == 0, OUTAGE + 30, step=0.1)
            done = time.monotonic()
        finally:
            jobs.stop()
        assert drained, outbox_counts(db_url)
        assert fake.capture.conflicting() == {}
        assert fake.capture.distinct() == transitions * 2  # nothing lost
        failed: list[Request] = seen["failed"]
    recovered_at: float = seen["until"]
    first_success: float = seen["first_success"]
    after_recovery, after_first_success = done - recovered_at, done - first_success
    print(f"\noutage {OUTAGE:g} s: first success {first_success - recovered_at:.1f} s after recovery, "
          f"drained {after_recovery:.1f} s after recovery ({after_first_success:.1f} s after the first success); "
          f"{len(failed)} requests during the outage")
    assert outbox_counts(db_url) == {"delivered": transitions}
    # The first success is a probe at most the probe cap (plus a 1 s poll) after recovery, and it
    # releases the whole backlog: no row's own backoff grew during the outage.
    assert first_success - recovered_at <= PROBE_CAP_SECONDS + 1.5
    assert after_first_success <= 3.0
    # While it failed, the destination got one small probe (one row: a track and an identify) at
    # its backoff, not a batch per row's backoff.
    assert all(len(r.messages) <= 2 for r in failed[1:]), [len(r.messages) for r in failed]
    assert len(failed) <= 2 + OUTAGE / 2
    lines = [r.getMessage() for r in caplog.records if r.name == "subledger.relay"]
    started = [line for line in lines if "is failing" in line]
    ended = [line for line in lines if "recovered after" in line]
    assert len(started) == 1 and f"{APP}/segment" in started[0] and "500" in started[0], lines
    assert len(ended) == 1 and f"{APP}/segment" in ended[0], lines
    match = re.search(r"recovered after ([\d.]+) s \((\d+) failed requests?\); releasing a backlog of (\d+) rows",
                      ended[0])
    assert match, ended[0]
    assert OUTAGE - 1 <= float(match[1]) <= OUTAGE + PROBE_CAP_SECONDS + 2
    assert int(match[2]) == len(failed)
    assert int(match[3]) == transitions - 1  # everything but the probe that succeeded
    with psycopg.connect(db_url) as conn:
        state = conn.execute("SELECT failing_since, failures, probe_at FROM destination_state").fetchall()
    assert state == [(None, 0, None)]


def test_a_row_that_alone_gets_500s_backs_off_alone(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A row-specific 5xx keeps per-row backoff: probes try other rows, so it cannot hold the rest."""
    caplog.set_level(logging.INFO, logger="subledger.relay")
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        ingest_events(db_url, settings, [e for n in range(6) for e in lifecycle(n)])
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT message_id, subscriber FROM outbox ORDER BY id LIMIT 1").fetchone()
        assert row is not None
        bad, bad_subscriber = row

        def crash_on_bad(request: Request) -> Reply | None:
            if any(m.get("messageId") == bad for m in request.messages):
                return Reply(500, {"error": "internal server error"})
            return None

        fake.hook = crash_on_bad
        relay = Relay(db_url, routes_for(settings), RelayConfig(backoff=Backoff(0.05, 0.4)))
        relay.drain_all(timeout=2.5)
        relay.close()
    with psycopg.connect(db_url) as conn:
        pending = conn.execute("SELECT DISTINCT subscriber FROM outbox WHERE status = 'pending'").fetchall()
        attempts = conn.execute("SELECT attempts FROM outbox WHERE message_id = %s", (bad,)).fetchone()
    assert pending == [(bad_subscriber,)]  # every other subscriber was delivered in full
    assert outbox_counts(db_url) == {"pending": 6, "delivered": 30}
    assert attempts is not None and attempts[0] >= 3  # still retried, on its own backoff
    # Its 500 made the destination look failing, and a probe with another row ended that at once.
    assert any("recovered after" in r.getMessage() for r in caplog.records if r.name == "subledger.relay")


# -- a killed relay -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_relay_delays_delivery_by_at_most_the_lease(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        config = write_config(tmp_path / "relay.toml", fake.url)
        transitions = ingest_events(db_url, settings, [e for n in range(30) for e in lifecycle(n)])
        lock = threading.Lock()
        killed: dict[str, Any] = {}
        victim: dict[str, int] = {}

        def kill_on_first_request(request: Request) -> Reset | None:
            with lock:
                if not killed and "pid" in victim:
                    os.kill(victim["pid"], signal.SIGKILL)  # the relay dies holding its claim
                    killed.update(at=time.time(), ids={str(m["messageId"]) for m in request.messages})
                    return Reset()
            return None

        fake.hook = kill_on_first_request
        first = _start(db_url, config, log, "--batch-rows", "10")
        with lock:
            victim["pid"] = first.pid
        assert _wait(lambda: bool(killed), 30), log.read_text()[-2000:]
        assert first.wait(timeout=10) == -signal.SIGKILL

        # While the dead relay's claim stands, `outbox list` and the audit timeline show who holds what.
        runner = CliRunner()
        listed = runner.invoke(cli, ["outbox", "list", "--json", "--config", str(config), "--database-url", db_url])
        assert listed.exit_code == 0, listed.output
        held = [r for r in json.loads(listed.stdout) if r["lease_owner"]]
        assert len(held) == 10
        assert all(r["lease_owner"].split(":")[1] == str(first.pid) for r in held)
        until = max(datetime.fromisoformat(r["lease_until"]) for r in held)
        assert until - datetime.now(UTC) <= timedelta(seconds=10)  # the short lease, not 60 s
        with psycopg.connect(db_url) as conn:
            found = audit.timeline(conn, held[0]["subscriber"])
        leased = [d for d in found.deliveries if d.lease_owner]
        assert [d.lease_owner for d in leased] == [held[0]["lease_owner"]] and leased[0].lease_until is not None

        second = _start(db_url, config, log)
        drained = _wait(lambda: _pending(db_url) == 0, 40, step=0.1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0, log.read_text()[-2000:]
        assert drained, outbox_counts(db_url)
        first_seen = fake.capture.first_seen()
        assert fake.capture.conflicting() == {}
        assert fake.capture.distinct() == transitions * 2
    stall = max(first_seen[mid] for mid in killed["ids"]) - killed["at"]
    print(f"\nlongest delivery stall after a SIGKILLed relay: {stall:.1f} s")
    assert stall <= 12.0
    assert outbox_counts(db_url) == {"delivered": transitions}


def test_a_renewed_lease_keeps_a_slow_request_to_its_relay(db_url: str) -> None:
    """A request slower than the lease: the heartbeat renews it, so no other relay sends those rows."""
    with FakeSegment() as fake:
        settings = settings_for(fake.url, timeout_seconds=6.0)
        transitions = ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))

        in_flight = threading.Event()

        def slow_first(request: Request) -> None:
            if request.number == 1:
                in_flight.set()
                time.sleep(3.5)  # three and a half leases
            return None

        fake.hook = slow_first
        lease = timedelta(seconds=1)
        holder = Relay(db_url, routes_for(settings), RelayConfig(lease=lease, backoff=Backoff(0.01, 0.05)))
        other = Relay(db_url, routes_for(settings), RelayConfig(lease=lease, backoff=Backoff(0.01, 0.05)))
        try:
            working = threading.Thread(target=holder.run_pass)
            working.start()
            assert in_flight.wait(5)  # the holder has claimed the rows and is sending them
            claimed_by_other = 0
            renewed: list[bool] = []
            started = time.monotonic()
            while working.is_alive():
                claimed_by_other += other.run_pass().claimed
                if time.monotonic() - started > 2.0 and not renewed:
                    with psycopg.connect(db_url) as conn:
                        row = conn.execute(
                            "SELECT count(*), bool_and(lease_until > now()) FROM outbox WHERE lease_owner = %s",
                            (holder.config.owner,),
                        ).fetchone()
                    renewed.append(row == (2, True))
                time.sleep(0.05)
            working.join()
            assert claimed_by_other == 0
            assert renewed == [True]  # 2 s into a 1 s lease, both rows still held, and not expired
            other.drain_all(timeout=10)
            sent = Counter(str(m.get("messageId")) for r in fake.seen_requests for m in r.messages)
        finally:
            holder.close()
            other.close()
        assert fake.capture.distinct() == transitions * 2
    assert max(sent.values()) == 1  # no messageId was ever sent twice
    assert outbox_counts(db_url) == {"delivered": transitions}


def test_a_lease_shorter_than_a_second_is_refused(db_url: str) -> None:
    with pytest.raises(ValueError, match="renewed every third of it"):
        Relay(db_url, {}, RelayConfig(lease=timedelta(seconds=0.5)))
