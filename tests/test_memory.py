"""The server keeps freed large buffers (optserve.memory): without that, glibc hands every
multi-MB buffer back to the kernel and each push pays a page fault per 4 KiB touched again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Buffers of a push's sizes, made and freed on a worker thread and on the main one, as the
# server's event loop and its to_thread workers do; minor page faults counted after a warm-up.
CHURN = textwrap.dedent(
    """
    import resource, sys, threading
    from optserve.memory import keep_freed_buffers
    if sys.argv[1] == "tuned":
        assert keep_freed_buffers()

    def churn():
        for size in (4, 6, 5) * 3:  # MiB
            body = bytearray(size << 20)
            copy = bytes(body)
            del body, copy

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        worker = threading.Thread(target=churn)
        worker.start()
        worker.join()
        churn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults()
    print(faults())
    """
)


def minor_faults(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    plain, tuned = minor_faults("plain"), minor_faults("tuned")
    # 18 buffers of 4-6 MiB: about 9000 faults when each goes back to the kernel
    assert plain > 2000, f"glibc kept the buffers by itself ({plain} faults): re-measure"
    assert tuned < 200, f"{tuned} page faults with the tuning, {plain} without"

