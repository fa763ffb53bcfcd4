"""Per-worker shared memory: counters, gauges and the messages being handled now.

The supervisor creates one anonymous shared mapping per worker *process* before
it forks it. The worker writes plain integers and floats into it (about 50 ns a
write, no syscall, nothing to send); the supervisor reads it to serve /metrics
and, when the worker dies, reads its final values and which messages it was
running. A dead worker's counters are folded into the slot's retired totals, so
counters never go backwards and nothing accumulates across restarts.

A message's counters are written when its outcome is decided and *before* its
ack is sent: a worker killed mid-message has counted nothing for it, and the
redelivery is counted once.
"""

from __future__ import annotations

import bisect
import mmap
import time
from dataclasses import dataclass

from .outcome import REASONS, Action, Reason

# Handler duration histogram bucket upper bounds, seconds (CPU-heavy work: up to 5 min).
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = tuple(a.value for a in Action)

# Integer cells.
RECEIVED = 0
RECONNECTS = 1
IN_PROGRESS = 2
DURATION_COUNT = 3
_PROCESSED = 4
_DEAD = _PROCESSED + len(OUTCOMES)
_BUCKET = _DEAD + len(REASONS)
N_INT = _BUCKET + len(BUCKETS) + 1  # +Inf bucket
# Float cells (indexed in the float view, after the integer cells).
DURATION_SUM = N_INT
LOOP_LAG = N_INT + 1
DEPTHS_AT = N_INT + 2  # time.monotonic() of the last queue-depth poll (0: never)
_SLOTS = N_INT + 3  # then per concurrency slot: key (int view), started (float view);
# then one cell per polled queue: ready messages (int view)

ID_BYTES = 64  # per concurrency slot: the running message's id, for log lines
RING = 256  # recently settled messages remembered (more than a burst of acks in flight)
PROCESSED = {name: _PROCESSED + i for i, name in enumerate(OUTCOMES)}
DEAD = {name: _DEAD + i for i, name in enumerate(REASONS)}


@dataclass(frozen=True)
class Running:
    key: int
    started: float  # time.monotonic()
    message_id: str  # for log lines; truncated to ID_BYTES


class Scoreboard:
    """One worker process's cells. Created in the supervisor, shared across fork."""

    def __init__(self, concurrency: int, queues: int = 0) -> None:
        self.concurrency = concurrency
        self.queues = queues
        self._depths = _SLOTS + 2 * concurrency
        self._ring_pos = self._depths + queues  # next write in the ring of settled keys
        self._ring = self._ring_pos + 1
        self._ids = 8 * (self._ring + RING)  # byte offset of the message-id slots
        self._mm = mmap.mmap(-1, self._ids + ID_BYTES * concurrency)
        self.ints = memoryview(self._mm).cast("Q")
        self.floats = memoryview(self._mm).cast("d")

    def close(self) -> None:
        self.ints.release()
        self.floats.release()
        self._mm.close()

    # -- written by the worker ------------------------------------------------
    def settle(self, action: Action, reason: Reason | None, duration: float,
               first_attempt: bool, settled_key: int = 0) -> None:
        """Count an outcome. `settled_key` (see message.identify) goes into a ring of
        recently settled messages: if this worker dies before the ack reaches the broker,
        the redelivery is recognised and acked without running or counting it again."""
        ints = self.ints
        if settled_key:
            pos = ints[self._ring_pos]
            ints[self._ring + pos % RING] = settled_key
            ints[self._ring_pos] = pos + 1
        if first_attempt:
            ints[RECEIVED] += 1
        ints[PROCESSED[action.value]] += 1
        if reason:
            ints[DEAD[reason]] += 1
        if duration >= 0:
            ints[_BUCKET + bisect.bisect_left(BUCKETS, duration)] += 1
            ints[DURATION_COUNT] += 1
            self.floats[DURATION_SUM] += duration

    def start(self, index: int, key: int, message_id: str | None) -> None:
        at = self._ids + ID_BYTES * index
        self._mm[at:at + ID_BYTES] = (message_id or "").encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        base = _SLOTS + 2 * index
        self.floats[base + 1] = time.monotonic()
        self.ints[base] = key or 1  # 0 marks a free slot
        self.ints[IN_PROGRESS] += 1

    def finish(self, index: int) -> None:
        self.ints[_SLOTS + 2 * index] = 0
        self.ints[IN_PROGRESS] -= 1

    def set_lag(self, lag: float) -> None:
        self.floats[LOOP_LAG] = lag

    def set_depths(self, depths: list[int]) -> None:
        for i, depth in enumerate(depths):
            self.ints[self._depths + i] = depth
        self.floats[DEPTHS_AT] = time.monotonic()

    # -- read by the supervisor -------------------------------------------------
    def depths(self) -> tuple[float, list[int]]:
        """(when they were polled, ready messages per queue); (0, []) if never."""
        at = float(self.floats[DEPTHS_AT])
        if not at:
            return 0.0, []
        return at, list(self.ints[self._depths:self._depths + self.queues])

    def running(self) -> list[Running]:
        out = []
        for i in range(self.concurrency):
            base = _SLOTS + 2 * i
            key = self.ints[base]
            if key:
                at = self._ids + ID_BYTES * i
                mid = self._mm[at:at + ID_BYTES].rstrip(b"\0").decode(errors="replace")
                out.append(Running(key, self.floats[base + 1], mid))
        return out

    def settled_since(self, position: int) -> tuple[int, list[int]]:
        """(the ring's position now, the settled keys written since `position`): at most
        RING of them, the older ones being overwritten already."""
        now = int(self.ints[self._ring_pos])
        ring, start = self._ring, max(position, now - RING)
        return now, [int(self.ints[ring + pos % RING]) for pos in range(start, now)]

    def counters(self) -> list[int]:
        return list(self.ints[:N_INT])

    def duration_sum(self) -> float:
        return float(self.floats[DURATION_SUM])


def buckets_cumulative(cells: list[int]) -> list[int]:
    out, total = [], 0
    for i in range(len(BUCKETS) + 1):
        total += cells[_BUCKET + i]
        out.append(total)
    return out
