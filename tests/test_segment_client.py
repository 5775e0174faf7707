"""The Segment client and the pure delivery rules: verdicts, backoff, batch packing, wire format."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime, timedelta

import pytest

from subledger.core.delivery import (
    ENVELOPE_BYTES,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    Backoff,
    Delivered,
    Paused,
    Poisoned,
    RetryAt,
    classify,
    encode_batch,
    halves,
    plan,
    requested_wait,
)
from subledger.core.render import iso_millis
from subledger.outbox.segment import SegmentClient
from subledger.outbox.sink import Reply, Reset, Sink

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
SENT_AT = iso_millis(NOW)  # encoding only: any instant will do
NO_JITTER = Backoff(1.0, 300.0)


def test_2xx_is_delivered() -> None:
    assert classify(200, {}, b'{"success": true}', NOW) == Delivered(200)
    assert classify(204, {}, b"", NOW) == Delivered(204)
    assert classify(200, {}, b"OK", NOW) == Delivered(200)  # RudderStack's body


def test_jitsu_ok_false_names_the_refused_messages() -> None:
    body = json.dumps({"ok": False, "receivedEvents": 3, "okEvents": 2,
                       "errors": ["Message ID: sl-abc.t: event error: too long"]}).encode()
    verdict = classify(200, {}, body, NOW)
    assert isinstance(verdict, Poisoned)
    assert verdict.message_ids == frozenset({"sl-abc.t"})
    assert "too long" in verdict.reason
    assert classify(200, {}, b'{"ok": true, "receivedEvents": 3}', NOW) == Delivered(200)


def test_jitsu_throttled_is_retried() -> None:
    body = json.dumps({"ok": False, "errors": ["Message ID: x: throttled"]}).encode()
    assert isinstance(classify(200, {}, body, NOW), RetryAt)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "7"}, 7),
        ({"retry-after": "2.5"}, 2.5),
        ({"Retry-After": "Sat, 28 Nov 2026 12:00:30 GMT"}, 30),
        ({"X-RateLimit-Reset": "12"}, 12),
        ({"X-RateLimit-Reset": str(int((NOW + timedelta(seconds=40)).timestamp()))}, 40),
        ({"Retry-After": "999999"}, 3600),  # clamped
    ],
)
def test_429_waits_what_the_endpoint_asks(headers: dict[str, str], wait: float) -> None:
    verdict = classify(429, headers, b"slow down", NOW)
    assert isinstance(verdict, RetryAt) and verdict.destination_wide
    assert verdict.at == NOW + timedelta(seconds=wait)


def test_429_without_headers_backs_off() -> None:
    verdict = classify(429, {}, b"", NOW, attempts=0, jitter=0.0, backoff=NO_JITTER)
    assert isinstance(verdict, RetryAt) and verdict.at == NOW + timedelta(seconds=0.5)
    assert requested_wait({"Retry-After": "soon"}, NOW) is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, None])
def test_server_errors_and_no_response_back_off(status: int | None) -> None:
    verdict = classify(status, {}, b"boom", NOW, attempts=3, jitter=1.0, backoff=NO_JITTER)
    assert isinstance(verdict, RetryAt) and not verdict.destination_wide
    assert verdict.at == NOW + timedelta(seconds=8)


def test_503_retry_after_is_a_floor() -> None:
    verdict = classify(503, {"Retry-After": "60"}, b"", NOW, jitter=0.0)
    assert isinstance(verdict, RetryAt) and verdict.at == NOW + timedelta(seconds=60)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_failures_pause(status: int) -> None:
    assert isinstance(classify(status, {}, b'{"error": "invalid write key"}', NOW), Paused)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_other_4xx_poison(status: int) -> None:
    verdict = classify(status, {}, b'{"error": "bad"}', NOW)
    assert isinstance(verdict, Poisoned) and not verdict.message_ids and "bad" in verdict.reason


def test_backoff_is_capped_with_equal_jitter() -> None:
    b = Backoff(1.0, 60.0)
    assert b.delay(0, 0.0) == timedelta(seconds=0.5)
    assert b.delay(0, 1.0) == timedelta(seconds=1)
    assert b.delay(4, 0.0) == timedelta(seconds=8)
    assert b.delay(50, 1.0) == timedelta(seconds=60)
    assert all(timedelta(seconds=30) <= b.delay(100, j / 10) <= timedelta(seconds=60) for j in range(11))


def test_plan_keeps_order_pairs_and_limits() -> None:
    items = [(i, (b"x" * 300, b"y" * 200)) for i in range(3000)]
    packed = plan(items, lambda it: it[1])
    flat = [it[0] for batch in packed.batches for it in batch]
    assert flat == list(range(3000))
    for batch in packed.batches:
        events = sum(len(it[1]) for it in batch)
        size = ENVELOPE_BYTES + sum(len(m) + 1 for it in batch for m in it[1])
        assert events <= MAX_BATCH_EVENTS and size <= MAX_BATCH_BYTES


def test_plan_never_exceeds_2500_events() -> None:
    items = [(i, (b"{}", b"{}")) for i in range(2000)]
    packed = plan(items, lambda it: it[1])
    assert [len(b) for b in packed.batches] == [1250, 750]


def test_plan_sets_oversize_messages_aside() -> None:
    items = [(0, (b"a",)), (1, (b"b" * (32 * 1024 + 1), b"c")), (2, (b"d",))]
    packed = plan(items, lambda it: it[1])
    assert [it[0] for it in packed.oversize] == [1]
    assert [[it[0] for it in b] for b in packed.batches] == [[0, 2]]


def test_halves() -> None:
    assert halves([1, 2, 3]) == ((1,), (2, 3))


def test_encode_batch_is_valid_json() -> None:
    body = encode_batch([b'{"a": 1}', b'{"b": 2}'], SENT_AT)
    assert json.loads(body) == {"batch": [{"a": 1}, {"b": 2}], "sentAt": SENT_AT}


def test_client_posts_basic_auth_and_the_stored_bytes() -> None:
    msgs = [json.dumps({"type": "track", "messageId": "m1", "userId": "u", "event": "e"}).encode()]
    with Sink(write_keys={"key1"}) as sink:
        client = SegmentClient(timeout=2)
        sent = client.send(sink.url, "key1", msgs, NOW)
        assert sent.verdict == Delivered(200)
        request = sink.capture.requests[0]
        auth = request.headers["authorization"].split(" ", 1)[1]
        assert base64.b64decode(auth) == b"key1:"
        assert request.headers["content-type"] == "application/json"
        assert json.loads(request.raw)["batch"] == [json.loads(msgs[0])]
        assert isinstance(client.send(sink.url, "wrong", msgs, NOW).verdict, Paused)
        client.close()


def test_client_gzip() -> None:
    msgs = [json.dumps({"type": "identify", "messageId": "m2", "userId": "u", "traits": {}}).encode()]
    with Sink() as sink:
        client = SegmentClient(timeout=2, gzip=True)
        assert client.send(sink.url, "k", msgs, NOW).verdict == Delivered(200)
        request = sink.capture.requests[0]
        assert request.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(request.raw))["batch"][0]["messageId"] == "m2"
        client.close()


def test_client_turns_network_failures_into_values() -> None:
    msgs = [b'{"type":"track","messageId":"m","userId":"u","event":"e"}']
    faults = iter([Reset(), Reply(200, delay=1.0)])
    with Sink(responder=lambda _r: next(faults, None)) as sink:
        client = SegmentClient(timeout=0.3)
        reset = client.send(sink.url, "k", msgs, NOW)
        assert reset.response.status is None and isinstance(reset.verdict, RetryAt)
        timeout = client.send(sink.url, "k", msgs, NOW)
        assert timeout.response.status is None and "timeout" in (timeout.response.error or "")
        assert client.send(sink.url, "k", msgs, NOW).verdict == Delivered(200)
        client.close()
    refused = SegmentClient(timeout=0.5).send("http://127.0.0.1:9", "k", msgs, NOW)
    assert refused.response.status is None and isinstance(refused.verdict, RetryAt)


def test_an_answer_that_cannot_be_decoded_is_a_value_not_an_exception() -> None:
    """A destination claiming gzip and sending garbage: retried like a lost answer, never raised into the relay."""
    import httpx

    def garbled(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip at all")

    client = SegmentClient(transport=httpx.MockTransport(garbled))
    try:
        sent = client.send("http://destination.invalid", "k", [b'{"type":"track","messageId":"m"}'], NOW)
    finally:
        client.close()
    assert sent.response.status is None and "unreadable answer" in (sent.response.error or "")
    assert isinstance(sent.verdict, RetryAt)
