"""HTTP ingest under concurrency, side by side with a bare psycopg baseline on the same server.

- `POST /v1/events`, one event per request, at 1 and at 32 clients for BENCH_SECONDS each,
  against `subledger serve` (a real subprocess on 127.0.0.1, a fresh database, its relay
  delivering to a local sink meanwhile). Every request carries a new id except about 5 % that
  repeat an earlier request byte for byte (answered `duplicate`); four events share each
  subscription (purchase, renewal, cancellation, uncancellation), sent back to back, so concurrent
  requests meet on the same subscription as a burst of store retries does.
- The baseline: as many threads as clients, one connection each, one transaction per event holding
  what a minimal event store writes (a log row, a state upsert, an outbox row) into a fresh
  database of the same tables, fed the very same request bodies. Each baseline run goes right before
  its subledger run (the machine is shared; both sides of a ratio should see the same load).
- `POST /webhooks/apple` at 32 clients, signed by a throwaway Apple-shaped chain whose root the
  bench app trusts, so every request runs Apple's own JWS verification (two JWS: the envelope and
  the signed transaction, each with its x5c chain).
- Received → sink latency of every message the relay delivered for the 32-client run: the outbox
  row's `created_at` (the request's arrival) to the sink's first receipt of its messageId.
- The load generator's own ceiling against a trivial server, printed beside.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import psycopg

from bench import common, loadgen
from bench.common import ROOT, Report, fresh_database, out_dir, seconds, times
from bench.service import Serve, SinkProcess

APP = "com.bench.http"
TOKEN = "bench-token"
APPLE_BUNDLE = "com.example.fitness"  # tests/apple_signing.py's defaults
APPLE_ID = 1234567890
DUPLICATES = 0.05
PER_SUBSCRIPTION = 4
EVENTS_TARGET = "≥ 0.5x\np99 ≤ 100 ms\n0 errors"
LATENCY_TARGET = "p50 < 100 ms\np99 < 500 ms"


class Bodies:
    """Canonical events for one run, thread-safe: new ids, shared subscriptions, some duplicates."""

    KINDS = ("purchase", "renewal", "auto_renew_disabled", "auto_renew_enabled")

    def __init__(self, run: str, seed: int = 11) -> None:
        self.run = run
        self.rng = random.Random(seed)
        self.n = 0
        self.sent: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self) -> bytes:
        with self.lock:
            if self.sent and self.rng.random() < DUPLICATES:
                return self.sent[-1 - self.rng.randrange(min(len(self.sent), 500))]
            n = self.n
            self.n += 1
            body = self._event(n)
            self.sent.append(body)
            return body

    def _event(self, n: int) -> bytes:
        sub, k = divmod(n, PER_SUBSCRIPTION)
        start = datetime.now(UTC) - timedelta(minutes=10)
        at = start + timedelta(minutes=k)
        kind = self.KINDS[k]
        item: dict[str, Any] = {
            "id": f"{self.run}-{n}", "app_id": APP, "type": kind, "occurred_at": at.isoformat(),
            "subscription_id": f"{self.run}-s{sub}", "app_user_id": f"{self.run}-u{sub}", "store": "app_store",
            "country_code": "US",
        }
        if kind in ("purchase", "renewal"):
            item.update(product_id="monthly", price="9.99", currency="USD", transaction_id=f"{self.run}-t{n}",
                        expires_at=(start + timedelta(days=30 * (k + 1))).isoformat())
        return orjson.dumps(item)


def _requests(path: str, bodies: Callable[[], bytes]) -> loadgen.NextRequest:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return lambda: loadgen.request_bytes(path, bodies(), headers)


# -- the bare baseline --------------------------------------------------------------------------

BARE_LOG = (
    "INSERT INTO event_log (position, source, external_id, app_id, kind, subscription_key, app_user_id,"
    " environment, occurred_at, received_at, raw, facts, hash)"
    " VALUES (nextval('bench_position'), 'custom', %s, %s, %s, %s, %s, 'production', %s, now(), %s, %s, %s)"
    " ON CONFLICT (source, external_id) DO NOTHING RETURNING position"
)
BARE_STATE = (
    "INSERT INTO subscriptions (key, app_id, app_user_id, status, expires_at, state, last_position, updated_at)"
    " VALUES (%s, %s, %s, 'active', %s, %s, %s, now())"
    " ON CONFLICT (key) DO UPDATE SET status = EXCLUDED.status, expires_at = EXCLUDED.expires_at,"
    " state = EXCLUDED.state, last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at"
)
BARE_OUTBOX = (
    "INSERT INTO outbox (message_id, transition_id, destination, app_id, subscriber, body, available_at, created_at)"
    " VALUES (%s, %s, 'segment', %s, %s, %s, now(), now())"
)


def bare_database() -> str:
    url = common.bare_database("subledger_bench_http_bare")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE bench_position")
    return url


def bare(url: str, clients: int, duration: float, bodies: Callable[[], bytes]) -> loadgen.Result:
    """`clients` threads, one connection each, one transaction per event: the floor of what any
    event store with a log, a projection and an outbox pays per event on this server."""
    result = loadgen.Result(clients)
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        latencies: list[float] = []
        errors: list[str] = []
        with psycopg.connect(url) as conn:
            barrier.wait()
            deadline = time.perf_counter() + duration
            while time.perf_counter() < deadline:
                raw = bodies()
                started = time.perf_counter()
                try:
                    item = orjson.loads(raw)
                    key = f"custom:{item['app_id']}:{item['subscription_id']}"
                    with conn.transaction():
                        row = conn.execute(BARE_LOG, (
                            item["id"], item["app_id"], item["type"], key, item["app_user_id"], item["occurred_at"],
                            raw, raw.decode(), hashlib.sha256(raw).digest())).fetchone()
                        if row is not None:
                            conn.execute(BARE_STATE, (key, item["app_id"], item["app_user_id"], item.get("expires_at"),
                                                      raw.decode(), row[0]))
                            conn.execute(BARE_OUTBOX, (f"m-{item['id']}", f"t-{item['id']}", item["app_id"],
                                                       item["app_user_id"], raw.decode()))
                except psycopg.Error as exc:
                    errors.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - started)
        with lock:
            result.latencies.extend(latencies)
            for e in errors:
                result.error(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - started
    return result


# -- Apple --------------------------------------------------------------------------------------

def apple_signing() -> ModuleType:
    """tests/apple_signing.py: the tests' Apple-shaped CA (the bench signs with it, never copies it)."""
    if "apple_signing" in sys.modules:
        return sys.modules["apple_signing"]
    spec = importlib.util.spec_from_file_location("apple_signing", ROOT / "tests" / "apple_signing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["apple_signing"] = module
    spec.loader.exec_module(module)
    return module


def apple_bodies(signing: ModuleType, ca: Any, count: int, seed: int = 12) -> list[bytes]:
    """`count` signed notifications: a subscribe then a renewal per subscription, ~5 % repeated."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    out: list[bytes] = []
    n = 0
    while len(out) < count:
        if out and rng.random() < DUPLICATES:
            out.append(out[-1 - rng.randrange(min(len(out), 500))])
            continue
        sub, k = divmod(n, 2)
        n += 1
        bought = now - timedelta(minutes=10)
        at = bought + timedelta(minutes=k)
        txn = signing.transaction(
            original_transaction_id=f"{run}{sub:010d}", transaction_id=f"{run}{sub:010d}-{k}",
            purchase=at, expires=at + timedelta(days=30), environment="Production",
            app_account_token=str(uuid.UUID(int=rng.getrandbits(128))) if k == 0 else None,
        )
        kind, subtype = ("SUBSCRIBED", "INITIAL_BUY") if k == 0 else ("DID_RENEW", None)
        out.append(signing.notification(ca, kind, subtype, txn=txn, environment="Production", signed=at,
                                        notification_uuid=str(uuid.UUID(int=rng.getrandbits(128)))))
    return out


def verification_cost(config: Path, notes: list[bytes]) -> float:
    """Seconds per notification of the Apple adapter alone (parse + JWS verification), in this process."""
    from subledger.app import settings as settings_module
    from subledger.app.sources import build_sources

    adapters = build_sources(settings_module.load(config))
    sample = notes[:50]
    started = time.perf_counter()
    for raw in sample:
        adapters.parse_apple(raw)
    return (time.perf_counter() - started) / len(sample)


# -- configuration ------------------------------------------------------------------------------

def write_config(sink_url: str, apple_root: Path) -> Path:
    path = out_dir() / "bench-http.toml"
    destination = f'write_key = "bench"\nendpoint = "{sink_url}"\npublish_historical = true\n'
    path.write_text(
        f'api_token = "{TOKEN}"\n\n'
        f'[apps."{APP}".destinations.segment]\n{destination}\n'
        f'[apps."{APPLE_BUNDLE}".apple]\nbundle_id = "{APPLE_BUNDLE}"\napp_apple_id = {APPLE_ID}\n'
        f'environments = ["Production"]\nroot_certificates = ["{apple_root}"]\n\n'
        f'[apps."{APPLE_BUNDLE}".destinations.segment]\n{destination}'
    )
    return path


# -- latency: the outbox row's created_at to the sink's receipt ------------------------------------

def drain(url: str, timeout: float) -> int:
    """Wait until the relay has delivered every pending row (or `timeout`); return the rows left."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()
            left = int(row[0]) if row else 0
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def deliveries(url: str, sink: SinkProcess, since: datetime, until: datetime) -> tuple[list[tuple[float, float]], int]:
    """(created_at, sink arrival) of every row made in the window and delivered, as epoch seconds;
    and how many rows of the window never reached the sink."""
    seen = sink.first_seen()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT body->0->>'messageId', extract(epoch FROM created_at) FROM outbox_delivered"
            " WHERE created_at BETWEEN %s AND %s", (since, until)).fetchall()
        undelivered = conn.execute(
            "SELECT count(*) FROM outbox WHERE created_at BETWEEN %s AND %s", (since, until)).fetchone()
    pairs = [(float(created), seen[mid]) for mid, created in rows if mid in seen]
    return pairs, (int(undelivered[0]) if undelivered else 0) + len(rows) - len(pairs)


