"""Bulk import of canonical NDJSON: derivation in worker processes partitioned by subscription key.

One Python process did everything an import does (decode, validate, fold, render, hash, encode)
at about 150 µs an event, with PostgreSQL mostly waiting for it. Here that work is split so that
only what must be sequential stays in the process holding the transaction:

- **workers** (`--jobs`, processes, each owning the subscriptions whose key hashes to it,
  `owner_of`) decode and validate their lines, encode each log row (all but position and hash)
  and the bytes its hash covers (`store.bulk.entry_parts`); once positions are known they fold,
  render and encode their subscriptions' states, transitions and outbox rows (the derive step
  every ingest runs, `outbox.derive`), reading history only when a late fact needs a re-fold.
- **the parent** reads lines and routes them, then per batch, in one transaction: locks the chain
  head (`unit_of_work.begin`, as every ingest does), numbers and chains the new entries in file
  order (`store.bulk.chain`: one SHA-256 each; the chain stays one gapless, verifiable sequence),
  COPYs the log, hands the positions to the workers and COPYs what they encoded.

So each batch is still one transaction holding log, projections, transitions and outbox rows;
a re-import finds every entry logged (all duplicates); and a subscription is derived by one worker
over its facts in log order, exactly as a single-process ingest derives it. The parent merges the
workers' rows in the order a single-process ingest stages them (by each subscription's first
line), so every table, hashes and the outbox's ids included, is the same whatever `--jobs`
(tests/test_bulk_import.py).

Pipelined: workers decode batch k+1 while the parent chains batch k and decode k+2 while it
commits, so at most three batches are in flight and memory stays flat whatever the file's size.

Routing is a hint: the parent guesses a line's subscription key from its JSON; a worker that finds
the true key belongs to another worker sends the parsed fact along, and the owner derives it.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice, repeat
from typing import IO, Any, NamedTuple, Protocol

import psycopg

from subledger.app.bootstrap import Services
from subledger.app.ingest_summary import Summary, canonical_line
from subledger.app.settings import Settings
from subledger.core.derive import Located
from subledger.core.events import Source, format_time
from subledger.core.lifecycle import SubscriptionState
from subledger.core.sources import Notification
from subledger.outbox.derive import IngestPolicy, derive
from subledger.outbox.ingest import _horizon, _is_history, wake_relay
from subledger.store import bulk, log, projections, unit_of_work
from subledger.store.db import connect
from subledger.store.outbox import OutboxRow

BATCH = 1000
MAX_JOBS = 8
# Wraps an iterator (to show progress, say) and yields its items unchanged; here it is advanced
# once per line committed, so a bar counts events stored and their rate.
Watch = Callable[[Iterator[Any], IO[bytes]], Iterator[Any]]


def default_jobs() -> int:
    """The CPU count, capped: beyond it workers only take turns, and PostgreSQL needs a core too."""
    return max(1, min(os.cpu_count() or 1, MAX_JOBS))


def owner_of(key: str | None, jobs: int) -> int:
    """The worker that derives subscription `key`: a stable hash (CRC-32, the same in every process,
    unlike `hash`) of the key's last part, which for a subscription is (the end of) its id."""
    if jobs == 1 or key is None:
        return 0
    return zlib.crc32(key.rpartition("/")[2].encode()) % jobs


_SUBSCRIPTION_ID = b'"subscription_id"'


def _hint(text: bytes, jobs: int) -> int:
    """The worker a line most likely belongs to, read off its bytes without decoding them (the one
    per-line cost the parent pays); a wrong guess (an escape in the id, a one-time purchase) costs
    a hand-over only, never a wrong result: the worker that parses the line routes it by its key."""
    if jobs == 1:
        return 0
    at = text.find(_SUBSCRIPTION_ID)
    if at < 0:
        return 0
    start = text.find(b'"', text.find(b":", at + len(_SUBSCRIPTION_ID)) + 1) + 1
    end = text.find(b'"', start)
    if start <= 0 or end < 0:
        return 0
    return zlib.crc32(text[start:end].rpartition(b"/")[2]) % jobs


@dataclass(frozen=True)
class Config:
    """What a worker needs (inherited by a forked worker, pickled for a spawned one)."""

    settings: Settings
    policy: IngestPolicy
    database_url: str
    timeout: float
    historical: bool
    jobs: int


# ---- the worker side --------------------------------------------------------------------------

