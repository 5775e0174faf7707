"""A fake Google for the Play tests: a real HTTP server on 127.0.0.1.

It serves the three Play Developer API resources subledger fetches (subscriptionsv2, products,
orders) from dictionaries a test fills and changes between deliveries, and `voidedpurchases.list`
(startTime/endTime on `voidedTimeMillis`, `type`, `maxResults` ≤ 1000, continuation tokens, pages
of `voided_page_size`, a page answering a scripted status the first time only), checks the bearer token,
answers scripted faults (5xx, 429, a 404/410, a 401/403, a hang longer than the client timeout) to
the next requests, records every request, and publishes the certificate of a throwaway RSA key at
`/oauth2/v1/certs` so Pub/Sub-style OIDC push tokens signed by `push_token` verify.

Builders for push bodies and resources live here too, shaped as the RTDN reference and the
subscriptionsv2 / orders references show them (`store-events.md` §2, G1, G2).
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

PACKAGE = "com.example.fitness.play"
TOKEN = "fake-google-access-token"
PUSH_AUDIENCE = "https://subledger.example/webhooks/google"
PUSH_EMAIL = "pubsub-push@example-project.iam.gserviceaccount.com"
SUBSCRIPTION_PATH = "projects/example-project/subscriptions/play-rtdn"
KID = "fake-kid-1"
PREFIX = "/androidpublisher/v3/applications/"


def _key_and_cert() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-google-oidc")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem_key, cert.public_bytes(serialization.Encoding.PEM)


SIGNING_KEY, SIGNING_CERT = _key_and_cert()
OTHER_KEY, _ = _key_and_cert()


def push_token(audience: str = PUSH_AUDIENCE, email: str = PUSH_EMAIL, *, key: bytes = SIGNING_KEY,
               issuer: str = "https://accounts.google.com", expires_in: int = 600, verified: bool = True) -> str:
    """An OIDC token as Pub/Sub signs it for an authenticated push subscription."""
    from google.auth import crypt, jwt

    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "email": email, "email_verified": verified, "sub": "1234567890",
              "iat": now, "exp": now + expires_in}
    token = jwt.encode(crypt.RSASigner.from_string(key.decode(), KID), claims)
    return token.decode() if isinstance(token, bytes) else str(token)


class FakeGoogle:
    """`faults`: statuses (or "hang") to answer to the next API requests, in order."""

    def __init__(self, *, token: str | None = TOKEN, hang_seconds: float = 1.0) -> None:
        self.token = token
        self.hang_seconds = hang_seconds
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.products: dict[tuple[str, str], dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, int] = {}  # token or order id → status answered for it, always
        self.faults: deque[int | str] = deque()
        self.voided: list[dict[str, Any]] = []  # VoidedPurchase objects, as voidedpurchases.list lists them
        self.voided_page_size = 1000
        self.voided_fail_once: dict[int, int] = {}  # page number (1-based) → status answered once, then the page
        self.requests: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.reply(*fake.answer(self.path, self.headers.get("Authorization")))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.reply(*fake.token_grant(self.path, self.rfile.read(length)))

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def certs_url(self) -> str:
        return f"{self.url}/oauth2/v1/certs"

    def __enter__(self) -> FakeGoogle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token_grant(self, path: str, form: bytes) -> tuple[int, Any]:
        """The OAuth token endpoint a service account key names (`token_uri`): a signed JWT in, a token out."""
        from urllib.parse import parse_qs

        from google.auth import jwt

        with self.lock:
            self.requests.append(path)
        fields = parse_qs(form.decode())
        try:
            claims = jwt.decode(fields["assertion"][0], certs={KID: SIGNING_CERT.decode()},
                                audience="https://oauth2.googleapis.com/token")  # google-auth's fixed audience
        except (KeyError, ValueError) as exc:
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        if "androidpublisher" not in str(claims.get("scope")):
            return 400, {"error": "invalid_scope"}
        return 200, {"access_token": self.token, "expires_in": 3600, "token_type": "Bearer"}

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account_key(self) -> dict[str, Any]:
        """A service account JSON key whose token endpoint is this fake (signed with the test key)."""
        return {
            "type": "service_account",
            "project_id": "example-project",
            "private_key_id": KID,
            "private_key": SIGNING_KEY.decode(),
            "client_email": "subledger-play@example-project.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": self.token_uri,
        }

    def api_requests(self) -> list[str]:
        with self.lock:
            return [r for r in self.requests if r.startswith(PREFIX)]

    def answer(self, path: str, authorization: str | None) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(path)
        if path == "/oauth2/v1/certs":
            return 200, {KID: SIGNING_CERT.decode()}
        if not path.startswith(PREFIX):
            return 404, {"error": {"code": 404, "message": "no such route"}}
        with self.lock:
            fault = self.faults.popleft() if self.faults else None
        if fault == "hang":
            time.sleep(self.hang_seconds)
            return 503, {"error": {"code": 503, "message": "too late"}}
        if isinstance(fault, int):
            return fault, {"error": {"code": fault, "message": f"scripted {fault}"}}
        if self.token is not None and authorization != f"Bearer {self.token}":
            return 401, {"error": {"code": 401, "message": "Request had invalid authentication credentials."}}
        parts = [unquote(p) for p in path[len(PREFIX):].split("?")[0].split("/")]
        if parts[0] != PACKAGE:
            return 404, {"error": {"code": 404, "message": "No application was found for the given package name."}}
        rest = parts[1:]
        if rest == ["purchases", "voidedpurchases"]:
            return self.voided_page(parse_qs(urlsplit(path).query))
        found: dict[str, Any] | None = None
        key = ""
        if rest[:3] == ["purchases", "subscriptionsv2", "tokens"] and len(rest) == 4:
            key = rest[3]
            found = self.subscriptions.get(key)
        elif rest[:2] == ["purchases", "products"] and len(rest) == 5 and rest[3] == "tokens":
            key = rest[4]
            found = self.products.get((rest[2], rest[4]))
        elif rest[:1] == ["orders"] and len(rest) == 2:
            key = rest[1]
            found = self.orders.get(key)
        if key in self.errors:
            status = self.errors[key]
            return status, {"error": {"code": status, "message": f"scripted {status} for {key}"}}
        if found is None:
            return 404, {"error": {"code": 404, "message": "The purchase token was not found."}}
        return 200, found


    def voided_page(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        """One page of voided purchases, oldest first. A continuation token carries the first query's
        window and type (Google ignores startTime/endTime once a token is given)."""
        limit = int(query.get("maxResults", ["1000"])[0])
        if not 0 < limit <= 1000:
            return 400, {"error": {"code": 400, "message": "maxResults must be in [1, 1000]"}}
        token = query.get("token", [None])[0]
        if token is not None:
            try:
                start, end, kind, offset = (int(x) for x in base64.urlsafe_b64decode(token).decode().split(":"))
            except ValueError:
                return 400, {"error": {"code": 400, "message": "Invalid pagination token."}}
        else:
            now = int(time.time() * 1000)
            start = int(query.get("startTime", [str(now - 30 * 86_400_000)])[0])
            end = int(query.get("endTime", [str(now)])[0])
            kind, offset = int(query.get("type", ["0"])[0]), 0
            if start < now - 30 * 86_400_000 - 60_000:
                return 400, {"error": {"code": 400, "message": "startTime is too far in the past."}}
        page_number = offset // self.voided_page_size + 1
        with self.lock:
            failure = self.voided_fail_once.pop(page_number, None)
        if failure is not None:
            return failure, {"error": {"code": failure, "message": f"scripted {failure} for page {page_number}"}}
        chosen = sorted((v for v in self.voided if start <= int(v["voidedTimeMillis"]) <= end
                         and (kind == 1 or v["purchaseToken"] not in self.subscriptions)),
                        key=lambda v: (int(v["voidedTimeMillis"]), v["orderId"]))
        size = min(limit, self.voided_page_size)
        page = chosen[offset:offset + size]
        body: dict[str, Any] = {"pageInfo": {"totalResults": len(page), "resultPerPage": size, "startIndex": offset},
                                "voidedPurchases": page}
        if offset + size < len(chosen):
            following = base64.urlsafe_b64encode(f"{start}:{end}:{kind}:{offset + size}".encode()).decode()
            body["tokenPagination"] = {"nextPageToken": following}
        return 200, body


# --- builders --------------------------------------------------------------------------------


def millis(when: datetime) -> str:
    return str(int(when.timestamp() * 1000))


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def developer_notification(kind: int | None, token: str, at: datetime, *, package: str = PACKAGE,
                           family: str = "subscription", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"version": "1.0", "packageName": package, "eventTimeMillis": millis(at)}
    if family == "subscription":
        base["subscriptionNotification"] = {"version": "1.0", "notificationType": kind, "purchaseToken": token}
    elif family == "one_time":
        base["oneTimeProductNotification"] = {"version": "1.0", "notificationType": kind, "purchaseToken": token,
                                              "sku": extra.pop("sku")}
    elif family == "voided":
        base["voidedPurchaseNotification"] = {"purchaseToken": token, "orderId": extra.pop("order_id"),
                                              "productType": extra.pop("product_type", 1),
                                              "refundType": extra.pop("refund_type", 1)}
    elif family == "test":
        base["testNotification"] = {"version": "1.0"}
    base.update(extra)
    return base


def push_body(notification: dict[str, Any], message_id: str) -> bytes:
    data = base64.b64encode(json.dumps(notification).encode()).decode()
    envelope = {"message": {"attributes": {}, "data": data, "messageId": message_id,
                            "publishTime": "2026-11-01T00:00:00Z"},
                "subscription": SUBSCRIPTION_PATH}
    return json.dumps(envelope, separators=(",", ":")).encode()


def money(amount: str, currency: str = "USD") -> dict[str, Any]:
    units, _, frac = amount.partition(".")
    nanos = int((frac + "000000000")[:9]) if frac else 0
    return {"currencyCode": currency, "units": units, "nanos": nanos}


def subscription_v2(
    product: str,
    expiry: datetime,
    *,
    order_id: str,
    phase: str = "basePrice",
    state: str = "SUBSCRIPTION_STATE_ACTIVE",
    auto_renew: bool = True,
    user: str | None = "user_play_1",
    start: datetime | None = None,
    linked: str | None = None,
    canceled: str | None = None,
    paused_until: datetime | None = None,
    test: bool = False,
    price: str = "9.99",
    currency: str = "USD",
    region: str = "US",
) -> dict[str, Any]:
    """A SubscriptionPurchaseV2 as `purchases.subscriptionsv2.get` answers (GP-LIFE's examples)."""
    line: dict[str, Any] = {
        "productId": product,
        "expiryTime": rfc3339(expiry),
        "latestSuccessfulOrderId": order_id,
        "autoRenewingPlan": {"autoRenewEnabled": auto_renew, "recurringPrice": money(price, currency)},
        "offerDetails": {"basePlanId": "monthly", "offerTags": []},
        "offerPhase": {phase: {}},
    }
    sub: dict[str, Any] = {
        "kind": "androidpublisher#subscriptionPurchaseV2",
        "startTime": rfc3339(start or expiry - timedelta(days=30)),
        "regionCode": region,
        "subscriptionState": state,
        "latestOrderId": order_id,
        "acknowledgementState": "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED",
        "lineItems": [line],
    }
    if user is not None:
        sub["externalAccountIdentifiers"] = {"obfuscatedExternalAccountId": user}
    if linked is not None:
        sub["linkedPurchaseToken"] = linked
    if canceled is not None:
        sub["canceledStateContext"] = {canceled: {}}
    if paused_until is not None:
        sub["pausedStateContext"] = {"autoResumeTime": rfc3339(paused_until)}
    if test:
        sub["testPurchase"] = {}
    return sub


PHASE_DETAILS = {"freeTrial": "freeTrialDetails", "introductoryPrice": "introductoryPriceDetails",
                 "basePrice": "baseDetails", "prorationPeriod": "prorationPeriodDetails"}


def order(order_id: str, product: str, total: str, *, currency: str = "USD", phase: str = "basePrice",
          token: str = "", created: datetime | None = None, state: str = "PROCESSED") -> dict[str, Any]:
    """An Order as `orders.get` answers: what the buyer paid, and the phase it paid for."""
    return {
        "orderId": order_id,
        "purchaseToken": token,
        "state": state,
        "createTime": rfc3339(created or datetime(2026, 11, 1, tzinfo=UTC)),
        "total": money(total, currency),
        "tax": money("0", currency),
        "lineItems": [{
            "productId": product,
            "total": money(total, currency),
            "subscriptionDetails": {"basePlanId": "monthly", "offerPhaseDetails": {PHASE_DETAILS[phase]: {}}},
        }],
    }


def voided_purchase(token: str, order_id: str, voided: datetime, *, purchased: datetime | None = None,
                    source: int = 0, reason: int = 1) -> dict[str, Any]:
    """A VoidedPurchase as `purchases.voidedpurchases.list` lists it (int64 times as strings)."""
    return {"kind": "androidpublisher#voidedPurchase", "purchaseToken": token,
            "purchaseTimeMillis": millis(purchased or voided - timedelta(days=1)), "voidedTimeMillis": millis(voided),
            "orderId": order_id, "voidedSource": source, "voidedReason": reason}
