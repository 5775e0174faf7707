"""A fake App Store Server API on 127.0.0.1, for the Apple reconciler's tests.

It answers the three endpoints reconciliation reads, as Apple documents them:

* `POST /inApps/v1/notifications/history[?paginationToken=]`: the body's startDate/endDate (ms) and
  onlyFailures filter the records (by their payload's signedDate, and the `failed` set); pages of
  `page_size` (Apple: 20) with `hasMore` and an opaque `paginationToken`;
* `GET /inApps/v1/subscriptions/{transactionId}`: the statuses the test set for that subscription;
* `GET /inApps/v2/history/{transactionId}[?revision=]`: its signed transactions, pages of
  `page_size`, `revision`/`hasMore`.

Every request must carry the bearer token the library signs: ES256 with the test's In-App Purchase
key, `kid` header = the key id, `iss` = the issuer id, `bid` = the bundle id, `aud` =
"appstoreconnect-v1", not expired; anything else is a 401. The first `throttle` requests are answered
429 with error 4290000 and `Retry-After` (a UNIX time in ms, as Apple sends it); `faults` maps a
request number (1-based, throttled ones included) to a status answered instead, once.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from apple_signing import BUNDLE_ID
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

KEY_ID = "TESTKEY123"
ISSUER_ID = "57246542-96fe-1a63-e053-0824d011072a"


def make_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh In-App Purchase key and its .p8 text (PKCS#8 PEM, as App Store Connect hands it out)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


@dataclass
class Record:
    """One notification Apple sent: its signed payload and when it was signed (ms)."""

    signed_payload: str
    signed_date: int
    failed: bool = False


@dataclass
class Subscription:
    """What the fake knows of one customer's subscription: statuses and signed transactions."""

    statuses: dict[str, Any]
    signed_transactions: list[str] = field(default_factory=list)


class FakeAppleApi:
    def __init__(self, public_key: ec.EllipticCurvePublicKey, records: list[Record] | None = None, *,
                 page_size: int = 20, throttle: int = 0, faults: dict[int, int] | None = None,
                 retry_after_ms: int | None = None, bundle_id: str = BUNDLE_ID) -> None:
        self.public_key, self.bundle_id = public_key, bundle_id
        self.records = list(records or [])
        self.subscriptions: dict[str, Subscription] = {}
        self.page_size, self.throttle, self.faults = page_size, throttle, dict(faults or {})
        self.retry_after_ms = retry_after_ms
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []  # method, path, query, body
        self.tokens: list[dict[str, Any]] = []  # the verified claims of every bearer token
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeAppleApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def calls(self, path_prefix: str) -> int:
        return sum(1 for _, path, _, _ in self.requests if path.startswith(path_prefix))

    # -- one request --

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        length = int(h.headers.get("content-length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        with self._lock:
            self.requests.append((method, url.path, query, body))
            number = len(self.requests)
        claims = self._verify(h.headers.get("authorization", ""))
        if claims is None:
            return _reply(h, 401, {"errorCode": 4010000, "errorMessage": "Unauthenticated"})
        if number <= self.throttle:
            headers = {} if self.retry_after_ms is None else {"Retry-After": str(self.retry_after_ms)}
            return _reply(h, 429, {"errorCode": 4290000, "errorMessage": "Rate limit exceeded."}, headers)
        fault = self.faults.pop(number, None)
        if fault is not None:
            return _reply(h, fault, {"errorCode": 5000000, "errorMessage": "An unknown error occurred."})
        path = url.path
        if method == "POST" and path == "/inApps/v1/notifications/history":
            return _reply(h, 200, self.history(body or {}, query.get("paginationToken", [None])[0]))
        if method == "GET" and path.startswith("/inApps/v1/subscriptions/"):
            found = self.find(path.rsplit("/", 1)[1])
            if found is None:
                return _reply(h, 404, {"errorCode": 4040010, "errorMessage": "Transaction id not found."})
            return _reply(h, 200, found.statuses)
        if method == "GET" and path.startswith("/inApps/v2/history/"):
            found = self.find(path.rsplit("/", 1)[1])
            if found is None:
                return _reply(h, 404, {"errorCode": 4040010, "errorMessage": "Transaction id not found."})
            return _reply(h, 200, self.transactions(found, query.get("revision", [None])[0]))
        _reply(h, 404, {"errorCode": 4040000, "errorMessage": "no such route"})

    def find(self, transaction_id: str) -> Subscription | None:
        """Apple takes any transaction id of the customer: the original one, or any of its transactions'."""
        for original, found in self.subscriptions.items():
            ids = {jwt.decode(jws, options={"verify_signature": False})["transactionId"]
                   for jws in found.signed_transactions}
            if transaction_id == original or transaction_id in ids:
                return found
        return None

    def _verify(self, authorization: str) -> dict[str, Any] | None:
        if not authorization.startswith("Bearer "):
            return None
        token = authorization.removeprefix("Bearer ")
        try:
            header = jwt.get_unverified_header(token)
            claims: dict[str, Any] = jwt.decode(token, self.public_key, algorithms=["ES256"],
                                                audience="appstoreconnect-v1", issuer=ISSUER_ID,
                                                options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError:
            return None
        if header.get("kid") != KEY_ID or header.get("alg") != "ES256" or claims.get("bid") != self.bundle_id:
            return None
        self.tokens.append({"header": header, **claims})
        return claims

    def history(self, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        start, end = int(body["startDate"]), int(body["endDate"])
        chosen = [r for r in self.records if start <= r.signed_date <= end]
        if body.get("onlyFailures"):
            chosen = [r for r in chosen if r.failed]
        chosen.sort(key=lambda r: r.signed_date)
        offset = int(token.removeprefix("page-")) if token else 0
        page = chosen[offset:offset + self.page_size]
        more = offset + self.page_size < len(chosen)
        answer: dict[str, Any] = {
            "notificationHistory": [
                {"signedPayload": r.signed_payload,
                 "sendAttempts": [{"attemptDate": r.signed_date,
                                   "sendAttemptResult": "NO_RESPONSE" if r.failed else "SUCCESS"}]}
                for r in page],
            "hasMore": more,
        }
        if more:
            answer["paginationToken"] = f"page-{offset + self.page_size}"
        return answer

    def transactions(self, found: Subscription, revision: str | None) -> dict[str, Any]:
        offset = int(revision.removeprefix("rev-")) if revision else 0
        page = found.signed_transactions[offset:offset + self.page_size]
        end = offset + len(page)
        return {"revision": f"rev-{end}", "hasMore": end < len(found.signed_transactions),
                "bundleId": self.bundle_id, "environment": "Production", "signedTransactions": page}


def _reply(h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    h.send_response(status)
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(raw)))
    h.end_headers()
    h.wfile.write(raw)
