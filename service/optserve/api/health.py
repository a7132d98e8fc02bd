"""Liveness and readiness: /healthz says the process answers, /readyz that the store does too."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from .http import json_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="The store is reachable (503 store_unavailable otherwise)")
async def readyz(request: Request) -> Response:
    await request.app.state.store.ping()  # StoreUnavailable becomes a 503 problem
    return json_response({"status": "ready"})
