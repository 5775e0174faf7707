"""Google Play: the Play Developer API calls and the Pub/Sub push check behind POST /webhooks/google.

`core/sources/google.py` maps a push and what was fetched for it; this module does the I/O:

* `PlayApi` fetches `purchases.subscriptionsv2.get`, `purchases.products.get` and `orders.get` with
  httpx and an OAuth token from google-auth (a service account key file, else Application Default
  Credentials), or a static bearer token (`access_token`, for tests and tokens minted elsewhere).
  The base URL is configurable, so tests point it at a fake Google API on 127.0.0.1.
* Failures: 5xx, 429, timeouts and connection errors are retried with exponential backoff, then
  raise `SourceUnavailable` (the webhook answers 503 and Pub/Sub redelivers). 404/410 are a
  `Failure` the adapter stores as "stored only" with the reason in its kind. 401/403 raise
  `CredentialsRefused` (a 424, nothing stored, so Pub/Sub keeps redelivering until the
  service account's access is fixed). An order the API refuses only loses the money: the facts are
  mapped without a price and `order_error` says why. Every outcome is counted in
  `subledger_google_fetches_total`.
* `PushVerifier` checks the OIDC token Pub/Sub signs for an authenticated push subscription
  (`id_token.verify_oauth2_token`: signature, expiry, issuer, audience), and the service account's
  email when one is configured.
* `GoogleLinks` is the adapter's `ChainLookup`: the subscription id already logged for a purchase
  token (a linked token's chain root), remembering what earlier lines of one import mapped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import google.auth.transport
import httpx
import psycopg
from prometheus_client import Counter

from subledger.app import chain_links
from subledger.app.chain_links import LoggedChain
from subledger.app.settings import GoogleSourceSettings
from subledger.core import safejson
from subledger.core.errors import (
    BadSignature,
    CredentialsRefused,
    InvalidEvent,
    PayloadRejected,
    SourceUnavailable,
    TooDeep,
)
from subledger.core.events import Source
from subledger.core.sources import Notification
from subledger.core.sources import google as google_source

log = logging.getLogger("subledger.google")
SCOPE = "https://www.googleapis.com/auth/androidpublisher"
PUSH_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CERTS_TTL_SECONDS = 300.0

FETCHES = Counter(
    "subledger_google_fetches_total",
    "Play Developer API calls by resource and outcome (ok, not_found, gone, unauthorized, forbidden, "
    "client_error, retried, unavailable).",
    ["app_id", "resource", "outcome"],
)
OUTCOMES = {404: "not_found", 410: "gone", 401: "unauthorized", 403: "forbidden"}


# --- the Play Developer API --------------------------------------------------------------------


class _Token:
    """An OAuth access token: static, from a service account key, or Application Default Credentials."""

    def __init__(self, settings: GoogleSourceSettings) -> None:
        self.settings = settings
        self._credentials: Any = None
        self._lock = threading.Lock()

    def header(self) -> str:
        if self.settings.access_token:
            return f"Bearer {self.settings.access_token}"
        # deferred: google-auth's credentials and HTTP transport load only when a token is needed
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import Request as AuthRequest
        from google.oauth2 import service_account

        with self._lock:
            try:
                if self._credentials is None:
                    if self.settings.service_account_file:
                        # google-auth ships no annotations for this constructor
                        self._credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                            self.settings.service_account_file, scopes=[SCOPE]
                        )
                    else:
                        self._credentials, _ = google.auth.default(scopes=[SCOPE])
                if not self._credentials.valid:
                    self._credentials.refresh(AuthRequest())
            except google.auth.exceptions.TransportError as exc:
                raise SourceUnavailable(f"could not reach Google's token endpoint: {exc}") from None
            except (google.auth.exceptions.GoogleAuthError, ValueError, OSError) as exc:
                raise CredentialsRefused(f"no usable Google credentials: {exc}", "google.credentials") from None
            return f"Bearer {self._credentials.token}"


class PlayApi:
    """GET the three resources with retries; one httpx client (connection pool) per app."""

    def __init__(self, app_id: str, settings: GoogleSourceSettings, *, sleep: Any = time.sleep) -> None:
        self.app_id = app_id
        self.settings = settings
        self.client = httpx.Client(base_url=settings.api_base_url, timeout=settings.timeout_seconds)
        self.token = _Token(settings)
        self.sleep = sleep
        self.requests = 0  # HTTP requests sent (retries included): a reconciliation run reports them
        self.throttled = 0  # of which Google answered 429 (quota)

    def close(self) -> None:
        self.client.close()

    def subscription(self, package: str, token: str) -> dict[str, Any] | google_source.Failure:
        path = f"/androidpublisher/v3/applications/{_q(package)}/purchases/subscriptionsv2/tokens/{_q(token)}"
        return self._get("subscriptionsv2", path)

    def product(self, package: str, product_id: str, token: str) -> dict[str, Any] | google_source.Failure:
        path = (f"/androidpublisher/v3/applications/{_q(package)}/purchases/products/{_q(product_id)}"
                f"/tokens/{_q(token)}")
        return self._get("products", path)

    def order(self, package: str, order_id: str) -> dict[str, Any] | google_source.Failure:
        return self._get("orders", f"/androidpublisher/v3/applications/{_q(package)}/orders/{_q(order_id)}")

    def voided_purchases(
        self, package: str, start: datetime, end: datetime, page_token: str | None, max_results: int = 1000
    ) -> dict[str, Any] | google_source.Failure:
        """One page of `purchases.voidedpurchases.list`, subscriptions included (`type=1`).

        The window is in Google's time of seeing the void (not `voidedTimeMillis`); Google ignores
        it once a continuation `token` is given, so a page is asked for by the token alone."""
        params: dict[str, str | int] = {"type": 1, "maxResults": max_results}
        if page_token:
            params["token"] = page_token
        else:
            params["startTime"] = _millis(start)
            params["endTime"] = _millis(end)
        path = f"/androidpublisher/v3/applications/{_q(package)}/purchases/voidedpurchases"
        return self._get("voidedpurchases", path, params)

    def _get(
        self, resource: str, path: str, params: Mapping[str, str | int] | None = None
    ) -> dict[str, Any] | google_source.Failure:
        attempts = 1 + self.settings.retries
        problem = ""
        for attempt in range(attempts):
            if attempt:
                FETCHES.labels(self.app_id, resource, "retried").inc()
                self.sleep(self.settings.backoff_seconds * 2 ** (attempt - 1))
            self.requests += 1
            try:
                response = self.client.get(path, params=params, headers={"Authorization": self.token.header()})
            except httpx.TimeoutException:
                problem = f"timed out after {self.settings.timeout_seconds} s"
                continue
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            status = response.status_code
            if status == 200:
                try:  # Google's answer is held to the same limits as a body we receive (core.safejson)
                    body = safejson.loads(response.content)
                except (InvalidEvent, TooDeep) as exc:  # a value no store can hold: retrying won't help
                    FETCHES.labels(self.app_id, resource, "client_error").inc()
                    raise InvalidEvent(f"the Play Developer API's answer {exc.reason}",
                                       f"{resource}.{exc.field}" if exc.field else resource) from None
                except PayloadRejected:
                    body = None
                if isinstance(body, dict):
                    FETCHES.labels(self.app_id, resource, "ok").inc()
                    return body
                problem = "answered 200 with a body that is not a JSON object"
                continue
            if status == 429 or status >= 500:
                self.throttled += status == 429
                problem = f"answered {status}"
                continue
            reason = _google_error(response)
            FETCHES.labels(self.app_id, resource, OUTCOMES.get(status, "client_error")).inc()
            if status in (401, 403):
                log.warning("Play Developer API refused our credentials for %s (%s): %s", resource, status, reason)
                raise CredentialsRefused(
                    f"the Play Developer API answered {status} to {resource}: {reason}; give the service account "
                    "access to the app in Play Console (Users and permissions)",
                    "google.credentials",
                )
            log.info("Play Developer API answered %s to %s: %s", status, resource, reason)
            return google_source.Failure(status, reason)
        FETCHES.labels(self.app_id, resource, "unavailable").inc()
        raise SourceUnavailable(f"the Play Developer API {problem} ({resource}, {attempts} attempts)")


def _q(part: str) -> str:
    return quote(part, safe="")


def _millis(when: datetime) -> int:
    return int(when.timestamp()) * 1000 + when.microsecond // 1000


def _google_error(response: httpx.Response) -> str:
    try:
        message = safejson.loads(response.content).get("error", {}).get("message")
    except (PayloadRejected, AttributeError):
        message = None
    return str(message)[:300] if message else response.reason_phrase or f"HTTP {response.status_code}"


# --- Pub/Sub push authentication ---------------------------------------------------------------


class _CachingRequest(google.auth.transport.Request):
    """google-auth's transport, with Google's public certificates cached for a few minutes."""

    def __init__(self) -> None:
        # deferred: google-auth's requests transport loads only when push tokens are verified
        from google.auth.transport.requests import Request as AuthRequest

        self.inner = AuthRequest()
        self.cache: dict[str, tuple[float, Any]] = {}
        self.lock = threading.Lock()

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: Any = None, **kwargs: Any) -> Any:
        if method != "GET":
            return self.inner(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self.lock:
            hit = self.cache.get(url)
            if hit is not None and time.monotonic() - hit[0] < CERTS_TTL_SECONDS:
                return hit[1]
        response = self.inner(url, method=method, body=body, headers=headers, timeout=timeout or 10, **kwargs)
        if response.status == 200:
            with self.lock:
                self.cache[url] = (time.monotonic(), response)
        return response


class PushVerifier:
    """The `Authorization: Bearer <OIDC JWT>` of an authenticated push subscription."""

    def __init__(self, audience: str, email: str | None, certs_url: str | None) -> None:
        self.audience = audience
        self.email = email
        self.certs_url = certs_url
        self.request = _CachingRequest()

    def verify(self, authorization: str | None) -> None:
        # deferred: google-auth's token verification loads only when a push carries a token
        import google.auth.exceptions
        from google.oauth2 import id_token

        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise BadSignature("a Pub/Sub push token (Bearer) is required", "Authorization")
        try:
            if self.certs_url:
                claims = id_token.verify_token(token, self.request, audience=self.audience, certs_url=self.certs_url)
                if claims.get("iss") not in PUSH_ISSUERS:
                    raise ValueError(f"wrong issuer {claims.get('iss')!r}")
            else:
                # google-auth ships no annotations for this function
                claims = id_token.verify_oauth2_token(  # type: ignore[no-untyped-call]
                    token, self.request, audience=self.audience)
        except google.auth.exceptions.TransportError as exc:
            raise SourceUnavailable(f"could not fetch Google's token certificates: {exc}") from None
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise BadSignature(f"the push token does not verify: {str(exc)[:200]}", "Authorization") from None
        if self.email is not None and (claims.get("email") != self.email or claims.get("email_verified") is not True):
            raise BadSignature("the push token is not the configured service account's", "Authorization")


# --- one app's source --------------------------------------------------------------------------


@dataclass
class GoogleSource:
    """One app's Play adapter: the pure config, the API client and the optional push check."""

    config: google_source.GoogleConfig
    settings: GoogleSourceSettings
    api: PlayApi
    verifier: PushVerifier | None = None

    @classmethod
    def build(cls, app_id: str, settings: GoogleSourceSettings) -> GoogleSource:
        config = google_source.GoogleConfig(app_id=app_id, package_name=settings.package_name or app_id)
        verifier = None
        if settings.push_audience:
            verifier = PushVerifier(settings.push_audience, settings.push_service_account_email,
                                    settings.push_certs_url)
        return cls(config, settings, PlayApi(app_id, settings), verifier)

    def verify_push(self, authorization: str | None) -> None:
        if self.verifier is not None:
            self.verifier.verify(authorization)

    def fetch(self, push: google_source.Push) -> google_source.Fetched:
        """Everything the mapping of `push` needs from Google (nothing for a test notification)."""
        package = self.config.package_name
        subscription: dict[str, Any] | None = None
        product: dict[str, Any] | None = None
        if push.wants_subscription and push.purchase_token:
            got = self.api.subscription(package, push.purchase_token)
            if isinstance(got, google_source.Failure):
                return google_source.Fetched(failure=got)
            subscription = got
        if push.wants_product and push.sku and push.purchase_token:
            got = self.api.product(package, push.sku, push.purchase_token)
            if isinstance(got, google_source.Failure):
                return google_source.Fetched(failure=got)
            product = got
        return self.fetched_with(push, subscription, product)

    def fetched_with(
        self, push: google_source.Push, subscription: Mapping[str, Any] | None,
        product: Mapping[str, Any] | None = None,
    ) -> google_source.Fetched:
        """`fetch` once the subscription (or product) is in hand: the order, for money, as `fetch` reads
        it (reconciliation fetched the subscription itself before it knew which push it stands for)."""
        package = self.config.package_name
        order: dict[str, Any] | None = None
        order_error = None
        wanted = push.family != "voided" or push.product_type == 1
        order_id = google_source.order_to_fetch(push, subscription, product) if wanted else None
        if order_id and self.settings.fetch_orders:
            try:
                got = self.api.order(package, order_id)
            except CredentialsRefused as exc:
                got = google_source.Failure(403, exc.reason)
            if isinstance(got, google_source.Failure):
                order_error = f"{got.status}: {got.reason}"
            else:
                order = got
        elif order_id:
            order_error = "orders are not fetched (fetch_orders = false)"
        return google_source.Fetched(subscription=subscription, order=order, product=product,
                                     order_error=order_error)

    def notification(
        self,
        push: google_source.Push,
        *,
        chain: google_source.ChainLookup | None,
        fetched: google_source.Fetched | None = None,
    ) -> Notification:
        """Fetch (unless `fetched` is given, e.g. from a capture line), then map."""
        if push.package_name != self.config.package_name:
            raise BadSignature(f"package {push.package_name!r} is not this app's", "packageName")
        got = fetched if fetched is not None else self.fetch(push)
        return google_source.map_push(push, got, self.config, chain=chain)


