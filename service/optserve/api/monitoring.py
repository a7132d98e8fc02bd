"""GET /metrics: the app's Prometheus metrics (optserve/metrics.py), open to scrapers without a key.

Kept out of the OpenAPI document: it is a text format for Prometheus, not part of the v1 API that
clients are generated from.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from ..metrics import Metrics
from ..store.errors import StoreUnavailable

router = APIRouter()
log = logging.getLogger("optserve.metrics")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    store = getattr(request.app.state, "store", None)
    if store is not None:
        try:  # awaited here, not in a collector: prometheus_client collects synchronously
            registry.open_sessions.set(await store.count())
        except StoreUnavailable as error:  # the rest is still worth scraping; /readyz says 503
            log.warning("open sessions not refreshed: %s", error)
    body, content_type = registry.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
