"""The App Store Server API, read for reconciliation through Apple's own `app-store-server-library`.

Why the library and not hand-written requests: it signs the ES256 bearer token Apple asks for
(`kid`, `iss`, `bid`, `aud=appstoreconnect-v1`, 5-minute expiry) and knows the endpoints and their
models; only two of its seams are overridden, in `_Client`, and nothing of it is copied:

* `_get_full_url`: with `api_base_url` configured, every path goes there instead of Apple's host for
  the environment (a proxy, or a fake on 127.0.0.1 in the tests); without it the library's own
  host is used unchanged.
* `_execute_request`: the library's call, unchanged, plus a note of the answer's `Retry-After`
  (its `APIException` keeps only status and error code, and Apple's 429 tells when to come back).

Read here: `get_notification_history` (pages of 20, `paginationToken`/`hasMore`, `startDate` within
the past 180 days, `onlyFailures`), `get_all_subscription_statuses` and `get_transaction_history`
(V2; V1 is deprecated). A 429 (error 4290000) waits for `Retry-After` (Apple sends a UNIX time in
milliseconds; a small number is taken as seconds) or backs off exponentially, then retries; a 5xx,
one of Apple's "retryable" errors or no answer is retried the same way. After the retries the run
stops with `SourceUnavailable` and the caller records nothing, so the next run reads the same window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from appstoreserverlibrary.api_client import (
    APIError,
    APIException,
    AppStoreServerAPIClient,
    GetTransactionHistoryVersion,
)
from appstoreserverlibrary.models.Environment import Environment
from appstoreserverlibrary.models.NotificationHistoryRequest import NotificationHistoryRequest
from appstoreserverlibrary.models.NotificationHistoryResponse import NotificationHistoryResponse
from appstoreserverlibrary.models.StatusResponse import StatusResponse
from appstoreserverlibrary.models.TransactionHistoryRequest import Order, TransactionHistoryRequest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from subledger.app.settings import AppleSourceSettings, AppSettings
from subledger.app.stripe_api import Calls
from subledger.core.errors import ConfigError, CredentialsRefused, SourceHasNoRecord, SourceUnavailable

T = TypeVar("T")
MAX_RETRY_AFTER: Final = 60.0
# Apple keeps notification history for 180 days; a startDate older than that is refused.
HISTORY_LIMIT: Final = timedelta(days=180)
# Apple's errors that its documentation says may be retried (the rest of the 4xx are final).
RETRYABLE: Final = frozenset({
    APIError.GENERAL_INTERNAL_RETRYABLE, APIError.ACCOUNT_NOT_FOUND_RETRYABLE, APIError.APP_NOT_FOUND_RETRYABLE,
    APIError.ORIGINAL_TRANSACTION_ID_NOT_FOUND_RETRYABLE,
})
NOT_FOUND: Final = frozenset({APIError.TRANSACTION_ID_NOT_FOUND, APIError.ORIGINAL_TRANSACTION_ID_NOT_FOUND})


def signing_key(value: str) -> bytes:
    """The In-App Purchase key: the PEM itself (written `${NAME}` in the TOML) or a path to the .p8."""
    if "-----BEGIN" in value:
        return value.encode()
    return Path(value).expanduser().read_bytes()


class _Client(AppStoreServerAPIClient):
    """Apple's client with the base URL replaceable and the last answer's Retry-After kept."""

    def __init__(self, key: bytes, key_id: str, issuer_id: str, bundle_id: str, environment: Environment,
                 base_url: str | None) -> None:
        super().__init__(key, key_id, issuer_id, bundle_id, environment)
        self._override = base_url.rstrip("/") if base_url else None
        self.retry_after: str | None = None

    def _get_full_url(self, path: str) -> str:
        return self._override + path if self._override else str(super()._get_full_url(path))

    def _execute_request(self, method: str, url: str, params: Any, headers: dict[str, str], json: Any,
                         data: bytes | None) -> Any:
        self.retry_after = None
        response = super()._execute_request(method, url, params, headers, json, data)
        self.retry_after = response.headers.get("retry-after")
        return response


@dataclass(frozen=True)
class HistoryPage:
    """One page of notification history: the environment read and each record's signedPayload."""

    environment: str
    signed_payloads: tuple[str, ...]


