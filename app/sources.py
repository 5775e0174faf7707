"""Store adapters built from the settings, once; shared by the webhooks and `subledger ingest --format`.

The endpoints hand bytes in and get a `Notification` (or a `PayloadRejected`) out; nothing here
maps a payload: that is `core/sources`. What lives here is the composition: which app's
credentials verify a body, routing Apple's one shared endpoint by the bundle id the body claims
(then verified by that app's `SignedDataVerifier`), and the log lookup Stripe refunds need.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar

import psycopg

from subledger.app.amazon_api import AmazonSource, Certificates, ReceiptLinks, SnsVerifier, confirmation_verifier
from subledger.app.amazon_api import split_capture as amazon_split_capture
from subledger.app.canonical import Rejection
from subledger.app.chain_links import LoggedChain
from subledger.app.google_api import GoogleLinks, GoogleSource, split_capture
from subledger.app.settings import Settings, check_routing_keys, read_certificate
from subledger.core.errors import BadSignature, ConfigError, PayloadRejected, SourceUnavailable, StoreError, UnknownApp
from subledger.core.sources import Notification, refuse_unstorable
from subledger.core.sources import amazon as amazon_source
from subledger.core.sources import apple as apple_source
from subledger.core.sources import google as google_source
from subledger.core.sources import revenuecat as rc_source
from subledger.core.sources import stripe as stripe_source
from subledger.outbox.ingest import Incoming
from subledger.store import lookups

log = logging.getLogger("subledger.ingest")
Format = Literal["canonical", "apple", "stripe", "revenuecat", "google", "amazon"]


def _key(app_id: str) -> str:
    return f'apps."{app_id}"'


@dataclass(frozen=True)
class Sources:
    """Adapters per app. Apple's are keyed by bundle id, the others by our app id."""

    apple: Mapping[str, apple_source.AppleAdapter] = field(default_factory=dict)
    stripe: Mapping[str, stripe_source.StripeConfig] = field(default_factory=dict)
    revenuecat: Mapping[str, rc_source.RevenueCatConfig] = field(default_factory=dict)
    google: Mapping[str, GoogleSource] = field(default_factory=dict)  # by package name
    amazon: Mapping[str, AmazonSource] = field(default_factory=dict)  # by package name

    # -- routing --

    def google_for(self, package_name: str) -> GoogleSource:
        """The app whose package name the push names (Play does not sign; the state is fetched)."""
        if not self.google:
            raise UnknownApp("no app is configured for Google Play notifications (add [apps.\"<app>\".google])")
        found = self.google.get(package_name)
        if found is None:
            raise UnknownApp(f"no app is configured for package {package_name[:200]!r}", "packageName")
        return found

    def amazon_for(self, package_name: str) -> AmazonSource:
        """The app whose package name the notification names (its signature is checked next)."""
        if not self.amazon:
            raise UnknownApp("no app is configured for Amazon Appstore notifications (add [apps.\"<app>\".amazon])")
        found = self.amazon.get(package_name)
        if found is None:
            raise UnknownApp(f"no app is configured for package {package_name[:200]!r}", "Message.appPackageName")
        return found

    def amazon_confirmation(self) -> SnsVerifier:
        """What checks an SNS subscription confirmation, which names no app (every Amazon app's hosts)."""
        if not self.amazon:
            raise UnknownApp("no app is configured for Amazon Appstore notifications (add [apps.\"<app>\".amazon])")
        return confirmation_verifier(list(self.amazon.values()))

    def apple_for(self, body: bytes) -> apple_source.AppleAdapter:
        """The adapter of the app whose bundle id the body claims (the claim is verified next)."""
        if not self.apple:
            raise UnknownApp("no app is configured for App Store notifications (add [apps.\"<app>\".apple])")
        claimed = apple_source.unverified_bundle_id(body)
        if claimed is None:
            # Unreadable, or names no bundle id: any app's adapter refuses it and words why
            # (Apple's verifier never accepts a notification whose bundle id is not its own).
            return self.apple[min(self.apple)]
        adapter = self.apple.get(claimed)
        if adapter is None:
            raise BadSignature(f"no app is configured for bundle id {claimed[:200]!r}", "bundleId")
        return adapter

    def stripe_for(self, app_id: str) -> stripe_source.StripeConfig:
        found = self.stripe.get(app_id)
        if found is None:
            raise UnknownApp(f"app {app_id!r} has no Stripe endpoint configured (add [{_key(app_id)}.stripe])",
                             "app_id")
        return found

    def revenuecat_for(self, app_id: str) -> rc_source.RevenueCatConfig:
        found = self.revenuecat.get(app_id)
        if found is None:
            raise UnknownApp(
                f"app {app_id!r} has no RevenueCat webhook configured (add [{_key(app_id)}.revenuecat])", "app_id"
            )
        return found

    # -- parsing: webhooks (authenticated by the source's own mechanism) --

    def parse_apple(self, body: bytes) -> Notification:
        notification: Notification = self.apple_for(body).parse(body)
        return notification

    def parse_stripe(
        self,
        app_id: str,
        body: bytes,
        signature: str | None,
        now: datetime,
        subscription_for: stripe_source.SubscriptionLookup | None = None,
    ) -> Notification:
        config = self.stripe_for(app_id)
        return stripe_source.parse_webhook(body, signature, config, now, subscription_for=subscription_for)

    def parse_revenuecat(self, app_id: str, body: bytes, authorization: str | None) -> Notification:
        return rc_source.parse_webhook(body, authorization, self.revenuecat_for(app_id))

    # -- parsing: captured bodies (`subledger ingest --format`) --

    def parse_captured(
        self,
        fmt: Format,
        body: bytes,
        *,
        app_id: str | None,
        settings: Settings,
        subscription_for: stripe_source.SubscriptionLookup | None = None,
    ) -> Notification:
        """One captured body. Apple is verified as configured (offline, dated at signedDate); Stripe
        and RevenueCat bodies carry no header once captured, so they are trusted as the operator's."""
        if fmt == "apple":
            return self.parse_apple(body)
        if app_id is None:
            raise ConfigError("--app", f"name the app the {fmt} bodies belong to")
        if fmt == "stripe":
            config = self.stripe.get(app_id) or _trusted_stripe(app_id, settings)
            return stripe_source.parse_unverified(body, config, subscription_for=subscription_for)
        if fmt == "revenuecat":
            rc = self.revenuecat.get(app_id) or _trusted_revenuecat(app_id, settings)
            return rc_source.parse_unverified(body, rc)
        raise ValueError(f"not a source format: {fmt}")

    def default_app(self, fmt: Format) -> str | None:
        """The app a `--format` import goes to when only one app has that source configured."""
        configured = {"stripe": list(self.stripe), "revenuecat": list(self.revenuecat)}.get(fmt, [])
        return configured[0] if len(configured) == 1 else None


