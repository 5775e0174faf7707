"""Amazon Appstore: the SNS certificate and confirmation fetches and the RVS calls behind POST /webhooks/amazon.

`core/sources/amazon.py` parses, checks signatures and maps; this module does the I/O:

* `Certificates` fetches SNS signing certificates (after `check_sns_url` accepted the URL) with
  httpx and caches them by URL for an hour (at most 32): SNS signs with a handful of certificates,
  so a delivery costs no fetch once warm. A 4xx for a certificate is a refusal (401: the URL names
  no certificate SNS publishes); a 5xx, timeout or connection error is a 503.
* `SnsVerifier` checks one envelope: version, certificate URL, certificate (validity at the
  service's clock), signature, and the app's `topic_arns` when pinned (403 for another topic). It
  confirms a `SubscriptionConfirmation` by GETting its `SubscribeURL` (on an SNS host only).
* `Rvs` calls the Receipt Verification Service: `{base}[/sandbox]/version/1.0/verifyReceiptId/
  developer/{secret}/user/{user}/receiptId/{receipt}` for each configured environment in turn (a
  400 or 497 from one tries the next). 5xx, 429, timeouts and connection errors are retried with
  exponential backoff, then raise `SourceUnavailable` (503). 496 raises `CredentialsRefused` (424).
  400/410/497 from the last environment are a `Failure` the adapter stores as "stored only" with
  the reason in its kind. The URL carries the shared secret, so no URL is ever logged or answered.
  Every outcome is counted in `subledger_amazon_fetches_total`.
* `ReceiptLinks` is the adapter's `ChainLookup`: the subscription id already logged for a receipt.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from prometheus_client import Counter

from subledger.app import chain_links
from subledger.app.chain_links import LoggedChain
from subledger.app.settings import AmazonSourceSettings
from subledger.core import safejson
from subledger.core.errors import (
    BadSignature,
    CredentialsRefused,
    InvalidEvent,
    PayloadRejected,
    SourceUnavailable,
    StoreError,
    TooDeep,
)
from subledger.core.events import Source
from subledger.core.sources import Notification
from subledger.core.sources import amazon as amazon_source
from subledger.store import sns_certificates
from subledger.store.db import Pool

log = logging.getLogger("subledger.amazon")
CERT_TTL_SECONDS = 3600.0
CERT_CACHE_SIZE = 32
MAX_CERT_BYTES = 64 * 1024
RVS_PATH = "/version/1.0/verifyReceiptId/developer/{secret}/user/{user}/receiptId/{receipt}"

FETCHES = Counter(
    "subledger_amazon_fetches_total",
    "Amazon calls by resource (rvs, certificate, confirmation) and outcome (ok, not_found, gone, "
    "unknown_user, unauthorized, client_error, retried, unavailable).",
    ["app_id", "resource", "outcome"],
)
OUTCOMES = {400: "not_found", 410: "gone", 497: "unknown_user", 496: "unauthorized"}


def _problem(exc: httpx.HTTPError) -> str:
    """An httpx failure without its text: the text can hold the URL, and RVS URLs hold the secret."""
    return "timed out" if isinstance(exc, httpx.TimeoutException) else f"could not connect ({type(exc).__name__})"


# --- SNS ---------------------------------------------------------------------------------------


class Certificates:
    """SNS signing certificates by URL, cached; one per process (every Amazon app shares it)."""

    def __init__(self, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 keep: Callable[[str, bytes], None] | None = None) -> None:
        self.client = httpx.Client(timeout=timeout, follow_redirects=False)
        self.clock = clock
        self.keep = keep  # called with each certificate fetched (serve stores it: store/sns_certificates.py)
        self.cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.lock = threading.Lock()
        self.fetched = 0  # fetches made, for tests and the curious

    def close(self) -> None:
        self.client.close()

    def get(self, url: str) -> bytes:
        with self.lock:
            hit = self.cache.get(url)
            if hit is not None and self.clock() - hit[0] < CERT_TTL_SECONDS:
                self.cache.move_to_end(url)
                return hit[1]
        try:
            response = self.client.get(url)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"the SNS signing certificate {_problem(exc)}") from None
        self.fetched += 1
        if response.status_code >= 500 or response.status_code == 429:
            raise SourceUnavailable(f"the SNS signing certificate host answered {response.status_code}")
        if response.status_code != 200 or len(response.content) > MAX_CERT_BYTES:
            raise BadSignature(f"the signing certificate could not be fetched (HTTP {response.status_code})",
                               "SigningCertURL")
        with self.lock:
            self.cache[url] = (self.clock(), response.content)
            while len(self.cache) > CERT_CACHE_SIZE:
                self.cache.popitem(last=False)
        if self.keep is not None:
            self.keep(url, response.content)
        return response.content


def keeper(pool: Pool, clock: Callable[[], datetime]) -> Callable[[str, bytes], None]:
    """`Certificates.keep` for serve: each fetched certificate is stored (store/sns_certificates.py),
    so the console re-verifies logged envelopes offline. A failure to store it is logged and never
    fails the notification (its entry then shows as unchecked)."""

    def keep(url: str, pem: bytes) -> None:
        try:
            with pool.connection() as conn:
                sns_certificates.save(conn, url, pem, clock())
        except StoreError as exc:
            log.warning("amazon: could not keep the SNS signing certificate %s: %s", url[:200], exc)

    return keep


@dataclass
class SnsVerifier:
    """Checks envelopes for the hosts and topics of one app (or of all of them, for confirmations)."""

    hosts: frozenset[str]
    topic_arns: frozenset[str]
    certificates: Certificates
    confirm: bool = True
    timeout: float = 5.0

    def verify(self, envelope: amazon_source.Envelope, now: datetime) -> None:
        amazon_source.signature_hash(envelope.signature_version)  # an unknown version: refused before any fetch
        amazon_source.check_sns_url(envelope.signing_cert_url, self.hosts, "SigningCertURL", pem=True)
        amazon_source.verify_signature(envelope, self.certificates.get(envelope.signing_cert_url), now)
        if self.topic_arns and envelope.topic_arn not in self.topic_arns:
            raise BadSignature(f"topic {envelope.topic_arn[:200]!r} is not a configured topic_arns entry", "TopicArn")

    def confirm_subscription(self, envelope: amazon_source.Envelope) -> bool:
        """GET the SubscribeURL of a verified confirmation (SNS then delivers); False when turned off."""
        if not self.confirm:
            return False
        url = envelope.get("SubscribeURL") or ""
        amazon_source.check_sns_url(url, self.hosts, "SubscribeURL")
        try:
            response = httpx.get(url, timeout=self.timeout, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"the SNS SubscribeURL {_problem(exc)}") from None
        if response.status_code != 200:
            if response.status_code >= 500 or response.status_code == 429:
                raise SourceUnavailable(f"the SNS SubscribeURL answered {response.status_code}")
            raise BadSignature(f"SNS refused the confirmation (HTTP {response.status_code})", "SubscribeURL")
        return True


# --- the Receipt Verification Service ----------------------------------------------------------


class Rvs:
    """GET a receipt from RVS with retries; one httpx client (connection pool) per app."""

    def __init__(self, app_id: str, settings: AmazonSourceSettings, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.app_id = app_id
        self.settings = settings
        self.client = httpx.Client(base_url=settings.rvs_base_url, timeout=settings.timeout_seconds,
                                   follow_redirects=False)
        self.sleep = sleep

    def close(self) -> None:
        self.client.close()

    def receipt(self, user: str, receipt: str) -> amazon_source.Fetched:
        failure: amazon_source.Failure | None = None
        for environment in self.settings.rvs_environments:
            got = self._get(environment, user, receipt)
            if isinstance(got, dict):
                return amazon_source.Fetched(receipt=got, environment=environment)
            failure = got
            if got.status not in (400, 497):
                break  # 410: the receipt is known, and no longer valid; no other environment to ask
        assert failure is not None
        return amazon_source.Fetched(failure=failure, environment=environment)

    def _get(self, environment: str, user: str, receipt: str) -> dict[str, Any] | amazon_source.Failure:
        prefix = "/sandbox" if environment == "sandbox" else ""
        path = prefix + RVS_PATH.format(secret=_q(self.settings.shared_secret), user=_q(user), receipt=_q(receipt))
        attempts = 1 + self.settings.retries
        problem = ""
        for attempt in range(attempts):
            if attempt:
                FETCHES.labels(self.app_id, "rvs", "retried").inc()
                self.sleep(self.settings.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = self.client.get(path)
            except httpx.HTTPError as exc:
                problem = _problem(exc)
                continue
            status = response.status_code
            if status == 200:
                try:  # Amazon's answer is held to the same limits as a body we receive (core.safejson)
                    body = safejson.loads(response.content)
                except (InvalidEvent, TooDeep) as exc:
                    FETCHES.labels(self.app_id, "rvs", "client_error").inc()
                    raise InvalidEvent(f"the RVS answer {exc.reason}",
                                       f"rvs.{exc.field}" if exc.field else "rvs") from None
                except PayloadRejected:
                    body = None
                if isinstance(body, dict):
                    FETCHES.labels(self.app_id, "rvs", "ok").inc()
                    return body
                problem = "answered 200 with a body that is not a JSON object"
                continue
            if status == 429 or status >= 500:
                problem = f"answered {status}"
                continue
            reason = _rvs_error(response)
            FETCHES.labels(self.app_id, "rvs", OUTCOMES.get(status, "client_error")).inc()
            if status == 496:
                log.warning("RVS refused the shared secret of app %s (%s)", self.app_id, environment)
                raise CredentialsRefused(
                    "RVS answered 496 (invalid shared secret): set the app's Shared Key from the Amazon Developer "
                    "Console (Apps & Services → Shared Key) as amazon.shared_secret", "amazon.shared_secret")
            log.info("RVS answered %s for a receipt of app %s (%s): %s", status, self.app_id, environment, reason)
            return amazon_source.Failure(status, reason)
        FETCHES.labels(self.app_id, "rvs", "unavailable").inc()
        raise SourceUnavailable(f"Amazon's Receipt Verification Service {problem} ({environment}, {attempts} attempts)")


def _q(part: str) -> str:
    return quote(part, safe="")


def _rvs_error(response: httpx.Response) -> str:
    try:
        obj = safejson.loads(response.content)
        message = obj.get("message") if isinstance(obj, dict) else None
    except PayloadRejected:
        message = None
    return str(message)[:300] if message else f"HTTP {response.status_code}"


# --- one app's source --------------------------------------------------------------------------


@dataclass
class AmazonSource:
    """One app's Amazon adapter: the pure config, the RVS client and the SNS verifier."""

    config: amazon_source.AmazonConfig
    settings: AmazonSourceSettings
    rvs: Rvs
    verifier: SnsVerifier

    @classmethod
    def build(cls, app_id: str, settings: AmazonSourceSettings, certificates: Certificates) -> AmazonSource:
        config = amazon_source.AmazonConfig(app_id=app_id, package_name=settings.package_name or app_id)
        verifier = SnsVerifier(frozenset(settings.sns_certificate_hosts), frozenset(settings.topic_arns),
                               certificates, settings.confirm_subscriptions, settings.timeout_seconds)
        return cls(config, settings, Rvs(app_id, settings), verifier)

    def verify(self, envelope: amazon_source.Envelope, now: datetime) -> None:
        self.verifier.verify(envelope, now)

    def fetch(self, rtn: amazon_source.Rtn) -> amazon_source.Fetched:
        return self.rvs.receipt(rtn.app_user_id, rtn.receipt_id)

    def notification(self, rtn: amazon_source.Rtn, *, chain: amazon_source.ChainLookup | None,
                     fetched: amazon_source.Fetched | None = None) -> Notification:
        """Fetch (unless `fetched` is given, e.g. from a capture line), then map."""
        got = fetched if fetched is not None else self.fetch(rtn)
        return amazon_source.map_notification(rtn, got, self.config, chain=chain)


