"""The processes an HTTP bench runs against: `subledger serve` as a subprocess, and a sink in its own.

The serve command line is `subledger serve --host 127.0.0.1 --port P --config C --database-url U`
plus BENCH_SERVE_ARGS (split like a shell would), so the same bench measures whatever the service
offers: `--workers N` is passed when `subledger serve --help` lists it (BENCH_WORKERS, default the
number of cores) unless BENCH_SERVE_ARGS names it already. With `--no-scheduler` in
BENCH_SERVE_ARGS the relay runs as its own `subledger relay` process beside it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import EXE, out_dir
from subledger.outbox.sink import Sink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_help() -> str:
    done = subprocess.run([EXE, "serve", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    return done.stdout


def serve_args() -> list[str]:
    """The extra serve arguments: BENCH_SERVE_ARGS, and `--workers` when serve has one."""
    extra = shlex.split(os.environ.get("BENCH_SERVE_ARGS", ""))
    if "--workers" in _serve_help() and not any(a.startswith("--workers") for a in extra):
        extra += ["--workers", os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 1))]
    return extra


class Serve:
    """`subledger serve` on a free port, its output in serve.log; started, then ready, then stopped."""

    def __init__(self, config: Path, database_url: str) -> None:
        self.port = free_port()
        self.args = serve_args()
        self.url = f"http://127.0.0.1:{self.port}"
        self._config = config
        self._database_url = database_url
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Serve:
        env = {k: v for k, v in os.environ.items() if k not in ("SUBLEDGER_CONFIG", "SUBLEDGER_DATABASE_URL")}
        common = ["--config", str(self._config), "--database-url", self._database_url]
        log = (out_dir() / "serve.log").open("ab")
        self._logs = [log]
        self._procs.append(subprocess.Popen(
            [EXE, "serve", "--host", "127.0.0.1", "--port", str(self.port), *common, *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        if "--no-scheduler" in self.args:
            relay_log = (out_dir() / "relay.log").open("ab")
            self._logs.append(relay_log)
            self._procs.append(subprocess.Popen([EXE, "relay", *common, "--no-expirations"],
                                                stdout=relay_log, stderr=subprocess.STDOUT, env=env))
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._procs[0].poll() is not None:
                code = self._procs[0].returncode
                raise RuntimeError(f"subledger serve exited {code}; see {out_dir() / 'serve.log'}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"subledger serve did not answer /healthz within {timeout:.0f} s")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self._logs:
            log.close()


# -- a Segment-compatible sink in its own process, asked over a pipe what it received and when --------

def _sink_main(conn: Any) -> None:
    sink = Sink("127.0.0.1", 0).start()
    conn.send(sink.url)
    while True:
        ask = conn.recv()
        if ask == "first_seen":
            conn.send(sink.capture.first_seen())
        elif ask == "distinct":
            conn.send(sink.capture.distinct())
        else:
            sink.stop()
            conn.send(None)
            return


class SinkProcess:
    """The sink's HTTP parsing runs in its own process, so it costs neither the service nor the generator
    a cycle of their interpreter; `first_seen` is messageId → arrival time (time.time())."""

    def __enter__(self) -> SinkProcess:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sink_main, args=(child,), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("the sink did not start")
        self.url: str = self._conn.recv()
        return self

    def _ask(self, what: str) -> Any:
        self._conn.send(what)
        return self._conn.recv()

    def first_seen(self) -> dict[str, float]:
        seen: dict[str, float] = self._ask("first_seen")
        return seen

    def distinct(self) -> int:
        return int(self._ask("distinct"))

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._ask("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
