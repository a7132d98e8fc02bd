"""Tensor wire codecs (JSON and safetensors) and content negotiation, used by the API layer only.

Decoded tensors are writable, C-contiguous, native float32 arrays (F16/BF16 safetensors input,
where the caller allows it, is upcast exactly); BF16 is also a safetensors response variant.
Every client-caused failure is a WireError carrying a stable `code`, an HTTP `status` and a
`detail` for problem+json.
The caller bounds body size and tensor count before calling: these functions trust neither.
"""

from __future__ import annotations

from .codec import decode_message, encode_message
from .errors import WireError
from .json_codec import decode_json_object, decode_json_tensor, encode_json, encode_json_tensor
from .media import (
    DTYPE_NAMES,
    JSON,
    SAFETENSORS,
    ResponseFormat,
    choose_response_format,
    choose_response_type,
    request_media_type,
)
from .message import BF16, F16, F32, Message
from .safetensors_codec import SafetensorsOut

__all__ = [
    "BF16",
    "DTYPE_NAMES",
    "F16",
    "F32",
    "JSON",
    "SAFETENSORS",
    "Message",
    "ResponseFormat",
    "SafetensorsOut",
    "WireError",
    "choose_response_format",
    "choose_response_type",
    "decode_json_object",
    "decode_json_tensor",
    "decode_message",
    "encode_json",
    "encode_json_tensor",
    "encode_message",
    "request_media_type",
]