def parse_push(raw: bytes, message_id: str | None = None) -> google_source.Push:
    return google_source.parse_push(raw, message_id=message_id)


def split_capture(raw: bytes) -> tuple[bytes, google_source.Fetched | None]:
    """A captured line: a push body, optionally with the fetch results stored beside it
    (`"subledger_fetched": {"subscriptionsv2", "order", "product", "failure"}`)."""
    obj = safejson.loads(raw)
    if not isinstance(obj, dict) or "subledger_fetched" not in obj:
        return raw, None
    stored = google_source.Fetched.from_json(obj.pop("subledger_fetched"))
    return json.dumps(obj, separators=(",", ":")).encode(), stored


# --- the chain lookup through the log ----------------------------------------------------------


class GoogleLinks(LoggedChain):
    """`ChainLookup`: purchase token → the subscription id its facts were logged under."""

    SOURCE = Source.GOOGLE
    ATTRIBUTE = "google_purchase_token"


def already_logged(conn: psycopg.Connection, external_id: str) -> bool:
    """A redelivery is answered from the log, without calling the store's API again."""
    return chain_links.already_logged(conn, Source.GOOGLE, external_id)


def duplicate_of(push: google_source.Push, app_id: str) -> Notification:
    """The notification a redelivery is recorded as (the log keeps the first delivery's facts)."""
    return Notification(source=Source.GOOGLE, external_id=push.external_id, app_id=app_id, kind=push.kind)


def message_id_header(headers: Mapping[str, str]) -> str | None:
    """Pub/Sub writes the message id as a header on unwrapped pushes (with metadata on)."""
    value = headers.get("x-goog-pubsub-message-id")
    return value.strip() if value and value.strip() else None