# One valid line, for the parent: (line, app_id, subscription key, owner, its log entry's parts):
# where it goes in the log and who derives it. A plain tuple, for the same reason as `bulk.Parts`.
Parsed = tuple[int, str, str | None, int, bulk.Parts]


class ParseReply(NamedTuple):
    rejected: list[tuple[int, str]]
    parsed: list[Parsed]
    # lines whose subscription another worker owns: (line, notification, historical)
    foreign: list[tuple[int, Notification, bool]]


class KeyRows(NamedTuple):
    """One subscription's derived rows, encoded; `first` (the line of its first new fact) orders them
    as a sequential ingest stages them."""

    first: int
    state: bytes
    transitions: bytes
    outbox: bytes
    superseded: tuple[str, ...]
    revived: tuple[str, ...]
    again: list[OutboxRow]
    new: int


class Partition:
    """The CPU work of the subscriptions one worker owns; runs in a worker process (or inline)."""

    def __init__(self, config: Config, index: int, conn: psycopg.Connection) -> None:
        """`conn` serves the derive step's reads for a re-fold (history, emitted ids, revived bodies).
        A worker's own connection sees the committed rows, which with the batch's own facts are what
        the parent's transaction sees (the fold counts a fact both fresh and logged once)."""
        self.config = config
        self.index = index
        self.conn = conn
        # line → (notification, historical) of the owned lines parsed and not yet derived
        self.pending: dict[int, tuple[Notification, bool]] = {}

    def parse(self, now: datetime, lines: Sequence[tuple[int, bytes]]) -> ParseReply:
        cfg = self.config
        reply = ParseReply([], [], [])
        received = format_time(now)
        for line, text in lines:
            checked = canonical_line(text, cfg.settings, historical=cfg.historical)
            if isinstance(checked, str):
                reply.rejected.append((line, checked))
                continue
            n = checked.notification
            historical = checked.historical or _is_history(n, now, _horizon(checked, cfg.policy))
            entry = log.Entry(n, checked.raw, now, historical, checked.arrival)
            key = n.key()
            owner = owner_of(key, cfg.jobs)
            reply.parsed.append((line, n.app_id, key, owner, bulk.entry_parts(entry, received)))
            if owner == self.index:
                self.pending[line] = (n, historical)
            else:
                reply.foreign.append((line, n, historical))
        return reply

    def derive(
        self,
        now: datetime,
        assigned: Sequence[tuple[int, int | None]],
        forwarded: Sequence[tuple[int, int, Notification, bool]],
        states: dict[str, SubscriptionState],
        links: dict[str, str],
    ) -> list[KeyRows]:
        """Derive this worker's subscriptions of one batch: `assigned` are its own parsed lines with
        their positions (None: a repeat, nothing to derive), `forwarded` lines other workers parsed."""
        located: list[tuple[int, int, Notification, bool]] = []
        for line, position in assigned:
            n, historical = self.pending.pop(line)
            if position is not None:
                located.append((line, position, n, historical))
        located.extend(forwarded)
        # file order, as a sequential ingest meets them (with partitioned chains, positions are not)
        located.sort(key=lambda item: item[0])
        by_key: dict[str, list[Located]] = defaultdict(list)
        first: dict[str, int] = {}
        for line, position, n, historical in located:
            for event in n.events:
                by_key[event.subscription_key].append(Located(event, position, historical))
                first.setdefault(event.subscription_key, line)
        policy = self.config.policy
        out: list[KeyRows] = []
        for key, fresh in by_key.items():
            derived = derive(self.conn, key, fresh, policy, now, state=states.get(key),
                             linked_user=links.get(key))
            d = derived.derivation
            out.append(KeyRows(
                first=first[key],
                state=projections.encode_state(d.state, d.last_position),
                transitions="".join([projections.encode_transition(e.transition, e.position, e.historical, now)
                                     for e in d.new]).encode(),
                outbox="".join([bulk.encode_outbox(row, now) for row in derived.messages]).encode(),
                superseded=d.superseded,
                revived=d.revived,
                again=derived.again,
                new=len(d.new),
            ))
        return out


def _handle(partition: Partition, message: tuple[Any, ...]) -> Any:
    if message[0] == "parse":
        return partition.parse(*message[1:])
    return partition.derive(*message[1:])


@dataclass(frozen=True)
class _Failure:
    """A worker's exception, carried back to the parent (which raises it)."""

    error: BaseException


