"""One training worker that rides out faults with the Python client's retries, for
tests/test_faults.py.

Like push_worker.py it makes its gradients from its own seed (multiples of 1/8 in [-2, 2], a
random non-empty subset of the tensors per push), waits at a file barrier, then pushes them; but
through `optserve_client.Client` with a patient RetryPolicy, so a push whose server was SIGKILLed
or whose store went down is sent again with the same Idempotency-Key until it is acknowledged.
Every HTTP attempt passes through a counting transport (a real httpx transport underneath), so
the output says which pushes met a 503 or a dropped connection. It writes one JSON document:

    {"worker": 3, "pushes": [{"grads": {...}, "version": 17, "replayed": false,
                              "params": {...}, "attempts": [200] or [503, "ConnectError", 200]}]}

A push the client finally gives up on is recorded with "error" (the test fails on it).

    python retry_worker.py --server URL --session SID --worker 3 --pushes 40 \
        --tensors '{"w": [4, 8], "b": [8]}' --barrier DIR --out FILE [--codec json|safetensors]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
from push_worker import make_pushes, wait_for_barrier  # this script's folder is on sys.path

from optserve_client import Client, OptservError, RetryPolicy

#: Patient enough to outlast an API restart (about a second, several under load) many times over.
POLICY = RetryPolicy(attempts=100, backoff=0.05, max_backoff=0.5)


class CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that notes each attempt's outcome: a status or an error's name."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[int | str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = super().handle_request(request)
        except httpx.TransportError as error:
            self.outcomes.append(type(error).__name__)
            raise
        self.outcomes.append(response.status_code)
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--pushes", type=int, required=True)
    parser.add_argument("--tensors", required=True, help='JSON {"name": shape}')
    parser.add_argument("--barrier", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--codec", choices=("json", "safetensors"), default="json")
    args = parser.parse_args()

    pushes = make_pushes(args.worker, args.pushes, json.loads(args.tensors), seed_base=2000)
    transport = CountingTransport()
    records: list[dict[str, Any]] = []
    client = Client(args.server, retries=POLICY, codec=args.codec, timeout=60, transport=transport)
    try:
        session = client.session(args.session)
        session.info()  # connected before the start
        wait_for_barrier(args.barrier, args.worker)
        for grads in pushes:
            record: dict[str, Any] = {
                "grads": {name: g.reshape(-1).tolist() for name, g in grads.items()}
            }
            transport.outcomes.clear()
            try:
                session.push(grads, base_version=None, returning="all")
            except OptservError as error:
                record["error"] = repr(error)
            else:
                result = session.last_push
                assert result is not None
                record.update(version=result.version, replayed=result.replayed)
                if not result.replayed:  # a replay carries the current params, not its own
                    record["params"] = {n: a.reshape(-1).tolist() for n, a in result.params.items()}
            record["attempts"] = list(transport.outcomes)
            records.append(record)
    finally:
        client.close()
        args.out.write_text(json.dumps({"worker": args.worker, "pushes": records}))


if __name__ == "__main__":
    main()
