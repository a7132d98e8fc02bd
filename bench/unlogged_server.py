"""An ablation for bench/hot_bench.py: `optserve serve` on the hot engine with the gradient bytes
left out of its log.

Everything else a push does is real: HTTP, decoding, the Adam step, the params copied back, the
fenced append script (version, schedule, idempotency records, a stream entry) and the snapshots.
Only the 4 MB per 1e6 push that the log would carry to the store stays behind, so the difference
from the real hot engine is what logging each gradient costs on this machine. Nothing this server
acknowledges can be replayed: it exists here, in a benchmark, and never in the service.

Run by hot_bench.py like `python -m optserve serve` (the same arguments and environment).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from optserve import cli
from optserve.store import hot_log

_append = hot_log.HotLog.append


async def append_without_gradients(
    self: hot_log.HotLog,
    sid: str,
    holder: hot_log.Holder,
    entries: Sequence[hot_log.LogPush | hot_log.LogConfig],
    *args: Any,
    **kwargs: Any,
) -> list[tuple[str, list[str]]]:
    """HotLog.append with each push's gradients left out (an empty manifest is logged)."""
    bare = [
        dataclasses.replace(entry, grads={}) if isinstance(entry, hot_log.LogPush) else entry
        for entry in entries
    ]
    return await _append(self, sid, holder, bare, *args, **kwargs)


if __name__ == "__main__":
    hot_log.HotLog.append = append_without_gradients  # type: ignore[method-assign]
    cli.main(["serve", *sys.argv[1:]])