def _trusted_stripe(app_id: str, settings: Settings) -> stripe_source.StripeConfig:
    if not settings.knows(app_id):
        raise ConfigError("--app", f"app {app_id!r} is not configured (add [{_key(app_id)}])")
    return stripe_source.StripeConfig(app_id=app_id, endpoint_secrets=("unused: captured bodies are trusted",))


def _trusted_revenuecat(app_id: str, settings: Settings) -> rc_source.RevenueCatConfig:
    if not settings.knows(app_id):
        raise ConfigError("--app", f"app {app_id!r} is not configured (add [{_key(app_id)}])")
    return rc_source.RevenueCatConfig(app_id=app_id, authorization="unused: captured bodies are trusted")


def build_sources(settings: Settings, *, certificates: Certificates | None = None) -> Sources:
    """Every configured adapter, validated; a ConfigError names the key (`apps."x".apple.…`).
    `certificates`: the SNS certificate cache the Amazon apps share (one is made when needed)."""
    apple_by_bundle: dict[str, apple_source.AppleAdapter] = {}
    stripe_by_app: dict[str, stripe_source.StripeConfig] = {}
    rc_by_app: dict[str, rc_source.RevenueCatConfig] = {}
    google_by_package: dict[str, GoogleSource] = {}
    amazon_by_package: dict[str, AmazonSource] = {}
    check_routing_keys(settings.apps)  # one app per bundle id / package name
    for app_id, app in settings.apps.items():
        try:
            if app.apple is not None:
                a = app.apple
                bundle = a.bundle_id or app_id
                roots = []
                for index, path in enumerate(a.root_certificates):
                    try:
                        roots.append(read_certificate(path))
                    except (OSError, ValueError) as exc:
                        raise ConfigError(f"apple.root_certificates[{index}]", f"{path}: {exc}") from None
                config = apple_source.AppleConfig(
                    bundle_id=bundle,
                    app_apple_id=a.app_apple_id,
                    root_certificates=tuple(roots),
                    environments=frozenset(a.environments),
                    enable_online_checks=a.enable_online_checks,
                    app_id=app_id,
                )
                apple_by_bundle[bundle] = apple_source.AppleAdapter(config)
            if app.stripe is not None:
                s = app.stripe
                stripe_by_app[app_id] = stripe_source.StripeConfig(
                    app_id=app_id,
                    endpoint_secrets=tuple(s.endpoint_secrets),
                    metadata_key=s.metadata_key,
                    tolerance=s.tolerance_seconds,
                )
            if app.revenuecat is not None:
                rc_by_app[app_id] = rc_source.RevenueCatConfig(
                    app_id=app_id, authorization=app.revenuecat.authorization
                )
            if app.google is not None:
                google = GoogleSource.build(app_id, app.google)
                google_by_package[google.config.package_name] = google
            if app.amazon is not None:
                certificates = certificates or Certificates()
                amazon = AmazonSource.build(app_id, app.amazon, certificates)
                amazon_by_package[amazon.config.package_name] = amazon
        except ConfigError as exc:
            raise ConfigError(f"{_key(app_id)}.{exc.key}", exc.reason) from None
    return Sources(apple=apple_by_bundle, stripe=stripe_by_app, revenuecat=rc_by_app, google=google_by_package,
                   amazon=amazon_by_package)


