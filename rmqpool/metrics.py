"""Every metric rmqpool exports, defined in one place, and the HTTP endpoints
/metrics, /healthz and /readyz, served from the supervisor's own loop.

Values come from the workers' scoreboards (shared memory) plus the retired
totals of dead worker processes, so counters never go backwards across worker
restarts and no files pile up. Workers are labelled by slot, never by pid.
"""

from __future__ import annotations

import functools
import json
import logging
import selectors
import socket
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
    """A tiny HTTP/1.0 server driven by the supervisor's selector: no thread, so fork
    stays safe. Each request is small; responses are written with a short timeout."""

    def __init__(self, sup: PoolView) -> None:
        self.sup = sup
        self._sel = selectors.DefaultSelector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(sup))
        s = sup.settings
        family = socket.AF_INET6 if ":" in s.metrics_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((s.metrics_host, s.metrics_port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self._sel.register(self.sock.fileno(), selectors.EVENT_READ, self.handle)
        self._clients: dict[int, tuple[socket.socket, bytes, float]] = {}
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d",
                 s.metrics_host, self.sock.getsockname()[1])

    def fileno(self) -> int:
        return self._sel.fileno()

    def fds(self) -> list[int]:
        return [self.sock.fileno(), self._sel.fileno(), *self._clients]

    def serve(self) -> None:
        for key, _ in self._sel.select(0):
            key.data()

    def handle(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            fd = conn.fileno()
            self._clients[fd] = (conn, b"", time.monotonic())
            self._sel.register(fd, selectors.EVENT_READ, functools.partial(self._read, fd))
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, (_conn, _, since) in list(self._clients.items()):
            if now - since > 5.0:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        conn, _, _ = self._clients.pop(fd)
        self._sel.unregister(fd)
        conn.close()

    def _read(self, fd: int) -> None:
        conn, buf, since = self._clients[fd]
        try:
            data = conn.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buf += data
        if b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < 16384:
            self._clients[fd] = (conn, buf, since)
            return
        self._sel.unregister(fd)
        del self._clients[fd]
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(self._respond(buf))
        except OSError:
            pass
        finally:
            conn.close()

    def _respond(self, request: bytes) -> bytes:
        line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1")
        parts = line.split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return _http(405, "text/plain", b"method not allowed\n")
        if path == "/metrics":
            return _http(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        if path in ("/healthz", "/readyz"):
            body = health(self.sup)
            ok = True
            if path == "/readyz":
                ready = sum(1 for w in self.sup.active.values() if w.ready)
                ok = self.sup.state == "running" and ready >= self.sup.desired
                body["ready"] = ok
            body["status"] = "ok" if ok else "unavailable"
            return _http(200 if ok else 503, "application/json",
                         json.dumps(body).encode() + b"\n")
        return _http(404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n")

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        self.sock.close()


def _http(status: int, content_type: str, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
              503: "Service Unavailable"}[status]
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body
