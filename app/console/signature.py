"""What the console can say about a log entry's signature, from what the log holds.

The log records no per-entry verdict (the hash chain's format stays as it is), but a webhook is
logged only after its signature or credentials check out, so most of the answer follows from the
entry's source and how it arrived, and for Apple it can be proven again:

- Apple: the stored body is the signed JWS itself. It is re-verified on view, through the app's
  own adapter (Apple's `SignedDataVerifier`: chain to the configured root certificates, ES256,
  bundle id, environment), always offline, so the chain is judged at the payload's `signedDate`
  and a page never reaches for the network (online OCSP checks, when an app enables them, are for
  ingest only). Captured Apple bodies (`subledger ingest --format apple`) and notifications
  recovered from Apple's notification history (`subledger reconcile apple`, which stores each
  record's signedPayload) are verified the same way when logged, so this holds for every Apple
  entry.
- Stripe, RevenueCat: the webhook checks `Stripe-Signature` / the `Authorization` value before
  logging, but captured bodies imported with `subledger ingest --format` are trusted unchecked and
  the log does not say which path an entry took, and the header is not stored: "not recorded".
- Google: a Pub/Sub push carries no signature of its own; its OIDC push token is checked when the
  app configures `push_audience`, and the state itself is fetched from the Play Developer API with
  subledger's service account. Per entry: not recorded.
- Amazon: the SNS envelope (with its `Signature` and `SigningCertURL`) is stored, and the webhook
  keeps each signing certificate it fetched (store/sns_certificates.py, 0012), so the envelope is
  re-verified on view against the kept certificate, offline, at the envelope's `Timestamp`, with
  the URL checked against the app's SNS hosts as at ingest. An entry whose certificate was never
  kept (logged before 0012, or imported while none was) is unchecked; a body that is not an SNS
  envelope (a captured receipt) is not recorded.
- Reconciliation (`arrival = reconciliation`) of the other stores: fetched by subledger from the
  store's API with its own credentials; there is no signature to check. Canonical events (`custom`) are authenticated
  by the API token or are the operator's own import; scheduler entries are subledger's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from subledger.app.settings import Settings
from subledger.app.sources import Sources, build_sources
from subledger.core.errors import (
    BadSignature,
    ConfigError,
    MalformedPayload,
    PayloadRejected,
    SignatureUncheckable,
)
from subledger.core.events import Source
from subledger.core.sources import amazon as amazon_source
from subledger.store.sns_certificates import Kept


@dataclass(frozen=True, slots=True)
class Verdict:
    """`state`: verified, failed, unchecked (could not be checked now), not recorded, or not signed."""

    state: str
    detail: str


def offline_apple(settings: Settings) -> Sources:
    """Apple adapters of every app that configures Apple, with online (OCSP) checks off: the same
    configuration the webhook verifies with, built by the one builder, minus the network."""
    apps = {}
    for app_id, app in settings.apps.items():
        if app.apple is not None:
            apple = app.apple.model_copy(update={"enable_online_checks": False})
            apps[app_id] = app.model_copy(update={"apple": apple, "google": None, "amazon": None, "stripe": None,
                                                  "revenuecat": None})
    return build_sources(settings.model_copy(update={"apps": apps}))


@dataclass(frozen=True, slots=True)
class SnsCheck:
    """What re-verifying an Amazon envelope needs: the app's SNS certificate hosts, and the
    certificate kept for the envelope's `SigningCertURL` (`None`: never kept)."""

    hosts: frozenset[str]
    kept: Kept | None


def verdict(source: str, arrival: str, raw: bytes, apple: Sources | None, sns: SnsCheck | None = None) -> Verdict:
    """The signature result of one log entry (`apple`: `offline_apple(settings)`, or None when it
    could not be built; then Apple entries are reported unchecked; `sns` likewise for Amazon)."""
    if source == Source.APPLE:  # pushed, imported or recovered from the notification history: the same JWS
        return _apple(raw, apple)
    if source == Source.AMAZON and sns is not None:
        return _amazon(raw, sns)
    if arrival == "reconciliation":
        return Verdict("not signed", "recovered by `subledger reconcile`: fetched from the store's API over HTTPS "
                                     "with subledger's own credentials, so there is no webhook signature to check")
    if source == Source.STRIPE:
        return Verdict("not recorded", "a webhook delivery is logged only after its Stripe-Signature verifies "
                                       "(HMAC with an endpoint secret, within the tolerance), but captured bodies "
                                       "imported with `subledger ingest --format stripe` are trusted unchecked, "
                                       "and the log does not record which path this entry took")
    if source == Source.REVENUECAT:
        return Verdict("not recorded", "a webhook delivery is logged only when its Authorization header equals "
                                       "the configured value, but captured bodies imported with `subledger ingest "
                                       "--format revenuecat` are trusted unchecked, and the log does not record "
                                       "which path this entry took")
    if source == Source.GOOGLE:
        return Verdict("not recorded", "a Pub/Sub push carries no signature of its own: its OIDC push token is "
                                       "checked when the app configures push_audience, and the subscription's "
                                       "state was fetched from the Play Developer API with subledger's service "
                                       "account; whether this push's token was checked is not recorded")
    if source == Source.AMAZON:
        return Verdict("not recorded", "an SNS notification is logged only after its signature verifies against "
                                       "Amazon's signing certificate; the stored envelope keeps its Signature, "
                                       "but re-checking it needs that certificate from the network, which a page "
                                       "does not fetch, and captured receipts are imported unchecked")
    if source == Source.SCHEDULER:
        return Verdict("not signed", "written by subledger's own scheduler")
    return Verdict("not signed", "a canonical event: authenticated by the API token (POST /v1/events) or the "
                                 "operator's own `subledger ingest`; it carries no store signature")


