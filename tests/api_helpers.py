"""Small helpers for talking to a live optserve in tests: JSON and safetensors bodies."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

ST = "application/x-safetensors"


def tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array, dtype=np.float32)
    return {"shape": list(array.shape), "data": array.reshape(-1).tolist()}


def from_json(spec: dict[str, Any]) -> np.ndarray:
    return np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])


def st_body(tensors: dict[str, np.ndarray], **fields: Any) -> bytes:
    metadata = {k: json.dumps(v) for k, v in fields.items()}
    return st_save({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, metadata)


def st_parse(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    header_len = int.from_bytes(body[:8], "little")
    metadata = json.loads(body[8 : 8 + header_len]).get("__metadata__", {})
    return st_load(body), {k: json.loads(v) for k, v in metadata.items()}


def create(client: httpx.Client, optimizer: dict, params: dict[str, np.ndarray], **fields) -> dict:
    body = {"optimizer": optimizer, "params": {k: tensor(v) for k, v in params.items()}, **fields}
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def push(client: httpx.Client, sid: str, grads: dict[str, np.ndarray], **fields) -> dict:
    body = {"grads": {k: tensor(v) for k, v in grads.items()}, **fields}
    response = client.post(f"/v1/sessions/{sid}/gradients", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def state(client: httpx.Client, sid: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The full state, bit-exact: every array's bytes (params and state) and every field."""
    response = client.get(f"/v1/sessions/{sid}/state", headers={"accept": ST})
    assert response.status_code == 200, response.text
    tensors, fields = st_parse(response.content)
    return {name: array.tobytes() for name, array in tensors.items()}, fields


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"].endswith(code)
    return problem
