"""App Store Server Notifications V2 → canonical events.

Why this module looks the way it does:

* Verification is Apple's own `SignedDataVerifier` (chain to a configured root, marker OIDs,
  ES256, bundle id / app id / environment), not a re-implementation. It sits behind the
  `AppleVerifier` protocol so tests and tools can inject a verifier. The signed transaction and
  renewal info are separate JWS and are verified separately, as Apple asks.
* One verifier per accepted environment, because the library checks one environment per verifier.
  The environment is read from the unverified payload only to *pick* the verifier; the library then
  re-checks it on the verified payload. `Xcode` / `LocalTesting` are never accepted: the library
  skips the signature check for them, which a public webhook must not allow.
* Offline by default (`enable_online_checks=False`): the library then validates the chain at the
  payload's `signedDate` and touches neither network nor clock, which keeps `core` pure. Turning
  online (OCSP) checks on is a deliberate per-app choice.
* The adapter states facts (purchase with period_type trial, renewal, auto_renew_disabled, ...);
  whether a renewal is a trial conversion is the fold's decision, from prior state.
* Unknown notification types and subtypes are stored with zero events, never refused: Apple adds
  types regularly and the raw log must keep them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import orjson
from appstoreserverlibrary.models.Environment import Environment as AppleEnvironment
from appstoreserverlibrary.models.JWSRenewalInfoDecodedPayload import JWSRenewalInfoDecodedPayload
from appstoreserverlibrary.models.JWSTransactionDecodedPayload import JWSTransactionDecodedPayload
from appstoreserverlibrary.models.ResponseBodyV2DecodedPayload import ResponseBodyV2DecodedPayload
from appstoreserverlibrary.signed_data_verifier import (
    SignedDataVerifier,
    VerificationException,
    VerificationStatus,
)
from cryptography import x509

from subledger.core import events, safejson
from subledger.core.errors import (
    BadSignature,
    ConfigError,
    InvalidEvent,
    MalformedPayload,
    PayloadRejected,
    SignatureUncheckable,
)
from subledger.core.events import (
    EventType,
    PeriodType,
    Reason,
    Source,
    Store,
    format_time,
)
from subledger.core.sources import Notification
from subledger.core.sources.payload import as_str, delivery_id, fact_id, fact_value, unix_time, unix_time_or_none

PRODUCTION = "Production"
SANDBOX = "Sandbox"
ACCEPTABLE_ENVIRONMENTS = frozenset({PRODUCTION, SANDBOX})
AUTO_RENEWABLE = "Auto-Renewable Subscription"
T = TypeVar("T")


class AppleVerifier(Protocol):
    """What the adapter needs from Apple's `SignedDataVerifier` (which satisfies it as is)."""

    def verify_and_decode_notification(self, signed_payload: str, /) -> ResponseBodyV2DecodedPayload: ...

    def verify_and_decode_signed_transaction(self, signed_transaction: str, /) -> JWSTransactionDecodedPayload: ...

    def verify_and_decode_renewal_info(self, signed_renewal_info: str, /) -> JWSRenewalInfoDecodedPayload: ...


@dataclass(frozen=True, slots=True)
class AppleConfig:
    """One app's App Store settings. `app_id` (canonical events' app) defaults to the bundle id."""

    bundle_id: str
    app_apple_id: int | None
    root_certificates: tuple[bytes, ...]
    environments: frozenset[str] = ACCEPTABLE_ENVIRONMENTS
    enable_online_checks: bool = False
    app_id: str = ""

    def __post_init__(self) -> None:
        if not self.bundle_id:
            raise ConfigError("apple.bundle_id", "must not be empty")
        if not self.app_id:
            object.__setattr__(self, "app_id", self.bundle_id)
        object.__setattr__(self, "environments", frozenset(self.environments))
        object.__setattr__(self, "root_certificates", tuple(self.root_certificates))
        unknown = sorted(self.environments - ACCEPTABLE_ENVIRONMENTS)
        if unknown:
            raise ConfigError(
                "apple.environments",
                f"unsupported {unknown}; only Production and Sandbox are verified by signature",
            )
        if not self.environments:
            raise ConfigError("apple.environments", "accept at least one environment")
        if PRODUCTION in self.environments and self.app_apple_id is None:
            raise ConfigError("apple.app_apple_id", "is required when Production is accepted")
        if not self.root_certificates:
            raise ConfigError("apple.root_certificates", "at least one Apple root certificate (DER)")
        for index, der in enumerate(self.root_certificates):
            try:
                x509.load_der_x509_certificate(der)
            except (ValueError, TypeError):
                raise ConfigError(f"apple.root_certificates[{index}]", "not a DER certificate") from None


