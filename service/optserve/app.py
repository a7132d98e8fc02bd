"""create_app(): the FastAPI application, its routers, and the store it lives on."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import __version__
from .api import health, monitoring, problems, sessions
from .api.forward import ForwardToOwner
from .api.request_log import RequestLogMiddleware
from .auth import Authenticator
from .config import Settings, get_settings
from .engine.events import VersionEvents
from .engine.hot.service import HotSessionService
from .engine.lifetime import Lifetime
from .engine.limits import Limits
from .engine.sessions import SessionService
from .metrics import Metrics
from .store.embedded import EmbeddedValkey
from .store.errors import StoreUnavailable
from .store.hot_log import HotLog
from .store.redis_store import RedisStore
from .store.sweeper import sweeping
from .store.tenants import adopt_untenanted

log = logging.getLogger("optserve")


def limits_of(settings: Settings) -> Limits:
    """The bounds on what one session may cost, from the settings of the same names."""
    return Limits(
        max_tensors_per_session=settings.max_tensors_per_session,
        max_elements_per_tensor=settings.max_elements_per_tensor,
        max_elements_per_session=settings.max_elements_per_session,
        max_tensor_name_length=settings.max_tensor_name_length,
        max_sessions_per_tenant=settings.max_sessions_per_tenant,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; without OPTSERVE_REDIS_URL it starts (or adopts) the embedded Valkey."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded: EmbeddedValkey | None = None
        url, cluster = settings.redis_url, settings.redis_cluster
        if url is None:
            embedded = EmbeddedValkey(settings.data_dir, appendfsync=settings.fsync)
            url, cluster = await to_thread.run_sync(embedded.start), False
            log.info("embedded valkey at %s, data in %s", url, settings.data_dir.resolve())
        store = await RedisStore.connect(
            url,
            cluster=cluster,
            fsync_always=settings.fsync == "always",
            timeout_s=settings.store_timeout_s,
            health_check_interval=30,
            metrics=metrics,
        )
        if store.cluster:
            log.info("redis cluster client (%s)", "set" if cluster else "detected")
        auth = Authenticator.from_settings(settings, store.client)
        try:
            await auth.check_startup(settings.host)  # StartupRefused: open on a public address
        except BaseException:
            await store.close()
            if embedded is not None:
                await to_thread.run_sync(embedded.stop)
            raise
        app.state.auth = auth
        with contextlib.suppress(StoreUnavailable):  # sessions from before tenants: `default`'s
            await adopt_untenanted(store.client)
        events = VersionEvents(store.client)
        events.start()
        options = {
            "group_commit": settings.group_commit,
            "idempotency_ttl_s": settings.idempotency_ttl_s,
            "events": events,
            "lifetime": Lifetime(settings.session_ttl_s, settings.max_session_ttl_s),
            "metrics": metrics,
            "limits": limits_of(settings),
        }
        forward_client: httpx.AsyncClient | None = None
        if settings.engine == "hot":
            service: SessionService = _hot_service(settings, store, options)
            # no read timeout: a forwarded long-poll or sync round waits as long as the owner
            forward_client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=2.0))
            app.state.forward_client = forward_client
        else:
            service = SessionService(store, **options)
        app.state.store = store
        app.state.service = service
        try:
            async with sweeping(store, settings.sweep_interval_s):
                yield
        finally:
            await service.close(wait_s=settings.shutdown_timeout_s)
            if forward_client is not None:
                await forward_client.aclose()
            await events.stop()
            await store.close()
            if embedded is not None:
                await to_thread.run_sync(embedded.stop)

    app = FastAPI(
        title="optserve",
        version=__version__,
        summary="Optimizer as a service: shared torch.optim-exact optimizer state over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    if settings.cors_origins:
        # Browsers may call from these origins and read the headers the clients rely on.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "ETag",
                "Idempotency-Replayed",
                "Retry-After",
                "Location",
                "X-Request-ID",
            ],
            max_age=600,
        )
    if settings.engine == "hot":  # inside the request log: forwarded requests get an id too
        app.add_middleware(ForwardToOwner, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware)  # outermost: every response gets its id
    problems.install(app)
    app.include_router(health.router)
    app.include_router(monitoring.router)
    app.include_router(sessions.router)
    return app


def release_long_polls(app: FastAPI) -> None:
    """The server began its graceful shutdown: long-polls answer now, pushes carry on."""
    service: SessionService | None = getattr(app.state, "service", None)
    if service is not None:
        service.release_long_polls()


def _hot_service(settings: Settings, store: RedisStore, options: dict) -> HotSessionService:
    """The hot engine (OPTSERVE_ENGINE=hot): sessions in memory, pushes logged to Redis."""
    service = HotSessionService(
        store,
        log=HotLog(store.client, fsync_always=store.fsync_always, chunk_bytes=store.chunk_bytes),
        owner_id=secrets.token_hex(8),
        url=settings.own_url,
        lease_ms=settings.hot_lease_ms,
        snapshot_steps=settings.hot_snapshot_steps,
        snapshot_s=settings.hot_snapshot_s,
        **options,
    )
    service.start()
    log.info("hot engine: this process is %s at %s", service.owner_id, service.url)
    return service
