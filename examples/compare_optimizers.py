#!/usr/bin/env python
"""SGD with momentum, Adam, RMSProp and AdaGrad on one classifier, trained through optserve.

Each optimizer trains the same small classifier (same initial weights, same data order) as one
optserve session. N worker processes, each holding only its own shard of the training set,
compute minibatch gradients with numpy from the params they last received and push them; the
server applies them (one step per push in `--mode async`, the mean of each round of N pushes in
`--mode sync`). After every epoch this process pulls the session's params and measures the
training loss and validation accuracy on the full sets.

    python examples/compare_optimizers.py                 # digits, 4 workers, async
    python examples/compare_optimizers.py --sparse        # synthetic bag-of-words instead
    python examples/compare_optimizers.py --url http://host:8000 --api-key KEY --mode sync

Without `--url` (or OPTSERVE_URL) it starts its own `optserve serve` on a free port, with an
embedded Valkey in a temporary directory, and stops it at the end. Writes `<data>_<mode>.csv`
(one row per optimizer and epoch) and `<data>_<mode>.png` (training loss and validation
accuracy) into `--out`. Needs the client's `demo` extra: `pip install "optserve-client[demo]"`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from optserve_client import Client, OptservError

# torch.optim's defaults where it has them (Adam 1e-3, RMSprop 1e-2, Adagrad 1e-2); SGD has no
# usable default, so the common 0.01 with momentum 0.9. Values are the server's optimizer specs.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "SGDM": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "Adam": {"name": "adam", "lr": 1e-3},
    "RMSProp": {"name": "rmsprop", "lr": 1e-2},
    "AdaGrad": {"name": "adagrad", "lr": 1e-2},
}
COLUMNS = [
    "optimizer",
    "epoch",
    "version",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "mean_staleness",
    "elapsed_s",
]
ROUND_TIMEOUT_S = 120.0  # sync rounds: a worker slower than this fails the run instead of hanging


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: int


def load_digits(seed: int, tiny: bool) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, shipped inside the wheel), pixels scaled to
    [0, 1], a fixed stratified 75/25 train/validation split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed
    )
    if tiny:
        x_train, y_train, x_val, y_val = x_train[:240], y_train[:240], x_val[:120], y_val[:120]
    return Dataset("digits", x_train, y_train, x_val, y_val, classes=10)


def make_bag_of_words(
    seed: int, tiny: bool, vocab: int = 2000, classes: int = 4, signal_words: int = 50
) -> Dataset:
    """Synthetic documents as binary word-presence vectors (about 1.2% non-zero).

    About 30 words per document are drawn from a Zipf law and say nothing about the class,
    except `signal_words` rare words per class (from the least frequent half of the vocabulary):
    each document holds one to three of them, each from its own class with probability 0.9. So
    the features that decide the class are the ones whose gradients are almost always zero: the
    case where AdaGrad's per-coordinate rates are said to help. Deterministic in `seed`.
    """
    if tiny:
        vocab, signal_words = 300, 10
    n_train, n_val = (240, 120) if tiny else (3000, 1000)
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()
    rare = rng.permutation(np.arange(vocab // 2, vocab))[: classes * signal_words]
    signal = rare.reshape(classes, signal_words)
    n = n_train + n_val
    y = rng.integers(0, classes, n)
    x = np.zeros((n, vocab), np.float32)
    for i in range(n):
        words = rng.choice(vocab, size=max(5, rng.poisson(30)), p=zipf)
        x[i, words] = 1.0
        for _ in range(rng.integers(1, 4)):
            label = y[i] if rng.random() < 0.9 else rng.integers(0, classes)
            x[i, rng.choice(signal[label])] = 1.0
    return Dataset("bow", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def shards(data: Dataset, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Worker i's part of the training set: every workers-th example, so class mixes match."""
    return [(data.x_train[i::workers], data.y_train[i::workers]) for i in range(workers)]


# -- model: a numpy MLP (or softmax regression with hidden=0) -------------------------------------