def make_verifier(config: AppleConfig, environment: str) -> AppleVerifier:
    """Apple's verifier for one environment of one app."""
    return SignedDataVerifier(
        list(config.root_certificates),
        config.enable_online_checks,
        AppleEnvironment(environment),
        config.bundle_id,
        config.app_apple_id,
    )


class AppleAdapter:
    """Parse → verify → map for one app. Build once: online checks cache verified keys per verifier."""

    def __init__(self, config: AppleConfig, verifiers: Mapping[str, AppleVerifier] | None = None) -> None:
        self.config = config
        if verifiers is None:
            verifiers = {env: make_verifier(config, env) for env in sorted(config.environments)}
        self._verifiers = dict(verifiers)

    def parse(self, body: bytes) -> Notification:
        """One POSTed body → a Notification; raises a PayloadRejected subclass for anything refused."""
        signed = _signed_payload(body)
        claims = _peek(signed, "signedPayload")
        environment = _claimed_environment(claims)
        if environment not in self.config.environments or environment not in self._verifiers:
            raise BadSignature(f"environment {environment!r} is not accepted for this app", "environment")
        verifier = self._verifiers[environment]
        decoded = self._verified(lambda: verifier.verify_and_decode_notification(signed), "signedPayload", claims)
        # The library checks appAppleId in Production only; Sandbox omits it, but when present it must match.
        section = decoded.data or decoded.summary
        claimed_app = section.appAppleId if section is not None else None
        expected_app = self.config.app_apple_id
        if claimed_app is not None and expected_app is not None and claimed_app != expected_app:
            raise BadSignature(f"appAppleId {claimed_app!r} is not this app's", "appAppleId")
        return _Mapping(self.config, verifier, decoded, environment, self._verified).notification()

    def _verified(self, call: Callable[[], T], name: str, claims: Mapping[str, Any] | None = None) -> T:
        try:
            return call()
        except VerificationException as exc:
            raise self._refusal(exc.status, name, claims) from None
        except Exception as exc:  # the library's cattrs structuring: signed, but not Apple's schema
            raise MalformedPayload(f"signed data does not match Apple's schema ({type(exc).__name__})", name) from None

    def _refusal(self, status: int, name: str, claims: Mapping[str, Any] | None) -> BadSignature:
        if status == VerificationStatus.INVALID_APP_IDENTIFIER:
            data = _section(claims or {}) or (claims or {})
            bundle, apple_id = data.get("bundleId"), data.get("appAppleId")
            if name == "signedPayload" and bundle == self.config.bundle_id:
                return BadSignature(f"appAppleId {apple_id!r} is not this app's", "appAppleId")
            return BadSignature(f"bundleId {bundle!r} is not {self.config.bundle_id!r}", "bundleId")
        if status == VerificationStatus.INVALID_ENVIRONMENT:
            return BadSignature("signed data is for another environment", "environment")
        if status == VerificationStatus.RETRYABLE_VERIFICATION_FAILURE:
            # Only with online checks on: OCSP could not be reached. Apple retries any 4xx/5xx answer.
            return SignatureUncheckable("online certificate (OCSP) check could not complete; transient", name)
        if status == VerificationStatus.INVALID_CHAIN_LENGTH:
            return BadSignature("x5c must hold exactly 3 certificates", name)
        if status == VerificationStatus.INVALID_CERTIFICATE:
            return BadSignature("x5c certificates are unreadable or no root is configured", name)
        return BadSignature("signature or certificate chain does not verify against Apple's root", name)


    def verified_transaction(self, environment: str, signed: str) -> JWSTransactionDecodedPayload:
        """A signed transaction the App Store Server API answered, verified as a webhook's is."""
        verifier = self._environment(environment)
        return self._verified(lambda: verifier.verify_and_decode_signed_transaction(signed), "signedTransactionInfo",
                              _peek_quietly(signed))

    def verified_renewal(self, environment: str, signed: str) -> JWSRenewalInfoDecodedPayload:
        """A signed renewal info the App Store Server API answered, verified as a webhook's is."""
        verifier = self._environment(environment)
        return self._verified(lambda: verifier.verify_and_decode_renewal_info(signed), "signedRenewalInfo")

    def _environment(self, environment: str) -> AppleVerifier:
        if environment not in self.config.environments or environment not in self._verifiers:
            raise BadSignature(f"environment {environment!r} is not accepted for this app", "environment")
        return self._verifiers[environment]


def parse_notification(body: bytes, config: AppleConfig) -> Notification:
    """Convenience for one-off use (tests, scripts); servers keep an `AppleAdapter` per app (`app.sources`)."""
    return AppleAdapter(config).parse(body)


