"""Configuration: a TOML file plus SUBLEDGER_* environment variables, validated at start.

Secrets stay out of the file: any string value written as "${NAME}" is read from the environment.
Every error names the key it is about, e.g. `apps."com.example".destinations.segment.write_key`.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from subledger.app.wording import validation_reason
from subledger.core.errors import ConfigError
from subledger.core.events import is_currency_code
from subledger.core.lifecycle import TransitionKind
from subledger.core.render import DEFAULT_EVENT_NAMES, Commission, Destination, RevenueMode

if TYPE_CHECKING:
    from subledger.store.retention import Retention

SEGMENT_US = "https://api.segment.io"
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def package_version() -> str:
    try:
        return version("subledger")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0"


def _base_url(value: str, example: str) -> str:
    """An http(s) base URL without its trailing slash; paths are appended to it."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http(s) base URL, e.g. {example}")
    return value.rstrip("/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_STORE_RATES = Commission()  # the published defaults live in core/render.py, once


class CommissionSettings(_Strict):
    app_store_first_year: Decimal = _STORE_RATES.app_store_first_year
    app_store_later: Decimal = _STORE_RATES.app_store_later
    app_store_small_business: bool = _STORE_RATES.app_store_small_business
    play_store: Decimal = _STORE_RATES.play_store
    stripe: Decimal = _STORE_RATES.stripe
    other: Decimal = _STORE_RATES.other


class DestinationSettings(_Strict):
    write_key: str = Field(min_length=1)
    sandbox_write_key: str | None = None
    endpoint: str = SEGMENT_US
    send_sandbox: bool = False
    event_names: dict[TransitionKind, str] = Field(default_factory=dict)
    revenue_mode: RevenueMode = RevenueMode.GROSS
    commission: CommissionSettings = Field(default_factory=CommissionSettings)
    tax_rates: dict[str, Decimal] = Field(default_factory=dict)
    default_tax_rate: Decimal = Decimal("0")
    currency: str | None = None
    rates: dict[str, Decimal] = Field(default_factory=dict)
    publish_historical: bool = False
    gzip: bool = False
    timeout_seconds: float = 15.0

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _base_url(value, SEGMENT_US)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str | None) -> str | None:
        if value is not None and not is_currency_code(value):
            raise ValueError("must be an ISO 4217 code such as USD")
        return value


AppleEnvironment = Literal["Production", "Sandbox"]


def _both_apple_environments() -> list[AppleEnvironment]:
    return ["Production", "Sandbox"]


def read_certificate(path: str) -> bytes:
    """A certificate file (DER, or PEM as Apple's download page also offers) → DER bytes."""
    # deferred: cryptography's X.509 loads only for a configuration that names certificate files
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = Path(path).expanduser().read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    x509.load_der_x509_certificate(data)
    return data


