"""One training worker as its own OS process, for tests/test_concurrency.py.

It makes its gradients (multiples of 1/8 in [-2, 2], from its own seed; each push carries a
random non-empty subset of the tensors), waits at a barrier so that every worker starts pushing
at the same moment, pushes them over real HTTP (alternating between the servers given, push k of
worker w going to server (w + k) % len(servers)), and writes one JSON document with every push:
the gradients it sent, the status it got, when it was sent and answered (time.time()) and, when
acknowledged, the version and the params the server sent back. A push is acknowledged only by a
200; nothing is retried, unless --retry-s: then every push carries an Idempotency-Key and a
transport error or a 503 is retried (on the next server) until it is acknowledged or the time is
up, as a real client rides out a failover.

    python push_worker.py --servers URL [URL ...] --session SID --worker 3 --pushes 50 \
        --tensors '{"w": [4, 8], "b": [8]}' --barrier DIR --out FILE [--wire json|safetensors]

Barrier: the worker creates DIR/ready-<worker> when it is connected, then waits for DIR/go.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

ST = "application/x-safetensors"


def make_pushes(
    worker: int, count: int, shapes: dict[str, list[int]], seed_base: int = 1000
) -> list[dict]:
    """The worker's gradients: multiples of 1/8 (sums are exact in float32), random subsets."""
    rng = np.random.default_rng(seed_base + worker)
    names = list(shapes)
    pushes = []
    for _ in range(count):
        carried = [name for name in names if rng.random() < 0.75] or [str(rng.choice(names))]
        pushes.append(
            {
                name: (rng.integers(-16, 17, size=shapes[name]) / 8).astype(np.float32)
                for name in carried
            }
        )
    return pushes


def encode(grads: dict[str, np.ndarray], wire: str, worker: int) -> tuple[bytes, dict[str, str]]:
    if wire == "json":
        body = {
            "grads": {
                name: {"shape": list(g.shape), "data": g.reshape(-1).tolist()}
                for name, g in grads.items()
            },
            "worker": f"w{worker}",
        }
        return json.dumps(body).encode(), {"content-type": "application/json"}
    body = st_save(grads, {"worker": json.dumps(f"w{worker}")})
    return body, {"content-type": ST, "accept": ST}


def decode(response: httpx.Response) -> tuple[int, dict[str, list[float]]]:
    """(version, params as flat lists) from a JSON or safetensors push response."""
    if response.headers["content-type"].startswith(ST):
        header_len = int.from_bytes(response.content[:8], "little")
        header = json.loads(response.content[8 : 8 + header_len])
        version = json.loads(header["__metadata__"]["version"])
        arrays = st_load(response.content)
        return version, {name: a.reshape(-1).tolist() for name, a in arrays.items()}
    body = response.json()
    return body["version"], {name: t["data"] for name, t in body["params"].items()}


def wait_for_barrier(barrier: Path, worker: int, timeout: float = 60.0) -> None:
    (barrier / f"ready-{worker}").touch()
    deadline = time.monotonic() + timeout
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"worker {worker}: no go signal within {timeout}s")
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", nargs="+", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--pushes", type=int, required=True)
    parser.add_argument("--tensors", required=True, help='JSON {"name": shape}')
    parser.add_argument("--barrier", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wire", choices=("json", "safetensors"), default="json")
    parser.add_argument("--retry-s", type=float, default=0.0)
    args = parser.parse_args()

    pushes = make_pushes(args.worker, args.pushes, json.loads(args.tensors))
    clients = [httpx.Client(base_url=url, timeout=120.0) for url in args.servers]
    records: list[dict[str, Any]] = []
    try:
        for client in clients:  # open the keep-alive connections before the start
            client.get("/healthz").raise_for_status()
        wait_for_barrier(args.barrier, args.worker)
        path = f"/v1/sessions/{args.session}/gradients?return=all"
        for k, grads in enumerate(pushes):
            server = (args.worker + k) % len(clients)
            body, headers = encode(grads, args.wire, args.worker)
            record: dict[str, Any] = {
                "server": server,
                "grads": {name: g.reshape(-1).tolist() for name, g in grads.items()},
            }
            record["sent"] = time.time()
            if args.retry_s:
                headers = {**headers, "idempotency-key": f"w{args.worker}-{k}"}
            deadline = time.monotonic() + args.retry_s
            while True:
                try:
                    response = clients[server].post(path, content=body, headers=headers)
                except httpx.HTTPError as error:  # not acknowledged: it may or may not have applied
                    record.update(status=None, error=repr(error))
                    retry = True
                else:
                    record["answered"] = time.time()
                    record["status"] = response.status_code
                    if response.status_code == 200:
                        record["version"], record["params"] = decode(response)
                        record["replayed"] = "idempotency-replayed" in response.headers
                        record["params_version"] = int(response.headers["etag"].strip('"'))
                    else:
                        record["error"] = response.text[:2000]
                    retry = response.status_code == 503
                if not retry or time.monotonic() > deadline:
                    break
                record["retries"] = record.get("retries", 0) + 1
                server = record["server"] = (server + 1) % len(clients)
                time.sleep(0.05)
            records.append(record)
    finally:
        for client in clients:
            client.close()
        args.out.write_text(json.dumps({"worker": args.worker, "pushes": records}))


if __name__ == "__main__":
    main()
