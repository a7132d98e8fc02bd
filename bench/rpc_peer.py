"""The peer optserve is measured beside: a parameter server on `torch.distributed.rpc`.

The pattern of PyTorch's parameter-server tutorial: worker processes send gradients with
`rpc_sync`, the server process steps `torch.optim.Adam` (torch's default CPU step, float32) and
returns the parameters. One rpc world: rank 0 is the parameter server (and tells the workers
what to run, with nested rpc calls), ranks 1..N are workers. TensorPipe on 127.0.0.1
(MASTER_ADDR/MASTER_PORT); by default restricted to its TCP transport and basic channel, so
tensors cross loopback TCP as optserve's do (TensorPipe would otherwise use shared memory and
cross-memory attach, which work on one host only); `--tensorpipe default` lifts that.

Measured per size: the latency of one worker pushing back to back (gradient sent, updated
parameters received as a tensor) and the updates per second of N workers pushing at once, with
the CPU time all the peer's processes (its process group: launcher, server, workers) spent per
update in that window.
The server applies one push at a time under a lock (asynchronous SGD: each push is one step).

Run by push_bench.py (`python bench/rpc_peer.py --out results.json ...`); the results file is
JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.rpc as rpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import group_cpu_seconds

PS = "ps"
RPC_TIMEOUT_S = 600.0
LR = 1e-3

# -- the parameter server (rank 0) ------------------------------------------------------------


class ParameterServer:
    """One float32 parameter vector and its Adam; every push is one `optimizer.step()`."""

    def __init__(self, size: int) -> None:
        self.param = torch.nn.Parameter(torch.zeros(size, dtype=torch.float32))
        self.optimizer = torch.optim.Adam([self.param], lr=LR)  # torch's default CPU step
        self.lock = threading.Lock()
        self.steps = 0

    def push(self, grad: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.param.grad = grad
            self.optimizer.step()
            self.steps += 1
            # A copy taken under the lock: the reply is serialised after this returns, while
            # the next push may already be stepping the parameter.
            return self.param.detach().clone()


_server: ParameterServer | None = None


def ps_push(grad: torch.Tensor) -> torch.Tensor:
    """Runs on the parameter server: one step with this gradient, the parameters back."""
    assert _server is not None
    return _server.push(grad)


# -- the workers (ranks 1..N), driven by rank 0 -----------------------------------------------

_grads: dict[int, torch.Tensor] = {}


def _grad(size: int, rank: int) -> torch.Tensor:
    if size not in _grads:
        _grads.clear()
        generator = torch.Generator().manual_seed(rank)
        _grads[size] = torch.randn(size, generator=generator, dtype=torch.float32) * 1e-3
    return _grads[size]


def worker_latency(size: int, warmup: int, reps: int) -> list[float]:
    """Runs on a worker: push back to back; seconds from send to parameters received."""
    grad = _grad(size, rpc.get_worker_info().id)
    for _ in range(warmup):
        rpc.rpc_sync(PS, ps_push, args=(grad,))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        params = rpc.rpc_sync(PS, ps_push, args=(grad,))
        samples.append(time.perf_counter() - start)
        assert params.numel() == size
    return samples


def worker_prepare(size: int) -> bool:
    _grad(size, rpc.get_worker_info().id)
    return True


def worker_window(size: int, start: float, warmup: float, duration: float) -> dict[str, Any]:
    """Runs on a worker: push back to back from `start` (time.monotonic, system-wide) until the
    window [start + warmup, start + warmup + duration] ends; count the pushes done inside it."""
    grad = _grad(size, rpc.get_worker_info().id)
    window_start, window_end = start + warmup, start + warmup + duration
    acked = in_window = 0
    latencies: list[float] = []
    while (now := time.monotonic()) < start:
        time.sleep(min(0.001, start - now))
    while (sent := time.monotonic()) < window_end:
        rpc.rpc_sync(PS, ps_push, args=(grad,))
        done = time.monotonic()
        acked += 1
        if window_start <= done <= window_end:
            in_window += 1
            if sent >= window_start:
                latencies.append(done - sent)
    return {"acked": acked, "in_window": in_window, "latencies": latencies}


# -- rank 0: the plan -------------------------------------------------------------------------


def run_plan(plan: dict[str, Any], workers: int) -> list[dict[str, Any]]:
    global _server
    results = []
    names = [f"worker{rank}" for rank in range(1, workers + 1)]
    for entry in plan["sizes"]:
        size = entry["size"]
        _server = ParameterServer(size)
        samples = rpc.rpc_sync(
            names[0], worker_latency, args=(size, entry["warmup"], entry["reps"])
        )
        result: dict[str, Any] = {"size": size, "latency_s": samples, "throughput": {}}
        for count in plan["workers"]:
            _server = ParameterServer(size)
            for future in [rpc.rpc_async(n, worker_prepare, args=(size,)) for n in names[:count]]:
                future.wait()
            before = _server.steps
            start = time.monotonic() + 0.2
            futures = [
                rpc.rpc_async(
                    name,
                    worker_window,
                    args=(size, start, plan["window_warmup_s"], entry["window_s"]),
                )
                for name in names[:count]
            ]
            cpu = _window_cpu(start + plan["window_warmup_s"], entry["window_s"])
            runs = [future.wait() for future in futures]
            in_window = sum(r["in_window"] for r in runs)
            latencies = sorted(lat for r in runs for lat in r["latencies"])
            result["throughput"][str(count)] = {
                "workers": count,
                "rate": in_window / entry["window_s"],
                "cpu_ms_per_update": 1e3 * cpu / max(in_window, 1),
                "median_latency_s": statistics.median(latencies) if latencies else None,
                "consistent": _server.steps - before == sum(r["acked"] for r in runs),
            }
        results.append(result)
        print(
            f"rpc peer {size:.0e}: 1 worker median "
            f"{statistics.median(samples) * 1e3:.2f} ms; "
            + ", ".join(
                f"{t['workers']} workers {t['rate']:.1f}/s" for t in result["throughput"].values()
            ),
            flush=True,
        )
        _server = None
    return results


def _window_cpu(start: float, duration: float) -> float:
    """CPU seconds the peer's processes spend in [start, start + duration] (time.monotonic)."""
    time.sleep(max(0.0, start - time.monotonic()))
    before = group_cpu_seconds(os.getpgrp())
    time.sleep(max(0.0, start + duration - time.monotonic()))
    return group_cpu_seconds(os.getpgrp()) - before


