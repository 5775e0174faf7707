"""The HTTP service: canonical ingestion, store webhooks, audit, outbox operations and health, over one pool.

`create_app` wires the routers (one module each) to the services and the pool; what they share
(request context, error bodies, the bearer check) is in `app.http.common`. Every refusal is a 4xx
with a JSON body naming the problem; nothing is stored for a refused item.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from subledger.app import console
from subledger.app.amazon_api import Certificates, keeper
from subledger.app.bootstrap import Services
from subledger.app.http import amazon, audit, docs, events, health, outbox, subscribers, webhooks
from subledger.app.http.common import install_error_handlers
from subledger.app.http.guard import RefuseUnstorableText
from subledger.app.sources import build_sources
from subledger.outbox.group_commit import GroupCommit
from subledger.store.db import Pool


def create_app(services: Services, *, pool_size: int = 8) -> FastAPI:
    pool = Pool(services.database_url, timeout=services.database_timeout, max_size=pool_size)
    # every append of every route shares transactions with its concurrent neighbours (group commit)
    committer = GroupCommit(pool, services.policy, services.clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        committer.start()
        try:
            yield
        finally:
            committer.close()  # after uvicorn answered the last request: what is queued commits first
            pool.close()

    app = FastAPI(title="subledger", version="1", lifespan=lifespan)
    docs.install(app)
    app.add_middleware(RefuseUnstorableText)  # NUL / lone surrogates in a path or query: 400 on every route
    app.state.services = services
    app.state.pool = pool
    app.state.committer = committer
    install_error_handlers(app)
    app.include_router(events.router)
    # the store adapters, built (and so validated) once; SNS certificates are kept as fetched
    sources = build_sources(services.settings, certificates=Certificates(keep=keeper(pool, services.clock)))
    app.include_router(webhooks.webhook_router(services, pool, committer, sources))
    app.include_router(amazon.amazon_router(services, pool, committer, sources))
    app.include_router(health.router)
    app.include_router(audit.router)
    app.include_router(outbox.router)
    app.include_router(subscribers.router)
    console.install(app)  # /console: HTML pages, signed-in by cookie or bearer (app/console/)
    return app
