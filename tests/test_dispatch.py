"""The relay's send step without a socket or a database: packing, bisection, halting after a failure.

outbox/dispatch.py turns claimed rows into requests and answers into an `Outcome`; these tests feed
it scripted answers and read the outcome the relay would record.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from subledger.core.delivery import Backoff
from subledger.outbox.dispatch import Dispatcher, Outcome
from subledger.outbox.routes import Route
from subledger.outbox.segment import Response
from subledger.store.outbox import ClaimedRow

NOW = datetime(2026, 6, 1, tzinfo=UTC)
ROUTE = Route("com.test.app", "segment", "http://127.0.0.1:9", "key")


class Scripted:
    """A client answering each request with `answer(messages)`; it remembers what it was sent."""

    def __init__(self, answer: Callable[[Sequence[bytes]], Response]) -> None:
        self.answer = answer
        self.sent: list[list[bytes]] = []

    def post(
        self, endpoint: str, write_key: str, messages: Sequence[bytes], *, gzip_body: bool | None = None,
        timeout: float | None = None,
    ) -> Response:
        self.sent.append(list(messages))
        return self.answer(messages)


def rows(n: int) -> list[ClaimedRow]:
    return [
        ClaimedRow(i, f"m{i}", ROUTE.app_id, ROUTE.destination, f"s{i}", (f'{{"messageId":"m{i}"}}'.encode(),),
                   (f"m{i}",), False, 0, None, NOW)
        for i in range(1, n + 1)
    ]


def dispatcher(client: Scripted, *, may_send: bool = True, max_batch_events: int | None = None) -> Dispatcher:
    return Dispatcher(client, clock=lambda: NOW, rng=random.Random(1), backoff=Backoff(1.0, 10.0),
                      may_send=lambda: may_send, max_batch_events=max_batch_events)


def send(d: Dispatcher, claimed: list[ClaimedRow], *, probe: bool = False) -> list[Outcome]:
    outcomes: list[Outcome] = []
    d.send(ROUTE, ROUTE.write_key, claimed, probe=probe, record=outcomes.append)
    return outcomes


def test_a_refused_batch_is_bisected_until_the_poison_row_is_alone() -> None:
    poison = b'{"messageId":"m3"}'
    client = Scripted(lambda msgs: Response(400, {}, b'{"error":"invalid"}', 0.0) if poison in msgs
                      else Response(200, {}, b"{}", 0.0))
    [outcome] = send(dispatcher(client), rows(8))
    assert [r.id for r, _, _ in outcome.dead] == [3]
    assert outcome.dead[0][1] == 400
    assert sorted(r.id for r in outcome.delivered) == [1, 2, 4, 5, 6, 7, 8]
    assert outcome.requests == len(client.sent) == 7  # 8 → 4+4 → 2+2 → 1+1
    assert outcome.tries[3] == 4 and outcome.tries[8] == 2
    assert [a.outcome for a in outcome.attempts if a.message_id == "m3"] == ["split", "split", "split", "dead"]
    assert outcome.failure is None and outcome.answered == NOW


def test_after_a_server_error_the_rest_of_the_pass_goes_back_unsent() -> None:
    client = Scripted(lambda msgs: Response(503, {}, b"down", 0.0))
    first, second = send(dispatcher(client, max_batch_events=2), rows(4))  # two rows (one message each) a batch
    assert len(client.sent) == 1
    assert [r.id for r, *_ in first.retry] == [1, 2] and first.failure is not None and first.answered is None
    assert [r.id for r in second.release] == [3, 4] and second.requests == 0 and not second.tries


def test_a_probe_failure_does_not_grow_the_rows_backoff() -> None:
    client = Scripted(lambda msgs: Response(500, {}, b"", 0.0))
    [probed] = send(dispatcher(client), rows(1), probe=True)
    [(_, at, status, _)] = probed.retry
    assert at == NOW and status == 500  # waits on the destination's probe backoff instead
    [healthy] = send(dispatcher(client), rows(1))
    assert healthy.retry[0][1] > NOW


def test_no_request_starts_when_the_lease_could_run_out() -> None:
    client = Scripted(lambda msgs: Response(200, {}, b"{}", 0.0))
    [outcome] = send(dispatcher(client, may_send=False), rows(3))
    assert client.sent == [] and [r.id for r in outcome.release] == [1, 2, 3] and not outcome.delivered
