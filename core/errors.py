"""One exception tree for subledger.

    SubledgerError
    ├── PayloadRejected          input we will not store; the caller gets a 4xx or a CLI error line
    │   ├── InvalidEvent         a canonical field is missing, mistyped or out of range
    │   ├── MalformedPayload     the body is not the JSON (or JWS) its source promises
    │   └── BadSignature         the source's authentication failed
    ├── StoreError               the database could not do what was asked
    │   ├── Conflict             a concurrent writer won; the operation may be retried
    │   └── StoreUnavailable     the database cannot be reached
    └── ConfigError              the configuration is invalid; names the key

Outcomes that are not failures (a duplicate delivery, a no-op fact) are values, never exceptions.
"""

from __future__ import annotations


class SubledgerError(Exception):
    """Base of every error subledger raises on purpose."""


class PayloadRejected(SubledgerError):
    """Raised when input is refused before anything is stored."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


class InvalidEvent(PayloadRejected):
    """Raised when a canonical event field is missing, mistyped or out of range."""


class MalformedPayload(PayloadRejected):
    """Raised when a body cannot be parsed as its source's format."""


class BadSignature(PayloadRejected):
    """Raised when a webhook's signature or token does not verify."""


class StoreError(SubledgerError):
    """Raised when the database fails an operation."""


class Conflict(StoreError):
    """Raised when a concurrent writer made the operation fail; retrying is safe."""


class StoreUnavailable(StoreError):
    """Raised when the database cannot be reached."""


class ConfigError(SubledgerError):
    """Raised when the configuration is invalid; the message names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config {key}: {reason}")
        self.key = key
        self.reason = reason