def _serve(config: Config, index: int, inbox: Any, outbox: Any) -> None:
    """A worker process: answer each message in order until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the import and its workers
    conn: psycopg.Connection | None = None
    try:
        conn = connect(config.database_url, autocommit=True, timeout=config.timeout)
        partition = Partition(config, index, conn)
        while (message := inbox.get()) is not None:
            outbox.put(_handle(partition, message))
    except BaseException as exc:
        outbox.put(_Failure(_portable(exc)))
    finally:
        if conn is not None:
            conn.close()


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (a StoreError does), else a RuntimeError with its traceback."""
    try:
        return pickle.loads(pickle.dumps(exc))  # type: ignore[no-any-return]
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)))


class _Worker(Protocol):
    def send(self, message: tuple[Any, ...]) -> None: ...
    def recv(self) -> Any: ...
    def close(self) -> None: ...


class _Inline:
    """`--jobs 1`: the partition runs in this process, answering in the order it was asked."""

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.replies: deque[Any] = deque()

    def send(self, message: tuple[Any, ...]) -> None:
        self.replies.append(_handle(self.partition, message))

    def recv(self) -> Any:
        return self.replies.popleft()

    def close(self) -> None:
        pass


class _Process:
    """A worker process and its two queues (a put never blocks, so neither side can deadlock)."""

    def __init__(self, context: Any, config: Config, index: int) -> None:
        self.inbox = context.Queue()
        self.outbox = context.Queue()
        self.process = context.Process(target=_serve, args=(config, index, self.inbox, self.outbox),
                                       name=f"subledger-import-{index}", daemon=True)
        self.process.start()

    def send(self, message: tuple[Any, ...]) -> None:
        self.inbox.put(message)

    def recv(self) -> Any:
        import queue

        while True:
            try:
                reply = self.outbox.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"bulk import worker {self.process.name} exited "
                                       f"({self.process.exitcode})") from None
        if isinstance(reply, _Failure):
            raise reply.error
        return reply

    def close(self) -> None:
        if self.process.is_alive():
            self.inbox.put(None)
            self.process.join(timeout=5)
        if self.process.is_alive():  # stopped mid-batch (an error, ^C): it has nothing left to say
            self.process.terminate()
            self.process.join(timeout=5)
        # The worker is gone: what it did not read must not keep this process from exiting.
        self.inbox.cancel_join_thread()
        self.inbox.close()
        self.outbox.close()


def _start(config: Config, jobs: int, conn: psycopg.Connection) -> list[_Worker]:
    if jobs == 1:
        return [_Inline(Partition(config, 0, conn))]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers: list[_Worker] = []
    try:
        for index in range(jobs):
            workers.append(_Process(context, config, index))
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


# ---- the parent side --------------------------------------------------------------------------

