"""The committed OpenAPI contract (clients/openapi.json) must match what the server serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from optserve.cli import openapi_document

COMMITTED = Path(__file__).resolve().parent.parent / "clients" / "openapi.json"


def test_committed_openapi_matches_the_app():
    assert COMMITTED.read_text() == openapi_document(), (
        "clients/openapi.json is out of date: regenerate it with "
        "`.venv/bin/optserve openapi --output clients/openapi.json`"
    )


def test_served_openapi_matches_the_committed_contract(api_url):
    served = httpx.get(f"{api_url}/openapi.json").json()
    assert served == json.loads(COMMITTED.read_text())


def test_every_route_documents_its_bodies():
    spec = json.loads(COMMITTED.read_text())
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"
            if method in ("post", "put", "patch"):
                assert "requestBody" in operation, f"{method.upper()} {path}"
            if path.startswith("/v1/"):
                errors = operation["responses"]["422"]["content"]["application/problem+json"]
                assert errors["schema"]["$ref"].endswith("/Problem")
