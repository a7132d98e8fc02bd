"""The /v1/sessions routes: each reads as the HTTP contract and hands the meaning to the engine."""

from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from ..auth import CurrentTenant, current_tenant
from ..engine.errors import EngineError, invalid_session
from ..engine.pushes import PushRequest
from ..wire import SAFETENSORS, decode_json_object, decode_message, request_media_type
from . import schemas
from .http import (
    AppSettings,
    Service,
    TensorDtype,
    etag,
    json_response,
    parse_version_header,
    read_body,
    response_format,
    tensor_output,
    tensor_response,
)
from .state_wire import decode_state, encode_state

# Every route needs the caller's tenant (auth.py); FastAPI runs the dependency once per request.
router = APIRouter(
    prefix="/v1/sessions",
    tags=["sessions"],
    responses=schemas.ERRORS,
    dependencies=[Depends(current_tenant)],
)

CREATE_FIELDS = {
    "optimizer", "tensors", "mode", "lr_schedule", "clip_grad_norm", "nonfinite", "name",
    "max_staleness", "staleness", "ttl_s",
}  # fmt: skip
MAX_IDEMPOTENCY_KEY = 255
PUSH_FIELDS = {"base_version", "worker"}

# Which safetensors bodies may carry F16/BF16 tensors (upcast exactly to float32 on arrival):
# - gradients: yes, the point of the cheaper wire; a gradient is consumed once, and the optimizer
#   adds it to float32 state, so an exact upcast loses nothing the client did not already round;
# - a new session's params: yes, nothing is stored yet; pretrained weights often ship in BF16 and
#   the session then starts from exactly those values, kept in float32 from there on;
# - PUT params and PUT state: no (400). Both overwrite float32 values the session holds; a worker
#   that read params back with ?dtype=bf16 and PUT them would silently cut every weight to 8
#   significant bits, and a checkpoint must restore bit-exactly.


async def owned_session(sid: str, tenant: CurrentTenant, service: Service) -> str:
    """The path's session id, if the caller's tenant owns it; 404 `session_not_found` (the same
    answer as for a session that does not exist) if it is another tenant's."""
    await service.tenancy.check(sid, tenant.name)
    return sid


#: `{sid}` of a route, checked to belong to the caller.
OwnedSession = Annotated[str, Depends(owned_session)]


