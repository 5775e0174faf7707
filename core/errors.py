"""One exception tree for subledger.

    SubledgerError
    ├── Transient                trying the same thing later may succeed: callers test the TYPE
    │                            (`isinstance(exc, Transient)`), never the message; mixed in below (T)
    ├── PayloadRejected          input we will not store; the caller gets a 4xx or a CLI error line
    │   ├── InvalidEvent         a canonical field is missing, mistyped or out of range
    │   ├── MalformedPayload     the body is not the JSON (or JWS) its source promises
    │   │   └── TooDeep          nested deeper than the JSON nesting limit
    │   ├── BadSignature         the source's authentication failed
    │   │   └── SignatureUncheckable (T)  an online check (Apple's OCSP) could not complete: a 503
    │   ├── UnknownApp           the request names an app with no credentials for this source (404)
    │   └── CredentialsRefused   a source's API refused OUR credentials (Play API 401/403): a 424
    ├── SourceUnavailable (T)    a source's API (the Play Developer API) did not answer usefully
    ├── SourceHasNoRecord        a source's API knows no such record (Apple: another environment may)
    ├── StoreError               the database could not do what was asked (permanent unless T)
    │   ├── Conflict (T)         a concurrent writer won (unique, serialization, deadlock)
    │   ├── StoreUnavailable (T) the database cannot serve now: unreachable, connection lost, shut down
    │   │   └── StoreTimeout (T) a statement was cancelled (statement_timeout) or waited too long
    │   │       └── Locked (T)   a row another transaction holds (lock_timeout)
    │   ├── PermissionDenied     this role may not do that (grants, the append-only log)
    │   ├── SchemaNotCurrent     the schema is not the revision this subledger needs (not migrated)
    │   └── ValueRefused         the database refused a value (out of range, bad text)
    ├── NotFound                 an operator named an outbox row that does not exist (LookupError)
    ├── UnknownTarget            an operator named an app or destination nobody configured (LookupError)
    ├── MissingRate              a currency conversion lacks its rate (ValueError)
    ├── ConfigError              the configuration is invalid; names the key
    ├── ApiError                 an HTTP refusal already decided: its status and JSON body
    ├── PageRefused              a console request refused with an HTML page (400, 403 CSRF, 404)
    └── LoginRequired            a console page asked for without a session: redirect to sign-in

Driver errors become StoreErrors at one door, `store/db.py` (`translate`), so no layer above store/
knows psycopg. Outcomes that are not failures (a duplicate delivery, a no-op fact, a destination's
5xx or timeout, which the relay records as a verdict) are values, never exceptions.
"""

from __future__ import annotations

from typing import Any


class SubledgerError(Exception):
    """Base of every error subledger raises on purpose."""


class Transient(SubledgerError):
    """Mixed into errors that a retry may cure (an outage, a lost race, a timeout).

    Why a type and not a word in the message: a message is for people and gets reworded; the
    decision to answer 503 (the sender retries) rather than 4xx (it gives up) must not depend on it.
    """


class PayloadRejected(SubledgerError):
    """Raised when input is refused before anything is stored."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        reason, field = _printable(reason), None if field is None else _printable(field)
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


def _printable(text: str) -> str:
    """A refusal is answered as JSON and printed as a CLI line: a NUL or a lone surrogate quoted from
    hostile input would break both (UTF-8 cannot encode U+D800), so they are escaped (`\\ud800`)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class InvalidEvent(PayloadRejected):
    """Raised when a canonical event field is missing, mistyped or out of range."""


class MalformedPayload(PayloadRejected):
    """Raised when a body cannot be parsed as its source's format."""


class TooDeep(MalformedPayload):
    """A document nested deeper than the JSON nesting limit: refused however it continues."""


class BadSignature(PayloadRejected):
    """Raised when a webhook's signature or token does not verify."""


class SignatureUncheckable(BadSignature, Transient):
    """The signature could not be checked now (Apple's OCSP responder out of reach): not the
    sender's fault, so it is answered 503 and the store delivers again."""


class UnknownApp(PayloadRejected):
    """The request names an app that has no credentials for this source (HTTP 404)."""


class CredentialsRefused(PayloadRejected):
    """A source's API refused our credentials (Play API 401/403): answered 424, nothing stored, so
    the sender keeps redelivering until the service account's access is fixed."""


class SourceUnavailable(Transient):
    """A source's API did not answer usefully after the retries (5xx, 429, timeout, no connection):
    try the delivery again later."""


class SourceHasNoRecord(SubledgerError, LookupError):
    """A source's API answered that it knows no such record (Apple's 404 for a transaction id): a
    value to try elsewhere (the other environment), not an outage."""


class StoreError(SubledgerError):
    """Raised when the database fails an operation."""


class Conflict(StoreError, Transient):
    """Raised when a concurrent writer made the operation fail; retrying is safe."""


class StoreUnavailable(StoreError, Transient):
    """Raised when the database cannot serve the request now (unreachable, connection lost, shut down)."""


class StoreTimeout(StoreUnavailable):
    """A statement was cancelled (statement_timeout) or waited longer than it may."""


class Locked(StoreTimeout):
    """A row another transaction holds made the statement give up (lock_timeout); a later try may pass."""


class PermissionDenied(StoreError):
    """This database role may not do what was asked (a missing grant, the append-only log)."""


class SchemaNotCurrent(StoreError):
    """Raised when the database's schema is not the revision this subledger needs."""


class ValueRefused(StoreError):
    """The database refused a value (out of range, invalid text). Validation should have refused it
    first; reaching the database means a check is missing, not that the input was fine."""


class NotFound(SubledgerError, LookupError):
    """No outbox row matches an operator's reference; `delivered` says the message was already delivered."""

    def __init__(self, ref: str, delivered: bool) -> None:
        super().__init__(f"message {ref!r} was already delivered" if delivered else f"no outbox row {ref!r}")
        self.delivered = delivered


class UnknownTarget(SubledgerError, LookupError):
    """An app or destination that neither the configuration nor the database knows: nothing is stored."""


class MissingRate(SubledgerError, ValueError):
    """Raised when currency conversion is configured but the rates table lacks the currency."""


class ConfigError(SubledgerError):
    """Raised when the configuration is invalid; the message names the key."""

    def __init__(self, key: str, reason: str) -> None:
        # a command-line option (`--app`) is named as typed, not as a configuration key
        super().__init__(f"{key}: {reason}" if key.startswith("--") else f"config {key}: {reason}")
        self.key = key
        self.reason = reason


class PageRefused(SubledgerError):
    """A console request refused with an HTML page (bad input 400, CSRF 403, unknown thing 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LoginRequired(SubledgerError):
    """No valid console session or bearer token: the handler redirects to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class ApiError(SubledgerError):
    """A refusal an HTTP handler has decided: the status and the JSON body it is answered with."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        # an absent detail is left out rather than sent as null, as the documented error schema says
        self.body = {"error": error, **{k: v for k, v in extra.items() if v is not None}}
