"""A small demo: N worker processes train one linear model through optserve.

Each worker holds its own shard of a synthetic regression problem (y = X w* + noise), computes
the mean-squared-error gradient of a minibatch at the params it last got back, pushes it, and
continues from the params the push returns: one shared Adam state on the server, no framework
shared between the workers. The run ends with the loss on all the data before and after, the
session's version (one per push) and each worker's minibatch losses in OUT/demo_workers.json.

    python examples/demo_workers.py --url http://127.0.0.1:8000 --api-key KEY --workers 4

--url and --api-key default to OPTSERVE_URL and OPTSERVE_API_KEY. Needs optserve-client only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from optserve_client import Client

FEATURES, SHARD_ROWS, BATCH = 16, 2048, 64


def true_weights() -> np.ndarray:
    return np.random.default_rng(0).normal(size=FEATURES).astype(np.float32)


def shard(worker: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker `worker`'s data, the same in every process (made from its seed)."""
    rng = np.random.default_rng(1 + worker)
    x = rng.normal(size=(SHARD_ROWS, FEATURES)).astype(np.float32)
    y = x @ true_weights() + np.float32(0.1) * rng.normal(size=SHARD_ROWS).astype(np.float32)
    return x, y


def loss_and_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    error = x @ w + b - y
    return float(np.mean(error**2)), {
        "w": (2 / len(y)) * (x.T @ error),
        "b": np.array([2 * np.mean(error)], np.float32),
    }


def work(url: str, api_key: str | None, sid: str, worker: int, steps: int) -> list[float]:
    """One worker: `steps` pushes of minibatch gradients; returns the minibatch losses."""
    x, y = shard(worker)
    rng = np.random.default_rng(100 + worker)
    losses = []
    with Client(url, api_key) as client:
        session = client.session(sid)
        params = session.pull()
        for _ in range(steps):
            rows = rng.integers(0, len(y), BATCH)
            loss, grads = loss_and_grads(params["w"], params["b"], x[rows], y[rows])
            losses.append(loss)
            params = session.push(grads, worker=f"w{worker}")
    return losses


def full_loss(params: dict[str, np.ndarray], workers: int) -> float:
    shards = [shard(worker) for worker in range(workers)]
    x, y = np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])
    return loss_and_grads(params["w"], params["b"], x, y)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("OPTSERVE_API_KEY"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="pushes per worker")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()

    with Client(args.url, args.api_key) as client:
        session = client.create_session(
            "adam",
            {"w": np.zeros(FEATURES, np.float32), "b": np.zeros(1, np.float32)},
            lr=args.lr,
            # Anneal to 0 over all the pushes: a constant-lr Adam ends up circling the optimum.
            lr_schedule={"type": "cosine", "T_max": args.workers * args.steps},
            name="demo_workers",
        )
        before = full_loss(session.pull(), args.workers)
        started = time.monotonic()
        jobs = [(args.url, args.api_key, session.id, w, args.steps) for w in range(args.workers)]
        with get_context("spawn").Pool(args.workers) as pool:
            losses = pool.starmap(work, jobs)
        seconds = time.monotonic() - started
        info = session.info()
        after = full_loss(session.pull(), args.workers)

    result = {
        "session": session.id,
        "workers": args.workers,
        "steps_per_worker": args.steps,
        "version": info["version"],
        "loss_before": before,
        "loss_after": after,
        "seconds": seconds,
        "pushes_per_second": args.workers * args.steps / seconds,
        "minibatch_losses": losses,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_workers.json").write_text(json.dumps(result, indent=1))
    print(
        f"{args.workers} workers x {args.steps} pushes through {args.url}: version "
        f"{info['version']}, loss {before:.4f} -> {after:.4f}, "
        f"{result['pushes_per_second']:.0f} pushes/s; written to {args.out / 'demo_workers.json'}"
    )
    return 0 if info["version"] == args.workers * args.steps and after < before / 10 else 1


if __name__ == "__main__":
    sys.exit(main())
