"""RFC 9457 problem details: every error leaves as application/problem+json with a stable `code`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from ..engine.errors import EngineError
from ..logs import request_id
from ..optim import OptimError
from ..store.errors import StoreUnavailable
from ..wire import WireError, encode_json

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://optserve.dev/problems/"
#: The name of the gradient push route (api/sessions.py): its problems are counted by code.
PUSH_ROUTE = "push_gradients"

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
    "too_many_elements": (413, "Too many tensor elements"),
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
    "too_many_tensors": (422, "Too many tensors"),
    "too_many_sessions": (422, "Too many sessions"),
    "rate_limited": (429, "Too many requests"),
    "internal_error": (500, "Internal server error"),
    "store_unavailable": (503, "Store unavailable"),
    "owner_unavailable": (503, "Session owner unavailable"),
    # Answered by the proxy of deploy/nginx.conf, not by the app: no replica could be reached.
    "api_unavailable": (503, "API unavailable"),
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


class ProblemResponse(Response):
    """A problem+json response that remembers its `code` (counted for refused pushes)."""

    media_type = PROBLEM_JSON

    def __init__(self, code: str, body: bytes, status: int, headers: dict[str, str] | None):
        super().__init__(body, status, headers=headers)
        self.code = code


def problem_response(
    code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> ProblemResponse:
    """The problem for `code`; inside a request it carries the request's id as `request_id`
    (also the X-Request-ID header), to quote when asking for support."""
    status, title = CODES[code]
    body = {"type": TYPE_BASE + code, "title": title, "status": status, "detail": detail}
    body["code"] = code
    rid = request_id.get()
    if rid is not None:
        body["request_id"] = rid
    body.update(extra)
    return ProblemResponse(code, encode_json(body), status, headers)


def count_refused_push(scope: Scope, code: str) -> None:
    """A push answered with a problem: optserve_pushes_rejected_total{code} goes up."""
    route = scope.get("route")
    if getattr(route, "name", None) == PUSH_ROUTE:
        scope["app"].state.metrics.pushes_rejected.labels(code).inc()


def _from_optim(error: OptimError) -> ProblemResponse:
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


Handler = Callable[[Request, Any], Awaitable[ProblemResponse]]


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem response."""

    def handles(kind: type[Exception]) -> Callable[[Handler], Handler]:
        def register(answer: Handler) -> Handler:
            async def handle(request: Request, error: Any) -> ProblemResponse:
                response = await answer(request, error)
                count_refused_push(request.scope, response.code)
                return response

            app.add_exception_handler(kind, handle)
            return answer

        return register

    @handles(Problem)
    async def _problem(_: Request, error: Problem) -> ProblemResponse:
        return problem_response(error.code, error.detail, error.headers, **error.extra)

    @handles(EngineError)
    async def _engine(_: Request, error: EngineError) -> ProblemResponse:
        return problem_response(error.code, error.detail, **_jsonable(error.extra))

    @handles(OptimError)
    async def _optim(_: Request, error: OptimError) -> ProblemResponse:
        return _from_optim(error)

    @handles(WireError)
    async def _wire(_: Request, error: WireError) -> ProblemResponse:
        return problem_response(error.code, error.detail)

    @handles(StoreUnavailable)
    async def _store(_: Request, error: StoreUnavailable) -> ProblemResponse:
        return problem_response(
            "store_unavailable", f"the store is unreachable: {error}", {"Retry-After": "1"}
        )

    @handles(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> ProblemResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        return problem_response("invalid_request", "the request is not valid", errors=errors)

    @handles(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> ProblemResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        if code is None:
            code = "invalid_body" if error.status_code == 400 else "internal_error"
        return problem_response(code, str(error.detail), dict(error.headers or {}))

    @handles(Exception)
    async def _unexpected(_: Request, error: Exception) -> ProblemResponse:
        return problem_response("internal_error", "an unexpected error occurred")
