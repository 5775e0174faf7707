"""Partitioned hash chains (`[log] chains = N`, store/log.py): concurrent ingests of different chains,
each chain gapless and verified on its own, a one-chain log continued with more chains."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from subledger.core.chain import chain_of
from subledger.core.events import Source, parse_event
from subledger.core.lifecycle import fold
from subledger.core.render import Destination
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import log
from subledger.store.verify import verify

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)  # injected; every fact is dated from it
APP = "com.example"
POLICY = IngestPolicy(destinations={APP: (Destination(name="segment", app_id=APP),)})
LIFECYCLE = (("purchase", 60, {"period_type": "trial"}), ("renewal", 50, {}), ("renewal", 40, {}),
             ("auto_renew_disabled", 30, {}), ("expiration", 20, {}))


def item(eid: str, kind: str, hours_ago: float, sub: str, **extra: Any) -> Incoming:
    data: dict[str, Any] = {
        "id": eid, "app_id": APP, "type": kind, "subscription_id": sub, "app_user_id": f"user-{sub}",
        "occurred_at": (NOW - timedelta(hours=hours_ago)).isoformat(),
    }
    if kind in ("purchase", "renewal"):
        data.update(product_id="monthly", price="9.99", currency="USD")
    data.update(extra)
    return Incoming(Notification.of(parse_event(data)), repr(data).encode())


def keyless(external_id: str) -> Incoming:
    """A delivery with no subscription (informational): chain 0 whatever the number of chains."""
    notification = Notification(source=Source.STRIPE, external_id=external_id, app_id=APP, kind="customer.updated",
                                subscription_key=None)
    return Incoming(notification, b'{"type": "customer.updated"}')


def lifecycle(sub: str) -> list[Incoming]:
    return [item(f"{sub}-{n}", kind, hours, sub, **extra) for n, (kind, hours, extra) in enumerate(LIFECYCLE)]


def key_of(sub: str) -> str:
    key = item("probe", "purchase", 1, sub).notification.key()
    assert key is not None
    return key


def subs_in_chains(chains: int, wanted: set[int], per_chain: int = 1) -> dict[int, list[str]]:
    """Subscription ids whose keys fall in each of `wanted` chains."""
    found: dict[int, list[str]] = defaultdict(list)
    n = 0
    while any(len(found[c]) < per_chain for c in wanted):
        sub = f"s{n}"
        c = chain_of(key_of(sub), chains)
        if c in wanted and len(found[c]) < per_chain:
            found[c].append(sub)
        n += 1
    return dict(found)


def chain_of_position(conn: psycopg.Connection, position: int) -> int:
    epoch = [e for e in log.epochs(conn) if e.first_position <= position][-1]
    return (position - epoch.first_position) % epoch.chains


def stored_hashes(conn: psycopg.Connection) -> list[tuple[int, bytes]]:
    return [(int(p), bytes(h)) for p, h in conn.execute("SELECT position, hash FROM event_log ORDER BY position")]


def test_the_default_is_one_chain_as_before(conn: psycopg.Connection) -> None:
    """No epoch, positions 1, 2, 3 on `log_head`, nothing in `log_heads`."""
    for sub in ("a", "b", "c"):
        ingest(conn, [item(f"{sub}-0", "purchase", 1, sub)], POLICY, NOW)
    assert [p for p, _ in stored_hashes(conn)] == [1, 2, 3]
    assert log.epochs(conn) == [log.FIRST_EPOCH]
    assert conn.execute("SELECT count(*) FROM log_heads").fetchone() == (0,)
    assert conn.execute("SELECT position FROM log_head").fetchone() == (3,)
    assert verify(conn).ok


def test_the_app_role_may_change_the_chains_and_ingest(conn: psycopg.Connection) -> None:
    conn.execute("SET ROLE subledger_app")
    conn.commit()
    assert log.set_chains(conn, 3, NOW) is not None
    assert [o.result for o in ingest(conn, lifecycle("r1")[:2], POLICY, NOW)] == ["new", "new"]
    assert log.set_chains(conn, 1, NOW) is not None
    assert verify(conn).ok


def test_32_threads_of_duplicates_and_late_events_with_four_chains(db_url: str) -> None:
    with psycopg.connect(db_url) as c:
        epoch = log.set_chains(c, 4, NOW)
        assert epoch is not None and epoch.chains == 4
    subs = [f"sub{n}" for n in range(16)]
    unique = [e for sub in subs for e in lifecycle(sub)] + [keyless(f"evt_info_{n}") for n in range(6)]
    sends = unique * 2  # every event delivered twice, by different threads
    random.Random(11).shuffle(sends)  # and out of occurrence order
    lanes: list[list[Incoming]] = [sends[n::32] for n in range(32)]
    start = threading.Barrier(32)
    errors: list[BaseException] = []
    results: list[str] = []

    def run(lane: list[Incoming]) -> None:
        try:
            with psycopg.connect(db_url) as own:
                start.wait()
                for incoming in lane:
                    results.extend(o.result for o in ingest(own, [incoming], POLICY, NOW))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sorted(results) == sorted(["new"] * len(unique) + ["duplicate"] * len(unique))
    with psycopg.connect(db_url) as c:
        result = verify(c)
        assert result.ok, [p.describe() for p in result.problems]
        assert result.entries == len(unique)
        stored = c.execute("SELECT source, external_id, count(*) FROM event_log GROUP BY 1, 2").fetchall()
        assert {(s, e) for s, e, _ in stored} == {(i.notification.source.value, i.notification.external_id)
                                                  for i in unique}
        assert all(n == 1 for _, _, n in stored)
        # every chain was used, and each one's positions advance by 4 (gapless within the chain)
        by_chain: dict[int, list[int]] = defaultdict(list)
        for position, _ in stored_hashes(c):
            by_chain[chain_of_position(c, position)].append(position)
        assert set(by_chain) == {0, 1, 2, 3}
        for positions in by_chain.values():
            assert all(b - a == 4 for a, b in itertools.pairwise(positions))
        # the live transitions are exactly those of a sequential fold of each subscription's events
        live = {r[0] for r in c.execute("SELECT id FROM transitions WHERE superseded_at IS NULL")}
        expected = {t.id for sub in subs for t in fold([i.notification.events[0] for i in lifecycle(sub)]).transitions}
        assert live == expected
        pending = {r[0] for r in c.execute("SELECT transition_id FROM outbox")}
        assert pending == expected  # superseded transitions' messages were withdrawn


def test_a_tampered_entry_in_chain_2_is_named(conn: psycopg.Connection) -> None:
    log.set_chains(conn, 4, NOW)
    found = subs_in_chains(4, {0, 1, 2, 3}, per_chain=2)
    for subs in found.values():
        for sub in subs:
            ingest(conn, lifecycle(sub)[:2], POLICY, NOW)
    assert verify(conn).ok
    positions = [p for p, _ in stored_hashes(conn) if chain_of_position(conn, p) == 2]
    victim = positions[1]
    conn.execute("ALTER TABLE event_log DISABLE TRIGGER event_log_append_only")
    conn.execute("UPDATE event_log SET raw = raw || '\\x00'::bytea WHERE position = %s", (victim,))
    conn.execute("ALTER TABLE event_log ENABLE TRIGGER event_log_append_only")
    conn.commit()
    result = verify(conn)
    assert not result.ok and result.first_bad_position == victim
    assert [(p.kind, p.chain, p.position) for p in result.problems] == [("chain", 2, victim)]
    assert result.problems[0].describe().startswith(f"chain at position {victim}: chain 2: ")
    assert result.as_json()["problems"][0]["chain"] == 2


def test_keyless_entries_are_in_chain_0_and_an_edited_head_is_named(conn: psycopg.Connection) -> None:
    log.set_chains(conn, 4, NOW)
    found = subs_in_chains(4, {1, 3})
    ingest(conn, [*lifecycle(found[1][0])[:2], keyless("evt_k")], POLICY, NOW)
    ingest(conn, lifecycle(found[3][0])[:1], POLICY, NOW)
    keyless_position = conn.execute("SELECT position FROM event_log WHERE external_id = 'evt_k'").fetchone()
    assert keyless_position is not None and chain_of_position(conn, int(keyless_position[0])) == 0
    conn.execute("UPDATE log_heads SET position = position + 4 WHERE chain = 3")
    conn.commit()
    problems = verify(conn).problems
    assert [(p.kind, p.chain) for p in problems] == [("head", 3)]
    assert problems[0].detail.startswith("chain 3's head says position")


def test_a_one_chain_log_continued_with_four_then_one_verifies(conn: psycopg.Connection) -> None:
    subs = [f"m{n}" for n in range(6)]
    for sub in subs:
        ingest(conn, lifecycle(sub)[:2], POLICY, NOW)
    before = stored_hashes(conn)
    assert [p for p, _ in before] == list(range(1, 13))
    conn.commit()  # the reads above opened a transaction: end it, so the change below commits on its own

    later = NOW + timedelta(minutes=1)
    epoch = log.set_chains(conn, 4, later)
    assert epoch is not None and (epoch.epoch, epoch.chains, epoch.first_position) == (1, 4, 13)
    assert epoch.started_at == later and epoch.entries_before == 12
    assert log.set_chains(conn, 4, later) is None  # already so: no new epoch
    for sub in [*subs, "m6", "m7"]:  # the same subscriptions again (they move to their chains), and new ones
        ingest(conn, lifecycle(sub)[2:4], POLICY, later)
    assert stored_hashes(conn)[:12] == before  # nothing written before the change was touched
    conn.commit()
    result = verify(conn)
    assert result.ok, [p.describe() for p in result.problems]
    assert result.entries == 12 + 16

    assert log.set_chains(conn, 1, later) is not None
    for sub in subs[:3]:
        ingest(conn, lifecycle(sub)[4:], POLICY, later)
    result = verify(conn)
    assert result.ok, [p.describe() for p in result.problems]
    assert result.entries == 12 + 16 + 3
    last = stored_hashes(conn)[-3:]
    assert [p for p, _ in last] == [last[0][0], last[0][0] + 1, last[0][0] + 2]  # one chain again: gapless

    # the seal ties each epoch to the chains it closed: a changed seal is named
    conn.execute("UPDATE log_epochs SET seal = %s WHERE epoch = 1", (b"\x01" * 32,))
    conn.commit()
    problems = verify(conn).problems
    assert problems and problems[0].kind == "chain" and "epoch 1 starts from a seal" in problems[0].detail


def test_ingests_of_different_chains_do_not_block_each_other(db_url: str) -> None:
    with psycopg.connect(db_url) as c:
        log.set_chains(c, 4, NOW)
    found = subs_in_chains(4, {1, 3}, per_chain=2)
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url) as other, psycopg.connect(db_url) as same:
        holder.execute("SELECT 1")  # an open transaction: ingest's own becomes a savepoint of it
        ingest(holder, [item("h-0", "purchase", 1, found[1][0])], POLICY, NOW)
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # chain 1 stays locked
        for c in (other, same):
            c.execute("SET lock_timeout = '500ms'")
            c.commit()
        started = time.monotonic()
        outcome = ingest(other, [item("o-0", "purchase", 1, found[3][0])], POLICY, NOW)  # chain 3: goes through
        assert [o.result for o in outcome] == ["new"] and time.monotonic() - started < 0.5
        with pytest.raises(psycopg.errors.LockNotAvailable):  # chain 1, another subscription: waits for the holder
            ingest(same, [item("w-0", "purchase", 1, found[1][1])], POLICY, NOW)
        same.rollback()
        holder.commit()
        assert [o.result for o in ingest(same, [item("w-0", "purchase", 1, found[1][1])], POLICY, NOW)] == ["new"]
        assert verify(same).ok


@pytest.mark.parametrize("extra", [0, 40], ids=["one-statement", "copy"])
def test_a_batch_of_several_chains_is_one_transaction(conn: psycopg.Connection, extra: int) -> None:
    """A batch spanning chains locks each of them (in order) and commits or fails as a whole, on both
    write paths (a big batch COPYs the log and updates each chain's head row)."""
    log.set_chains(conn, 4, NOW)
    found = subs_in_chains(4, {0, 1, 2, 3})
    batch = [e for subs in found.values() for e in lifecycle(subs[0])] + [keyless("evt_batch")]
    batch += [item(f"x{n}", "purchase", 1, f"x{n}") for n in range(extra)]
    random.Random(3).shuffle(batch)

    def fail(point: str) -> None:
        if point == "before_commit":
            raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        ingest(conn, batch, POLICY, NOW, fail_at=fail)
    assert conn.execute("SELECT count(*) FROM event_log").fetchone() == (0,)
    conn.commit()
    assert all(o.result == "new" for o in ingest(conn, batch, POLICY, NOW))
    result = verify(conn)
    assert result.ok and result.entries == len(batch)


def _rate(db_url: str, chains: int, seconds: float, threads: int = 32) -> float:
    """Ingests per second with `threads` threads, one event of its own subscription per call."""
    with psycopg.connect(db_url) as c:
        log.set_chains(c, chains, NOW)
    done = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = [0.0]

    def run(lane: int) -> None:
        with psycopg.connect(db_url) as own:
            start.wait()
            n = 0
            while time.monotonic() < stop[0]:
                sub = f"t{chains}-{lane}-{n}"
                ingest(own, [item(sub, "purchase", 1, sub)], POLICY, NOW)
                n += 1
            done[lane] = n

    workers = [threading.Thread(target=run, args=(lane,)) for lane in range(threads)]
    for t in workers:
        t.start()
    stop[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for t in workers:
        t.join()
    return sum(done) / (time.monotonic() - began)


@pytest.mark.skipif(not os.environ.get("SUBLEDGER_MEASURE"), reason="a measurement: SUBLEDGER_MEASURE=1 -s")
def test_throughput_chains_1_vs_8(db_url: str) -> None:
    """32 threads calling ingest directly, one event per call, each of its own subscription: tx/s."""
    seconds = float(os.environ.get("SUBLEDGER_MEASURE_SECONDS", "10"))
    one = _rate(db_url, 1, seconds)
    eight = _rate(db_url, 8, seconds)
    with psycopg.connect(db_url) as c:
        assert verify(c).ok
    print(f"\n32 threads, one event per ingest, {seconds:.0f} s each: chains=1 {one:.0f} tx/s, "
          f"chains=8 {eight:.0f} tx/s ({eight / one:.2f}x)")


def test_the_configured_chains_are_applied_when_a_command_starts(tmp_path: Any, db_url: str) -> None:
    """`[log] chains = 4` in the config: the first command opens the epoch (and says so), the next
    finds it in place; the entries it ingests then land in four chains and verify."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "subledger")
    config = Path(tmp_path) / "c.toml"
    config.write_text('[log]\nchains = 4\n\n[apps."com.example"]\n')
    now = datetime.now(UTC)
    events = Path(tmp_path) / "e.ndjson"
    events.write_text("".join(json.dumps({
        "id": f"e{i}", "app_id": "com.example", "type": "purchase", "subscription_id": f"s{i}",
        "occurred_at": (now - timedelta(hours=1)).isoformat(), "product_id": "m", "price": "1", "currency": "USD",
    }) + "\n" for i in range(12)))
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(Path(tmp_path) / "data")}
    env.pop("SUBLEDGER_CONFIG", None)

    def ingest_file() -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "ingest", str(events), "--config", str(config), "--database-url", db_url],
                              capture_output=True, text=True, env=env, timeout=120)

    first = ingest_file()
    assert first.returncode == 0, first.stderr
    assert "the log now appends to 4 hash chains from position 1" in first.stderr
    second = ingest_file()
    assert second.returncode == 0, second.stderr
    assert "hash chain" not in second.stderr
    config.write_text('[apps."com.example"]\n')  # a config that does not name the chains changes nothing
    third = ingest_file()
    assert third.returncode == 0 and "hash chain" not in third.stderr, third.stderr
    with psycopg.connect(db_url) as conn:
        assert [e.chains for e in log.epochs(conn)] == [1, 4]
        assert len({chain_of_position(conn, p) for (p,) in conn.execute("SELECT position FROM event_log")}) > 1
        assert verify(conn).ok
