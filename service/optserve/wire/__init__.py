"""Tensor wire codecs (JSON and safetensors) and content negotiation, used by the API layer only.

Decoded tensors are writable, C-contiguous, native float32 arrays. Every client-caused failure is
a WireError carrying a stable `code`, an HTTP `status` and a `detail` for problem+json.
The caller bounds body size and tensor count before calling: these functions trust neither.
"""

from __future__ import annotations

from .codec import decode_message, encode_message
from .errors import WireError
from .json_codec import decode_json_object, decode_json_tensor, encode_json, encode_json_tensor
from .media import JSON, SAFETENSORS, choose_response_type, request_media_type
from .message import Message

__all__ = [
    "JSON",
    "SAFETENSORS",
    "Message",
    "WireError",
    "choose_response_type",
    "decode_json_object",
    "decode_json_tensor",
    "decode_message",
    "encode_json",
    "encode_json_tensor",
    "encode_message",
    "request_media_type",
]
