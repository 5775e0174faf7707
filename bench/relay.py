"""Relay benches, side by side in one run against the same local Segment-compatible sink.

- Throughput: transitions delivered per second by the relay (durable: each row claimed, sent, acked
  by a 2xx and moved to `outbox_delivered`) against the official `segment-analytics-python` client
  sending the very same messages (in-memory queue, not durable, defaults but a queue big enough).
  The sink runs in its own process so neither side pays for its JSON parsing.
- Latency: ingest commit → sink receipt at 200 events/s, with the relay as its own `subledger relay`
  process woken by NOTIFY; percentiles HDR-style (p50, p90, p99, p99.9, max).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.common import Report, fresh_database, out_dir
from subledger.app import settings as settings_module
from subledger.core.events import parse_event
from subledger.core.render import message_id_base
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest, wake_relay
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.routes import routes_from
from subledger.outbox.sink import Sink

APP = "com.bench.relay"
WRITE_KEY = "bench-key"


def _settings(endpoint: str) -> Any:
    return settings_module.from_dict({"apps": {APP: {"destinations": {"segment": {
        "write_key": WRITE_KEY, "endpoint": endpoint, "publish_historical": True}}}}})


def _policy(settings: Any) -> IngestPolicy:
    return IngestPolicy(destinations=settings.destinations("bench"), horizon=settings.historical_horizon)


def _events(n_subscriptions: int, per_subscription: int) -> list[dict[str, Any]]:
    """A purchase then renewals: one transition each, `per_subscription` per subscriber."""
    start = datetime(2026, 6, 1, tzinfo=UTC)
    out: list[dict[str, Any]] = []
    for n in range(n_subscriptions):
        at = start + timedelta(minutes=n)
        sub = f"bench{n:07d}"
        for k in range(per_subscription):
            kind = "purchase" if k == 0 else "renewal"
            out.append({
                "id": f"{sub}-{k}", "app_id": APP, "type": kind, "occurred_at": at.isoformat(),
                "subscription_id": sub, "app_user_id": f"user{n:07d}", "store": "app_store",
                "product_id": "monthly", "price": "9.99", "currency": "USD", "country_code": "US",
                "expires_at": (at + timedelta(days=30)).isoformat(), "transaction_id": f"{sub}-t{k}",
            })
            at += timedelta(days=30)
    return out


def _ingest(url: str, settings: Any, events: list[dict[str, Any]]) -> int:
    made = 0
    with psycopg.connect(url) as conn:
        for i in range(0, len(events), 1000):
            items = [Incoming(Notification.of(parse_event(e)), json.dumps(e).encode()) for e in events[i : i + 1000]]
            made += sum(len(o.transitions) for o in ingest(conn, items, _policy(settings), datetime.now(UTC),
                                                             notify=False))
    return made


# -- the sink in its own process -----------------------------------------------------------------

def _sink_main(port: Any, ready: Any) -> None:
    sink = Sink("127.0.0.1", 0)
    port.value = sink.port
    ready.set()
    sink.serve_forever()


class _SinkProcess:
    def __enter__(self) -> _SinkProcess:
        ctx = multiprocessing.get_context("spawn")
        self._port = ctx.Value("i", 0)
        ready = ctx.Event()
        self._proc = ctx.Process(target=_sink_main, args=(self._port, ready), daemon=True)
        self._proc.start()
        ready.wait(30)
        self.url = f"http://127.0.0.1:{self._port.value}"
        return self

    def received(self) -> int:
        with urllib.request.urlopen(self.url + "/healthz", timeout=10) as reply:
            return int(json.loads(reply.read())["received"])

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)


# -- throughput ----------------------------------------------------------------------------------

def throughput(report: Report, n_subscriptions: int, per_subscription: int = 4) -> None:
    url = fresh_database("subledger_bench_relay")
    with _SinkProcess() as sink:
        settings = _settings(sink.url)
        transitions = _ingest(url, settings, _events(n_subscriptions, per_subscription))
        relay = Relay(url, routes_from(settings.apps), RelayConfig(batch_rows=2000))
        started = time.perf_counter()
        stats = relay.drain()
        ours = time.perf_counter() - started
        relay.close()
        assert stats.delivered == transitions, stats
        with psycopg.connect(url) as conn:
            left = conn.execute("SELECT count(*) FROM outbox").fetchone()
            bodies = [r[0] for r in conn.execute("SELECT body FROM outbox_delivered ORDER BY created_at, message_id")]
        assert left == (0,)
        received_by_relay = sink.received()

        theirs = _analytics_python(sink.url, bodies)
        total = sink.received()
    ours_rate = transitions / ours
    theirs_rate = transitions / theirs
    report.add(
        "relay", f"throughput\n{transitions:,} transitions\n({2 * transitions:,} messages)",
        f"{ours_rate:,.0f}/s\ndurable, acked\n{stats.requests} requests",
        f"analytics-python\n(in memory)\n{theirs_rate:,.0f}/s",
        f"{ours_rate / theirs_rate:.2f}x", "≥ 1.0x", ours_rate >= theirs_rate,
    )
    if received_by_relay != 2 * transitions or total < 2 * transitions:
        report.console.print(f"  [yellow]sink counts: relay {received_by_relay}, total {total}[/yellow]")


def _analytics_python(endpoint: str, bodies: list[list[dict[str, Any]]]) -> float:
    """The official client, defaults (upload_size=100, one consumer thread), sending the same messages."""
    from segment.analytics import Client

    errors: list[Any] = []
    n = sum(len(b) for b in bodies)
    client = Client(WRITE_KEY, host=endpoint, max_queue_size=n + 10, on_error=lambda e, _b: errors.append(e))
    started = time.perf_counter()
    for track, identify in bodies:
        who = {"user_id": track.get("userId"), "anonymous_id": track.get("anonymousId")}
        when = datetime.fromisoformat(track["timestamp"].replace("Z", "+00:00"))
        client.track(event=track["event"], properties=track["properties"], context=track["context"],
                     timestamp=when, message_id=track["messageId"], **who)
        client.identify(traits=identify["traits"], context=identify["context"], timestamp=when,
                        message_id=identify["messageId"], **who)
    client.flush()
    elapsed = time.perf_counter() - started
    client.shutdown()
    if errors:
        raise RuntimeError(f"analytics-python failed: {errors[:3]}")
    return elapsed


# -- latency -------------------------------------------------------------------------------------

def latency(report: Report, rate: float = 200.0, seconds: float = 15.0) -> None:
    url = fresh_database("subledger_bench_latency")
    with Sink() as sink:
        settings = _settings(sink.url)
        config = out_dir() / "relay-latency.toml"
        config.write_text(f'[apps."{APP}".destinations.segment]\nwrite_key = "{WRITE_KEY}"\n'
                          f'endpoint = "{sink.url}"\npublish_historical = true\n')
        relay = _start_relay(url, config)
        try:
            commits = _paced_ingest(url, settings, sink, rate, seconds)
            deadline = time.monotonic() + 30
            while sink.capture.distinct() < 2 * (len(commits) + 1) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(20)
        seen = sink.capture.first_seen()
    samples = sorted((seen[mid] - at) * 1000 for mid, at in commits.items() if mid in seen)
    lost = len(commits) - len(samples)

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))]

    report.add("relay", f"commit → sink\npaced {rate:.0f}/s\n{len(samples):,} events",
               f"p50 {pct(50):.1f} ms\np99 {pct(99):.1f} ms\nmax {samples[-1]:.1f} ms", "-", "-",
               "p50 < 100 ms\np99 < 500 ms", pct(50) < 100 and pct(99) < 500)
    if lost:
        report.console.print(f"  [red]{lost} events never reached the sink[/red]")


def _start_relay(url: str, config: Path) -> subprocess.Popen[bytes]:
    exe = str(Path(sys.executable).parent / "subledger")
    env = {**os.environ}
    env.pop("SUBLEDGER_CONFIG", None)
    log = (out_dir() / "relay-latency.log").open("ab")
    return subprocess.Popen([exe, "relay", "--config", str(config), "--database-url", url, "--no-expirations"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _paced_ingest(url: str, settings: Any, sink: Sink, rate: float, seconds: float) -> dict[str, float]:
    """One event per transaction at `rate`/s; returns messageId → commit time (after a warm-up)."""
    policy = _policy(settings)
    commits: dict[str, float] = {}
    with psycopg.connect(url) as conn:
        def one(n: int) -> tuple[str, float]:
            now = datetime.now(UTC)
            event = parse_event({
                "id": f"lat-{n}", "app_id": APP, "type": "purchase", "occurred_at": now.isoformat(),
                "subscription_id": f"lat{n:07d}", "app_user_id": f"lat-user{n}", "store": "app_store",
                "product_id": "monthly", "price": "9.99", "currency": "USD",
                "expires_at": (now + timedelta(days=30)).isoformat(),
            })
            (outcome,) = ingest(conn, [Incoming(Notification.of(event), b"{}")], policy, now, notify=False)
            committed = time.time()
            wake_relay(conn)
            return message_id_base(outcome.transitions[0], "segment") + ".t", committed

        one(0)  # warm-up: wait until the relay process is up and delivering
        deadline = time.monotonic() + 60
        while sink.capture.distinct() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        total = int(rate * seconds)
        started = time.monotonic()
        for n in range(1, total + 1):
            delay = started + (n - 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            mid, at = one(n)
            commits[mid] = at
    return commits


def run(report: Report, *, quick: bool = False) -> None:
    throughput(report, 300 if quick else 1_500)
    latency(report, 200.0, 2.0 if quick else 10.0)


if __name__ == "__main__":
    r = Report()
    run(r, quick="--quick" in sys.argv)
    r.print()
