"""RFC 9457 problem details: every error leaves as application/problem+json with a stable `code`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import EngineError
from ..optim import OptimError
from ..store.errors import StoreUnavailable
from ..wire import WireError, encode_json

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://optserve.dev/problems/"

#: code -> (status, title). The codes are part of the API: never rename one.
CODES: dict[str, tuple[int, str]] = {
    "invalid_body": (400, "Malformed request body"),
    "unauthorized": (401, "Unauthorized"),
    "session_not_found": (404, "Session not found"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "not_acceptable": (406, "Not acceptable"),
    "not_representable": (406, "Not representable in the requested media type"),
    "conflict": (409, "Conflict"),
    "stale_gradient": (409, "Stale gradient"),
    "duplicate_in_round": (409, "Duplicate push in round"),
    "precondition_failed": (412, "Precondition failed"),
    "payload_too_large": (413, "Payload too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "unknown_optimizer": (422, "Unknown optimizer"),
    "invalid_hyperparameter": (422, "Invalid hyperparameter"),
    "unknown_tensor": (422, "Unknown tensor"),
    "shape_mismatch": (422, "Shape mismatch"),
    "non_finite": (422, "Non-finite gradient"),
    "invalid_session": (422, "Invalid session"),
    "invalid_state": (422, "Invalid optimizer state"),
    "invalid_request": (422, "Invalid request"),
    "idempotency_key_reused": (422, "Idempotency key reused"),
    "internal_error": (500, "Internal server error"),
    "store_unavailable": (503, "Store unavailable"),
    "round_timeout": (504, "Round timed out"),
}


class Problem(Exception):
    """Raise from a route to answer with a problem; `extra` members join the body."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None, **extra):
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra
        super().__init__(detail)


def problem_response(
    code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    status, title = CODES[code]
    body = {"type": TYPE_BASE + code, "title": title, "status": status, "detail": detail}
    body["code"] = code
    body.update(extra)
    return Response(encode_json(body), status, headers=headers, media_type=PROBLEM_JSON)


def _from_optim(error: OptimError) -> Response:
    extra: dict[str, Any] = {}
    for attribute in ("field", "allowed", "tensor", "tensors"):
        if hasattr(error, attribute):
            extra[attribute] = getattr(error, attribute)
    if hasattr(error, "value"):
        extra["value"] = _jsonable(error.value)
    return problem_response(error.code, str(error), **extra)


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | type(None)):
        return value if not (isinstance(value, float) and value != value) else str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem response."""

    @app.exception_handler(Problem)
    async def _problem(_: Request, error: Problem) -> Response:
        return problem_response(error.code, error.detail, error.headers, **error.extra)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, error: EngineError) -> Response:
        return problem_response(error.code, error.detail, **_jsonable(error.extra))

    @app.exception_handler(OptimError)
    async def _optim(_: Request, error: OptimError) -> Response:
        return _from_optim(error)

    @app.exception_handler(WireError)
    async def _wire(_: Request, error: WireError) -> Response:
        return problem_response(error.code, error.detail)

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, error: StoreUnavailable) -> Response:
        return problem_response(
            "store_unavailable", f"the store is unreachable: {error}", {"Retry-After": "1"}
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        return problem_response("invalid_request", "the request is not valid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        if code is None:
            code = "invalid_body" if error.status_code == 400 else "internal_error"
        return problem_response(code, str(error.detail), dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> Response:
        return problem_response("internal_error", "an unexpected error occurred")
