"""What `serve` and `relay` say when they start: where they are, what they will do, and what is missing.

A service that starts silently with no token, no configuration or no destination looks healthy
and does nothing useful; the summary says so on the first screen (and in the first log lines).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from subledger.app.bootstrap import Services
from subledger.app.settings import package_version
from subledger.app.wording import plural
from subledger.store.db import data_dir, display_url

log = logging.getLogger("subledger")


@dataclass
class StartupSummary:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def emit(self, logger: logging.Logger = log) -> None:
        for line in self.lines:
            logger.info(line)
        for warning in self.warnings:
            logger.warning(warning)


def summarize(
    services: Services,
    *,
    listen: str | None,
    relay: bool,
    explicit_url: str | None = None,
) -> StartupSummary:
    """`listen`: the HTTP address (None for `relay`); `relay`: whether this process delivers."""
    settings = services.settings
    summary = StartupSummary()
    what = f"serving on http://{listen}" if listen else "relay only (no HTTP)"
    summary.lines.append(f"subledger {package_version()} {what}")
    embedded = not (explicit_url or settings.database_url or os.environ.get("SUBLEDGER_DATABASE_URL"))
    where = f" (embedded PostgreSQL, data in {data_dir()})" if embedded else ""
    summary.lines.append(f"database: {display_url(services.database_url)}{where}")
    has_file = settings.source not in ("defaults", "dict")
    summary.lines.append(f"config: {settings.source if has_file else 'none (built-in defaults)'}")
    destinations = 0
    for app_id, app in sorted(settings.apps.items()):
        names = [f"{name} ({d.endpoint})" for name, d in sorted(app.destinations.items())]
        destinations += len(names)
        sources = [s for s in ("apple", "stripe", "revenuecat", "google", "amazon")
                   if getattr(app, s, None) is not None]
        summary.lines.append(
            f"app {app_id}: " + (", ".join(names) if names else "no destination")
            + (f"; webhooks: {', '.join(sources)}" if sources else "")
        )
    summary.lines.append(
        f"{plural(len(settings.apps), 'app')}, {plural(destinations, 'destination')}; "
        + ("relay on (this process delivers the outbox)" if relay
           else "relay off (run `subledger relay` or `serve` with the scheduler elsewhere)")
    )
    if listen and not settings.api_token:
        summary.warnings.append("no api_token: every /v1 route answers 401 until SUBLEDGER_API_TOKEN "
                                "(or api_token in the config) is set")
    if not has_file:
        summary.warnings.append("no configuration file (--config or SUBLEDGER_CONFIG): no app is configured")
    if not settings.apps and not settings.accept_unconfigured_apps:
        summary.warnings.append("no app is configured: every event is refused as 'not configured'")
    if destinations == 0:
        summary.warnings.append("no destination is configured: events are stored, nothing is sent")
    return summary
