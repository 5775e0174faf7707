"""`subledger serve --workers 2`: worker processes answer HTTP, the parent relays; stops cleanly either way.

Real processes throughout: the serve command as a user runs it, the fake Segment as the destination.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from fake_segment import APP, FakeSegment, lifecycle, write_config
from live_server import free_port

from subledger.store.verify import verify

SUBLEDGER = str(Path(sys.executable).parent / "subledger")
TOKEN = "workers-token"


def _children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@contextmanager
def _serve(tmp_path: Path, db_url: str, endpoint: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    config = write_config(tmp_path / "c.toml", endpoint)
    config.write_text(f'api_token = "{TOKEN}"\n' + config.read_text())
    port = free_port()
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(tmp_path / "data"), "SUBLEDGER_LOG_FORMAT": "json"}
    env.pop("SUBLEDGER_CONFIG", None)
    proc = subprocess.Popen([SUBLEDGER, "serve", "--workers", "2", "--port", str(port), "--config", str(config),
                             "--database-url", db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # two spawned workers import the whole service
        while len(_children_serving(proc.pid)) < 2 or not _healthy(base):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "serve --workers 2 never answered"
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _children_serving(pid: int) -> list[int]:
    return [c for c in _children(pid) if "multiprocessing" not in _cmdline(c) or "spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_two_workers_ingest_concurrently_and_the_parent_relays_each_message_once(tmp_path: Path, db_url: str) -> None:
    events = [e for n in range(12) for e in lifecycle(n, renewals=1)]  # 5 transitions each
    with FakeSegment() as segment, _serve(tmp_path, db_url, segment.url) as (proc, base):
        def send(event: dict[str, object]) -> str:
            with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
                response = http.post(f"{base}/v1/events", json=event)
                assert response.status_code == 200, response.text
                return str(response.json()["result"])

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, events + events[:20]))  # 20 duplicates racing the originals
        assert results.count("new") == len(events)
        deadline = time.monotonic() + 60
        while len(tracks := [m for m in segment.capture.messages() if m["type"] == "track"]) < 12 * 5:
            assert time.monotonic() < deadline, f"delivered {len(tracks)} of {12 * 5}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    tracks = [m for m in segment.capture.messages() if m["type"] == "track"]
    # concurrent senders deliver a lifecycle out of order: a transition emitted early and superseded
    # later stays delivered (rule 3), so there can be more messages than live transitions, never a repeat
    assert len({m["messageId"] for m in tracks}) == len(tracks) >= 12 * 5
    assert not segment.capture.duplicates()
    assert all(len(bodies) == 1 for bodies in segment.capture.payloads.values())
    with psycopg.connect(db_url) as conn:
        assert verify(conn).ok
        assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (len(events),)
        assert conn.execute("SELECT count(*) FROM transitions WHERE superseded_at IS NULL").fetchone() == (12 * 5,)
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)  # everything live was delivered
    assert {m["properties"]["app_id"] for m in tracks} == {APP}


def test_workers_stop_by_themselves_when_the_parent_is_sigkilled(tmp_path: Path, db_url: str) -> None:
    with FakeSegment() as segment, _serve(tmp_path, db_url, segment.url) as (proc, base):
        workers = _children_serving(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.2)
        assert not _healthy(base)