def unverified_bundle_id(body: bytes) -> str | None:
    """The bundle id the body *claims*, to route a shared endpoint to an app's config. Not trusted."""
    try:
        return as_str(_section(_peek(_signed_payload(body), "signedPayload")).get("bundleId"))
    except MalformedPayload:
        return None


# --- reconciliation: records of Apple's notification history -----------------------------------


def recovered_body(signed_payload: str) -> bytes:
    """The body logged for a record of Apple's notification history: the JSON Apple POSTs.

    A history record's `signedPayload` is the very JWS the webhook carried, so `AppleAdapter.parse`
    maps this body to the same Notification and the same external id (the notificationUUID): a
    recovered notification whose webhook did arrive is a duplicate, never a second fact.
    """
    return orjson.dumps({"signedPayload": signed_payload})


@dataclass(frozen=True, slots=True)
class Listed:
    """A history record as it claims to be (unverified): enough to skip what the log holds and to
    ingest the rest oldest first. The claims are verified by `AppleAdapter.parse` before use."""

    notification_uuid: str
    signed_date: int
    signed_payload: str


def listed(signed_payload: str) -> Listed:
    """The notificationUUID and signedDate a history record claims; an unreadable record is listed
    under its payload (it never matches a logged id, and the adapter refuses it with the reason)."""
    try:
        claims = _peek(signed_payload, "signedPayload")
    except PayloadRejected:
        claims = {}
    uuid, signed = claims.get("notificationUUID"), claims.get("signedDate")
    return Listed(
        uuid if isinstance(uuid, str) and uuid else f"unreadable:{signed_payload[:64]}",
        signed if isinstance(signed, int) and not isinstance(signed, bool) else 0,
        signed_payload,
    )


# --- reconciliation: one subscription's transactions and status ------------------------------
#
# `subledger reconcile apple --subscription` asks the App Store Server API for one subscription's
# transaction history (V2) and statuses. Those answers are signed snapshots, not notifications, so
# they carry no notificationUUID; a fact is recovered only when the log lacks it, under an external
# id derived from what it states, so a second refresh finds it logged and recovers nothing:
#
# * a charge: a signed transaction whose id no logged charge fact (purchase, renewal, billing
#   recovery) carries → `purchase` when it is the original transaction, else `renewal` (the fold
#   decides trial conversion), dated at its purchaseDate; id `-transaction:<transactionId>`;
# * a refund: a transaction with a revocationDate and no logged refund fact for its id → the facts
#   of a REFUND notification (refund, and the expiration when its period had not ended), dated at
#   the revocationDate; id `-refund:<transactionId>`;
# * an expiration: status 2 (expired) when the log has no expiration since the latest charge,
#   dated at that transaction's expiresDate, reason from expirationIntent; id `-expired:<transactionId>`.
#
# Only facts whose instant the answer states are recovered, and their ids begin with "-", which
# sorts before every notificationUUID: when the notification of the same fact arrives later (Apple
# retried it, or the notification history recovers it) its fact ties on the instant and sorts
# after the recovered one, so the fold keeps crediting the recovered fact and derives nothing new
# (a charge whose transaction id it counted is not a second charge). An auto-renew switch is not
# recovered here: the renewal info does not say when it happened, and a fact dated at the answer
# would be re-derived from the late notification's earlier instant. The notification history
# recovers those, and billing-issue, grace-period and product-change facts.

CHARGES = frozenset({EventType.PURCHASE, EventType.RENEWAL, EventType.BILLING_RECOVERED})
STATUS_EXPIRED = 2


@dataclass(frozen=True, slots=True)
class Recovered:
    """A fact the log lacks, as a notification to ingest, and the raw body that stated it."""

    notification: Notification
    raw: bytes


