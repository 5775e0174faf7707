"""Group commit: concurrent ingests share one transaction, and each is answered after that commit.

Why: every ingest holds the hash chain's head row from its first statement to its commit (fsync
included), so one transaction per request runs the whole service one request at a time, whatever
the number of clients: 32 clients measured no faster than 1. Here the requests that arrive while a
transaction is in flight wait in a queue; the writer thread then takes all of them (up to
`max_items` items) into the next transaction. The guarantees are the single ingest's, because it is
the single ingest (`outbox.ingest.ingest` over the concatenated items): one transaction holds the
log rows, projections, transitions and outbox rows of every request in it; a repeat, in the same
batch or not, is a duplicate; positions stay gapless in commit order; the fold applies each
subscription's events in occurrence order whichever request carried them. A request is answered
only after the commit that holds its items, so a 200 still means "durable".

What it costs: a request waits for the transaction in flight before its own starts (at most about
one transaction's time more than alone: p50 grows little, p99 by one batch), and one bad request
must not fail its neighbours: a batch that fails for a reason other than the database being out of
reach is re-run one request per transaction, so each request gets its own outcome or its own error.

Callers in threads use `ingest`; the HTTP handlers await `ingest_async`, which holds no worker
thread while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from psycopg_pool import ConnectionPool

from subledger.core.errors import StoreUnavailable, Transient
from subledger.outbox.ingest import Incoming, IngestPolicy, Outcome, ingest

log = logging.getLogger("subledger.ingest")

# Items per transaction: beyond a few hundred a batch only adds latency (the COPY path is already
# at its per-row cost), and a request of 1,000 events (the API's limit) still goes in whole.
MAX_ITEMS = 256


@dataclass(eq=False)
class _Waiting:
    """One caller's items and how it is told the outcome (an event for threads, a future for async)."""

    items: list[Incoming]
    done: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] | None = None
    error: BaseException | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[list[Outcome]] | None = None

    def settle(self, outcomes: list[Outcome] | None, error: BaseException | None) -> None:
        self.outcomes, self.error = outcomes, error
        self.done.set()
        if self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future, outcomes, error)


def _resolve(future: asyncio.Future[list[Outcome]], outcomes: list[Outcome] | None,
             error: BaseException | None) -> None:
    if future.done():  # the caller went away (client disconnected): nothing to tell
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert outcomes is not None
        future.set_result(outcomes)


class GroupCommit:
    """A writer thread that ingests what concurrent callers submit, many callers per transaction."""

    def __init__(
        self,
        pool: ConnectionPool,
        policy: IngestPolicy,
        clock: Callable[[], datetime],
        *,
        max_items: int = MAX_ITEMS,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._clock = clock
        self._max_items = max_items
        self._queue: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.transactions = 0  # how many commits served how many requests: the batching made visible
        self.requests = 0

    def start(self) -> GroupCommit:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="subledger-group-commit", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the writer (a server calls this after its last request)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def ingest(self, items: Sequence[Incoming]) -> list[Outcome]:
        """Ingest `items` in the next transaction and return their outcomes once it committed."""
        waiting = self._submit(_Waiting(list(items)))
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.outcomes is not None
        return waiting.outcomes

    async def ingest_async(self, items: Sequence[Incoming]) -> list[Outcome]:
        """`ingest` for a coroutine: the event loop keeps serving while the transaction runs."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(list(items), loop=loop, future=loop.create_future())
        self._submit(waiting)
        assert waiting.future is not None
        return await waiting.future

    def _submit(self, waiting: _Waiting) -> _Waiting:
        with self._cond:
            if self._stopping or self._thread is None:
                raise StoreUnavailable("the service is stopping: not accepting new events")
            self._queue.append(waiting)
            self._cond.notify()
        return waiting

    def _take(self) -> list[_Waiting] | None:
        """Everything queued (up to `max_items` items, at least one caller); None once stopped and empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            while self._queue and size + len(self._queue[0].items) <= self._max_items:
                size += len(self._queue[0].items)
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._commit(batch)
            except BaseException as exc:  # never leave a caller waiting, whatever happened
                log.exception("group commit failed")
                for waiting in batch:
                    if not waiting.done.is_set():
                        waiting.settle(None, exc)

    def _commit(self, batch: list[_Waiting]) -> None:
        try:
            outcomes = self._transaction([item for waiting in batch for item in waiting.items])
        except Transient as exc:  # the database out of reach: every caller gets the same 503
            for waiting in batch:
                waiting.settle(None, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].settle(None, exc)
                return
            # one caller's items broke the shared transaction (nothing of it was written): each alone
            for waiting in batch:
                self._commit([waiting])
            return
        self.transactions += 1
        self.requests += len(batch)
        start = 0
        for waiting in batch:
            end = start + len(waiting.items)
            waiting.settle(outcomes[start:end], None)
            start = end

    def _transaction(self, items: list[Incoming]) -> list[Outcome]:
        with self._pool.connection() as conn:  # ingest NOTIFYs the relay once, after the commit
            return ingest(conn, items, self._policy, self._clock())
