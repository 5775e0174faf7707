"""`subledger demo` end to end: samples in, relay to the local sink, exactly what arrived printed."""

from __future__ import annotations

import re
import time

import psycopg
import psycopg.sql
import pytest
from rich.console import Console

from subledger.app.demo import DEMO_DATABASE, run_demo


def test_demo_delivers_every_published_transition_once(pg_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBLEDGER_DATABASE_URL", pg_server)
    console = Console(record=True, width=200)
    started = time.monotonic()
    try:
        run_demo(console)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(DEMO_DATABASE)))
    elapsed = time.monotonic() - started
    text = console.export_text()
    summary = re.search(r"the sink received (\d+) distinct messageIds \((\d+) duplicates\); outbox left: (\w+)", text)
    assert summary, text[-2000:]
    distinct, duplicates, left = int(summary[1]), int(summary[2]), summary[3]
    assert distinct > 0 and distinct % 2 == 0 and duplicates == 0 and left == "empty"
    printed = re.findall(r"^\s+(track|identify)\s", text, flags=re.MULTILINE)
    assert len(printed) == distinct  # exactly the messages the endpoint received, each once
    assert printed.count("track") == printed.count("identify")
    assert elapsed < 30
