"""Request ids and logs: every response carries X-Request-ID (the client's sane one, else a new
one), problems quote it, and the server's stderr is one JSON object per line, with one access
line per request under that id (read from the real server's log file)."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis

from optserve.logs import JsonFormatter, RequestIdFilter, TextFormatter, request_id
from optserve.store import keys

from .api_helpers import tensor

HEX32 = "0123456789abcdef"


def log_entries(path: Path, rid: str, *, want: int = 1, timeout: float = 10.0) -> list[dict]:
    """The JSON log lines of request `rid`, once at least `want` are written (the access line
    is written just after the response is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [
            json.loads(line)
            for line in path.read_text().splitlines()
            if rid in line and line.startswith("{")
        ]
        entries = [e for e in entries if e.get("request_id") == rid]
        if len(entries) >= want or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def access_line(path: Path, rid: str) -> dict:
    lines = [e for e in log_entries(path, rid) if e["logger"] == "optserve.access"]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=30) as client:
        yield client


def test_a_sane_request_id_is_kept_returned_and_logged(client, api_server):
    rid = f"trace-{uuid.uuid4()}.a:B/7+=@~"
    response = client.get("/healthz", headers={"X-Request-ID": rid})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == rid
    line = access_line(api_server.log_path, rid)
    assert line["level"] == "info"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", 200)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["time"].endswith("Z") and datetime.fromisoformat(line["time"])
    assert line["message"].startswith("GET /healthz 200 ")


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "", 'quo"te', "new\\nline"])
def test_an_insane_request_id_is_replaced(client, api_server, sent):
    response = client.get("/readyz", headers={"X-Request-ID": sent})
    rid = response.headers["x-request-id"]
    assert rid != sent and len(rid) == 32 and set(rid) <= set(HEX32)
    assert access_line(api_server.log_path, rid)["path"] == "/readyz"


def test_without_a_request_id_each_response_gets_a_new_one(client):
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(rid) == 32 for rid in ids)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/sessions/nosuch/gradients", {"grads": {"w": tensor([1])}}, 404,
         "session_not_found"),
        ("POST", "/v1/sessions", {"optimizer": {"name": "nope"}}, 422, "unknown_optimizer"),
        ("GET", "/v1/sessions?limit=0", None, 422, "invalid_request"),
        ("GET", "/no/such/path", None, 404, "not_found"),
        ("PUT", "/healthz", None, 405, "method_not_allowed"),
    ],
)  # fmt: skip
def test_problems_quote_the_request_id(client, api_server, method, path, body, status, code):
    rid = f"err-{uuid.uuid4()}"
    response = client.request(method, path, json=body, headers={"X-Request-ID": rid})
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == rid
    problem = response.json()
    assert (problem["code"], problem["request_id"]) == (code, rid)
    assert access_line(api_server.log_path, rid)["status"] == status


def test_an_unhandled_error_is_a_500_problem_logged_with_its_id(client, api_server, redis_url):
    sid = "e" * 32  # its meta is a string, not a hash: the store's WRONGTYPE error escapes
    with redis.Redis.from_url(redis_url) as direct:
        direct.set(keys.meta_key(sid), "not a hash")
    rid = f"boom-{uuid.uuid4()}"
    response = client.get(f"/v1/sessions/{sid}", headers={"X-Request-ID": rid})
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["x-request-id"] == rid
    assert response.json()["code"] == "internal_error"
    assert response.json()["request_id"] == rid
    entries = log_entries(api_server.log_path, rid, want=2)
    error = next(e for e in entries if e["level"] == "error")
    assert "WRONGTYPE" in error["exception"]
    assert error["message"] == f"unhandled error in GET /v1/sessions/{sid}"
    assert next(e for e in entries if e["logger"] == "optserve.access")["status"] == 500


def test_the_server_log_is_one_json_object_per_line(client, api_server):
    client.get("/healthz")
    lines = api_server.log_path.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry), line
    started = [json.loads(line)["message"] for line in lines]
    assert any(message.startswith("Uvicorn running on") for message in started)


def test_formatters_carry_the_context_request_id_extras_and_tracebacks():
    record_filter = RequestIdFilter()
    token = request_id.set("rid-1")
    try:
        try:
            raise ValueError("bad value")
        except ValueError:
            record = logging.LogRecord(
                "optserve.x", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
            )
        record.sid = "s1"  # as logged with extra={"sid": "s1"}
        record_filter.filter(record)
    finally:
        request_id.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "rid-1" and entry["sid"] == "s1"
    assert entry["level"] == "error" and entry["logger"] == "optserve.x"
    assert entry["message"] == "failed x"
    assert "ValueError: bad value" in entry["exception"]
    outside = logging.LogRecord("optserve.y", logging.INFO, __file__, 1, "hello", (), None)
    record_filter.filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
    assert " INFO optserve.y [-] hello" in TextFormatter().format(outside)