def _only(fields: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise invalid_session(f"unknown {what} field(s): {', '.join(unknown)}")


@router.post(
    "",
    status_code=201,
    response_model=schemas.Session,
    openapi_extra=schemas.body(schemas.SessionCreate, tensors_in="params"),
    summary="Create a session",
)
async def create_session(
    request: Request, service: Service, settings: AppSettings, tenant: CurrentTenant
) -> Response:
    body = await read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type")
    message = decode_message(body, content_type, "params", required=False, upcast=True)
    _only(message.fields, CREATE_FIELDS, "session")
    session = await service.create(message.fields, message.tensors, tenant.name)
    location = f"/v1/sessions/{session['id']}"
    return json_response(session, 201, {"Location": location, "ETag": etag(session["version"])})


@router.get("", response_model=schemas.SessionList, summary="List sessions")
async def list_sessions(
    service: Service,
    tenant: CurrentTenant,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # Redis ranges are 64-bit signed
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    return json_response({"sessions": await service.list(offset, limit, tenant.name)})


@router.get("/{sid}", response_model=schemas.Session, summary="Read a session")
async def get_session(sid: OwnedSession, service: Service) -> Response:
    session = await service.get(sid)
    return json_response(session, headers={"ETag": etag(session["version"])})


@router.patch(
    "/{sid}",
    response_model=schemas.Session,
    openapi_extra=schemas.body(schemas.SessionPatch),
    summary="Change hyperparameters in flight",
)
async def patch_session(
    sid: OwnedSession, request: Request, service: Service, settings: AppSettings
) -> Response:
    changes = decode_json_object(await read_body(request, settings.max_body_bytes))
    return json_response(await service.patch(sid, changes))


@router.delete("/{sid}", status_code=204, summary="Delete a session and all its keys")
async def delete_session(sid: OwnedSession, service: Service) -> Response:
    await service.delete(sid)
    return Response(status_code=204)


@router.get(
    "/{sid}/params",
    response_model=schemas.Params,
    responses=schemas.TENSOR_RESPONSE,
    summary="Current parameters (long-poll with after_version and wait_s; 304 at the deadline)",
)
async def get_params(
    sid: OwnedSession,
    request: Request,
    service: Service,
    settings: AppSettings,
    names: Annotated[str | None, Query(description="Comma-separated tensor names")] = None,
    after_version: Annotated[int | None, Query(ge=0)] = None,
    wait_s: Annotated[float, Query(ge=0)] = 0.0,
    dtype: TensorDtype = None,
) -> Response:
    negotiated = response_format(request, dtype)
    if after_version is not None:
        wait = min(wait_s, settings.long_poll_max_s)
        if not await service.wait_for_version(sid, after_version, wait):
            version = (await service.get(sid))["version"]
            return Response(status_code=304, headers={"ETag": etag(version)})
    selected = [n for n in names.split(",") if n] if names is not None else None
    output = tensor_output(negotiated)
    result = await service.get_params(sid, selected, output.allocate if output else None)
    return tensor_response(
        negotiated, result.params, {"version": result.version}, "params",
        {"ETag": etag(result.version)}, output,
    )  # fmt: skip


@router.put(
    "/{sid}/params",
    response_model=schemas.Version,
    openapi_extra=schemas.body(schemas.ParamsPut, tensors_in="params"),
    summary="Replace parameter values (optimizer state untouched)",
)
async def put_params(
    sid: OwnedSession,
    request: Request,
    service: Service,
    settings: AppSettings,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    body = await read_body(request, settings.max_body_bytes)
    message = decode_message(body, request.headers.get("content-type"), "params")
    _only(message.fields, set(), "params")
    if not message.tensors:
        raise invalid_session("no params to replace")
    version = await service.put_params(
        sid, message.tensors, parse_version_header("If-Match", if_match)
    )
    return json_response({"version": version}, headers={"ETag": etag(version)})


@router.post(
    "/{sid}/gradients",
    response_model=schemas.PushResponse,
    responses=schemas.TENSOR_RESPONSE,
    openapi_extra=schemas.body(schemas.GradientPush, tensors_in="grads"),
    summary="Push gradients: one optimizer step, updated params back",
)
async def push_gradients(
    sid: OwnedSession,
    request: Request,
    service: Service,
    settings: AppSettings,
    returning: Annotated[
        Literal["all", "pushed", "none"],
        Query(alias="return", description="Which params to send back"),
    ] = "all",
    idempotency_key: Annotated[
        str | None,
        Header(description="Retry-safe: a key seen before returns the first response"),
    ] = None,
    dtype: TensorDtype = None,
) -> Response:
    start = time.perf_counter()
    negotiated = response_format(request, dtype)  # a 406 before the step, not after
    body = await read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type")
    message = decode_message(body, content_type, "grads", upcast=True)
    _only(message.fields, PUSH_FIELDS, "push")
    _check_push_fields(message.fields)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise invalid_session(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    output = tensor_output(negotiated) if returning != "none" else None
    push = PushRequest(
        grads=message.tensors,
        returning=returning,
        base_version=message.fields.get("base_version"),
        worker=message.fields.get("worker"),
        idempotency_key=idempotency_key,
        body_digest=hashlib.sha256(body).hexdigest() if idempotency_key is not None else None,
        params_out=output.allocate if output is not None else None,
    )
    del body, message  # the gradients are decoded: free the raw body before the push runs
    result = await service.push(sid, push)
    fields: dict[str, Any] = {"version": result.version, "applied": result.applied}
    optional = (
        "skipped",
        "total_norm",
        "staleness",
        "params_version",
        "lr",
        "round",
        "round_workers",
    )
    for name in optional:
        value = getattr(result, name)
        if value is not None:
            fields[name] = value
    headers = {"ETag": etag(result.params_version or result.version)}  # the params' version
    if result.replayed:
        headers["Idempotency-Replayed"] = "true"
    response = tensor_response(negotiated, result.params, fields, "params", headers, output)
    codec = "safetensors" if request_media_type(content_type) == SAFETENSORS else "json"
    push_seconds = request.app.state.metrics.push_seconds.labels(result.mode, codec)
    push_seconds.observe(time.perf_counter() - start)
    return response


def _version_to_adopt(state: dict[str, Any]) -> int:
    if "version" not in state:
        raise EngineError("invalid_state", 'adopt_version needs the document\'s "version"')
    return state["version"]


def _check_push_fields(fields: dict[str, Any]) -> None:
    base = fields.get("base_version")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 0):
        raise invalid_session('"base_version" must be a non-negative integer')
    worker = fields.get("worker")
    if worker is not None and (not isinstance(worker, str) or not 0 < len(worker) <= 256):
        raise invalid_session('"worker" must be a string of 1 to 256 characters')


@router.get(
    "/{sid}/state",
    response_model=schemas.State,
    responses=schemas.TENSOR_RESPONSE,
    summary="Export params and the full optimizer state (a checkpoint)",
)
async def get_state(sid: OwnedSession, request: Request, service: Service) -> Response:
    exported = await service.export_state(sid)
    body, media_type = encode_state(exported, request.headers.get("accept"))
    return Response(body, media_type=media_type, headers={"ETag": etag(exported["version"])})


@router.put(
    "/{sid}/state",
    response_model=schemas.Version,
    openapi_extra=schemas.body(schemas.StatePut),
    summary="Restore params and the full optimizer state",
)
async def put_state(
    sid: OwnedSession,
    request: Request,
    service: Service,
    settings: AppSettings,
    if_match: Annotated[str | None, Header()] = None,
    adopt_version: Annotated[
        bool,
        Query(
            description="Take the document's version instead of adding one, so a checkpoint "
            "restored into a new session continues its count; it must be past the session's"
        ),
    ] = False,
) -> Response:
    body = await read_body(request, settings.max_body_bytes)
    media_type = request_media_type(request.headers.get("content-type"))
    state = decode_state(body, media_type == SAFETENSORS)
    version = await service.import_state(
        sid,
        state["tensors"],
        optimizer=state.get("optimizer"),
        schedule_state=state.get("lr_schedule_state"),
        lr_schedule=state.get("lr_schedule"),
        if_match=parse_version_header("If-Match", if_match),
        version=_version_to_adopt(state) if adopt_version else None,
    )
    return json_response({"version": version}, headers={"ETag": etag(version)})
