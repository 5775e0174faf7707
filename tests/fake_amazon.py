"""A fake Amazon for the Appstore tests: a real HTTP server on 127.0.0.1 playing SNS and RVS.

It serves SNS signing certificates (`/SimpleNotificationService-<name>.pem`) made by this module's
throwaway keys, answers a subscription confirmation's `SubscribeURL` (`/confirm`), and answers the
Receipt Verification Service's `verifyReceiptId` (production and `/sandbox`) from dictionaries a
test fills and changes between deliveries: it checks the shared secret (496 when wrong), answers
scripted faults (5xx, 429, a hang longer than the client timeout) to the next RVS requests, and
records every request. `sns_body` signs an SNS message as SNS does (SignatureVersion 1 or 2).

Builders for RTN messages and RVS receipts live here too, shaped as Amazon's RTN and RVS
references show them (`notificationType`, `receiptId`, `renewalDate`, `cancelReason`, ...).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from subledger.core.sources.amazon import Envelope, string_to_sign

PACKAGE = "com.example.fitness.amazon"
SECRET = "2:amazon-test-shared-secret"
TOPIC = "arn:aws:sns:us-east-1:033616359524:LT0XA"
USER = "io9oFdzmCSMuKk_pp9pYccoIHRfc6kSAAYaNo51xZrg="
RVS_PREFIX = "/version/1.0/verifyReceiptId/developer/"


@dataclass(frozen=True)
class Signer:
    """A key and its certificate, as SNS publishes one."""

    key: rsa.RSAPrivateKey
    pem: bytes


def make_signer(*, valid_from: timedelta = timedelta(days=-1), valid_for: timedelta = timedelta(days=30)) -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    start = datetime.now(UTC) + valid_from
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(start + valid_for)
        .sign(key, hashes.SHA256())
    )
    return Signer(key, cert.public_bytes(serialization.Encoding.PEM))


GOOD = make_signer()
OTHER = make_signer()  # a key whose certificate is not the one named
EXPIRED = make_signer(valid_from=timedelta(days=-40), valid_for=timedelta(days=30))


def ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def rtn_message(kind: str, receipt: str, at: datetime, *, package: str = PACKAGE, user: str = USER,
                cancelled: str | None = None, beta: bool = False) -> dict[str, Any]:
    return {"appPackageName": package, "notificationType": kind, "appUserId": user, "receiptId": receipt,
            "relatedReceipts": {"cancelledReceiptId": cancelled} if cancelled else {}, "timestamp": ms(at),
            "betaProductTransaction": beta}


def receipt(receipt_id: str, purchased: datetime, *, renews: datetime | None = None, term_sku: str = "fit.monthly",
            parent: str = "fit.premium", cancelled: datetime | None = None, cancel_reason: int | None = None,
            auto_renewing: bool = True, trial_end: datetime | None = None, grace_end: datetime | None = None,
            product_type: str = "SUBSCRIPTION", **extra: Any) -> dict[str, Any]:
    """An RVS receipt as `verifyReceiptId` answers it."""
    body: dict[str, Any] = {
        "autoRenewing": auto_renewing, "betaProduct": False, "cancelDate": None if cancelled is None else ms(cancelled),
        "cancelReason": cancel_reason, "countryCode": "US", "deferredDate": None, "deferredSku": None,
        "freeTrialEndDate": None if trial_end is None else ms(trial_end),
        "gracePeriodEndDate": None if grace_end is None else ms(grace_end), "parentProductId": None,
        "productId": parent, "productType": product_type, "promotions": None, "purchaseDate": ms(purchased),
        "quantity": 1, "receiptId": receipt_id, "renewalDate": None if renews is None else ms(renews),
        "term": "1 Month", "termSku": term_sku, "testTransaction": False,
    }
    body.update(extra)
    return body


class FakeAmazon:
    """`faults`: statuses (or "hang") to answer to the next RVS requests, in order."""

    def __init__(self, *, secret: str = SECRET, hang_seconds: float = 1.0) -> None:
        self.secret = secret
        self.hang_seconds = hang_seconds
        self.receipts: dict[str, dict[str, Any]] = {}  # receipt id → receipt (production)
        self.sandbox: dict[str, dict[str, Any]] = {}  # receipt id → receipt (the RVS cloud sandbox)
        self.errors: dict[str, int] = {}  # receipt id → status answered for it, always
        self.faults: deque[int | str] = deque()
        self.certificates: dict[str, bytes] = {"good": GOOD.pem, "other": OTHER.pem, "expired": EXPIRED.pem}
        self.requests: list[str] = []
        self.confirmed: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def cert_url(self, name: str = "good") -> str:
        return f"{self.url}/SimpleNotificationService-{name}.pem"

    def rvs_requests(self) -> list[str]:
        return [r for r in self.requests if "/verifyReceiptId/" in r]

    def __enter__(self) -> FakeAmazon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if path.startswith("/SimpleNotificationService-") and path.endswith(".pem"):
                    pem = fake.certificates.get(path[len("/SimpleNotificationService-"):-4])
                    self._send(200, pem, "text/plain") if pem else self._send(404, {"error": "no such certificate"})
                    return
                if path == "/confirm":
                    fake.confirmed.append(self.path)
                    self._send(200, b"<ConfirmSubscriptionResponse/>", "text/xml")
                    return
                sandbox = path.startswith("/sandbox/")
                rest = path[len("/sandbox"):] if sandbox else path
                if not rest.startswith(RVS_PREFIX):
                    self._send(404, {"message": "unknown path"})
                    return
                parts = rest[len(RVS_PREFIX):].split("/")  # secret/user/U/receiptId/R
                if len(parts) != 5 or parts[1] != "user" or parts[3] != "receiptId":
                    self._send(400, {"message": "bad request"})
                    return
                secret, receipt_id = unquote(parts[0]), unquote(parts[4])
                if fake.faults:
                    fault = fake.faults.popleft()
                    if fault == "hang":
                        time.sleep(fake.hang_seconds)
                        self._send(500, {"message": "too late"})
                    else:
                        self._send(int(fault), {"message": "scripted fault"})
                    return
                if not sandbox and secret != fake.secret:
                    self._send(496, {"message": "Invalid developer secret"})
                    return
                if receipt_id in fake.errors:
                    self._send(fake.errors[receipt_id], {"message": "scripted error"})
                    return
                found = (fake.sandbox if sandbox else fake.receipts).get(receipt_id)
                if found is None:
                    self._send(400, {"message": "Invalid receiptId"})
                    return
                self._send(200, found)

        return Handler


def sns_body(message: dict[str, Any] | str, cert_url: str, *, signer: Signer = GOOD, version: str = "1",
             message_id: str | None = None, topic: str = TOPIC, tamper: bool = False,
             at: datetime | None = None) -> bytes:
    """An SNS Notification around `message`, signed as SNS does (SHA1withRSA for 1, SHA256 for 2)."""
    fields = {
        "Type": "Notification", "MessageId": message_id or str(uuid.uuid4()), "TopicArn": topic,
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    return _signed(fields, signer, version, tamper)


def confirmation_body(cert_url: str, subscribe_url: str, *, signer: Signer = GOOD, version: str = "1",
                      topic: str = TOPIC, tamper: bool = False) -> bytes:
    token = uuid.uuid4().hex * 2
    fields = {
        "Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": token, "TopicArn": topic,
        "Message": f"You have chosen to subscribe to the topic {topic}.\nTo confirm the subscription, visit the "
                   "SubscribeURL included in this message.",
        "SubscribeURL": f"{subscribe_url}?Action=ConfirmSubscription&TopicArn={topic}&Token={token}",
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    return _signed(fields, signer, version, tamper)


def _signed(fields: dict[str, str], signer: Signer, version: str, tamper: bool) -> bytes:
    algorithm: hashes.HashAlgorithm = hashes.SHA256() if version == "2" else hashes.SHA1()
    signature = signer.key.sign(string_to_sign(Envelope(fields)), padding.PKCS1v15(), algorithm)
    body = {**fields, "Signature": base64.b64encode(signature).decode()}
    if tamper:
        body["Message"] = body["Message"].replace("RENEWED", "CANCELLED").replace("PURCHASED", "EXPIRED") + " "
    return json.dumps(body).encode()


def amazon_settings(fake: FakeAmazon, **extra: Any) -> dict[str, Any]:
    """The `[apps."<app>".amazon]` section pointing at the fake (its host the only signing host)."""
    return {"package_name": PACKAGE, "shared_secret": SECRET, "rvs_base_url": fake.url,
            "sns_certificate_hosts": [fake.host], "timeout_seconds": 0.5, "retries": 1, "backoff_seconds": 0,
            **extra}
