"""Request bodies in, negotiated tensor responses out: the parts every route shares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request
from fastapi.responses import Response

from ..config import Settings
from ..engine.sessions import SessionService
from ..wire import JSON, choose_response_type, encode_json, encode_message
from .problems import Problem


def get_service(request: Request) -> SessionService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


Service = Annotated[SessionService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem("payload_too_large", f"body of {declared} bytes is over the {limit} limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem("payload_too_large", f"body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None):
    return Response(encode_json(body), status, headers=dict(headers or {}), media_type=JSON)


def tensor_response(
    request: Request,
    tensors: Mapping[str, np.ndarray],
    fields: Mapping[str, Any],
    tensor_field: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Encode as the client's Accept asks: JSON by default, safetensors when preferred."""
    media_type = choose_response_type(request.headers.get("accept"))
    body = encode_message(tensors, fields, tensor_field, media_type)
    return Response(body, 200, headers=dict(headers or {}), media_type=media_type)


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
