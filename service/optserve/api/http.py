"""Request bodies in, negotiated tensor responses out: the parts every route shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, Query, Request
from fastapi.responses import Response

from ..config import Settings
from ..engine.sessions import SessionService
from ..wire import (
    F32,
    JSON,
    SAFETENSORS,
    ResponseFormat,
    SafetensorsOut,
    choose_response_format,
    encode_json,
    encode_message,
)
from .problems import Problem


def get_service(request: Request) -> SessionService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


Service = Annotated[SessionService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]

#: `?dtype=` on the routes that return params (the keys of wire.DTYPE_NAMES).
TensorDtype = Annotated[
    Literal["f32", "bf16"] | None,
    Query(
        description="Tensor dtype of the params returned: bf16 halves the bytes (rounded to "
        "nearest even; the session keeps float32) and answers in application/x-safetensors "
        "whatever Accept prefers, or 406 if Accept rules that out (JSON carries float32 only). "
        "Also asked for by the Accept parameter `application/x-safetensors; dtype=bf16`"
    ),
]


def response_format(request: Request, dtype: str | None) -> ResponseFormat:
    """Negotiate a tensor response before doing the work, so a 406 changes nothing."""
    return choose_response_format(request.headers.get("accept"), dtype)


async def read_body(request: Request, limit: int) -> bytes | memoryview:
    """The whole body, refused with 413 as soon as it is known to be over `limit` bytes (a JSON
    body: over `max_json_body_bytes`, since parsing it costs many times its size)."""
    if not is_safetensors(request.headers.get("content-type")):
        limit = min(limit, request.app.state.settings.max_json_body_bytes)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem("payload_too_large", f"body of {declared} bytes is over the {limit} limit")
    if declared is not None and declared.isdigit():
        return await _read_exactly(request, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem("payload_too_large", f"body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def is_safetensors(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == SAFETENSORS


async def _read_exactly(request: Request, length: int) -> bytes | memoryview:
    """A body of known length read into one preallocated buffer: no list of chunks to join, so
    a large upload costs one copy of itself, not two; and writable, so the safetensors decoder
    can take its tensors as views of it."""
    if length < 2**16:
        return b"".join([chunk async for chunk in request.stream()])
    body = memoryview(np.empty(length, np.uint8))  # not zero-filled: every byte is written below
    size = 0
    async for chunk in request.stream():
        end = size + len(chunk)
        if end > length:
            raise Problem("invalid_body", "the body is longer than its Content-Length")
        body[size:end] = chunk
        size = end
    if size != length:
        raise Problem("invalid_body", "the body is shorter than its Content-Length")
    return body


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None):
    return Response(encode_json(body), status, headers=dict(headers or {}), media_type=JSON)


def tensor_response(
    response_format: ResponseFormat,
    tensors: Mapping[str, np.ndarray],
    fields: Mapping[str, Any],
    tensor_field: str,
    headers: Mapping[str, str] | None = None,
    prepared: SafetensorsOut | None = None,
) -> Response:
    """Encode as negotiated (`response_format`): JSON by default, safetensors when preferred;
    `prepared`: the body the tensors were written into (see `tensor_output`), if it takes them."""
    media_type = response_format.media_type
    body = prepared.finish(tensors, fields) if prepared is not None else None
    if body is None:
        body = encode_message(tensors, fields, tensor_field, media_type, response_format.dtype)
    return Response(body, 200, headers=dict(headers or {}), media_type=media_type)


def tensor_output(response_format: ResponseFormat) -> SafetensorsOut | None:
    """A response body to copy returned tensors straight into, when the negotiated format
    stores them as they are (float32 safetensors); None for JSON and bf16, which convert."""
    if response_format.media_type == SAFETENSORS and response_format.dtype == F32:
        return SafetensorsOut()
    return None


def etag(version: int) -> str:
    return f'"{version}"'


def parse_version_header(name: str, value: str | None) -> int | None:
    """A version from If-Match / ETag form: `"12"`, `W/"12"` or `12`."""
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise Problem("invalid_request", f'{name} must be a session version such as "12"')
    return int(text)
