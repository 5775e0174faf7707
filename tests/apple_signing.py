"""Mint App Store Server Notifications signed by a throwaway Apple-shaped certificate chain.

Apple's test leaf key is not public, so tests cannot reuse Apple's own signed vectors for new
payloads. Instead we build what Apple's chain looks like (root → intermediate carrying OID
1.2.840.113635.100.6.2.1 → leaf carrying 1.2.840.113635.100.6.11.1), sign ES256 JWS with the leaf
and put the chain in `x5c`, exactly as the App Store does. Passing our root to the adapter then runs
the real `SignedDataVerifier` path, strict X.509 checks included (the certificates carry key
identifiers, so no private switch has to be flipped). Shared by unit and end-to-end tests.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

WWDR_INTERMEDIATE_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")
APP_STORE_LEAF_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2045, 1, 1, tzinfo=UTC)

BUNDLE_ID = "com.example.fitness"
APP_APPLE_ID = 1234567890
DEFAULT_SIGNED_DATE = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def ms(when: datetime) -> int:
    """Apple's wire format for times: UNIX milliseconds."""
    return int(when.timestamp() * 1000)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    marker: x509.ObjectIdentifier | None,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if marker is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(marker, b"\x05\x00"), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class SigningCA:
    """A root, an intermediate and a leaf; `root_der` is what an adapter config trusts."""

    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    @property
    def x5c(self) -> list[str]:
        """Standard base64 DER, leaf first, as RFC 7515 §4.1.6 and Apple put it."""
        return [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
            for c in (self.leaf, self.intermediate, self.root)
        ]


