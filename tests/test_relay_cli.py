"""`subledger relay --once` and `subledger sink`, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fake_segment import FakeSegment, ingest_events, lifecycle, outbox_counts, settings_for, write_config

SUBLEDGER = str(Path(sys.executable).parent / "subledger")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(tmp_path / "data")}
    env.pop("SUBLEDGER_CONFIG", None)
    return env


def test_relay_once_drains_and_reports(db_url: str, tmp_path: Path) -> None:
    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        transitions = ingest_events(db_url, settings, lifecycle(1) + lifecycle(2))
        config = write_config(tmp_path / "c.toml", fake.url)
        done = subprocess.run(
            [SUBLEDGER, "relay", "--once", "--json", "--config", str(config), "--database-url", db_url],
            capture_output=True, text=True, env=_env(tmp_path), timeout=60,
        )
        assert done.returncode == 0, done.stderr
        counts = json.loads(done.stdout.strip().splitlines()[-1])
        assert counts["delivered"] == transitions and counts["dead"] == 0
        assert fake.capture.distinct() == 2 * transitions
    assert outbox_counts(db_url) == {"delivered": transitions}


def test_sink_prints_what_it_receives(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([SUBLEDGER, "sink", "--port", str(port), "--write-key", "k1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        url = f"http://127.0.0.1:{port}/v1/batch"
        batch = {"batch": [{"type": "track", "messageId": "m-1", "userId": "u1", "event": "rc_renewal_event",
                            "properties": {"revenue": 9.99, "currency": "USD"}}]}
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = httpx.post(url, json=batch, auth=("k1", ""), timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sink never started"
                time.sleep(0.1)
        assert reply.status_code == 200
        assert httpx.post(url, json=batch, auth=("wrong", ""), timeout=2).status_code == 401
        assert httpx.post(url, content=b"{not json", auth=("k1", ""), timeout=2).status_code == 400
    finally:
        # SIGTERM, as a service manager or a background job's kill sends; the sink must stop on it.
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0
    assert "rc_renewal_event revenue=9.99 USD" in out and "[m-1]" in out
    assert "received 1 distinct message\n" in err
