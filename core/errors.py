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
        # a command-line option (`--app`) is named as typed, not as a configuration key
        super().__init__(f"{key}: {reason}" if key.startswith("--") else f"config {key}: {reason}")
        self.key = key
        self.reason = reason
