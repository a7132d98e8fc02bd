"""Pick the codec for a media type; the API layer calls these two functions and nothing deeper."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .json_codec import decode_json_message, encode_json_message
from .media import JSON, SAFETENSORS, request_media_type
from .message import F32, Message
from .safetensors_codec import decode_safetensors_message, encode_safetensors_message


def decode_message(
    body: bytes,
    content_type: str | None,
    tensor_field: str,
    required: bool = True,
    *,
    upcast: bool = False,
) -> Message:
    """Decode a request body by its Content-Type (missing means JSON).

    `tensor_field` names the JSON member holding the tensors ("grads", "params"); safetensors
    bodies carry tensors at top level, so it does not apply there. `upcast` lets safetensors
    bodies hold F16 and BF16 tensors too (decoded exactly to float32); JSON is float32 either way.
    Raises WireError: 415 for a foreign Content-Type, 400 for a malformed body.
    """
    if request_media_type(content_type) == SAFETENSORS:
        return decode_safetensors_message(body, upcast)
    return decode_json_message(body, tensor_field, required)


def encode_message(
    tensors: Mapping[str, np.ndarray],
    fields: Mapping[str, Any],
    tensor_field: str,
    media_type: str,
    dtype: str = F32,
) -> bytes:
    """Encode float32 tensors and JSON-able fields as `media_type` (from choose_response_type).

    `dtype` (from choose_response_format) is the safetensors tensor dtype, F32 or BF16.
    Raises WireError `not_representable` when the type cannot carry the data (NaN/inf in JSON),
    TypeError for non-float32 arrays, ValueError for an unknown media type or a dtype the media
    type cannot carry (BF16 in JSON: negotiation never picks it): the last two are bugs.
    """
    if media_type == JSON:
        if dtype != F32:
            raise ValueError(f"JSON carries float32 only, not {dtype!r}")
        return encode_json_message(tensors, fields, tensor_field)
    if media_type == SAFETENSORS:
        return encode_safetensors_message(tensors, fields, dtype)
    raise ValueError(f"cannot encode media type {media_type!r}")
