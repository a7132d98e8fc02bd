"""What the Python client's HTTP costs the worker, per transport, beside a raw-socket floor.

One worker process sends a safetensors gradient body to bench/echo_app.py (the HTTP floor app of
bench/push_bench.py: FastAPI reading the raw body and sending it back) and receives the same
bytes back, as a push with `?return=all` does; the CPU time of the worker process per round
trip is measured (the echo server's is not: it is the same for every transport). Each transport
and size runs in a fresh worker process: what the allocator kept from an earlier run (freed
multi-MB buffers, and so page faults or none) would otherwise favour whichever runs later.
Transports:

* floor: a blocking socket, the request head and body sent with `sendall`, the response read
  with `recv_into` straight into a buffer of its length: the least a Python worker can do;
* stdlib: optserve's sync `Client` transport for http:// URLs (optserve_client/_transport.py);
* asyncio: optserve's `AsyncClient` transport for http:// URLs
  (optserve_client/_async_transport.py), on asyncio's default loop;
* httpx sync, httpx async: httpx's own transports (what https:// URLs, a proxy or a
  `transport=` of one's own use).

Run with `make bench-client` on an otherwise idle machine; it is not a test. `--reps 20` is a
quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import push_bench as pb  # noqa: E402  (the echo server, the bodies, the source version)
from report import describe, write_section  # noqa: E402

SECTION = "client-bench"
SIZES = (10**5, 10**6)
REPS = {10**5: 300, 10**6: 60}
WARMUP = 5
PACKAGES = ("httpx", "numpy")
TRANSPORTS = ("floor", "stdlib", "asyncio", "httpx sync", "httpx async")


class SocketFloor:
    """One keep-alive connection on a blocking socket; nothing but the bytes and the framing."""

    def __init__(self, url: httpx.URL) -> None:
        self.sock = socket.create_connection((url.host, url.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{url.host}:{url.port}".encode()

    def post(self, body: bytes) -> bytearray:
        head = b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (
            self.host,
            len(body),
        )
        self.sock.sendall(head)
        self.sock.sendall(body)
        pending = b""
        while b"\r\n\r\n" not in pending:
            pending += self.sock.recv(65536)
        head, rest = pending.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        out = bytearray(length)
        out[: len(rest)] = rest
        view, filled = memoryview(out), len(rest)
        while filled < length:
            filled += self.sock.recv_into(view[filled:])
        return out

    def close(self) -> None:
        self.sock.close()


def cpu_per_call(call: Callable[[], object], reps: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) per call, after WARMUP calls."""
    for _ in range(WARMUP):
        call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reps):
        call()
    return (time.process_time() - cpu) / reps, (time.perf_counter() - wall) / reps


def measure(transport: str, url: str, body: bytes, reps: int) -> tuple[float, float]:
    headers = {"content-type": "application/octet-stream"}
    if transport == "floor":
        floor = SocketFloor(httpx.URL(url))
        try:
            return cpu_per_call(lambda: floor.post(body), reps)
        finally:
            floor.close()
    if transport in ("stdlib", "httpx sync"):
        from optserve_client._transport import StdlibTransport

        chosen = StdlibTransport() if transport == "stdlib" else httpx.HTTPTransport()
        with httpx.Client(base_url=url, transport=chosen, timeout=120) as client:
            return cpu_per_call(lambda: client.post("/echo", content=body, headers=headers), reps)
    from optserve_client._async_transport import AsyncPlainTransport

    async def run() -> tuple[float, float]:
        chosen = AsyncPlainTransport() if transport == "asyncio" else httpx.AsyncHTTPTransport()
        async with httpx.AsyncClient(base_url=url, transport=chosen, timeout=120) as client:
            for _ in range(WARMUP):
                await client.post("/echo", content=body, headers=headers)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(reps):
                await client.post("/echo", content=body, headers=headers)
            return (time.process_time() - cpu) / reps, (time.perf_counter() - wall) / reps

    return asyncio.run(run())


def in_fresh_process(transport: str, url: str, size: int, reps: int) -> tuple[float, float]:
    """`measure` in a new worker process (this script with --child)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", transport, url, str(size), str(reps)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cpu, wall = json.loads(out.splitlines()[-1])
    return cpu, wall


def run(args: argparse.Namespace, workdir: Path) -> dict[int, dict[str, tuple[float, float]]]:
    echo = pb.ChildServer(
        "echo", [sys.executable, str(BENCH / "echo_app.py")], {}, workdir / "echo.log"
    )
    results: dict[int, dict[str, tuple[float, float]]] = {}
    try:
        echo.wait_ready("/healthz")
        for size in args.sizes:
            reps = args.reps or REPS.get(size, 60)
            results[size] = {}
            for transport in TRANSPORTS:
                results[size][transport] = in_fresh_process(transport, echo.url, size, reps)
                cpu, wall = results[size][transport]
                print(f"{size:.0e} {transport}: CPU {pb.ms(cpu)}, wall {pb.ms(wall)}", flush=True)
    finally:
        echo.stop()
    return results


def report(
    args: argparse.Namespace, results: dict[int, dict[str, tuple[float, float]]]
) -> list[str]:
    lines = [
        "## The Python client's HTTP: worker CPU per push-sized round trip, per transport",
        "",
        "One worker process sends a safetensors gradient body to bench/echo_app.py and receives",
        "the same bytes back (a push with `?return=all`, without the optimizer); the worker's",
        "CPU time per round trip, beside the floor: a blocking socket sending the request and",
        "receiving the response straight into a buffer of its length. `stdlib` and `asyncio` are",
        "the transports optserve's `Client` and `AsyncClient` use for http:// URLs; the httpx",
        "rows are httpx's own (https://, a proxy, or a `transport=` given).",
        "",
        *describe(PACKAGES),
        f"- optserve source: {args.source}",
        "- reproduce: `make bench-client`",
        "",
        "| parameters | body | "
        + " | ".join(f"{t} CPU" for t in TRANSPORTS)
        + " | "
        + " | ".join(f"{t} wall" for t in TRANSPORTS)
        + " |",
        "|---|---|" + "---|" * (2 * len(TRANSPORTS)),
    ]
    for size, by_transport in results.items():
        floor_cpu = by_transport["floor"][0]
        cpu_cells = [pb.ms(by_transport["floor"][0])] + [
            f"{pb.ms(by_transport[t][0])} ({by_transport[t][0] / floor_cpu:.1f}x)"
            for t in TRANSPORTS[1:]
        ]
        wall_cells = [pb.ms(by_transport[t][1]) for t in TRANSPORTS]
        body_mb = (4 * size) / 1e6
        lines.append(
            f"| {size:.0e} | {body_mb:.1f} MB each way | "
            + " | ".join(cpu_cells + wall_cells)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--reps", type=int, help="timed round trips per transport and size")
    parser.add_argument("--child", nargs=4, metavar=("TRANSPORT", "URL", "SIZE", "REPS"))
    args = parser.parse_args()
    if args.child:  # one measurement, in this fresh process
        transport, url, size, reps = args.child
        _, body, _ = pb.build_bodies(int(size))
        print(json.dumps(measure(transport, url, body, int(reps))))
        return
    args.source = pb.source_version()
    with tempfile.TemporaryDirectory(prefix="optserve-client-bench-") as workdir:
        results = run(args, Path(workdir))
    lines = report(args, results)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, SECTION, lines)


if __name__ == "__main__":
    main()
