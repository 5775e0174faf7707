"""A local Segment-compatible capture endpoint: `POST /v1/batch` (and the single-call routes).

Used by `subledger sink --port N` (point a config's `endpoint` at it to see exactly what would be
sent), by `subledger demo`, by the tests' fake Segment (which adds fault injection through
`responder`) and by the bench. It checks what Segment checks before answering 200: HTTP Basic (or
body `writeKey`) auth when keys are given, JSON, 32 KB per event, 500 KB per request, 2,500 events,
a messageId, a userId or anonymousId, and `event` on a track.

A real HTTP server on a thread (stdlib `ThreadingHTTPServer`, HTTP/1.1 keep-alive), so clients
exercise their real network path: connection reuse, timeouts, resets.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

from subledger.core.delivery import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_MESSAGE_BYTES

ROUTES = ("/v1/batch", "/v1/track", "/v1/identify", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias")


@dataclass(frozen=True, slots=True)
class Request:
    """One received request, as the responder and the record see it."""

    number: int
    path: str
    headers: dict[str, str]
    write_key: str | None
    raw: bytes
    messages: tuple[dict[str, Any], ...]
    received_at: float


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"success": True})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Reset:
    """Drop the connection without an answer (TCP RST), optionally after a delay."""

    delay: float = 0.0


Responder = Callable[[Request], Reply | Reset | None]
"""A fault hook: return a Reply or Reset to override the normal answer, None for normal handling."""


@dataclass
class Capture:
    """Everything accepted (answered 2xx), thread-safe. The sink's memory of what 'Segment' got."""

    requests: list[Request] = field(default_factory=list)
    accepted: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    payloads: dict[str, set[str]] = field(default_factory=dict)
    attempts: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)
            for message in request.messages:
                mid = str(message.get("messageId"))
                self.accepted.append((request.received_at, message))
                self.counts[mid] += 1
                self.payloads.setdefault(mid, set()).add(json.dumps(message, sort_keys=True))

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for _, m in self.accepted]

    def distinct(self) -> int:
        with self.lock:
            return len(self.counts)

    def duplicates(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in self.counts.items() if v > 1}

    def conflicting(self) -> dict[str, set[str]]:
        """messageIds seen with two different payloads: must always be empty."""
        with self.lock:
            return {k: v for k, v in self.payloads.items() if len(v) > 1}

    def first_seen(self) -> dict[str, float]:
        with self.lock:
            out: dict[str, float] = {}
            for at, m in self.accepted:
                out.setdefault(str(m.get("messageId")), at)
            return out


def _refusal(messages: list[Any], raw_size: int) -> str | None:
    """Segment's own pre-checks, so a capture run catches what Segment would refuse."""
    if raw_size > MAX_BATCH_BYTES:
        return f"request of {raw_size} bytes exceeds 500 KB"
    if len(messages) > MAX_BATCH_EVENTS:
        return f"{len(messages)} events exceed 2,500 per batch"
    for m in messages:
        if not isinstance(m, dict):
            return "batch items must be objects"
        mid = m.get("messageId", "?")
        if len(json.dumps(m, separators=(",", ":")).encode()) > MAX_MESSAGE_BYTES:
            return f"message {mid} exceeds 32 KB"
        if not m.get("userId") and not m.get("anonymousId"):
            return f"message {mid}: no_user_anon_id"
        if m.get("type") == "track" and not m.get("event"):
            return f"message {mid}: track without event"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the sink has its own echo
        return

    def do_GET(self) -> None:
        if self.path in ("/", "/healthz"):
            self._answer(Reply(200, {"status": "ok", "received": self.server.capture.distinct()}))
        else:
            self._answer(Reply(404, {"error": "not found"}))

    def do_POST(self) -> None:
        sink = self.server.sink
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        received_at = time.time()
        headers = {k.lower(): v for k, v in self.headers.items()}
        path = self.path.split("?")[0]
        if path not in ROUTES:
            self._answer(Reply(404, {"error": f"no route {path}"}))
            return
        body = raw
        if "gzip" in headers.get("content-encoding", ""):
            try:
                body = gzip.decompress(raw)
            except OSError:
                self._answer(Reply(400, {"error": "bad gzip body"}))
                return
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self._answer(Reply(400, {"error": "invalid JSON"}))
            return
        if not isinstance(parsed, dict):
            self._answer(Reply(400, {"error": "body must be a JSON object"}))
            return
        key = _basic_user(headers.get("authorization")) or parsed.get("writeKey")
        if path == "/v1/batch":
            messages = parsed.get("batch")
            if not isinstance(messages, list):
                self._answer(Reply(400, {"error": "batch must be an array"}))
                return
        else:
            messages = [{**parsed, "type": path.rsplit("/", 1)[1]}]
        request = Request(
            number=sink.next_number(), path=path, headers=headers, write_key=key, raw=raw,
            messages=tuple(m for m in messages if isinstance(m, dict)), received_at=received_at,
        )
        if sink.responder is not None:
            override = sink.responder(request)
            if isinstance(override, Reset):
                self._reset(override.delay)
                return
            if override is not None:
                self._answer(override, request)
                return
        if sink.write_keys is not None and key not in sink.write_keys:
            self._answer(Reply(401, {"error": "invalid write key"}), request)
            return
        refusal = _refusal(messages, len(body))
        if refusal:
            self._answer(Reply(400, {"error": refusal}), request)
            return
        sink.capture.add(request)
        if sink.echo is not None:
            sink.echo(request)
        self._answer(Reply(200, {"success": True}), request)

    def _answer(self, reply: Reply, request: Request | None = None) -> None:
        if reply.delay:
            time.sleep(reply.delay)
        with self.server.capture.lock:
            self.server.capture.attempts += 1
            self.server.capture.statuses[reply.status] += 1
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (timeout); nothing to tell it

    def _reset(self, delay: float) -> None:
        if delay:
            time.sleep(delay)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


def _basic_user(header: str | None) -> str | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header.split(" ", 1)[1].strip()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: Sink
    capture: Capture


class Sink:
    """Start with `start()` (or as a context manager); `url` is the endpoint base to configure."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        write_keys: set[str] | None = None,
        responder: Responder | None = None,
        echo: Callable[[Request], None] | None = None,
    ) -> None:
        self.capture = Capture()
        self.write_keys = write_keys
        self.responder = responder
        self.echo = echo
        self._counter = 0
        self._count_lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.sink = self
        self._server.capture = self.capture
        self._thread: threading.Thread | None = None

    def next_number(self) -> int:
        with self._count_lock:
            self._counter += 1
            return self._counter

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{host}:{self.port}"

    def start(self) -> Sink:
        self._thread = threading.Thread(target=self._server.serve_forever, name="sink", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def printer(stream: IO[str], *, full: bool = False) -> Callable[[Request], None]:
    """An echo that prints one line per received message (or the whole JSON with `full`)."""
    lock = threading.Lock()

    def echo(request: Request) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(request.received_at))
        with lock:
            for m in request.messages:
                if full:
                    stream.write(json.dumps(m, sort_keys=True) + "\n")
                    continue
                who = str(m.get("userId") or f"anon {m.get('anonymousId')}")
                what = str(m.get("event")) if m.get("type") == "track" else json.dumps(m.get("traits", {}))
                revenue = (m.get("properties") or {}).get("revenue")
                extra = f" revenue={revenue} {m['properties'].get('currency', '')}" if revenue is not None else ""
                kind = str(m.get("type"))
                stream.write(f"{stamp} {kind:<8} {who:<24} {what}{extra}  [{m.get('messageId')}]\n")
            stream.flush()

    return echo
