"""The bundled sample notifications and the configuration they need, for `subledger demo`.

* `canonical_lifecycle.ndjson` — canonical events of app `com.example.fitness`.
* `stripe_lifecycle.ndjson` — Stripe webhook events of app `com.example.fitness.web` (trial →
  converted → renewal → cancellation → expiration), ingested as captured bodies (`--format stripe`).
* `apple_lifecycle.ndjson` — App Store Server Notifications V2 of app `com.example.fitness`, the
  same lifecycle. Apple does not sign samples for us, so these are signed by a throwaway demo chain
  shaped like Apple's (root → WWDR-marked intermediate → App Store-marked leaf; its private keys were
  discarded) and verified for real by Apple's `SignedDataVerifier` against the demo root in
  `apple_demo_root.json` — which the demo trusts instead of Apple Root CA G3. Never configure that
  root in production.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console

from subledger.app.bootstrap import Services
from subledger.app.stream_ingest import Summary, ingest_stream

DEMO_APP = "com.example.fitness"
STRIPE_DEMO_APP = "com.example.fitness.web"
DEMO_APP_APPLE_ID = 1234567890
DEMO_STRIPE_SECRET = "whsec_subledger_demo"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    fmt: str
    app_id: str | None = None


SAMPLES = (
    Sample("canonical_lifecycle.ndjson", "canonical"),
    Sample("apple_lifecycle.ndjson", "apple"),
    Sample("stripe_lifecycle.ndjson", "stripe", STRIPE_DEMO_APP),
)


def _package() -> Any:
    return files("subledger.app.samples")


def demo_root_der() -> bytes:
    """The demo chain's root certificate (DER) that verifies `apple_lifecycle.ndjson`."""
    data = json.loads(_package().joinpath("apple_demo_root.json").read_text())
    return base64.b64decode(data["der_base64"])


def demo_root_file(directory: Path | None = None) -> Path:
    """The demo root written to a file, as an operator saves Apple's root; the path is stable."""
    der = demo_root_der()
    folder = directory or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"subledger-demo-apple-root-{hashlib.sha256(der).hexdigest()[:12]}.cer"
    if not path.exists() or path.read_bytes() != der:
        path.write_bytes(der)
    return path


def sample_apps(destinations: dict[str, Any], directory: Path | None = None) -> dict[str, Any]:
    """The `apps` configuration the bundled samples need, every app sending to `destinations`."""
    return {
        DEMO_APP: {
            "destinations": json.loads(json.dumps(destinations)),
            "apple": {
                "app_apple_id": DEMO_APP_APPLE_ID,
                "root_certificates": [str(demo_root_file(directory))],
            },
        },
        STRIPE_DEMO_APP: {
            "destinations": json.loads(json.dumps(destinations)),
            "stripe": {"endpoint_secrets": [DEMO_STRIPE_SECRET]},
        },
    }


def ingest_samples(services: Services, console: Console | None = None) -> list[tuple[str, Summary]]:
    """Ingest every bundled sample through `subledger ingest`'s code path; (name, Summary) each.

    With a rich `console`, prints one line per sample as the demo shows it."""
    results = []
    for sample in SAMPLES:
        data = _package().joinpath(sample.name).read_bytes()
        summary = ingest_stream(
            services, io.BytesIO(data), sample.name, historical=False, fmt=sample.fmt, app_id=sample.app_id,
        )
        results.append((sample.name, summary))
        if console is not None:
            console.print(
                f"[bold]ingest[/bold] {sample.name} ({sample.fmt}): new {summary.new}, duplicate "
                f"{summary.duplicate}, rejected {summary.rejected}, transitions {summary.transitions}"
            )
    return results
