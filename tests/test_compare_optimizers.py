"""examples/compare_optimizers.py end to end, at a tiny size: the script as a real subprocess, its
workers as real processes, pushing to a real server (the shared one, or one it starts itself)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image

from optserve_client import Client

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_optimizers.py"
OPTIMIZERS = ["SGDM", "Adam", "RMSProp", "AdaGrad"]
COLUMNS = [
    "optimizer", "epoch", "version", "train_loss", "val_loss", "val_accuracy",
    "mean_staleness", "elapsed_s",
]  # fmt: skip
EPOCHS, WORKERS, TRAIN, BATCH = 3, 2, 240, 32  # --tiny: 240 training examples


def run_demo(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPTSERVE_URL", "OPTSERVE_API_KEY")}
    command = [sys.executable, str(SCRIPT), "--tiny", "--workers", str(WORKERS), "--out", str(out)]
    result = subprocess.run(
        [*command, *flags], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return result


def check_outputs(out: Path, stem: str, steps_per_version: int) -> None:
    """CSV: every optimizer at epochs 0..EPOCHS, the version advancing by one epoch's steps, the
    training loss lower at the end than at the start; PNG: a real image of both panels."""
    with open(out / f"{stem}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert [r["optimizer"] for r in rows] == [o for o in OPTIMIZERS for _ in range(EPOCHS + 1)]
    for name in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == name]
        assert [int(r["epoch"]) for r in mine] == list(range(EPOCHS + 1))
        assert [int(r["version"]) for r in mine] == [e * steps_per_version for e in range(4)]
        losses = [float(r["train_loss"]) for r in mine]
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0], (name, losses)
        assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in mine)
    png = out / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height >= 300  # two panels side by side


def test_dense_async_through_the_shared_server(api_url: str, tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--url", api_url)
    steps = math.ceil(TRAIN / WORKERS / BATCH)
    check_outputs(tmp_path, "digits_async", steps * WORKERS)  # async: every push is a step
    assert "wrote" in result.stdout
    with Client(api_url) as client:  # the script deletes its sessions
        names = [s.get("name") or "" for s in client.list_sessions()]
    assert not [n for n in names if n.startswith("compare-optimizers-")]


def test_sparse_sync_with_its_own_server(tmp_path: Path) -> None:
    """No --url: the script starts `optserve serve` with an embedded Valkey and stops it."""
    run_demo(tmp_path, "--sparse", "--mode", "sync")
    steps = math.ceil(TRAIN / WORKERS / BATCH)
    check_outputs(tmp_path, "bow_sync", steps)  # sync: one step per round of WORKERS pushes
