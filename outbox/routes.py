"""What a destination is for the relay: where one (app, destination) sends, with which key, how.

A route is the relay's whole view of the configuration: endpoint, write keys (a sandbox one for
sandbox events), gzip and the request timeout. `app` builds the routes from its settings with
`routes_from`; outbox never imports the app layer, so the settings are read through the two
protocols below (what a destination's settings must offer), not through their classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Route:
    """Where one (app, destination) sends: endpoint, keys and transport options."""

    app_id: str
    destination: str
    endpoint: str
    write_key: str
    sandbox_write_key: str | None = None
    gzip: bool = False
    timeout_seconds: float = 15.0

    def key_for(self, sandbox: bool) -> str:
        return self.sandbox_write_key if sandbox and self.sandbox_write_key else self.write_key

    def fingerprint(self) -> str:
        """Changes when the endpoint or a key changes: a paused destination resumes on a config change."""
        material = "\x1f".join((self.endpoint, self.write_key, self.sandbox_write_key or ""))
        return hashlib.sha256(material.encode()).hexdigest()[:16]


class DestinationConfig(Protocol):
    """What `routes_from` reads of one destination's settings (app.settings.DestinationSettings)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def write_key(self) -> str: ...
    @property
    def sandbox_write_key(self) -> str | None: ...
    @property
    def gzip(self) -> bool: ...
    @property
    def timeout_seconds(self) -> float: ...


class AppConfig(Protocol):
    """What `routes_from` reads of one app's settings (app.settings.AppSettings)."""

    @property
    def destinations(self) -> Mapping[str, DestinationConfig]: ...


def routes_from(apps: Mapping[str, AppConfig]) -> dict[tuple[str, str], Route]:
    """The routes of `Settings.apps`, keyed by (app_id, destination)."""
    return {
        (app_id, name): Route(
            app_id=app_id,
            destination=name,
            endpoint=d.endpoint,
            write_key=d.write_key,
            sandbox_write_key=d.sandbox_write_key,
            gzip=d.gzip,
            timeout_seconds=d.timeout_seconds,
        )
        for app_id, app in apps.items()
        for name, d in app.destinations.items()
    }
