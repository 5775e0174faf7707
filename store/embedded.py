"""See and stop the embedded PostgreSQL that `store.db.embedded_url` starts and leaves running.

The embedded server outlives the command that started it (so later commands reuse it); an
operator needs to know it is there, where its data lives, how to connect, and how to stop it
cleanly. Reading its state never starts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from subledger.store.db import data_dir


@dataclass(frozen=True)
class EmbeddedStatus:
    data_dir: Path
    running: bool
    pid: int | None = None
    url: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_pid_file(pgdata: Path) -> tuple[int, str | None] | None:
    """(pid, URL) from PostgreSQL's postmaster.pid; None when there is none or it is unreadable."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return None
    port = lines[3].strip() if len(lines) > 3 else ""
    socket_dir = lines[4].strip() if len(lines) > 4 else ""
    host = lines[5].strip() if len(lines) > 5 else ""
    url = None
    if socket_dir:
        url = f"postgresql://postgres:@/postgres?host={socket_dir}" + (f"&port={port}" if port else "")
    elif host and port:
        url = f"postgresql://postgres:@{host}:{port}/postgres"
    return pid, url


def status(directory: Path | None = None) -> EmbeddedStatus:
    """The embedded server under `directory` (default: $SUBLEDGER_DATA_DIR or ./.subledger)."""
    where = directory or data_dir()
    found = _read_pid_file(where / "pgdata")
    if found is None or not _alive(found[0]):
        return EmbeddedStatus(data_dir=where, running=False)
    return EmbeddedStatus(data_dir=where, running=True, pid=found[0], url=found[1])


def stop(directory: Path | None = None, *, timeout: float = 30.0) -> bool:
    """Fast shutdown (SIGINT: open transactions roll back, the data is left consistent); False if not running.

    Raises TimeoutError when the server has not exited within `timeout` seconds.
    """
    current = status(directory)
    if not current.running or current.pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(current.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while _alive(current.pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the embedded PostgreSQL (pid {current.pid}) did not stop within {timeout:.0f} s")
        time.sleep(0.05)
    return True
