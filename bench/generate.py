"""Deterministic synthetic event streams: a realistic lifecycle mix, about ten events per subscription."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

APP = "com.bench.app"
START = datetime(2026, 1, 1, tzinfo=UTC)
PRODUCTS = ["monthly", "yearly", "monthly_pro"]
COUNTRIES = ["US", "DE", "GB", "FR", "JP", "BR"]
STORES = ["app_store", "play_store", "stripe"]


def lifecycle(rng: random.Random, n: int) -> list[dict[str, Any]]:
    sub = f"sub{n:08d}"
    user = f"user{n:08d}" if rng.random() < 0.8 else None
    store = rng.choice(STORES)
    at = START + timedelta(minutes=rng.randrange(0, 60 * 24 * 30))
    trial = rng.random() < 0.4
    product = rng.choice(PRODUCTS)
    country = rng.choice(COUNTRIES)
    events: list[dict[str, Any]] = []

    def add(kind: str, **extra: Any) -> None:
        item: dict[str, Any] = {
            "id": f"{sub}-{len(events)}", "app_id": APP, "type": kind, "occurred_at": at.isoformat(),
            "subscription_id": sub, "store": store, "country_code": country,
        }
        if user:
            item["app_user_id"] = user
        item.update(extra)
        events.append(item)

    period = timedelta(days=30)
    add("purchase", product_id=product, period_type="trial" if trial else "normal",
        price="0" if trial else "9.99", currency="USD", expires_at=(at + period).isoformat(),
        transaction_id=f"{sub}-t0")
    renewals = rng.randint(3, 8)
    for r in range(renewals):
        at += period
        if rng.random() < 0.1:
            add("billing_issue")
            at += timedelta(days=1)
            add("billing_recovered", product_id=product, price="9.99", currency="USD",
                expires_at=(at + period).isoformat(), transaction_id=f"{sub}-t{r + 1}")
        else:
            add("renewal", product_id=product, price="9.99", currency="USD",
                expires_at=(at + period).isoformat(), transaction_id=f"{sub}-t{r + 1}")
        if rng.random() < 0.05:
            add("product_change", new_product_id=rng.choice(PRODUCTS))
    at += timedelta(days=rng.randint(1, 20))
    add("auto_renew_disabled", reason="unsubscribe")
    if rng.random() < 0.2:
        at += timedelta(days=1)
        add("auto_renew_enabled")
        at += timedelta(days=1)
        add("auto_renew_disabled")
    at += timedelta(days=10)
    add("expiration", reason="unsubscribe")
    return events


def events(count: int, seed: int = 42) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    produced = 0
    n = 0
    while produced < count:
        for item in lifecycle(rng, n):
            if produced >= count:
                return
            yield item
            produced += 1
        n += 1


def write_ndjson(path: str, count: int, seed: int = 42) -> None:
    with open(path, "w") as f:
        for item in events(count, seed):
            f.write(json.dumps(item, separators=(",", ":")) + "\n")