def confirmation_verifier(sources: list[AmazonSource]) -> SnsVerifier:
    """A confirmation names no app: it is checked against every Amazon app's hosts (each AWS's or
    loopback, so the union widens nothing), pinned to their topics only if every app pins them."""
    hosts = frozenset(h for s in sources for h in s.verifier.hosts)
    topics = frozenset(t for s in sources for t in s.verifier.topic_arns)
    pinned = all(s.verifier.topic_arns for s in sources)
    return SnsVerifier(hosts, topics if pinned else frozenset(), sources[0].verifier.certificates,
                       any(s.verifier.confirm for s in sources), min(s.verifier.timeout for s in sources))


def split_capture(raw: bytes) -> tuple[amazon_source.Envelope, amazon_source.Fetched | None]:
    """A captured line: an SNS body, optionally with the RVS answer stored beside it
    (`"subledger_fetched": {"environment", "receipt" | "failure"}`)."""
    obj = safejson.loads(raw)
    stored = None
    if isinstance(obj, dict) and "subledger_fetched" in obj:
        stored = amazon_source.Fetched.from_json(obj.pop("subledger_fetched"))
        raw = json.dumps(obj, separators=(",", ":")).encode()
    return amazon_source.parse_envelope(raw), stored


# --- the chain lookup through the log ----------------------------------------------------------


class ReceiptLinks(LoggedChain):
    """`ChainLookup`: receipt → the subscription id its facts were logged under."""

    SOURCE = Source.AMAZON
    ATTRIBUTE = "amazon_receipt_id"


def already_logged(conn: psycopg.Connection, external_id: str) -> bool:
    """A redelivery is answered from the log, without calling the store's API again."""
    return chain_links.already_logged(conn, Source.AMAZON, external_id)


def duplicate_of(rtn: amazon_source.Rtn, app_id: str) -> Notification:
    """The notification a redelivery is recorded as (the log keeps the first delivery's facts)."""
    return Notification(source=Source.AMAZON, external_id=rtn.external_id, app_id=app_id, kind=rtn.notification_type)