def make_ca(
    *,
    name: str = "Test Apple",
    leaf_marker: bool = True,
    intermediate_marker: bool = True,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
) -> SigningCA:
    """A fresh 3-level chain. Drop a marker OID to get a chain Apple's verifier must refuse."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root_cn, inter_cn, leaf_cn = f"{name} Root CA", f"{name} WWDR CA", f"{name} Store Signing"
    common = {"not_before": not_before, "not_after": not_after}
    root = _cert(root_cn, root_key, root_cn, root_key, ca=True, marker=None, **common)
    intermediate = _cert(
        inter_cn,
        inter_key,
        root_cn,
        root_key,
        ca=True,
        marker=WWDR_INTERMEDIATE_OID if intermediate_marker else None,
        **common,
    )
    leaf = _cert(
        leaf_cn,
        leaf_key,
        inter_cn,
        inter_key,
        ca=False,
        marker=APP_STORE_LEAF_OID if leaf_marker else None,
        **common,
    )
    return SigningCA(root=root, intermediate=intermediate, leaf=leaf, leaf_key=leaf_key)


def sign(
    payload: dict[str, Any],
    ca: SigningCA,
    *,
    x5c: list[str] | bool | None = True,
    algorithm: str = "ES256",
    key: ec.EllipticCurvePrivateKey | None = None,
) -> str:
    """Compact ES256 JWS with the chain in `x5c` (`x5c=False` omits it; a list overrides it)."""
    headers: dict[str, Any] = {"typ": "JWT"}
    if x5c is True:
        headers["x5c"] = ca.x5c
    elif isinstance(x5c, list):
        headers["x5c"] = x5c
    signing_key = key or ca.leaf_key
    if algorithm == "none":
        return jwt.encode(payload, None, algorithm="none", headers=headers)
    if algorithm != "ES256":
        return jwt.encode(payload, "not-an-apple-key-but-32-bytes-long", algorithm=algorithm, headers=headers)
    return jwt.encode(payload, signing_key, algorithm="ES256", headers=headers)


def tamper(jws: str, **changes: Any) -> str:
    """Rewrite claims of a signed JWS, keeping the original signature (so it no longer verifies)."""
    header, payload, signature = jws.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


def transaction(
    *,
    original_transaction_id: str = "2000000111111111",
    transaction_id: str | None = None,
    product_id: str = "com.example.fitness.monthly",
    purchase: datetime = datetime(2025, 6, 1, 11, 59, tzinfo=UTC),
    expires: datetime | None = None,
    price: int | None = 9990,
    currency: str | None = "USD",
    trial: bool = False,
    environment: str = "Sandbox",
    bundle_id: str = BUNDLE_ID,
    app_account_token: str | None = "7e3fb20b-4cdb-47cc-936d-99d65f608138",
    **extra: Any,
) -> dict[str, Any]:
    """A decoded JWSTransaction (fields as in Apple's docs and the library's test model)."""
    body: dict[str, Any] = {
        "transactionId": transaction_id or original_transaction_id,
        "originalTransactionId": original_transaction_id,
        "webOrderLineItemId": "34343",
        "bundleId": bundle_id,
        "productId": product_id,
        "subscriptionGroupIdentifier": "55555",
        "purchaseDate": ms(purchase),
        "originalPurchaseDate": ms(purchase),
        "expiresDate": ms(expires or purchase + timedelta(days=30)),
        "quantity": 1,
        "type": "Auto-Renewable Subscription",
        "inAppOwnershipType": "PURCHASED",
        "signedDate": ms(purchase + timedelta(seconds=5)),
        "environment": environment,
        "transactionReason": "PURCHASE",
        "storefront": "USA",
        "storefrontId": "143441",
    }
    if app_account_token is not None:
        body["appAccountToken"] = app_account_token
    if trial:
        body.update({"offerType": 1, "offerDiscountType": "FREE_TRIAL", "offerPeriod": "P1W", "price": 0})
        body["currency"] = currency or "USD"
    elif price is not None:
        body["price"] = price
        if currency is not None:
            body["currency"] = currency
    body.update(extra)
    return body


def renewal_info(
    *,
    original_transaction_id: str = "2000000111111111",
    product_id: str = "com.example.fitness.monthly",
    auto_renew_product_id: str | None = None,
    auto_renew: bool = True,
    environment: str = "Sandbox",
    signed: datetime = DEFAULT_SIGNED_DATE,
    **extra: Any,
) -> dict[str, Any]:
    """A decoded JWSRenewalInfo."""
    body: dict[str, Any] = {
        "originalTransactionId": original_transaction_id,
        "productId": product_id,
        "autoRenewProductId": auto_renew_product_id or product_id,
        "autoRenewStatus": 1 if auto_renew else 0,
        "signedDate": ms(signed),
        "environment": environment,
        "recentSubscriptionStartDate": ms(signed - timedelta(days=30)),
        "renewalDate": ms(signed + timedelta(days=30)),
    }
    body.update(extra)
    return body


def notification_payload(
    ca: SigningCA,
    notification_type: str,
    subtype: str | None = None,
    *,
    txn: dict[str, Any] | None = None,
    renewal: dict[str, Any] | None = None,
    environment: str = "Sandbox",
    bundle_id: str = BUNDLE_ID,
    app_apple_id: int | None = APP_APPLE_ID,
    signed: datetime = DEFAULT_SIGNED_DATE,
    notification_uuid: str | None = None,
    data: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The decoded responseBodyV2 payload; inner transaction/renewal dicts are signed separately."""
    if data is None:
        data = {"environment": environment, "bundleId": bundle_id, "bundleVersion": "1.0", "status": 1}
        if app_apple_id is not None:
            data["appAppleId"] = app_apple_id
        if txn is not None:
            data["signedTransactionInfo"] = sign(txn, ca)
        if renewal is not None:
            data["signedRenewalInfo"] = sign(renewal, ca)
    payload: dict[str, Any] = {
        "notificationType": notification_type,
        "notificationUUID": notification_uuid or str(uuid.uuid4()),
        "data": data,
        "version": "2.0",
        "signedDate": ms(signed),
    }
    if subtype is not None:
        payload["subtype"] = subtype
    payload.update(extra)
    return payload


def body(signed_payload: str) -> bytes:
    """The HTTP body Apple POSTs."""
    return json.dumps({"signedPayload": signed_payload}).encode()


def notification(ca: SigningCA, notification_type: str, subtype: str | None = None, **kwargs: Any) -> bytes:
    """A complete, validly signed HTTP body for one notification."""
    return body(sign(notification_payload(ca, notification_type, subtype, **kwargs), ca))