def init_params(features: int, hidden: int, classes: int, seed: int) -> dict[str, np.ndarray]:
    """torch.nn.Linear's initialisation (uniform in +-1/sqrt(fan_in)), from a fixed seed."""
    rng = np.random.default_rng(seed)
    sizes = [features, hidden, classes] if hidden else [features, classes]
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"w{i}"] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        params[f"b{i}"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return params


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits, and the hidden activations the backward pass needs (None without a layer)."""
    if "w2" not in params:
        return x @ params["w1"] + params["b1"], None
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    return hidden @ params["w2"] + params["b2"], hidden


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    loss = float(-log_probs[rows, y].mean())
    grad = np.exp(log_probs)
    grad[rows, y] -= 1.0
    return loss, grad / len(y)


def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """One minibatch: the loss and the gradient of every parameter (float32, as pushed)."""
    logits, hidden = forward(params, x)
    loss, d_logits = cross_entropy(logits, y)
    if hidden is None:
        grads = {"w1": x.T @ d_logits, "b1": d_logits.sum(axis=0)}
    else:
        d_hidden = (d_logits @ params["w2"].T) * (hidden > 0)
        grads = {
            "w1": x.T @ d_hidden,
            "b1": d_hidden.sum(axis=0),
            "w2": hidden.T @ d_logits,
            "b2": d_logits.sum(axis=0),
        }
    return loss, {name: g.astype(np.float32) for name, g in grads.items()}


def evaluate(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a whole set."""
    logits, _ = forward(params, x)
    loss, _ = cross_entropy(logits, y)
    return loss, float((logits.argmax(axis=1) == y).mean())


# -- workers: separate processes, each with its own shard and its own HTTP client -----------------


def worker_main(
    index: int,
    url: str,
    api_key: str | None,
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    seed: int,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    """Run one epoch over this shard per task `(session_id, epoch)`; None ends the process.

    Each minibatch's gradient comes from the params this worker last saw (the answer to its
    previous push, or a pull at the start of the epoch), so in async mode it may be a few
    versions behind: the staleness the server reports is summed up and sent back.
    """
    worker = f"worker-{index}"
    try:
        with Client(url, api_key, timeout=ROUND_TIMEOUT_S + 30) as client:
            sessions = {}
            while (task := tasks.get()) is not None:
                sid, epoch = task
                if sid not in sessions:
                    sessions[sid] = client.session(sid)
                session = sessions[sid]
                # The same order for every optimizer: it depends on the seed, worker and epoch.
                order = np.random.default_rng([seed, index, epoch]).permutation(len(y))
                params = session.pull()
                staleness = 0
                for batch in np.array_split(order, steps):
                    _, grads = loss_and_grads(params, x[batch], y[batch])
                    params = session.push(grads, worker=worker)
                    staleness += session.last_push.staleness or 0
                results.put(("done", index, staleness))
    except BaseException:  # anything a worker hits must reach the parent, or it waits forever
        results.put(("error", index, traceback.format_exc()))


class WorkerPool:
    """N worker processes (spawned, so nothing of this process's state is shared) kept for
    every run; `epoch()` hands each one epoch of a session and waits until all are done."""

    def __init__(self, url: str, api_key: str | None, data: Dataset, args: argparse.Namespace):
        context = mp.get_context("spawn")
        self.results: mp.Queue = context.Queue()
        self.tasks: list[mp.Queue] = [context.Queue() for _ in range(args.workers)]
        # Every worker pushes the same number of times per epoch, as sync rounds need.
        self.steps = max(1, math.ceil(len(data.y_train) / args.workers / args.batch_size))
        self.processes = [
            context.Process(
                target=worker_main,
                args=(i, url, api_key, x, y, self.steps, args.seed, self.tasks[i], self.results),
                name=f"optserve-demo-worker-{i}",
                daemon=True,
            )
            for i, (x, y) in enumerate(shards(data, args.workers))
        ]
        for process in self.processes:
            process.start()

    def epoch(self, sid: str, epoch: int) -> float:
        """One epoch on every worker; returns the mean staleness of its pushes."""
        for tasks in self.tasks:
            tasks.put((sid, epoch))
        staleness, pending = 0, len(self.tasks)
        while pending:
            try:
                kind, index, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"worker process(es) died: {', '.join(dead)}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"worker {index} failed:\n{payload}")
            staleness += payload
            pending -= 1
        return staleness / (self.steps * len(self.tasks))

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


# -- a local server when no --url is given --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """`optserve serve` as a child process on a free port, with an embedded Valkey whose data
    lives in a temporary directory; stops it (and the Valkey) at the end.

    Yields the URL at once, so the workers can start while the server does, and a function
    that waits until the server is ready.
    """
    try:
        import optserve  # noqa: F401 - only to say clearly what is missing
    except ImportError:
        sys.exit("optserve (the server) is not installed here: start one and pass --url")
    with tempfile.TemporaryDirectory(prefix="optserve-demo-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "OPTSERVE_REDIS_URL"}
        env["OPTSERVE_DATA_DIR"] = str(Path(tmp) / "data")
        env.setdefault("OPTSERVE_LOG_LEVEL", "warning")
        log_path = Path(tmp) / "optserve.log"
        with open(log_path, "wb") as log:
            command = [sys.executable, "-m", "optserve", "serve"]
            server = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def wait_ready() -> None:
            deadline = time.monotonic() + 60
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"optserve did not start:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        return
                time.sleep(0.1)

        try:
            yield url, wait_ready
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# -- the experiment -------------------------------------------------------------------------------


def session_mode(args: argparse.Namespace) -> dict[str, Any] | None:
    """Sync: rounds of exactly --workers pushes, whose mean gradient is one step."""
    if args.mode == "async":
        return None
    workers = args.workers
    return {
        "type": "sync",
        "workers": workers,
        "min_workers": workers,
        "timeout_s": ROUND_TIMEOUT_S,
    }


def run_optimizer(
    client: Client,
    pool: WorkerPool,
    label: str,
    data: Dataset,
    initial: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Train one optimizer as one session; one row per epoch (epoch 0: the initial params)."""
    from tqdm import tqdm

    session = client.create_session(
        OPTIMIZERS[label], initial, mode=session_mode(args), name=f"compare-optimizers-{label}"
    )
    rows: list[dict[str, Any]] = []
    start = time.monotonic()

    def record(epoch: int, params: dict[str, np.ndarray], staleness: float) -> None:
        train_loss, _ = evaluate(params, data.x_train, data.y_train)
        val_loss, val_accuracy = evaluate(params, data.x_val, data.y_val)
        rows.append(
            {
                "optimizer": label,
                "epoch": epoch,
                "version": session.version,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "mean_staleness": staleness,
                "elapsed_s": time.monotonic() - start,
            }
        )

    try:
        record(0, session.pull(), 0.0)
        with tqdm(total=args.epochs, desc=f"{label:8}", unit="epoch", ncols=100) as bar:
            for epoch in range(1, args.epochs + 1):
                staleness = pool.epoch(session.id, epoch)
                record(epoch, session.pull(), staleness)
                last = rows[-1]
                bar.set_postfix_str(
                    f"loss={last['train_loss']:.4f} val_acc={last['val_accuracy']:.3f}",
                    refresh=False,
                )
                bar.update()
    finally:
        session.delete()
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Two panels like the origin article's figures: training loss (log) and validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, spec in OPTIMIZERS.items():
        mine = [r for r in rows if r["optimizer"] == label]
        epochs = [r["epoch"] for r in mine]
        extra = f", momentum={spec['momentum']:g}" if "momentum" in spec else ""
        name = f"{label} (lr={spec['lr']:g}{extra})"
        loss_ax.plot(epochs, [r["train_loss"] for r in mine], label=name)
        acc_ax.plot(epochs, [r["val_accuracy"] for r in mine], label=name)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    # Zoom on where the runs differ: the first tenth of the epochs may fall below the axis.
    settled = [r["val_accuracy"] for r in rows if r["epoch"] >= max(1, rows[-1]["epoch"] // 10)]
    acc_ax.set_ylim(max(0.0, min(settled) - 0.02), min(1.0, max(settled) + 0.01))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.legend(*loss_ax.get_legend_handles_labels(), loc="lower center", ncol=len(OPTIMIZERS))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("OPTSERVE_URL"),
        help="a running optserve (env OPTSERVE_URL); default: start one here",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPTSERVE_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (env OPTSERVE_API_KEY)",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker processes per optimizer")
    parser.add_argument(
        "--mode",
        choices=["async", "sync"],
        default="async",
        help="async: every push is a step; sync: rounds of --workers pushes",
    )
    parser.add_argument("--epochs", type=int, help="default 100 digits, 40 sparse, 3 --tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per push")
    parser.add_argument(
        "--hidden",
        type=int,
        help="hidden units; 0 = softmax regression (default 64 digits, 0 sparse)",
    )
    parser.add_argument(
        "--sparse", action="store_true", help="synthetic bag-of-words data instead of the digits"
    )
    parser.add_argument("--seed", type=int, default=0, help="data split, init and data order")
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run, for tests")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the CSV and the PNG (default examples/results)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batch_size < 1:
        parser.error("--workers and --batch-size must be at least 1")
    if args.epochs is None:
        args.epochs = 3 if args.tiny else 40 if args.sparse else 100
    if args.hidden is None:
        args.hidden = 0 if args.sparse else 16 if args.tiny else 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = make_bag_of_words if args.sparse else load_digits
    data = load(args.seed, args.tiny)
    initial = init_params(data.x_train.shape[1], args.hidden, data.classes, args.seed)
    model = (
        f"MLP {data.x_train.shape[1]}-{args.hidden}-{data.classes}"
        if args.hidden
        else f"softmax regression {data.x_train.shape[1]}-{data.classes}"
    )
    title = (
        f"{data.name}: {model}, {len(data.y_train)} train / {len(data.y_val)} validation, "
        f"{args.workers} workers {args.mode}, batch {args.batch_size} per push"
    )
    print(title, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{data.name}_{args.mode}"

    with contextlib.ExitStack() as stack:
        url, wait_ready = (args.url, None) if args.url else stack.enter_context(local_server())
        pool = WorkerPool(url, args.api_key, data, args)  # the workers connect at their 1st task
        stack.callback(pool.close)
        if wait_ready is not None:
            wait_ready()
        client = stack.enter_context(Client(url, args.api_key, timeout=ROUND_TIMEOUT_S + 30))
        rows = [
            row
            for label in OPTIMIZERS
            for row in run_optimizer(client, pool, label, data, initial, args)
        ]

    write_csv(stem.with_suffix(".csv"), rows)
    plot(stem.with_suffix(".png"), rows, title)
    print(f"\n{'optimizer':10}{'train loss':>12}{'val loss':>10}{'val acc':>9}{'best val acc':>14}")
    for label in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == label]
        best = max(r["val_accuracy"] for r in mine)
        last = mine[-1]
        print(
            f"{label:10}{last['train_loss']:12.4f}{last['val_loss']:10.4f}"
            f"{last['val_accuracy']:9.3f}{best:14.3f}"
        )
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OptservError as exc:  # the server's answer (or the lack of one) says it all
        sys.exit(f"optserve: {exc}")