def rank_main(rank: int, world: int, port: int, tensorpipe: str, plan: dict, out: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and SIGTERM
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")  # said by every rank
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("TP_SOCKET_IFADDR", "127.0.0.1")  # TensorPipe's listening address
    extra: dict[str, Any] = {}
    if tensorpipe == "tcp":
        extra = {"_transports": ["uv"], "_channels": ["basic"]}
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=max(16, 2 * world), rpc_timeout=RPC_TIMEOUT_S, **extra
    )
    name = PS if rank == 0 else f"worker{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=options)
    try:
        if rank == 0:
            results = run_plan(plan, world - 1)
            Path(out).write_text(json.dumps({"torch": torch.__version__, "results": results}))
    finally:
        rpc.shutdown()  # waits for every rank: the workers serve until rank 0 is done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="write the results here (JSON)")
    parser.add_argument("--plan", required=True, help="JSON: sizes with reps and windows")
    parser.add_argument("--tensorpipe", choices=("tcp", "default"), default="tcp")
    args = parser.parse_args()
    plan = json.loads(args.plan)
    world = 1 + max(plan["workers"])
    context = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = []
    # SIGTERM unwinds like Ctrl-C, so the finally below ends every rank.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        port = free_port()
        for rank in range(world):
            proc = context.Process(
                target=rank_main,
                args=(rank, world, port, args.tensorpipe, plan, args.out),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        while procs[0].is_alive():  # rank 0 finishes last (rpc.shutdown waits for all)
            procs[0].join(timeout=0.5)
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit(f"an rpc rank failed: exit codes {[p.exitcode for p in procs]}")
        for proc in procs:
            proc.join(timeout=30)
        if procs[0].exitcode != 0:
            raise SystemExit(f"the parameter server exited with {procs[0].exitcode}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


if __name__ == "__main__":
    main()