def recover_subscription(
    config: AppleConfig,
    environment: str,
    transactions: Iterable[JWSTransactionDecodedPayload],
    logged: Iterable[events.CanonicalEvent],
    *,
    signed_transactions: Mapping[str, str],
    status: int | None = None,
    renewal: JWSRenewalInfoDecodedPayload | None = None,
    signed_renewal: str | None = None,
) -> list[Recovered]:
    """The facts one subscription's verified transactions and status state that `logged` (the log's
    facts of that subscription) lacks, oldest first. Pure: the shell reads Apple and the log.

    `signed_transactions` maps a transaction id to the JWS it came in, logged as the raw body.
    """
    facts = list(logged)
    charged = {e.transaction_id for e in facts if e.type in CHARGES and e.transaction_id}
    refunded = {e.transaction_id for e in facts if e.type is EventType.REFUND and e.transaction_id}
    chosen = sorted((t for t in transactions if t.rawType in (None, AUTO_RENEWABLE) and t.transactionId),
                    key=lambda t: (t.purchaseDate or 0, t.transactionId or ""))
    out: list[Recovered] = []
    for txn in chosen:
        tid = str(txn.transactionId)
        body = orjson.dumps({"signedTransactionInfo": signed_transactions.get(tid), "recovered": "transaction"})
        if tid not in charged:
            kind = EventType.PURCHASE if tid == txn.originalTransactionId else EventType.RENEWAL
            mapping = _Mapping.recovered(config, environment, f"-transaction:{tid}", "TRANSACTION", txn, None)
            mapping._charge(kind)
            out.append(Recovered(mapping.notification(), body))
        if txn.revocationDate is not None and tid not in refunded:
            mapping = _Mapping.recovered(config, environment, f"-refund:{tid}", "TRANSACTION/REVOKED", txn, None)
            mapping.on_refund()
            out.append(Recovered(mapping.notification(), body))
    latest = chosen[-1] if chosen else None
    if latest is not None and status is not None:
        out.extend(_status_facts(config, environment, latest, facts, status, renewal,
                                 orjson.dumps({"status": status, "signedRenewalInfo": signed_renewal,
                                               "signedTransactionInfo": signed_transactions.get(
                                                   str(latest.transactionId)), "recovered": "status"})))
    return out


def _status_facts(config: AppleConfig, environment: str, latest: JWSTransactionDecodedPayload,
                  facts: list[events.CanonicalEvent], status: int, renewal: JWSRenewalInfoDecodedPayload | None,
                  body: bytes) -> list[Recovered]:
    tid = str(latest.transactionId)
    since = unix_time_or_none(latest.purchaseDate, "purchaseDate")
    recent = [e for e in facts if since is None or e.occurred_at >= since]
    out: list[Recovered] = []
    if status == STATUS_EXPIRED and not any(e.type is EventType.EXPIRATION for e in recent):
        mapping = _Mapping.recovered(config, environment, f"-expired:{tid}", "STATUS/EXPIRED", latest, renewal)
        when = unix_time_or_none(latest.expiresDate, "expiresDate") or mapping.signed_at
        mapping._add(EventType.EXPIRATION, when, reason=mapping._intent_reason() or Reason.UNKNOWN,
                     product_id=latest.productId, expires_at=when)
        out.append(Recovered(mapping.notification(), body))
    return out


# --- parsing helpers -------------------------------------------------------------------------


def _signed_payload(body: bytes) -> str:
    obj = safejson.loads(body)  # depth, numbers and text held to the limits; 400/422 naming the field
    if not isinstance(obj, dict):
        raise MalformedPayload("body must be a JSON object")
    signed = obj.get("signedPayload")
    if not isinstance(signed, str) or not signed:
        raise MalformedPayload("is required and must be a string", "signedPayload")
    return signed


def _peek(jws: str, name: str) -> dict[str, Any]:
    """The claims of a compact JWS, unverified: only used to choose a verifier and word errors."""
    parts = jws.split(".")
    if len(parts) != 3:
        raise MalformedPayload("not a compact JWS", name)
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
    except (ValueError, binascii.Error):
        raise MalformedPayload("JWS payload is not base64url JSON", name) from None
    claims = safejson.loads(raw, what=name)
    if not isinstance(claims, dict):
        raise MalformedPayload("JWS payload must be a JSON object", name)
    return claims


def _peek_quietly(jws: str) -> dict[str, Any]:
    """Claims for wording an error about an inner JWS; {} when it cannot even be read."""
    try:
        return _peek(jws, "-")
    except PayloadRejected:
        return {}