class StripeLinks:
    """`subscription_for` for Stripe refunds: references seen earlier in this run, then the log.

    A file import may carry an invoice and its refund in one batch, before either is stored, so the
    references of every parsed notification are remembered; the webhook path only asks the log.
    """

    def __init__(self, conn: psycopg.Connection | None, app_id: str) -> None:
        self.conn = conn
        self.app_id = app_id
        self.seen: dict[str, str] = {}
        self.paid_invoice: dict[str, str] = {}  # payment intent / charge → invoice (basil)

    def remember(self, notification: Notification, raw: bytes) -> None:
        if notification.kind == "invoice_payment.paid":
            paid_by, invoice = lookups.invoice_payment(raw)
            for ref in paid_by:
                if invoice is not None:
                    self.paid_invoice[ref] = invoice
        for event in notification.events:
            if event.subscription_id is None:
                continue
            attrs = event.attributes
            refs = [event.transaction_id, attrs.get("stripe_payment_intent"), attrs.get("stripe_charge")]
            for known in refs:
                if isinstance(known, str) and known:
                    self.seen[known] = event.subscription_id

    def __call__(self, reference: str) -> str | None:
        found = self.seen.get(reference)
        invoice = self.paid_invoice.get(reference)
        if found is None and invoice is not None:
            found = self.seen.get(invoice) or self._logged(invoice)
        return found or self._logged(reference)

    def _logged(self, reference: str) -> str | None:
        return None if self.conn is None else lookups.stripe_subscription_for(self.conn, self.app_id, reference)



def captured_incoming(
    sources: Sources,
    fmt: Format,
    raw: bytes,
    settings: Settings,
    *,
    app_id: str | None,
    links: StripeLinks | None = None,
    historical: bool = False,
    google_links: dict[str, GoogleLinks] | None = None,
    amazon_links: dict[str, ReceiptLinks] | None = None,
) -> Incoming | Rejection:
    """One captured body (a line of `subledger ingest --format …`) → what `ingest` takes, or why not."""
    if fmt == "google":
        return google_captured(sources, raw, google_links if google_links is not None else {}, conn=None,
                               historical=historical)
    if fmt == "amazon":
        return amazon_captured(sources, raw, amazon_links if amazon_links is not None else {}, conn=None,
                               historical=historical)
    try:
        notification = sources.parse_captured(fmt, raw, app_id=app_id, settings=settings, subscription_for=links)
        refuse_unstorable(notification)
    except PayloadRejected as exc:
        return Rejection(exc.field, exc.reason)
    except (StoreError, ConfigError):
        raise
    except Exception as exc:  # an adapter bug on a hostile line: that line is refused, the import goes on
        return unmappable(exc)
    if links is not None:
        links.remember(notification, raw)
    return Incoming(notification, raw, historical=historical)