class AppleSourceSettings(_Strict):
    """`[apps."<app>".apple]`: App Store Server Notifications V2 for this app."""

    bundle_id: str | None = Field(default=None, min_length=1)  # default: the app's key
    app_apple_id: int | None = Field(default=None, gt=0)
    environments: list[AppleEnvironment] = Field(
        default_factory=_both_apple_environments, min_length=1
    )
    root_certificates: list[str] = Field(min_length=1)  # files: Apple Root CA - G3 (DER or PEM)
    enable_online_checks: bool = False
    # reconciliation (`subledger reconcile apple`): an In-App Purchase key for the App Store Server API
    api_key: str | None = Field(default=None, min_length=1)  # a path to the .p8, or its PEM ("${NAME}")
    key_id: str | None = Field(default=None, min_length=1)
    issuer_id: str | None = Field(default=None, min_length=1)
    api_base_url: str | None = None  # default: Apple's host of each environment; tests name a local fake
    history_days: float = Field(default=30, gt=0, le=180)  # the daily (--all) run's reach; Apple keeps 180

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str | None) -> str | None:
        return None if value is None else _base_url(value, "https://api.storekit.apple.com")

    @field_validator("api_key")
    @classmethod
    def _key_readable(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN" not in value:  # a path (the PEM itself comes via ${NAME})
            try:
                Path(value).expanduser().read_bytes()
            except OSError as exc:
                raise ValueError(f"{value}: {exc.strerror or exc}") from None
        return value

    @model_validator(mode="after")
    def _api_credentials(self) -> AppleSourceSettings:
        given = [name for name in ("api_key", "key_id", "issuer_id") if getattr(self, name)]
        if given and len(given) < 3:
            raise ValueError("api_key, key_id and issuer_id go together (App Store Connect → Users and Access → "
                             "Integrations → In-App Purchase)")
        return self

    @field_validator("root_certificates")
    @classmethod
    def _readable(cls, paths: list[str]) -> list[str]:
        for index, path in enumerate(paths):
            try:
                read_certificate(path)
            except OSError as exc:
                raise ValueError(f"[{index}] {path}: {exc.strerror or exc}") from None
            except ValueError:
                raise ValueError(f"[{index}] {path}: not a DER or PEM certificate") from None
        return paths

    @model_validator(mode="after")
    def _production_needs_app_id(self) -> AppleSourceSettings:
        if "Production" in self.environments and self.app_apple_id is None:
            raise ValueError("app_apple_id is required when Production is accepted (App Store Connect → App ID)")
        return self


class StripeSourceSettings(_Strict):
    """`[apps."<app>".stripe]`: the webhook endpoint POST /webhooks/stripe/<app>."""

    endpoint_secrets: list[str] = Field(min_length=1)  # whsec_…; several while rolling a secret
    metadata_key: str = Field(default="app_user_id", min_length=1)
    tolerance_seconds: int = Field(default=300, ge=0)  # 0 turns the timestamp age check off
    # reconciliation (`subledger reconcile stripe`): a restricted key that may read events
    api_key: str | None = Field(default=None, min_length=1)
    api_base_url: str = Field(default="https://api.stripe.com", min_length=1)

    @field_validator("endpoint_secrets", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("endpoint_secrets")
    @classmethod
    def _non_empty(cls, secrets: list[str]) -> list[str]:
        for index, secret in enumerate(secrets):
            if not secret.strip():
                raise ValueError(f"[{index}] must not be empty")
        return secrets


class RevenueCatSourceSettings(_Strict):
    """`[apps."<app>".revenuecat]`: the webhook endpoint POST /webhooks/revenuecat/<app>."""

    authorization: str = Field(min_length=1)  # the exact Authorization header value set in RevenueCat

    @field_validator("authorization")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class GoogleSourceSettings(_Strict):
    """`[apps."<app>".google]`: Play RTDN through POST /webhooks/google, state fetched from the Play API."""

    package_name: str | None = Field(default=None, min_length=1)  # default: the app's key
    service_account_file: str | None = None  # JSON key of a service account invited in Play Console
    access_token: str | None = Field(default=None, min_length=1)  # a static bearer token (tests, fakes)
    api_base_url: str = "https://androidpublisher.googleapis.com"
    fetch_orders: bool = True  # the Orders API for money (needs "View financial data")
    timeout_seconds: float = Field(default=5.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)  # extra attempts on 5xx, 429 and timeouts
    backoff_seconds: float = Field(default=0.5, ge=0)
    # Pub/Sub push authentication (optional): the OIDC token Pub/Sub signs, checked when audience is set.
    push_audience: str | None = Field(default=None, min_length=1)
    push_service_account_email: str | None = Field(default=None, min_length=1)
    push_certs_url: str | None = None  # default: Google's; only tests point it elsewhere
    # `subledger reconcile google`: the subscriptionsv2 sweep's bound per run, and how long after a
    # period's end a live subscription must have stayed silent before it is asked about.
    sweep_limit: int = Field(default=500, ge=0, le=100_000)
    sweep_margin_minutes: float = Field(default=60, ge=0)

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str) -> str:
        return _base_url(value, "https://androidpublisher.googleapis.com")

    @field_validator("service_account_file")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> GoogleSourceSettings:
        if self.service_account_file and self.access_token:
            raise ValueError("set service_account_file or access_token, not both")
        if self.push_service_account_email and not self.push_audience:
            raise ValueError("push_service_account_email needs push_audience (the push endpoint's audience)")
        return self


AMAZON_RVS = "https://appstore-sdk.amazon.com"
AmazonEnvironment = Literal["production", "sandbox"]


def _amazon_production() -> list[AmazonEnvironment]:
    return ["production"]


def _aws_sns_hosts() -> list[str]:
    # deferred (as below): core.sources.amazon loads cryptography, only for a configuration with Amazon apps
    from subledger.core.sources.amazon import AWS_SNS_HOSTS

    return list(AWS_SNS_HOSTS)


class AmazonSourceSettings(_Strict):
    """`[apps."<app>".amazon]`: Amazon Appstore RTN through POST /webhooks/amazon, receipts from RVS."""

    package_name: str | None = Field(default=None, min_length=1)  # default: the app's key
    shared_secret: str = Field(min_length=1)  # the Developer Console's Shared Key; write "${NAME}"
    rvs_base_url: str = AMAZON_RVS
    rvs_environments: list[AmazonEnvironment] = Field(default_factory=_amazon_production, min_length=1)
    timeout_seconds: float = Field(default=4.0, gt=0, le=30)  # Amazon waits 15 s for the answer
    retries: int = Field(default=1, ge=0, le=5)  # extra attempts on 5xx, 429 and timeouts
    backoff_seconds: float = Field(default=0.25, ge=0)
    topic_arns: list[str] = Field(default_factory=list)  # when set, messages of other SNS topics are 403
    confirm_subscriptions: bool = True  # GET a SubscriptionConfirmation's SubscribeURL
    # Where signing certificates may come from: SNS's own hosts; only loopback host:port can be added (tests).
    sns_certificate_hosts: list[str] = Field(default_factory=_aws_sns_hosts, min_length=1)

    @field_validator("rvs_base_url")
    @classmethod
    def _rvs_base_url(cls, value: str) -> str:
        return _base_url(value, AMAZON_RVS)

    @field_validator("shared_secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("sns_certificate_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        from subledger.core.sources.amazon import allowed_host

        for index, host in enumerate(hosts):
            if not allowed_host(host):
                raise ValueError(f"[{index}] {host[:100]!r}: only sns.*.amazonaws.com(.cn) or a loopback host:port "
                                 "(a test fake) may sign")
        return hosts


class LogSettings(_Strict):
    """`[log]`: the event log's hash chains (README: Database; docs/scale-out.md).

    `chains`: how many independent chains the log appends to, an entry's chain being a stable hash
    of its subscription key; ingests of different chains commit in parallel. 1 (the default) is the
    log as it always was. A change on a non-empty log starts new chains from the current heads
    (`store.log.set_chains`), recorded in `log_epochs`; nothing already written changes.
    """

    chains: int = Field(default=1, ge=1, le=1024)


class AppSettings(_Strict):
    destinations: dict[str, DestinationSettings] = Field(default_factory=dict)
    settle_delay_seconds: float = Field(default=0, ge=0, le=3600)
    expiration_grace_hours: float = Field(default=24, ge=0)
    # Store credentials, read by the store adapters (app/sources.py).
    apple: AppleSourceSettings | None = None
    stripe: StripeSourceSettings | None = None
    revenuecat: RevenueCatSourceSettings | None = None
    google: GoogleSourceSettings | None = None
    amazon: AmazonSourceSettings | None = None


class RetentionSettings(_Strict):
    """`[retention]`: how long the delivery tables keep their detail; the event log is never pruned.

    The prune job runs every `interval_minutes` in `serve` and `relay`, `batch_rows` rows per
    transaction (store/retention.py says what each table keeps and why a re-send cannot follow).
    """

    enabled: bool = True
    attempts_days: float = Field(default=30, ge=1)
    delivered_days: float = Field(default=90, ge=1)
    duplicate_receipts_days: float = Field(default=90, ge=1)
    destination_state_days: float = Field(default=30, ge=1)
    interval_minutes: float = Field(default=60, ge=1, le=1440)
    batch_rows: int = Field(default=1000, ge=1, le=100_000)

    def policy(self) -> Retention:
        # deferred: the store (psycopg) loads only when a process prunes, not for every settings load
        from subledger.store.retention import Retention

        return Retention(
            attempts=timedelta(days=self.attempts_days),
            delivered=timedelta(days=self.delivered_days),
            duplicate_receipts=timedelta(days=self.duplicate_receipts_days),
            destination_state=timedelta(days=self.destination_state_days),
            batch=self.batch_rows,
        )


class ReconciliationSettings(_Strict):
    """`[reconciliation]`: the scheduled reconciliation runs and the gap report (README: Reconciliation).

    `serve` and `relay` schedule, per store and app whose API credentials are configured, a frequent
    run (failures only) every `frequent_minutes` and a daily run (every type) once per `daily_hours`,
    checked at each frequent tick against the mode's cursor, so a restart does not repeat it.
    `/readyz` is degraded while an app and source recovered more than `gap_threshold` facts in the
    last 24 h: the default 0 flags any fact push lost.
    """

    enabled: bool = True
    frequent_minutes: float = Field(default=15, gt=0, le=1440)
    daily_hours: float = Field(default=24, gt=0, le=24 * 7)
    first_run_delay_seconds: float = Field(default=30, ge=0, le=3600)
    gap_threshold: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _daily_not_more_often(self) -> ReconciliationSettings:
        if self.daily_hours * 60 < self.frequent_minutes:
            raise ValueError("daily_hours must not be shorter than frequent_minutes (the daily run is checked "
                             "at each frequent tick)")
        return self


class FileSettings(_Strict):
    api_token: str | None = None
    database_url: str | None = None
    historical_horizon_hours: float = Field(default=72, gt=0)
    # a fact recovered by reconciliation is published up to this old (README: Reconciliation)
    reconciliation_publish_days: float = Field(default=30, gt=0)
    accept_unconfigured_apps: bool = False
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    database_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    migrate: bool | None = None
    apps: dict[str, AppSettings] = Field(default_factory=dict)
    log: LogSettings = Field(default_factory=LogSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    reconciliation: ReconciliationSettings = Field(default_factory=ReconciliationSettings)


class EnvSettings(BaseSettings):
    """The environment's say; it wins over the file for these keys."""

    model_config = SettingsConfigDict(env_prefix="SUBLEDGER_", extra="ignore")
    config: str | None = None
    api_token: str | None = None
    database_url: str | None = None
    database_timeout_seconds: float | None = Field(default=None, gt=0, le=300)
    migrate: bool | None = None


class Settings(_Strict):
    api_token: str | None
    database_url: str | None
    historical_horizon: timedelta
    accept_unconfigured_apps: bool
    max_body_bytes: int
    apps: dict[str, AppSettings]
    source: str
    # How long a request or command waits for the database before "database unavailable".
    database_timeout_seconds: float = 5.0
    # serve/relay/ingest at start: None migrates only when the role may (owns the schema); True always
    # tries; False never does, and refuses to run on a schema that is behind.
    migrate: bool | None = None
    log: LogSettings = Field(default_factory=LogSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    # a fact recovered by reconciliation is published up to this old (outbox/ingest._horizon)
    reconciliation_publish: timedelta = timedelta(days=30)
    reconciliation: ReconciliationSettings = Field(default_factory=ReconciliationSettings)

    def destinations(self, library_version: str | None = None) -> dict[str, tuple[Destination, ...]]:
        lib = library_version or package_version()
        return {
            app_id: tuple(_destination(app_id, name, d, lib) for name, d in app.destinations.items())
            for app_id, app in self.apps.items()
        }

    def knows(self, app_id: str) -> bool:
        return self.accept_unconfigured_apps or app_id in self.apps


def _destination(app_id: str, name: str, d: DestinationSettings, lib: str) -> Destination:
    names = dict(DEFAULT_EVENT_NAMES)
    names.update(d.event_names)
    return Destination(
        name=name,
        app_id=app_id,
        event_names=names,
        revenue_mode=d.revenue_mode,
        commission=Commission(**d.commission.model_dump()),
        tax_rates=d.tax_rates,
        default_tax_rate=d.default_tax_rate,
        currency=d.currency,
        rates=d.rates,
        send_sandbox=d.send_sandbox,
        publish_historical=d.publish_historical,
        library_version=lib,
    )


def _expand(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{_key(k)}" if path else _key(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        match = _ENV_REF.match(value)
        if match:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(path, f"refers to environment variable {name}, which is not set")
            return os.environ[name]
    return value


def _check_grace(parsed: FileSettings) -> None:
    """An inferred expiration is dated at its period's end and noticed `grace` later: with a grace at or
    past the historical horizon every inferred expiration would be history, and none would be sent."""
    for app_id, app in parsed.apps.items():
        if app.expiration_grace_hours >= parsed.historical_horizon_hours:
            raise ConfigError(
                f'apps."{app_id}".expiration_grace_hours',
                f"must be less than historical_horizon_hours ({parsed.historical_horizon_hours:g})",
            )


def check_routing_keys(apps: dict[str, AppSettings]) -> None:
    """Cross-app rules a single model cannot see: one app per Apple bundle id and per Play and
    Amazon package name (the routing keys). The one implementation: `load` applies it, and `build_sources` again
    for settings assembled without `load` (a `model_copy`), so a body is never routed by a key two
    apps claim."""
    for source, field, what in (("apple", "bundle_id", "bundle id"), ("google", "package_name", "package name"),
                                ("amazon", "package_name", "package name")):
        owners: dict[str, str] = {}
        for app_id, app in apps.items():
            section = getattr(app, source)
            if section is None:
                continue
            routing_key: str = getattr(section, field) or app_id  # default: the app's key
            if routing_key in owners:
                raise ConfigError(f"apps.{_key(app_id)}.{source}.{field}",
                                  f"{routing_key!r} is already the {what} of app {owners[routing_key]!r}")
            owners[routing_key] = app_id


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'"{k}"'


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(_key(str(part)) for part in loc)


def load(path: str | Path | None = None) -> Settings:
    """Read, expand and validate the configuration; raise ConfigError naming the bad key."""
    try:
        env = EnvSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError("SUBLEDGER_" + str(first["loc"][0]).upper(), validation_reason(first)) from None
    chosen = path or env.config
    raw: dict[str, Any] = {}
    source = "defaults"
    if chosen:
        file = Path(chosen)
        raw = _read_toml(file)
        source = str(file)
    return _validated(raw, source, env)


def _read_toml(file: Path) -> dict[str, Any]:
    """The file's TOML; every way a path can fail is one ConfigError naming the file (never a traceback)."""
    where = f"file {file}"
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "not found") from None
    except IsADirectoryError:
        raise ConfigError(where, "is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(where, "cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot be read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"is not valid TOML: {exc}") from None


def from_dict(data: dict[str, Any]) -> Settings:
    """Settings from an in-memory mapping (tests, the demo), validated like a file."""
    return _validated(data, "dict", None)


def _validated(raw: dict[str, Any], source: str, env: EnvSettings | None) -> Settings:
    try:
        parsed = FileSettings.model_validate(_expand(raw, ""))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc, reason = first["loc"], validation_reason(first)
        if loc and loc[-1] == "[key]":  # a mapping's key is wrong, not its value
            loc, reason = loc[:-1], f"is not a valid key; {reason}"
        raise ConfigError(_loc(loc) or "(top level)", reason) from None
    check_routing_keys(parsed.apps)
    _check_grace(parsed)
    return Settings(
        api_token=(env.api_token if env else None) or parsed.api_token,
        database_url=(env.database_url if env else None) or parsed.database_url,
        historical_horizon=timedelta(hours=parsed.historical_horizon_hours),
        reconciliation_publish=timedelta(days=parsed.reconciliation_publish_days),
        accept_unconfigured_apps=parsed.accept_unconfigured_apps,
        max_body_bytes=parsed.max_body_bytes,
        apps=parsed.apps,
        source=source,
        log=parsed.log,
        retention=parsed.retention,
        reconciliation=parsed.reconciliation,
        database_timeout_seconds=(env.database_timeout_seconds if env else None) or parsed.database_timeout_seconds,
        migrate=parsed.migrate if env is None or env.migrate is None else env.migrate,
    )

