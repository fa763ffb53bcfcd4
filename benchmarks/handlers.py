"""Benchmark handlers, shared by rmqpool (benchmarks.handlers:NAME) and by the
hand-written baseline (benchmarks/handwritten.py), so both run the same code.

Every call ends in _tick(), which records, in a 24-byte file of the process's
own under $BENCH_STATS_DIR (tmpfs), three doubles: messages handled, the
CLOCK_MONOTONIC time the first one finished and the time the last one
finished. The harness sums/min/maxes them across processes. The file is opened
on the first call, so a supervisor that imports this module before forking
never holds one (each forked worker opens its own, named by its pid).

$BENCH_CPU_ITERS sets the loop count of cpu() (the harness calibrates it to ~5 ms).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

CPU_ITERS = int(os.environ.get("BENCH_CPU_ITERS", "100000"))
_monotonic = time.monotonic
_cells: Any = None  # memoryview of 3 doubles: count, first, last
_keep: list[Any] = []


def _open() -> Any:
    global _cells
    path = os.path.join(os.environ["BENCH_STATS_DIR"], str(os.getpid()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 24)
        mm = mmap.mmap(fd, 24)
    finally:
        os.close(fd)
    _keep.append(mm)
    _cells = memoryview(mm).cast("d")
    return _cells


def _tick() -> None:
    cells = _cells if _cells is not None else _open()
    now = _monotonic()
    if not cells[0]:
        cells[1] = now
    cells[2] = now
    cells[0] += 1.0


def burn(iterations: int) -> int:
    """Pure-Python CPU work (holds the GIL throughout)."""
    x = 0
    for i in range(iterations):
        x += i * i
    return x


def noop(body: bytes) -> None:
    _tick()


async def noop_async(body: bytes) -> None:
    _tick()


def cpu(body: bytes) -> None:
    burn(CPU_ITERS)
    _tick()


def echo(body: Any) -> Any:
    """bench_client.py's call() handler: the reply is the request (no _tick)."""
    return body