def is_ndjson(stream: IO[bytes]) -> bool:
    """Whether the stream starts like NDJSON (not a JSON array), looked at without consuming it;
    False when it cannot be told (the single-process reader handles those streams)."""
    head = b""
    try:
        if stream.seekable():
            at = stream.tell()
            head = stream.read(4096)
            stream.seek(at)
        elif (peek := getattr(stream, "peek", None)) is not None:
            head = peek(4096)
    except (OSError, ValueError):
        return False
    head = head.lstrip()
    return bool(head) and not head.startswith(b"[")


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped line) of every line that is not blank."""
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if text:
            yield number, text


@dataclass
class _Batch:
    """A batch whose lines were sent to the workers to parse; `replies` once they answered."""

    now: datetime
    lines: int
    replies: list[ParseReply] = field(default_factory=list)


def import_ndjson(
    services: Services, stream: IO[bytes], name: str, *, historical: bool = False, progress: Watch | None = None,
    jobs: int = 1, batch: int = BATCH,
) -> Summary:
    """Import canonical NDJSON from `stream` in transactions of `batch` lines, derived by `jobs` workers
    (forked: a caller with threads of its own, which a fork does not carry over, keeps `jobs` 1)."""
    jobs = max(1, jobs)
    config = Config(services.settings, services.policy, services.database_url, services.database_timeout,
                    historical, jobs)
    summary = Summary()
    conn = connect(services.database_url, timeout=services.database_timeout)
    workers: list[_Worker] = []
    try:
        workers = _start(config, jobs, conn)
        lines = _lines(stream)
        # one tick per line committed; the bar fills by bytes read (`stream.tell()`), a few batches ahead
        ticks = None if progress is None else progress(repeat(None), stream)

        def dispatch() -> _Batch | None:
            chunk = list(islice(lines, batch))
            if not chunk:
                return None
            now = services.clock()
            routed: list[list[tuple[int, bytes]]] = [[] for _ in workers]
            for line, text in chunk:
                routed[_hint(text, jobs)].append((line, text))
            for worker, part in zip(workers, routed, strict=True):
                worker.send(("parse", now, part))
            return _Batch(now, len(chunk))

        # Each worker answers in the order it is asked: parse k+1 and derive k are asked for while
        # batch k is written, parse k+2 while it commits (see the module's docstring).
        current, following = dispatch(), dispatch()
        if current is not None:
            current.replies = [w.recv() for w in workers]
        while current is not None:
            following, after = _step(conn, workers, current, following, dispatch, summary, name)
            if ticks is not None:
                deque(islice(ticks, current.lines), maxlen=0)
            current, following = following, after
    finally:
        if ticks is not None:
            ticks.close()  # type: ignore[attr-defined]  # a generator: ends the bar
        for worker in workers:
            worker.close()
        conn.close()
    return summary


def _step(
    conn: psycopg.Connection, workers: Sequence[_Worker], current: _Batch, following: _Batch | None,
    dispatch: Callable[[], _Batch | None], summary: Summary, name: str,
) -> tuple[_Batch | None, _Batch | None]:
    """Write batch `current` in one transaction; returns the next batch (parsed) and the one after
    (sent to parse)."""
    now = current.now
    for line, reason in sorted(r for reply in current.replies for r in reply.rejected):
        summary.reject(name, line, reason)
    parsed = sorted((p for reply in current.replies for p in reply.parsed), key=lambda p: p[0])
    foreign = {line: (n, historical) for reply in current.replies for line, n, historical in reply.foreign}
    after: _Batch | None = None
    with conn.transaction():
        entries = [log.Entry(Notification(_SOURCES[parts[0]], parts[1], app_id, "", (), key), b"", now, False)
                   for _, app_id, key, _, parts in parsed]
        keys = sorted({key for _, _, key, _, _ in parsed if key is not None})
        begun = unit_of_work.begin(conn, entries, keys,
                                   sorted({(app_id, key) for _, app_id, key, _, _ in parsed if key is not None}))
        positions, rows, writes = bulk.chain([p[4] for p in parsed], begun.head, now)
        jobs = len(workers)
        assigned: list[list[tuple[int, int | None]]] = [[] for _ in workers]
        forwarded: list[list[tuple[int, int, Notification, bool]]] = [[] for _ in workers]
        for (line, _, _, owner, _), position in zip(parsed, positions, strict=True):
            if line in foreign:
                if position is not None:
                    forwarded[owner].append((line, position, *foreign[line]))
            else:
                assigned[owner].append((line, position))
        states: list[dict[str, SubscriptionState]] = [{} for _ in workers]
        for key, state in begun.states.items():
            states[owner_of(key, jobs)][key] = state
        links: list[dict[str, str]] = [{} for _ in workers]
        for key, user in begun.links.items():
            links[owner_of(key, jobs)][key] = user
        for w, worker in enumerate(workers):
            worker.send(("derive", now, assigned[w], forwarded[w], states[w], links[w]))
        bulk.write_log(conn, rows, writes)  # while the workers derive (they read only committed rows)
        after = dispatch()
        if following is not None:
            following.replies = [w.recv() for w in workers]
        derived = sorted((rows for w in workers for rows in w.recv()), key=lambda r: r.first)
        bulk.write_derived(conn, bulk.Derived(
            states=[r.state for r in derived],
            transitions=[r.transitions for r in derived],
            outbox=[r.outbox for r in derived],
            superseded=[i for r in derived for i in r.superseded],
            revived=[i for r in derived for i in r.revived],
            again=[row for r in derived for row in r.again],
        ), now)
    appended = sum(1 for position in positions if position is not None)
    summary.new += appended
    summary.duplicate += len(positions) - appended
    summary.transitions += sum(r.new for r in derived)
    if any(r.outbox or r.again for r in derived):
        wake_relay(conn)
    return following, after


_SOURCES = {s.value: s for s in Source}