def _section(claims: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of a notification that names app and environment (data/summary/appData/token)."""
    for key in ("data", "summary", "appData", "externalPurchaseToken"):
        value = claims.get(key)
        if isinstance(value, dict):
            return value
    return {}


def _claimed_environment(claims: Mapping[str, Any]) -> str:
    token = claims.get("externalPurchaseToken")
    if isinstance(token, dict) and not any(isinstance(claims.get(k), dict) for k in ("data", "summary")):
        purchase_id = token.get("externalPurchaseId")
        return SANDBOX if isinstance(purchase_id, str) and purchase_id.startswith("SANDBOX") else PRODUCTION
    environment = _section(claims).get("environment")
    if not isinstance(environment, str):
        raise MalformedPayload("notification names no environment", "data.environment")
    return environment


def _milliunits(value: Any, name: str) -> Decimal | None:
    """Apple prices are integer milliunits: 9990 is 9.99 in the currency."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent("must be integer milliunits", name)
    return Decimal(value) / Decimal(1000)


def _period_type(txn: JWSTransactionDecodedPayload) -> PeriodType:
    """Trial ⇔ introductory offer that is a free trial; other introductory offers are `intro`."""
    offer, discount = txn.rawOfferType, txn.rawOfferDiscountType
    if discount == "FREE_TRIAL" and offer in (None, 1):
        return PeriodType.TRIAL
    if offer == 1:
        return PeriodType.INTRO
    return PeriodType.NORMAL


EXPIRED_SUBTYPE_REASON = {
    "VOLUNTARY": Reason.UNSUBSCRIBE,
    "BILLING_RETRY": Reason.BILLING_ERROR,
    "PRICE_INCREASE": Reason.PRICE_INCREASE,
    "PRODUCT_NOT_FOR_SALE": Reason.UNKNOWN,
}
EXPIRATION_INTENT_REASON = {
    1: Reason.UNSUBSCRIBE,
    2: Reason.BILLING_ERROR,
    3: Reason.PRICE_INCREASE,
    4: Reason.UNKNOWN,
    5: Reason.UNKNOWN,
}
STORED_ONLY = frozenset(
    {
        "TEST",
        "CONSUMPTION_REQUEST",
        "REFUND_DECLINED",
        "PRICE_INCREASE",
        "RENEWAL_EXTENSION",
        "EXTERNAL_PURCHASE_TOKEN",
        "METADATA_UPDATE",
        "MIGRATION",
        "PRICE_CHANGE",
        "RESCIND_CONSENT",
    }
)

_ALPHA3 = (
    "ABWAW AFGAF AGOAO AIAAI ALAAX ALBAL ANDAD AREAE ARGAR ARMAM ASMAS ATAAQ ATFTF ATGAG AUSAU AUTAT "
    "AZEAZ BDIBI BELBE BENBJ BESBQ BFABF BGDBD BGRBG BHRBH BHSBS BIHBA BLMBL BLRBY BLZBZ BMUBM BOLBO "
    "BRABR BRBBB BRNBN BTNBT BVTBV BWABW CAFCF CANCA CCKCC CHECH CHLCL CHNCN CIVCI CMRCM CODCD COGCG "
    "COKCK COLCO COMKM CPVCV CRICR CUBCU CUWCW CXRCX CYMKY CYPCY CZECZ DEUDE DJIDJ DMADM DNKDK DOMDO "
    "DZADZ ECUEC EGYEG ERIER ESHEH ESPES ESTEE ETHET FINFI FJIFJ FLKFK FRAFR FROFO FSMFM GABGA GBRGB "
    "GEOGE GGYGG GHAGH GIBGI GINGN GLPGP GMBGM GNBGW GNQGQ GRCGR GRDGD GRLGL GTMGT GUFGF GUMGU GUYGY "
    "HKGHK HMDHM HNDHN HRVHR HTIHT HUNHU IDNID IMNIM INDIN IOTIO IRLIE IRNIR IRQIQ ISLIS ISRIL ITAIT "
    "JAMJM JEYJE JORJO JPNJP KAZKZ KENKE KGZKG KHMKH KIRKI KNAKN KORKR KWTKW LAOLA LBNLB LBRLR LBYLY "
    "LCALC LIELI LKALK LSOLS LTULT LUXLU LVALV MACMO MAFMF MARMA MCOMC MDAMD MDGMG MDVMV MEXMX MHLMH "
    "MKDMK MLIML MLTMT MMRMM MNEME MNGMN MNPMP MOZMZ MRTMR MSRMS MTQMQ MUSMU MWIMW MYSMY MYTYT NAMNA "
    "NCLNC NERNE NFKNF NGANG NICNI NIUNU NLDNL NORNO NPLNP NRUNR NZLNZ OMNOM PAKPK PANPA PCNPN PERPE "
    "PHLPH PLWPW PNGPG POLPL PRIPR PRKKP PRTPT PRYPY PSEPS PYFPF QATQA REURE ROURO RUSRU RWARW SAUSA "
    "SDNSD SENSN SGPSG SGSGS SHNSH SJMSJ SLBSB SLESL SLVSV SMRSM SOMSO SPMPM SRBRS SSDSS STPST SURSR "
    "SVKSK SVNSI SWESE SWZSZ SXMSX SYCSC SYRSY TCATC TCDTD TGOTG THATH TJKTJ TKLTK TKMTM TLSTL TONTO "
    "TTOTT TUNTN TURTR TUVTV TWNTW TZATZ UGAUG UKRUA UMIUM URYUY USAUS UZBUZ VATVA VCTVC VENVE VGBVG "
    "VIRVI VNMVN VUTVU WLFWF WSMWS YEMYE ZAFZA ZMBZM ZWEZW"
)
ALPHA3_TO_ALPHA2 = {pair[:3]: pair[3:] for pair in _ALPHA3.split()}


def stream_key(app_id: str, subscription_id: str) -> str:
    """The subscription key an App Store subscription's events get (for stored-only notifications)."""
    return events.stream_key(app_id, Store.APP_STORE, subscription_id)


# --- mapping ---------------------------------------------------------------------------------


class _Mapping:
    """The mapping of one verified notification; one method per notification type family."""

    def __init__(
        self,
        config: AppleConfig,
        verifier: AppleVerifier,
        decoded: ResponseBodyV2DecodedPayload,
        environment: str,
        verified: Callable[..., Any],
    ) -> None:
        self.config = config
        self.decoded = decoded
        self.environment = "sandbox" if environment == SANDBOX else "production"
        self.external_id = delivery_id(decoded.notificationUUID, "notificationUUID")
        self.type = decoded.rawNotificationType or ""
        self.subtype = decoded.rawSubtype or ""
        kind = f"{self.type or 'UNKNOWN'}/{self.subtype}" if self.subtype else (self.type or "UNKNOWN")
        self.kind = kind[:200]
        self.signed_at = unix_time(decoded.signedDate, "signedDate")
        data = decoded.data
        self.txn: JWSTransactionDecodedPayload | None = None
        self.renewal: JWSRenewalInfoDecodedPayload | None = None
        if data is not None and data.signedTransactionInfo:
            signed_txn = data.signedTransactionInfo
            self.txn = verified(
                lambda: verifier.verify_and_decode_signed_transaction(signed_txn),
                "data.signedTransactionInfo",
                _peek_quietly(signed_txn),
            )
        if data is not None and data.signedRenewalInfo:
            signed_renewal = data.signedRenewalInfo
            self.renewal = verified(
                lambda: verifier.verify_and_decode_renewal_info(signed_renewal), "data.signedRenewalInfo"
            )
        txn_otid = self.txn.originalTransactionId if self.txn is not None else None
        renewal_otid = self.renewal.originalTransactionId if self.renewal is not None else None
        if txn_otid and renewal_otid and txn_otid != renewal_otid:
            raise InvalidEvent("belongs to another subscription than the transaction", "data.signedRenewalInfo")
        self.subscription_id = txn_otid or renewal_otid or None
        self.facts: list[dict[str, Any]] = []

    @classmethod
    def recovered(cls, config: AppleConfig, environment: str, external_id: str, kind: str,
                  txn: JWSTransactionDecodedPayload, renewal: JWSRenewalInfoDecodedPayload | None) -> _Mapping:
        """A mapping of verified API answers (no notification): the same building blocks, so a
        recovered fact says what the webhook's would have. Dated at the transaction's signedDate."""
        self = cls.__new__(cls)
        self.config = config
        self.environment = "sandbox" if environment == SANDBOX else "production"
        self.external_id = delivery_id(external_id, "transactionId")
        self.type, self.subtype, self.kind = "", "", kind
        self.txn, self.renewal = txn, renewal
        self.signed_at = unix_time(txn.signedDate, "signedDate")
        self.subscription_id = txn.originalTransactionId or None
        self.facts = []
        return self

    # -- result --

    def notification(self) -> Notification:
        handler = self.HANDLERS.get(self.type)
        if handler is not None:
            handler(self)
        stored = None
        if self.subscription_id and self._is_subscription():
            stored = stream_key(self.config.app_id, self.subscription_id)
        return Notification.from_facts(
            Source.APPLE, self.external_id, self.config.app_id, self.kind, self.facts, stored_key=stored
        )

    # -- handlers (named after notificationType) --

    def on_subscribed(self) -> None:
        if self.subtype in ("INITIAL_BUY", "RESUBSCRIBE"):
            self._charge(EventType.PURCHASE)

    def on_did_renew(self) -> None:
        if self.subtype == "":
            self._charge(EventType.RENEWAL)
        elif self.subtype == "BILLING_RECOVERY":
            self._charge(EventType.BILLING_RECOVERED)

    def on_did_change_renewal_status(self) -> None:
        if self.subtype == "AUTO_RENEW_DISABLED":
            enabled = False
        elif self.subtype == "AUTO_RENEW_ENABLED":
            enabled = True
        elif self.subtype == "" and self.renewal is not None and self.renewal.rawAutoRenewStatus in (0, 1):
            enabled = self.renewal.rawAutoRenewStatus == 1
        else:
            return
        if enabled:
            self._status(EventType.AUTO_RENEW_ENABLED)
        else:
            self._status(EventType.AUTO_RENEW_DISABLED, reason=self._intent_reason())

    def on_did_fail_to_renew(self) -> None:
        if self.subtype in ("", "GRACE_PERIOD"):
            grace = self.renewal.gracePeriodExpiresDate if self.renewal is not None else None
            extra = {}
            if grace is not None:
                extra["grace_period_expires_at"] = format_time(unix_time(grace, "gracePeriodExpiresDate"))
            self._status(EventType.BILLING_ISSUE, attributes=extra)

    def on_grace_period_expired(self) -> None:
        self._status(EventType.EXPIRATION, reason=Reason.BILLING_ERROR)

    def on_expired(self) -> None:
        if self.subtype in EXPIRED_SUBTYPE_REASON:
            reason: Reason | None = EXPIRED_SUBTYPE_REASON[self.subtype]
        elif self.subtype == "":
            reason = self._intent_reason() or Reason.UNKNOWN
        else:
            return
        self._status(EventType.EXPIRATION, reason=reason)

    def on_refund(self) -> None:
        txn = self._require_txn()
        if not self._is_subscription():
            return  # a refunded consumable or non-consumable: no subscription stream to state it on
        price = _milliunits(txn.price, "price")
        if price is not None and txn.rawRevocationType == "REFUND_PRORATED" and txn.revocationPercentage:
            price = price * Decimal(txn.revocationPercentage) / Decimal(100000)
        when = unix_time_or_none(txn.revocationDate, "revocationDate") or self.signed_at
        attributes: dict[str, Any] = {}
        if txn.rawRevocationReason is not None:
            attributes["revocation_reason"] = txn.rawRevocationReason
        if txn.rawRevocationType is not None:
            attributes["revocation_type"] = txn.rawRevocationType
        self._add(
            EventType.REFUND,
            when,
            price=None if price is None else -price,
            currency=txn.currency if price is not None else None,
            transaction_id=txn.transactionId,
            product_id=txn.productId,
            purchased_at=unix_time_or_none(txn.purchaseDate, "purchaseDate"),
            attributes=attributes,
        )
        # Apple revokes what the refunded transaction granted: when its period had not ended by the
        # revocation, access ends now, stated as an expiration at the same instant (it sorts after
        # the refund: uuid < uuid#1). A refund of an earlier, finished period leaves access alone.
        period_end = unix_time_or_none(txn.expiresDate, "expiresDate")
        if period_end is None or period_end > when:
            self._add(EventType.EXPIRATION, when, reason=Reason.CUSTOMER_SUPPORT, product_id=txn.productId)

    def on_refund_reversed(self) -> None:
        txn = self._require_txn()
        if self._is_subscription():
            self._status(EventType.REFUND_REVERSED, transaction_id=txn.transactionId)

    def on_revoke(self) -> None:
        txn = self._require_txn()
        if self._is_subscription():
            when = unix_time_or_none(txn.revocationDate, "revocationDate") or self.signed_at
            self._add(EventType.EXPIRATION, when, reason=Reason.UNKNOWN, product_id=txn.productId)

    def on_did_change_renewal_pref(self) -> None:
        if self.subtype == "UPGRADE":
            txn = self._require_txn()
            when = unix_time(txn.purchaseDate, "purchaseDate")
            # The upgrade takes effect now and starts a new, charged period: state both facts at the
            # same instant so the change sorts first (ids: uuid < uuid#1).
            self._add(EventType.PRODUCT_CHANGE, when, new_product_id=txn.productId)
            self._charge(EventType.RENEWAL, when=when)
        elif self.subtype in ("DOWNGRADE", ""):
            renewal = self.renewal
            if renewal is None or not renewal.autoRenewProductId:
                if self.subtype == "":
                    return  # a reverted downgrade with nothing to revert to: keep it stored only
                raise InvalidEvent("is required for a downgrade", "data.signedRenewalInfo")
            product = renewal.productId or (self.txn.productId if self.txn is not None else None)
            self._status(EventType.PRODUCT_CHANGE, new_product_id=renewal.autoRenewProductId, product_id=product)

    def on_offer_redeemed(self) -> None:
        if self.subtype in ("UPGRADE", "DOWNGRADE"):
            self.on_did_change_renewal_pref()

    def on_renewal_extended(self) -> None:
        txn = self._require_txn()
        self._status(EventType.EXTENDED, expires_at=unix_time_or_none(txn.expiresDate, "expiresDate"))

    def on_one_time_charge(self) -> None:
        self._require_txn()
        if self._is_subscription():
            return
        self._charge(EventType.ONE_TIME_PURCHASE)

    HANDLERS: dict[str, Callable[[_Mapping], None]] = {
        "SUBSCRIBED": on_subscribed,
        "DID_RENEW": on_did_renew,
        "DID_CHANGE_RENEWAL_STATUS": on_did_change_renewal_status,
        "DID_FAIL_TO_RENEW": on_did_fail_to_renew,
        "GRACE_PERIOD_EXPIRED": on_grace_period_expired,
        "EXPIRED": on_expired,
        "REFUND": on_refund,
        "REFUND_REVERSED": on_refund_reversed,
        "REVOKE": on_revoke,
        "DID_CHANGE_RENEWAL_PREF": on_did_change_renewal_pref,
        "OFFER_REDEEMED": on_offer_redeemed,
        "RENEWAL_EXTENDED": on_renewal_extended,
        "ONE_TIME_CHARGE": on_one_time_charge,
    }

    # -- building blocks --

    def _require_txn(self) -> JWSTransactionDecodedPayload:
        if self.txn is None:
            raise InvalidEvent(f"is required for {self.type}", "data.signedTransactionInfo")
        return self.txn

    def _is_subscription(self) -> bool:
        return self.txn is None or self.txn.rawType in (None, AUTO_RENEWABLE)

    def _intent_reason(self) -> Reason | None:
        intent = self.renewal.rawExpirationIntent if self.renewal is not None else None
        return EXPIRATION_INTENT_REASON.get(intent) if isinstance(intent, int) else None

    def _charge(self, kind: EventType, when: datetime | None = None) -> None:
        """A fact that starts a period (or sells a one-time product): everything the transaction says."""
        txn = self._require_txn()
        price = _milliunits(txn.price, "price")
        self._add(
            kind,
            when or unix_time_or_none(txn.purchaseDate, "purchaseDate") or self.signed_at,
            product_id=txn.productId,
            period_type=_period_type(txn) if kind is not EventType.ONE_TIME_PURCHASE else PeriodType.NORMAL,
            price=price,
            currency=txn.currency if price is not None else None,
            expires_at=unix_time_or_none(txn.expiresDate, "expiresDate"),
            transaction_id=txn.transactionId,
        )

    def _status(self, kind: EventType, **fields: Any) -> None:
        """A fact about the subscription's state, dated when Apple signed the notification."""
        if self.txn is not None:
            fields.setdefault("product_id", self.txn.productId)
            fields.setdefault("expires_at", unix_time_or_none(self.txn.expiresDate, "expiresDate"))
        self._add(kind, self.signed_at, **fields)

    def _add(self, kind: EventType, when: datetime, **fields: Any) -> None:
        subscription = None if kind is EventType.ONE_TIME_PURCHASE else self.subscription_id
        if kind is not EventType.ONE_TIME_PURCHASE and not subscription:
            raise InvalidEvent(f"is required for {self.type}", "originalTransactionId")
        index = len(self.facts)
        facts: dict[str, Any] = {
            "id": fact_id(self.external_id, index),
            "source": Source.APPLE.value,
            "app_id": self.config.app_id,
            "type": kind.value,
            "occurred_at": format_time(when),
            "subscription_id": subscription,
            "store": Store.APP_STORE.value,
            "environment": self.environment,
            "app_user_id": self._app_user_id(),
            "country_code": self._country(),
        }
        attributes = {**self._attributes(), **fields.pop("attributes", {})}
        facts.update((name, fact_value(value)) for name, value in fields.items())
        if attributes:
            facts["attributes"] = attributes
        self.facts.append({k: v for k, v in facts.items() if v is not None})

    def _app_user_id(self) -> str | None:
        for source in (self.txn, self.renewal):
            token = source.appAccountToken if source is not None else None
            if isinstance(token, str) and token:
                return token
        return None

    def _country(self) -> str | None:
        storefront = self.txn.storefront if self.txn is not None else None
        return ALPHA3_TO_ALPHA2.get(storefront) if isinstance(storefront, str) else None

    def _attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"apple_notification": self.kind}
        txn = self.txn
        if txn is not None:
            pairs: Iterable[tuple[str, Any]] = (
                ("storefront", txn.storefront),
                ("offer_type", txn.rawOfferType),
                ("offer_discount_type", txn.rawOfferDiscountType),
                ("offer_identifier", txn.offerIdentifier),
                ("offer_period", txn.offerPeriod),
                ("ownership", txn.rawInAppOwnershipType),
                ("transaction_type", txn.rawType),
            )
            out.update({k: v for k, v in pairs if v is not None})
        return out
