"""Schemathesis against /openapi.json and a real `optserve serve` that needs keys.

The schema is loaded from the committed contract, clients/openapi.json, which test_openapi.py
keeps equal to what the server serves at /openapi.json (schemathesis' lazy fixture loader, which
would fetch it from the live server, does not run under this pytest).

A bounded number of generated requests per operation (MAX_EXAMPLES), sent with tenant team-a's
key. Checks: no 5xx, and every error is application/problem+json with a stable `code` that
api/problems.py defines. Half of the requests that name a session name a real one (created per
test), so generated bodies reach the codecs and the engine, not only the 404.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from optserve.api.problems import CODES

from .api_helpers import tensor
from .conftest import KEY_A, ServerProcess

#: Per operation; raise it for a deeper run: OPTSERVE_TEST_SCHEMATHESIS_EXAMPLES=500 pytest ...
MAX_EXAMPLES = int(os.environ.get("OPTSERVE_TEST_SCHEMATHESIS_EXAMPLES", "12"))
AUTH = {"Authorization": f"Bearer {KEY_A}"}


@schemathesis.check
def problem_details(ctx, response, case) -> None:
    """Every 4xx/5xx is RFC 9457 problem+json with a `code` of ours and the matching status."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/problem+json"), (response.status_code, content_type)
    problem = response.json()
    assert problem.get("code") in CODES, problem
    assert problem["status"] == response.status_code == CODES[problem["code"]][0], problem


@schemathesis.serializer("application/x-safetensors")
def raw_bytes(ctx, value) -> dict[str, bytes]:
    """Generated safetensors bodies (arbitrary bytes) are sent as they are."""
    data = getattr(value, "data", value)
    return {"data": data if isinstance(data, bytes) else str(data).encode()}


@pytest.fixture
def real_session(auth_server: ServerProcess, redis_url: str) -> str:
    body = {"optimizer": {"name": "adam"}, "params": {"w": tensor(np.ones(3, np.float32))}}
    response = httpx.post(f"{auth_server.url}/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()["id"]


CONTRACT = Path(__file__).resolve().parents[1] / "clients" / "openapi.json"
schema = schemathesis.openapi.from_path(CONTRACT)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_every_generated_request_with_a_problem_or_success(
    case, auth_server: ServerProcess, real_session: str
) -> None:
    sid = (case.path_parameters or {}).get("sid")
    if isinstance(sid, str) and len(sid) % 2 == 0:
        case.path_parameters["sid"] = real_session
    case.call_and_validate(
        base_url=auth_server.url, headers=AUTH, checks=[not_a_server_error, problem_details]
    )