# -- the section --------------------------------------------------------------------------------

def _figure(r: loadgen.Result, unit: str = "req/s", first: str = "") -> str:
    return f"{first}{r.rate:,.0f} {unit}\np50 {r.pct(50):,.0f} ms\np99 {r.pct(99):,.0f} ms\n{r.errors} errors"


def _errors(report: Report, what: str, r: loadgen.Result) -> None:
    if r.errors:
        report.note(f"{what}: {r.errors} errors, statuses {r.statuses}, e.g. {'; '.join(r.samples)}")


def run(report: Report, *, quick: bool = False) -> None:
    duration = seconds()
    signing = apple_signing()
    ca = signing.make_ca(name="Bench Apple")
    root = out_dir() / "bench-apple-root.cer"
    root.write_bytes(ca.root_der)

    gen = loadgen.ceiling(32, min(2.0, duration), Bodies("ceiling")())

    url = fresh_database("subledger_bench_http")
    bare_url = bare_database()
    results: dict[str, loadgen.Result] = {}
    with SinkProcess() as sink:
        config = write_config(sink.url, root)
        with Serve(config, url) as serve:
            report.console.print(f"  serve {' '.join(serve.args) or '(default arguments)'} on {serve.url}",
                                 highlight=False)
            warm = min(1.0, duration)
            loadgen.run("127.0.0.1", serve.port, 4, warm, _requests("/v1/events", Bodies("warm")))
            bare(bare_url, 4, warm, Bodies("bare-warm"))
            # each pair back to back, the baseline first, so both sides see the same machine (it is shared)
            for clients in (1, 32):
                drain(url, 60.0)
                results[f"bare{clients}"] = bare(bare_url, clients, duration, Bodies(f"c{clients}"))
                since = datetime.now(UTC)
                results[f"events{clients}"] = loadgen.run(
                    "127.0.0.1", serve.port, clients, duration, _requests("/v1/events", Bodies(f"c{clients}")))
                until = datetime.now(UTC)
            ended = time.time()
            left = drain(url, 60.0)
            drained = time.time()
            pairs, lost = deliveries(url, sink, since, until)
            r32 = results["events32"]
            count = int(max(r32.rate, 50.0) * duration * 1.3) + 100
            signed_at = time.perf_counter()
            notes = apple_bodies(signing, ca, count)
            sign_seconds = time.perf_counter() - signed_at
            headers = {"Content-Type": "application/json"}
            it = iter(notes)
            results["apple32"] = loadgen.run(
                "127.0.0.1", serve.port, 32, duration,
                lambda: (lambda b: None if b is None else loadgen.request_bytes("/webhooks/apple", b, headers))(
                    next(it, None)))
    verify = verification_cost(config, notes)

    e1, e32, a32, b1, b32 = (results[k] for k in ("events1", "events32", "apple32", "bare1", "bare32"))
    bare1, bare32 = _figure(b1, "tx/s", "bare psycopg\n"), _figure(b32, "tx/s", "bare psycopg\n")
    report.add("http", "load generator:\ntrivial server,\n32 connections", "-", f"{gen.rate:,.0f} req/s",
               f"{e32.rate / gen.rate:.3f}x", "≪ 1x: not the\nbottleneck", e32.rate < 0.5 * gen.rate)
    report.add("http", f"POST /v1/events\n1 client, {e1.seconds:.0f} s", _figure(e1), bare1,
               times(e1.rate / b1.rate), "-")
    ok32 = e32.rate >= 0.5 * b32.rate and e32.pct(99) <= 100 and e32.errors == 0
    report.add("http", f"POST /v1/events\n32 clients, {e32.seconds:.0f} s", _figure(e32), bare32,
               times(e32.rate / b32.rate), EVENTS_TARGET, ok32)
    ok_apple = a32.rate >= 0.5 * b32.rate and a32.pct(99) <= 100 and a32.errors == 0
    report.add("http", f"POST /webhooks/\napple (JWS)\n32 clients, {a32.seconds:.0f} s", _figure(a32), bare32,
               times(a32.rate / b32.rate), EVENTS_TARGET, ok_apple)
    samples = [arrived - created for created, arrived in pairs]
    if samples:
        p50, p99 = loadgen.percentile(samples, 50) * 1000, loadgen.percentile(samples, 99) * 1000
        report.add("http", f"received → sink\nin the 32-client\nrun, {len(samples):,} msgs",
                   f"p50 {p50:,.0f} ms\np99 {p99:,.0f} ms", "-", "-", LATENCY_TARGET, p50 < 100 and p99 < 500)
    during = sum(1 for _, arrived in pairs if arrived <= ended)
    report.note(f"relay in the 32-client run: {len(pairs) + lost:,} outbox rows made, {during:,} at the sink by the "
                f"run's end, the rest {max(0.0, drained - ended):.0f} s later"
                + (f"; {lost:,} never arrived, {left:,} pending after 60 s" if lost or left else ""))
    report.note(f"apple: {len(notes):,} notifications signed beforehand in {sign_seconds:.1f} s; the adapter "
                f"alone (parse + JWS verification, in process) takes {verify * 1000:.1f} ms per notification")
    for name, r in results.items():
        _errors(report, name, r)