@dataclass
class AppleApi:
    """One app's App Store Server API: the environments read, the daily window, what a run asked.

    `calls` counts every request (retries included), pages read and 429s met, for the run's summary.
    `bundle_id` may be left None: the reconciler fills it from the app's adapter before the first call
    (the JWT's `bid`), so the client can be opened from an app's settings alone.
    """

    key: bytes = field(repr=False)
    key_id: str
    issuer_id: str
    bundle_id: str | None = None
    environments: tuple[str, ...] = ("Production",)
    base_url: str | None = None
    history_days: float = 30.0
    retries: int = 5
    backoff_seconds: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    calls: Calls = field(default_factory=Calls)
    # told (pages read so far) after each page, for a progress bar
    progress: Callable[[int], None] | None = None
    _clients: dict[str, _Client] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePrivateKey):  # Apple's keys are P-256, signing ES256
            raise ConfigError("apple.api_key", "not an In-App Purchase key (the .p8 file's PEM)")

    def clients(self) -> dict[str, _Client]:
        """One library client per environment read, made at first use (Production first)."""
        if not self._clients:
            if not self.bundle_id:
                raise ConfigError("apple.bundle_id", "the App Store Server API needs the app's bundle id")
            for environment in self.environments:
                self._clients[environment] = _Client(self.key, self.key_id, self.issuer_id, self.bundle_id,
                                                     Environment(environment), self.base_url)
        return self._clients

    @property
    def window(self) -> timedelta:
        return min(timedelta(days=self.history_days), HISTORY_LIMIT)

    def close(self) -> None:
        """Nothing held open: the library opens one connection per request."""

    # -- notification history --

    def notification_pages(self, start: datetime, end: datetime, *, failures_only: bool) -> Iterator[HistoryPage]:
        """Every page of every environment's notifications sent from `start` to `end`."""
        for environment, client in self.clients().items():
            request = NotificationHistoryRequest(
                startDate=_ms(start), endDate=_ms(end), onlyFailures=True if failures_only else None)
            token: str | None = None
            while True:
                page = self._call(client, "notification history",
                                  partial(client.get_notification_history, token, request))
                if not isinstance(page, NotificationHistoryResponse):
                    raise SourceUnavailable("Apple's notification history answer is not a history page")
                self._page_read()
                records = page.notificationHistory or []
                yield HistoryPage(environment, tuple(r.signedPayload for r in records if r.signedPayload))
                if not page.hasMore or not page.paginationToken:
                    break
                token = page.paginationToken

    # -- one subscription --

    def subscription(self, transaction_id: str) -> tuple[str, StatusResponse, list[str]] | None:
        """(environment, statuses, every signed transaction, oldest first) of the customer of
        `transaction_id`, from the first environment that knows it; None when none does."""
        for environment, client in self.clients().items():
            try:
                statuses = self._call(client, "subscription statuses",
                                      partial(client.get_all_subscription_statuses, transaction_id))
            except SourceHasNoRecord:
                continue
            signed: list[str] = []
            revision: str | None = None
            request = TransactionHistoryRequest(sort=Order.ASCENDING)
            while True:
                history = self._call(client, "transaction history", partial(
                    client.get_transaction_history, transaction_id, revision, request, GetTransactionHistoryVersion.V2))
                self._page_read()
                signed.extend(history.signedTransactions or [])
                if not history.hasMore or not history.revision:
                    break
                revision = history.revision
            return environment, statuses, signed
        return None

    def _page_read(self) -> None:
        self.calls.pages += 1
        if self.progress is not None:
            self.progress(self.calls.pages)

    # -- retries --

    def _call(self, client: _Client, what: str, call: Callable[[], T]) -> T:
        problem = ""
        for attempt in range(1 + self.retries):
            self.calls.requests += 1
            try:
                return call()
            except APIException as exc:
                status, code = exc.http_status_code, exc.raw_api_error
                if status == 429 or code == APIError.RATE_LIMIT_EXCEEDED:
                    self.calls.throttled += 1
                elif status in (401, 403):
                    raise CredentialsRefused(
                        f"Apple refused the In-App Purchase key (HTTP {status}): check [apps.<app>.apple] api_key, "
                        "key_id and issuer_id (App Store Connect → Users and Access → Integrations)") from None
                elif status == 404 and code in NOT_FOUND:
                    raise SourceHasNoRecord(str(code)) from None
                elif not (status >= 500 or code in RETRYABLE):
                    raise SourceUnavailable(f"Apple answered the {what} with HTTP {status}"
                                            + (f" (error {code})" if code else "")) from None
                problem = f"HTTP {status}" + (f", error {code}" if code else "")
                self._wait(attempt, client.retry_after)
            except OSError as exc:  # requests' errors: no connection, timeout
                problem = type(exc).__name__
                self._wait(attempt, None)
            except (ValueError, TypeError, KeyError) as exc:  # a 200 whose body is not Apple's model
                raise SourceUnavailable(f"Apple's {what} answer does not match Apple's schema "
                                        f"({type(exc).__name__})") from None
        raise SourceUnavailable(f"Apple's {what} did not answer after {1 + self.retries} attempts ({problem})")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.retries:
            return
        delay = self.backoff_seconds * 2 ** attempt
        try:
            value = float(retry_after) if retry_after else None
        except ValueError:
            value = None
        if value is not None:
            # Apple: a UNIX time in milliseconds; anything small is a delay in seconds (RFC 9110)
            delay = value / 1000 - self.clock() if value > 1e11 else value
        self.sleep(min(max(delay, 0.0), MAX_RETRY_AFTER))


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def configured(app: AppSettings) -> bool:
    """Whether an app can be reconciled against Apple: its In-App Purchase key is configured."""
    return app.apple is not None and bool(app.apple.api_key)


def from_settings(settings: AppleSourceSettings, bundle_id: str | None = None, **overrides: Any) -> AppleApi:
    """The API of one app from its `[apps."<app>".apple]` settings (which checked the three credentials
    go together). `overrides`: `sleep`, `clock`, `retries`, ... (tests, the scheduler's stop event)."""
    if not (settings.api_key and settings.key_id and settings.issuer_id):
        raise ConfigError("apple.api_key", "reconciliation needs api_key, key_id and issuer_id")
    try:
        key = signing_key(settings.api_key)
    except OSError as exc:
        raise ConfigError("apple.api_key", f"{settings.api_key}: {exc.strerror or exc}") from None
    return AppleApi(key=key, key_id=settings.key_id, issuer_id=settings.issuer_id,
                    bundle_id=settings.bundle_id or bundle_id, environments=tuple(settings.environments),
                    base_url=settings.api_base_url, history_days=settings.history_days, **overrides)


def open_api(app: AppSettings, sleep: Callable[[float], None]) -> AppleApi:
    """`from_settings` for an app known to be `configured` (the reconciliation registry's shape)."""
    assert app.apple is not None
    return from_settings(app.apple, sleep=sleep)
