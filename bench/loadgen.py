"""A lean HTTP/1.1 load generator: asyncio streams, keep-alive, request bytes built before the clock runs.

Each of `clients` coroutines holds one connection and sends one request at a time (a webhook
sender waits for its answer), so concurrency is exactly `clients`. A request costs the generator a
write, a `readuntil` of the head and a `readexactly` of the body: tens of microseconds, which
`ceiling` measures against a trivial server in its own process, so a run can tell whether it
measured the service or the generator. No third-party client: httpx would cost more per request
than the service's own parsing.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# A request: the full bytes on the wire, and a check of the answer (status, body) → is it an error?
Check = Callable[[int, bytes], bool]
NextRequest = Callable[[], bytes | None]


def request_bytes(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One POST, keep-alive (HTTP/1.1's default), with its Content-Length."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    """What one run measured: answered requests, their latencies, and what went wrong."""

    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests only
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # the first few error answers, for the console

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        """The p-th percentile latency in milliseconds (nearest rank)."""
        return percentile(self.latencies, p) * 1000

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 3:
            self.samples.append(what[:200])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at < 0:
        raise ConnectionError("answer without Content-Length (chunked answers are not read)")
    length = int(lower[at + 15 : lower.index(b"\r\n", at)])
    return status, await reader.readexactly(length)


async def _reconnect(host: str, port: int, deadline: float,
                     result: Result) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection after a failed one; a refused connect is an error too, retried until the deadline."""
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            result.error(f"connect: {exc!r}")
            if time.perf_counter() >= deadline:
                raise
            await asyncio.sleep(0.05)


async def _client(host: str, port: int, next_request: NextRequest, check: Check, deadline: float,
                  result: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    clock = time.perf_counter
    try:
        while clock() < deadline:
            data = next_request()
            if data is None:
                return
            started = clock()
            try:
                writer.write(data)
                status, body = await _answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                result.error(f"connection: {exc!r}")
                writer.close()
                reader, writer = await _reconnect(host, port, deadline, result)
                continue
            result.latencies.append(clock() - started)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if check(status, body):
                result.error(f"{status} {body[:160]!r}")
    finally:
        writer.close()


async def _run(host: str, port: int, clients: int, seconds: float, next_request: NextRequest,
               check: Check) -> Result:
    result = Result(clients)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_client(host, port, next_request, check, deadline, result) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def run(host: str, port: int, clients: int, seconds: float, next_request: NextRequest,
        check: Check | None = None) -> Result:
    """Send requests from `next_request` (None: no more) over `clients` connections for `seconds`."""
    return asyncio.run(_run(host, port, clients, seconds, next_request, check or (lambda s, _b: s != 200)))


def cycle(requests: list[bytes]) -> NextRequest:
    it: Iterator[bytes] = iter(requests)

    def next_request() -> bytes | None:
        return next(it, None)

    return next_request


# -- the generator's own ceiling: a trivial keep-alive server in its own process -------------------

TRIVIAL_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"result\":\"ok\"}"


async def _trivial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at >= 0:
                await reader.readexactly(int(lower[at + 15 : lower.index(b"\r\n", at)]))
            writer.write(TRIVIAL_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _trivial_main(port: Any, ready: Any) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_trivial, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        await server.serve_forever()

    asyncio.run(main())


def ceiling(clients: int, seconds: float, body: bytes) -> Result:
    """Requests/s this generator reaches against a server that does nothing: a lower bound of its own
    ceiling (the trivial server is Python too, and shares the cores)."""
    ctx = multiprocessing.get_context("spawn")
    port = ctx.Value("i", 0)
    ready = ctx.Event()
    proc = ctx.Process(target=_trivial_main, args=(port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the trivial server did not start")
        data = request_bytes("/", body, {"Authorization": "Bearer x"})
        return run("127.0.0.1", port.value, clients, seconds, lambda: data)
    finally:
        proc.terminate()
        proc.join(5)
