"""Crash safety of the real `subledger relay` process: SIGKILL it 20 times mid-run; run two at once.

Kills land at random points: while the fake endpoint holds a request it has accepted (the
acknowledgement is lost), and at random short delays after a request arrived (mid-HTTP, mid-record,
mid-claim). Each time a new process starts; leases of the dead one run out and its rows are sent again under the same
messageIds. Nothing may be lost, and no messageId may ever carry two different payloads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_segment import (
    FakeSegment,
    ingest_events,
    lifecycle,
    outbox_counts,
    requests_so_far,
    settings_for,
    write_config,
)

from subledger.outbox.sink import Request, Reset

SUBLEDGER = str(Path(sys.executable).parent / "subledger")


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _stop_what_was_started() -> Iterator[None]:
    """Every relay a test starts is killed at its end, pass or fail: nothing outlives the test."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _start(db_url: str, config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(config.parent / "data")}
    env.pop("SUBLEDGER_CONFIG", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [SUBLEDGER, "relay", "--config", str(config), "--database-url", db_url, "--no-expirations",
             "--interval", "0.2", "--backoff-base", "0.05", "--backoff-cap", "0.5", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    _started.append(proc)
    return proc


def _wait(predicate: Any, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _pending(db_url: str) -> int:
    return outbox_counts(db_url).get("pending", 0)


@pytest.mark.slow
def test_sigkill_twenty_times_loses_nothing(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(20261128)
    log = tmp_path / "relay.log"
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        config = write_config(tmp_path / "relay.toml", fake.url)
        transitions = ingest_events(db_url, settings, [e for n in range(834) for e in lifecycle(n)])
        assert transitions >= 5000

        victim: dict[str, Any] = {"at": None, "pid": None}
        lock = threading.Lock()

        def kill_while_holding(request: Request) -> Reset | None:
            with lock:
                if victim["at"] is not None and request.number >= victim["at"]:
                    fake.capture.add(request)  # "Segment" took it; the acknowledgement is what gets lost
                    os.kill(victim["pid"], signal.SIGKILL)
                    victim["at"] = None
                    return Reset()
            return None

        fake.hook = kill_while_holding
        kills = {"holding a request": 0, "after a delay": 0}
        for i in range(20):
            proc = _start(db_url, config, log, "--batch-rows", "40", "--lease-seconds", "2.5")
            target = requests_so_far(fake) + rng.randint(1, 4)
            if i % 2 == 0:
                with lock:
                    victim.update(at=target, pid=proc.pid)
                exited = _wait(lambda p=proc: p.poll() is not None, 30)
                with lock:
                    victim["at"] = None
                if not exited:
                    proc.kill()
                kills["holding a request"] += 1
            else:
                assert _wait(lambda t=target: requests_so_far(fake) >= t, 30), "the relay made no progress"
                time.sleep(rng.uniform(0, 0.08))
                proc.send_signal(signal.SIGKILL)
                kills["after a delay"] += 1
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
            assert _pending(db_url) > 0, f"the run ended before kill {i + 1}; make it longer"

        final = _start(db_url, config, log, "--batch-rows", "200", "--lease-seconds", "2.5")
        drained = _wait(lambda: _pending(db_url) == 0, 120, step=0.2)
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=20) == 0, log.read_text()[-2000:]  # a clean stop on SIGTERM
        assert drained, outbox_counts(db_url)
        assert fake.capture.conflicting() == {}
        assert fake.capture.distinct() == transitions * 2
        resent = len(fake.capture.duplicates())
    assert kills == {"holding a request": 10, "after a delay": 10}
    assert outbox_counts(db_url) == {"delivered": transitions}
    assert resent > 0  # the kills did interrupt deliveries; the resends reused their messageIds


@pytest.mark.slow
def test_two_relay_processes_deliver_each_message_once(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        config = write_config(tmp_path / "relay.toml", fake.url)
        transitions = ingest_events(db_url, settings, [e for n in range(400) for e in lifecycle(n)])
        procs = [_start(db_url, config, log, "--batch-rows", "50") for _ in range(2)]
        drained = _wait(lambda: _pending(db_url) == 0, 90, step=0.1)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in procs]
        assert drained, outbox_counts(db_url)
        assert codes == [0, 0], log.read_text()[-2000:]
        assert fake.capture.duplicates() == {}
        assert fake.capture.distinct() == transitions * 2
    assert outbox_counts(db_url) == {"delivered": transitions}