def unmappable(exc: Exception) -> Rejection:
    """A line an adapter failed on unexpectedly: a bug, not bad input (hostile input is refused by
    validation first). The import goes on, the traceback is logged under an error id, and the line
    is refused naming that id, so it can be found and ingested again once the bug is fixed."""
    error_id = uuid.uuid4().hex[:16]
    log.error("store adapter failed on a captured line [error_id=%s]", error_id, exc_info=exc,
              extra={"error_id": error_id})
    return Rejection(None, f"internal error: the adapter failed on this line ({type(exc).__name__}; "
                           f"error_id {error_id} in the log)")


def google_captured(
    sources: Sources, raw: bytes, links: dict[str, GoogleLinks], *, conn: psycopg.Connection | None,
    historical: bool = False,
) -> Incoming | Rejection:
    """A captured Play push (a line of `ingest --format google`): the fetch results stored in the line
    (`subledger_fetched`) when present, else fetched now as the app is configured. The line is stored
    as it was given. `links` (per app) carry chain roots between the lines of one import."""

    def mapped() -> tuple[Notification, LoggedChain]:
        body, stored = split_capture(raw)
        push = google_source.parse_push(body)
        adapter = sources.google_for(push.package_name)
        chain = _chain_for(links, GoogleLinks, conn, adapter.config.app_id)
        return adapter.notification(push, chain=chain, fetched=stored), chain

    return _captured_with_fetch(raw, mapped, historical)


def amazon_captured(
    sources: Sources, raw: bytes, links: dict[str, ReceiptLinks], *, conn: psycopg.Connection | None,
    historical: bool = False,
) -> Incoming | Rejection:
    """A captured SNS delivery (a line of `ingest --format amazon`): trusted as the operator's, like
    Stripe's (a signing certificate may be gone by the time a capture is replayed); the RVS answer
    stored in the line (`subledger_fetched`) when present, else fetched now. The line is stored as
    it was given. `links` (per app) carry chain roots between the lines of one import."""

    def mapped() -> tuple[Notification, LoggedChain]:
        envelope, stored = amazon_split_capture(raw)
        rtn = amazon_source.parse_notification(envelope)
        adapter = sources.amazon_for(rtn.package_name)
        chain = _chain_for(links, ReceiptLinks, conn, adapter.config.app_id)
        return adapter.notification(rtn, chain=chain, fetched=stored), chain

    return _captured_with_fetch(raw, mapped, historical)


Chain = TypeVar("Chain", bound=LoggedChain)


def _chain_for(links: dict[str, Chain], kind: type[Chain], conn: psycopg.Connection | None, app_id: str) -> Chain:
    """The app's chain lookup for this import, made on its first line."""
    found = links.get(app_id)
    if found is None:
        found = links[app_id] = kind(conn, app_id)
    return found


def _captured_with_fetch(
    raw: bytes, mapped: Callable[[], tuple[Notification, LoggedChain]], historical: bool
) -> Incoming | Rejection:
    """What a captured line of a fetching source (Google, Amazon) becomes: refusals and an API that
    is down are that line's rejection, an adapter bug too (with an error id); a database or config
    error stops the import. A mapped line's ids join the chain for the lines after it."""
    try:
        notification, chain = mapped()
        refuse_unstorable(notification)
    except PayloadRejected as exc:  # CredentialsRefused included
        return Rejection(exc.field, exc.reason)
    except SourceUnavailable as exc:
        return Rejection(None, f"{exc}; ingest the file again later (repeats are duplicates)")
    except (StoreError, ConfigError):
        raise
    except Exception as exc:  # an adapter bug on a hostile line: that line is refused, the import goes on
        return unmappable(exc)
    chain.remember(notification)
    return Incoming(notification, raw, historical=historical)
