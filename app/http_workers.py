"""`serve --workers N`: N uvicorn worker processes answer HTTP; the relay and the jobs run in the parent.

Why processes: one Python process runs one thread at a time, and a request costs mostly Python
(HTTP parsing, validation, the fold, rendering), so a burst of webhooks needs more than one
process to use more than one core. Within each worker the appends of concurrent requests already
share transactions (outbox/group_commit.py); the workers' transactions take turns on the chain
head, a wait of one short transaction, not one per request. The relay runs in the parent, out of
the request path: its claims, JSON and HTTP calls never compete with a request thread.

uvicorn's own supervisor starts, watches and stops the workers (it needs an import string, and
spawned children import it afresh): each child builds its services from the configuration path and
database URL the parent put in its environment (`CONFIG_ENV`, `URL_ENV`), so a worker runs exactly
what a one-process `serve` would. A worker whose parent disappears (SIGKILLed, say) stops itself
rather than holding the port for nobody.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

CONFIG_ENV = "SUBLEDGER_SERVE_CONFIG"
URL_ENV = "SUBLEDGER_SERVE_DATABASE_URL"
PARENT_ENV = "SUBLEDGER_SERVE_PARENT"  # the supervising process, so a worker that starts late still knows it
FACTORY = "subledger.app.http_workers:worker_app"
PARENT_POLL_SECONDS = 1.0

log = logging.getLogger("subledger")


def worker_app() -> Any:
    """The ASGI app of one worker process (uvicorn calls this in the child)."""
    from subledger.app import logs, settings
    from subledger.app.bootstrap import build
    from subledger.app.http import create_app

    logs.configure(logging.INFO)
    _stop_when_orphaned(int(os.environ.get(PARENT_ENV) or os.getppid()))
    config = os.environ.get(CONFIG_ENV) or None
    services = build(settings.load(config), database_url=os.environ.get(URL_ENV) or None)
    return create_app(services)


def _stop_when_orphaned(parent: int) -> None:
    """SIGTERM this worker (a graceful stop) once its parent is gone: the parent supervises it and
    runs the relay, so a worker without one would accept events nobody delivers."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        log.warning("the serve process %d is gone: stopping this worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="subledger-parent-watch", daemon=True).start()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket the workers share, made with IPPROTO_TCP spelled out.

    asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose `proto` says TCP, and an
    accepted socket inherits the listening one's; uvicorn's own `bind_socket` leaves `proto` 0, so
    every keep-alive response written in two sends waited for the client's delayed ACK: measured
    56 ms per request for one client instead of 7 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        raise SystemExit(1) from None
    sock.set_inheritable(True)
    log.info("listening on http://%s:%d with worker processes", host, sock.getsockname()[1])
    return sock


def serve_workers(*, host: str, port: int, workers: int, config: Path | None, database_url: str | None) -> None:
    """Run `workers` uvicorn processes on host:port until SIGTERM/SIGINT, then return (exit 0)."""
    import uvicorn  # deferred: the ASGI server loads only in a process that serves HTTP
    from uvicorn.supervisors import Multiprocess

    from subledger.app import logs

    os.environ[CONFIG_ENV] = str(config) if config is not None else ""
    os.environ[URL_ENV] = database_url or ""
    os.environ[PARENT_ENV] = str(os.getpid())
    uv_config = uvicorn.Config(FACTORY, factory=True, host=host, port=port, workers=workers,
                               log_config=logs.uvicorn_log_config(), log_level="info")
    sock = _listen(host, port)
    try:
        Multiprocess(uv_config, sockets=[sock]).run()
    finally:
        sock.close()
    log.info("stopped")
