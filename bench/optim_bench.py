"""Time each optserve optimizer update beside torch.optim's CPU step, in one run on one machine.

For every algorithm and size: optserve's update (numba kernels), torch's default CPU step
(single-tensor, `foreach=False`) which is the floor, and torch's fused CPU step where torch has one.
Also checks that memory held by optserve does not grow with the number of steps. Run with
`make bench-optim` (or `python bench/optim_bench.py --write BENCHMARKS.md`); it is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states

sys.path.insert(0, str(Path(__file__).parent))
from report import describe, write_section

SIZES = (10**3, 10**5, 10**6, 10**7)
ALGORITHMS: dict[str, tuple[type[torch.optim.Optimizer] | None, bool]] = {
    # name: (torch class, torch has a fused CPU step)
    "sgd": (torch.optim.SGD, True),
    "adam": (torch.optim.Adam, True),
    "adamw": (torch.optim.AdamW, True),
    "rmsprop": (torch.optim.RMSprop, False),
    "adagrad": (torch.optim.Adagrad, True),
    "nadam": (torch.optim.NAdam, False),
    "radam": (torch.optim.RAdam, False),
    "adamax": (torch.optim.Adamax, False),
    "lion": (None, False),
}
OPTIONS = {"sgd": {"lr": 0.01, "momentum": 0.9}, "lion": {"lr": 1e-4}}
SECTION = "optim-bench"  # BENCHMARKS.md markers: <!-- optim-bench:begin --> ... :end -->


def torch_lion_step(params: list[torch.Tensor], exp_avgs: list[torch.Tensor]) -> None:
    """timm's Lion op sequence: torch.optim has no Lion, this is the same work in torch ops."""
    with torch.no_grad():
        for p, m in zip(params, exp_avgs, strict=True):
            p.mul_(1 - 1e-4 * 0.0)
            update = m.mul(0.9).add_(p.grad, alpha=0.1).sign_()
            p.add_(update, alpha=-1e-4)
            m.lerp_(p.grad, 0.01)


def median_seconds(step: Callable[[], None], size: int) -> float:
    """Median wall time of one step, after warm-up (JIT compile, first-touch of state)."""
    repeats = max(5, min(2000, 3 * 10**7 // (size * 10)))
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_optserve(name: str, size: int, rng: np.random.Generator) -> float:
    algorithm = get_algorithm(name)
    hp = algorithm.configure(OPTIONS.get(name, {}))
    params = {"w": rng.standard_normal(size).astype(np.float32)}
    grads = {"w": rng.standard_normal(size).astype(np.float32)}
    states = initial_states(algorithm, hp, params)
    return median_seconds(lambda: apply_update(algorithm, hp, params, grads, states, 1e-4), size)


def time_torch(name: str, size: int, fused: bool) -> float:
    cls, _ = ALGORITHMS[name]
    param = torch.nn.Parameter(torch.randn(size))
    param.grad = torch.randn(size)
    if cls is None:
        exp_avg = [torch.zeros(size)]
        return median_seconds(lambda: torch_lion_step([param], exp_avg), size)
    flags = {"fused": True} if fused else {"foreach": False}
    optimizer = cls([param], **OPTIONS.get(name, {}), **flags)
    return median_seconds(optimizer.step, size)


def allocation_growth(name: str) -> int:
    """Bytes still allocated after 200 more steps, beyond what one step left: should be ~0."""
    algorithm = get_algorithm(name)
    hp = algorithm.configure(OPTIONS.get(name, {}))
    params = {"w": np.zeros(10**5, np.float32)}
    grads = {"w": np.ones(10**5, np.float32)}
    states = initial_states(algorithm, hp, params)
    for _ in range(3):
        apply_update(algorithm, hp, params, grads, states, 1e-4)
    tracemalloc.start()
    apply_update(algorithm, hp, params, grads, states, 1e-4)
    first = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        apply_update(algorithm, hp, params, grads, states, 1e-4)
    growth = tracemalloc.get_traced_memory()[0] - first
    tracemalloc.stop()
    return growth


def run(sizes: tuple[int, ...], names: list[str]) -> list[str]:
    rng = np.random.default_rng(0)
    ratios: dict[tuple[str, int], float] = {}
    lines = [
        "## Optimizer update: optserve vs torch.optim CPU step",
        "",
        "Median time of one update of one float32 tensor. The floor is torch's default CPU step",
        "(single-tensor, `foreach=False`) measured in the same run; `ratio` = optserve / floor",
        "(below 1 is faster; the target is at most 1.5 at 1e6 and 1e7). torch's fused CPU step is",
        "shown where torch has one. Lion has no torch.optim class: its floor is timm's op sequence",
        "in torch. `alloc growth` = bytes optserve still holds after 200 more steps at 1e5.",
        "",
        f"- torch intra-op threads: {torch.get_num_threads()}",
        *describe(("numpy", "numba", "torch")),
        "- reproduce: `make bench-optim`",
        "",
    ]
    header_end = len(lines)
    for size in sizes:
        lines += [
            f"### {size:.0e} elements",
            "",
            "| algorithm | optserve | torch single-tensor (floor) | ratio | torch fused | "
            "ratio to fused | ns/element | alloc growth |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in names:
            ours = time_optserve(name, size, rng)
            floor = time_torch(name, size, fused=False)
            ratios[(name, size)] = ours / floor
            has_fused = ALGORITHMS[name][1]
            fused = time_torch(name, size, fused=True) if has_fused else None
            growth = allocation_growth(name) if size == sizes[0] else None
            lines.append(
                f"| {name} | {ours * 1e3:.3f} ms | {floor * 1e3:.3f} ms | {ours / floor:.2f} | "
                + (f"{fused * 1e3:.3f} ms | {ours / fused:.2f} | " if fused else "n/a | n/a | ")
                + f"{ours / size * 1e9:.2f} | "
                + (f"{growth} B |" if growth is not None else "|")
            )
            print(lines[-1], flush=True)
        lines.append("")
    return [*lines[:header_end], *verdict(ratios), "", *lines[header_end:]]


TARGET_SIZES, TARGET_RATIO = (10**6, 10**7), 1.5


def verdict(ratios: dict[tuple[str, int], float]) -> list[str]:
    """Whether this run met the target: every algorithm at most 1.5x the floor at 1e6 and 1e7."""
    judged = {key: ratio for key, ratio in ratios.items() if key[1] in TARGET_SIZES}
    if not judged:
        return [
            "Target (at most 1.5x the floor at 1e6 and 1e7 elements): not measured in this run."
        ]
    (name, size), worst = max(judged.items(), key=lambda item: item[1])
    met = "met" if worst <= TARGET_RATIO else "NOT met"
    return [
        f"Target (every algorithm at most {TARGET_RATIO}x the floor at 1e6 and 1e7 elements): "
        f"**{met}** in this run; the worst ratio was {worst:.2f} ({name} at {size:.0e})."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    args = parser.parse_args()
    lines = run(tuple(args.sizes), args.algorithms)
    if args.write:
        write_section(args.write, SECTION, lines)


if __name__ == "__main__":
    main()
