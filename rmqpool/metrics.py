"""Every metric rmqpool exports, defined in one place, and the HTTP endpoints
/metrics, /healthz and /readyz, served from the supervisor's own loop.

Values come from the workers' scoreboards (shared memory) plus the retired
totals of dead worker processes, so counters never go backwards across worker
restarts and no files pile up. Workers are labelled by slot, never by pid.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import control, topology
from . import scoreboard as sb
from .http import HttpServer
from .outcome import REASONS
from .process import Restart, WorkerProcess
from .settings import Settings

log = logging.getLogger("rmqpool.metrics")

DEPTH_STALE = 15.0  # queue depths older than this (3 polls) are not exported


class RetiredView(Protocol):
    @property
    def cells(self) -> dict[int, list[int]]: ...
    @property
    def duration_sum(self) -> dict[int, float]: ...


class PoolView(Protocol):
    """What the metrics and health endpoints read of the supervisor."""

    settings: Settings
    desired: int
    state: str
    last_loop: float
    workers: dict[int, WorkerProcess]
    active: dict[int, WorkerProcess]
    restarts: dict[str, int]

    @property
    def retired(self) -> RetiredView: ...


def totals(sup: PoolView) -> tuple[list[int], float]:
    """Counter cells summed over retired and live worker processes, and the duration sum."""
    cells = [0] * sb.N_INT
    duration_sum = sum(sup.retired.duration_sum.values())
    for retired in sup.retired.cells.values():
        for i, v in enumerate(retired):
            cells[i] += v
    for worker in sup.workers.values():
        for i, v in enumerate(worker.board.counters()):
            cells[i] += v
        duration_sum += worker.board.duration_sum()
    return cells, duration_sum


class PoolCollector:
    def __init__(self, sup: PoolView) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        from . import __version__

        sup, q = self.sup, self.sup.settings.queue
        cells, duration_sum = totals(sup)
        live = [w for w in sup.workers.values()]

        received = CounterMetricFamily("rmqpool_messages_received",
                                       "Messages received for the first time (attempt 1), "
                                       "counted when settled", labels=["queue"])
        received.add_metric([q], cells[sb.RECEIVED])
        yield received
        processed = CounterMetricFamily("rmqpool_messages_processed",
                                        "Deliveries settled, by outcome",
                                        labels=["queue", "outcome"])
        for outcome, index in sb.PROCESSED.items():
            processed.add_metric([q, outcome], cells[index])
        yield processed
        dead = CounterMetricFamily("rmqpool_dead_letters", "Messages sent to the DLQ, by reason",
                                   labels=["queue", "reason"])
        for reason in REASONS:
            dead.add_metric([q, reason], cells[sb.DEAD[reason]])
        yield dead
        duration = HistogramMetricFamily("rmqpool_handler_duration_seconds",
                                         "Time spent in the handler", labels=["queue"])
        cumulative = sb.buckets_cumulative(cells)
        bounds = [*(f"{b:g}" for b in sb.BUCKETS), "+Inf"]
        duration.add_metric([q], list(zip(bounds, cumulative, strict=True)), duration_sum)
        yield duration
        in_progress = GaugeMetricFamily("rmqpool_messages_in_progress",
                                        "Messages in a handler right now", labels=["queue"])
        in_progress.add_metric([q], sum(w.board.ints[sb.IN_PROGRESS] for w in live))
        yield in_progress
        workers = GaugeMetricFamily("rmqpool_workers", "Worker processes by state",
                                    labels=["state"])
        workers.add_metric(["desired"], sup.desired)
        workers.add_metric(["running"], len(sup.active))
        workers.add_metric(["ready"], sum(1 for w in sup.active.values() if w.ready))
        yield workers
        restarts = CounterMetricFamily("rmqpool_worker_restarts",
                                       "Worker processes replaced, by reason", labels=["reason"])
        for why in sorted(set(Restart) | set(sup.restarts)):
            restarts.add_metric([why], sup.restarts.get(why, 0))
        yield restarts
        reconnects = CounterMetricFamily("rmqpool_broker_reconnects",
                                         "Reconnections of workers to the broker")
        reconnects.add_metric([], cells[sb.RECONNECTS])
        yield reconnects
        lag = GaugeMetricFamily("rmqpool_event_loop_lag_seconds",
                                "How late each worker's event loop ran its last heartbeat",
                                labels=["slot"])
        now = time.monotonic()
        for slot, worker in sorted(sup.active.items()):
            lag.add_metric([str(slot)], round(worker.loop_lag(now, control.BEAT_INTERVAL), 4))
        yield lag
        depth = GaugeMetricFamily("rmqpool_queue_messages",
                                  "Ready messages in the work queue, its retry queues and its "
                                  "DLQ (polled by the workers every 5 s; absent while no "
                                  "worker could poll for 15 s)", labels=["queue"])
        polls = [w.board.depths() for w in live]
        at, depths = max(polls, default=(0.0, []), key=lambda p: p[0])
        if at and now - at < DEPTH_STALE:  # no worker could poll lately: unknown, not 0
            for spec, value in zip(topology.all_queues(sup.settings), depths, strict=True):
                depth.add_metric([spec.name], value)
        yield depth
        info = GaugeMetricFamily("rmqpool_info", "rmqpool version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def health(sup: PoolView) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "status": "ok",
        "supervisor_loop_age": round(now - sup.last_loop, 3),
        "desired": sup.desired,
        "workers": [{"slot": w.slot, "pid": w.pid, "state": w.state, "ready": w.ready,
                     "last_beat_age": round(now - w.last_beat, 3)}
                    for w in sorted(sup.workers.values(), key=lambda w: (w.slot, w.pid))],
    }


class MetricsServer:
    """The routes; all I/O is HttpServer's (non-blocking, no thread, so fork stays safe).
    The supervisor watches fileno() and calls serve() at least every 0.25 s."""

    def __init__(self, sup: PoolView) -> None:
        self.sup = sup
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(sup))
        s = sup.settings
        self.server = HttpServer(s.metrics_host, s.metrics_port, self.respond)
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d",
                 s.metrics_host, self.server.port)

    def fileno(self) -> int:
        return self.server.fileno()

    def serve(self) -> None:
        self.server.serve()

    def fds(self) -> list[int]:
        return self.server.fds()

    def close(self) -> None:
        self.server.close()

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/healthz", "/readyz"):
            body = health(self.sup)
            ok = True
            if path == "/readyz":
                ready = sum(1 for w in self.sup.active.values() if w.ready)
                ok = self.sup.state == "running" and ready >= self.sup.desired
                body["ready"] = ok
            body["status"] = "ok" if ok else "unavailable"
            return 200 if ok else 503, "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