def _apple(raw: bytes, apple: Sources | None) -> Verdict:
    if apple is None:
        return Verdict("unchecked", "the Apple configuration could not be loaded, so the JWS was not re-verified")
    try:
        adapter = apple.apple_for(raw)
    except (BadSignature, PayloadRejected) as exc:
        return Verdict("unchecked", f"not re-verified: {exc}")
    try:
        adapter.parse(raw)
    except SignatureUncheckable as exc:
        return Verdict("unchecked", f"not re-verified: {exc}")
    except (BadSignature, MalformedPayload) as exc:
        return Verdict("failed", f"re-verified now: {exc}")
    except PayloadRejected as exc:  # verified, then refused by today's mapping
        return Verdict("verified", f"the JWS verifies against the configured Apple root certificate(s) of "
                                   f"{adapter.config.bundle_id}; today's mapping refuses it ({exc})")
    return Verdict("verified", f"re-verified now: the signed payload and its signed transaction / renewal info "
                               f"chain to the configured Apple root certificate(s) of {adapter.config.bundle_id} "
                               f"(offline, at the payload's signedDate)")


def sns_hosts(settings: Settings, app_id: str) -> frozenset[str]:
    """Where the app's SNS certificates may come from, as its webhook checks (SNS's own hosts for
    an app no longer configured with Amazon)."""
    app = settings.apps.get(app_id)
    configured = app.amazon if app is not None else None
    return frozenset(configured.sns_certificate_hosts if configured is not None else amazon_source.AWS_SNS_HOSTS)


def certificate_url(raw: bytes) -> str | None:
    """The `SigningCertURL` of a stored SNS envelope, or None when the body is not one."""
    try:
        return amazon_source.parse_envelope(raw).signing_cert_url
    except MalformedPayload:  # TooDeep too
        return None


def _amazon(raw: bytes, sns: SnsCheck) -> Verdict:
    try:
        envelope = amazon_source.parse_envelope(raw)
    except MalformedPayload:  # TooDeep too
        return Verdict("not recorded", "the stored body is not a signed SNS envelope (a captured receipt, imported "
                                       "with `subledger ingest --format amazon`, which is trusted unchecked)")
    url = envelope.signing_cert_url
    try:
        amazon_source.check_sns_url(url, sns.hosts, "SigningCertURL", pem=True)
    except BadSignature as exc:
        return Verdict("failed", f"re-checked now: {exc}")
    kept = sns.kept
    if kept is None:
        return Verdict("unchecked", f"the signing certificate {url} was never kept (the entry was logged before "
                                    "subledger kept certificates, or imported), and a page does not fetch it")
    try:
        at = datetime.fromisoformat(envelope.fields["Timestamp"])
    except ValueError:
        return Verdict("failed", "re-checked now: the envelope's Timestamp is not an ISO 8601 time")
    try:
        amazon_source.verify_signature(envelope, kept.pem, at)
    except BadSignature as exc:
        return Verdict("failed", f"re-verified now: {exc}")
    return Verdict("verified", f"re-verified now: the SNS signature (version {envelope.signature_version}) verifies "
                               f"against the signing certificate {url}, kept as fetched on "
                               f"{kept.first_fetched_at:%Y-%m-%d %H:%M} UTC, valid at the envelope's Timestamp "
                               f"(offline)")


def safe_offline_apple(settings: Settings) -> Sources | None:
    """`offline_apple`, or None when the configuration cannot be built (a certificate file gone)."""
    try:
        return offline_apple(settings)
    except (ConfigError, OSError, ValueError):
        return None


def brief(source: str, arrival: str) -> str:
    """The timeline's one-word column, without re-verifying anything (the entry page does that)."""
    if source == Source.APPLE:
        return "signed JWS"
    return verdict(source, arrival, b"", None).state
