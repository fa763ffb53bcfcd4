"""rmqpool vs a hand-written multi-process aio-pika consumer, against the real broker.

    .venv/bin/python benchmarks/bench.py [--messages N] [--workers W] [--quick]

See benchmarks/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiormq
from pamqp import commands as spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import handlers  # noqa: E402

URL = os.environ.get("RMQPOOL_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = bytes(range(256)) * 2  # 512 bytes, the same for every message and every run
MIN_UPTIME = 5.0  # rmqpool.supervisor.MIN_UPTIME: dying sooner counts as a quick death

TARGETS = {
    "noop": 1.0, "cpu": 0.95, "rss": 1.2, "metrics_cost": 5.0, "scrape_ms": 50.0,
}
SCRAPE_EVERY = 0.25  # seconds between scrapes in (c): even --quick runs see several


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the broker ------------------------------------------------------------------------------------
class Broker:
    """One admin connection: publish, queue depth (passive declare), delete."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self.ch: Any = None

    async def open(self) -> None:
        self.conn = await aiormq.connect(self.url)
        self.ch = await self.conn.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def _channel(self) -> Any:
        if self.ch is None or self.ch.is_closed:
            self.ch = await self.conn.channel(publisher_confirms=True)
        return self.ch

    async def declare(self, queue: str) -> None:
        await (await self._channel()).queue_declare(queue, durable=True)

    async def publish(self, queue: str, n: int, window: int = 1000) -> float:
        """n persistent messages, pipelined `window` at a time, each confirmed. msg/s."""
        ch = await self._channel()
        await ch.queue_declare(queue, durable=True)
        props = spec.Basic.Properties(delivery_mode=2, content_type="application/octet-stream")
        started = time.monotonic()
        for start in range(0, n, window):
            confirms = await asyncio.gather(*(
                ch.basic_publish(BODY, routing_key=queue, properties=props)
                for _ in range(min(window, n - start))))
            if not all(isinstance(c, spec.Basic.Ack) for c in confirms):
                raise RuntimeError("the broker nacked a published message")
        return n / (time.monotonic() - started)

    async def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of `queue`."""
        ok = await (await self._channel()).queue_declare(queue, passive=True)
        return ok.message_count, ok.consumer_count

    async def delete(self, queues: list[str]) -> None:
        for name in queues:
            try:
                await (await self._channel()).queue_delete(name)
            except aiormq.exceptions.AMQPError:
                pass


def unique_queue(tag: str) -> str:
    return f"rmqpool-bench-{tag}-{uuid.uuid4().hex[:8]}"


def all_queues(queue: str) -> list[str]:
    """The queue and what rmqpool declares next to it with default options (DLQ,
    retry tiers)."""
    from rmqpool import topology
    from rmqpool.settings import Settings

    names = [spec.name for spec in topology.all_queues(Settings(handler="x:y", queue=queue))]
    return [queue, *(n for n in names if n != queue)]


# -- processes -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Variant:
    key: str  # short id
    label: str
    impl: str  # "hand" or "rmqpool"
    handler: str  # function name in benchmarks.handlers
    threaded: bool = False  # hand-written: run the handler in a one-thread executor
    metrics: bool = False  # rmqpool: serve /metrics (and scrape it every SCRAPE_EVERY s)


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path
    port: int
    stats_dir: pathlib.Path
    t0: float

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def rmqpool_cmd() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("rmqpool")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rmqpool"]


def launch(v: Variant, queue: str, workers: int, prefetch: int, tmp: pathlib.Path,
           env_extra: dict[str, str]) -> Launched:
    stats_dir = pathlib.Path(tempfile.mkdtemp(prefix="rmqpool-bench-", dir="/dev/shm"
                                              if os.path.isdir("/dev/shm") else None))
    port = free_port() if v.metrics else 0
    if v.impl == "rmqpool":
        argv = [*rmqpool_cmd(), f"benchmarks.handlers:{v.handler}", "--url", URL,
                "--queue", queue, "--workers", str(workers), "--prefetch", str(prefetch),
                "--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
    else:
        argv = [sys.executable, str(ROOT / "benchmarks" / "handwritten.py"), "--url", URL,
                "--queue", queue, "--workers", str(workers), "--prefetch", str(prefetch),
                "--handler", f"benchmarks.handlers:{v.handler}",
                *(["--thread"] if v.threaded else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_STATS_DIR": str(stats_dir),
           **env_extra}
    log_path = tmp / f"{v.key}-{queue}.log"
    with open(log_path, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Launched(proc, log_path, port, stats_dir, t0)


def stop(run: Launched) -> None:
    """SIGKILL the whole process group (supervisor/parent and its workers)."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.proc.wait(10)
    shutil.rmtree(run.stats_dir, ignore_errors=True)


def read_stats(stats_dir: pathlib.Path) -> tuple[int, float, float]:
    """(messages handled, first finished, last finished) over all processes."""
    count, first, last = 0, float("inf"), 0.0
    for entry in os.scandir(stats_dir):
        with open(entry.path, "rb") as f:
            data = f.read(24)
        if len(data) < 24:
            continue
        c, f1, l1 = memoryview(data).cast("d")
        if c:
            count += int(c)
            first, last = min(first, f1), max(last, l1)
    return count, first, last


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def find_broker_pid() -> int | None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        return int(entry.name)
            except OSError:
                pass
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")
BROKER_PID = find_broker_pid()


@dataclass
class CpuSample:
    """CPU used so far by: our launched process tree, the broker, everyone else."""
    at: float
    handled: int
    ours: float
    broker: float
    others: float

    @classmethod
    def take(cls, pids: list[int], handled: int) -> CpuSample:
        ours = sum(cpu_seconds(p) for p in pids)
        broker = cpu_seconds(BROKER_PID) if BROKER_PID else 0.0
        harness = time.process_time()
        return cls(time.monotonic(), handled, ours, broker,
                   machine_busy() - ours - broker - harness)


def process_age(pid: int) -> float:
    """Seconds since the process started (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / CLK_TCK
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start
    except OSError:
        return 0.0


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET that, like Prometheus, stops at Content-Length rather
    than waiting for the server to close (see leaked_http_sockets())."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data, length = b"", None
        while True:
            if length is None and b"\r\n\r\n" in data:
                head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip() == "content-length":
                        length = len(head) + 4 + int(value)
            if length is not None and len(data) >= length:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def leaked_http_sockets(port: int, pids: list[int]) -> int:
    """Worker fds still holding a connection to the supervisor's HTTP port: a worker
    forked while a request was open inherits the client socket, so the supervisor's
    close() does not end the connection (the client sees no EOF)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] != "0A":  # not LISTEN
                inodes.add(cols[9])
    held = 0
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(fd.path)
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    held += 1
        except OSError:
            pass
    return held


# -- throughput + start-up -------------------------------------------------------------------------
@dataclass
class Run:
    rate: float  # msg/s, first handled -> last handled
    startup: float  # s, launch -> first handled
    cpu_us: float  # CPU of the launched processes per message, while consuming
    others: float  # cores busy with other processes (not ours, not the broker) meanwhile
    scrapes: int = 0


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def add(self, key: str, run: Run) -> None:
        self.runs.setdefault(key, []).append(run)

    def best(self, key: str) -> float:
        return max(r.rate for r in self.runs[key])

    def median(self, key: str) -> float:
        return statistics.median(r.rate for r in self.runs[key])

    def startup(self, key: str) -> float:
        return statistics.median(r.startup for r in self.runs[key])

    def cpu_us(self, key: str) -> float:
        return statistics.median(r.cpu_us for r in self.runs[key])

    def others(self, key: str) -> float:
        return max(r.others for r in self.runs[key])


async def throughput(broker: Broker, v: Variant, n: int, workers: int, prefetch: int,
                     tmp: pathlib.Path, env: dict[str, str], timeout: float) -> Run:
    queue = unique_queue(v.key)
    await broker.publish(queue, n)
    run = launch(v, queue, workers, prefetch, tmp, env)
    scrapes, next_scrape = 0, run.t0 + SCRAPE_EVERY
    pids: list[int] = []
    a = b = None
    try:
        deadline = run.t0 + timeout
        while True:
            count, first, last = read_stats(run.stats_dir)
            if count and a is None:  # consuming: its workers all exist by now
                pids = [run.proc.pid, *children(run.proc.pid)]
                a = CpuSample.take(pids, count)
            if count >= n:
                b = CpuSample.take(pids, count)
                break
            now = time.monotonic()
            if run.proc.poll() is not None or now > deadline:
                raise RuntimeError(f"{v.label}: {count}/{n} handled after {now - run.t0:.1f}s "
                                   f"(exit {run.proc.poll()})\n{run.log_tail()}")
            if v.metrics and now >= next_scrape:  # a far more eager Prometheus than any real one
                try:
                    http_get(run.port, "/metrics")
                    scrapes += 1
                except OSError:
                    pass
                next_scrape += SCRAPE_EVERY
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the last acks leave the worker
    finally:
        stop(run)
    # Every message acked? Once the consumers are gone, unacked ones are requeued.
    for _ in range(100):
        ready, consumers = await broker.depth(queue)
        if consumers == 0:
            break
        await asyncio.sleep(0.05)
    await broker.delete(all_queues(queue))
    if ready:
        raise RuntimeError(f"{v.label}: {ready} message(s) were handled but not acked")
    if count != n:
        raise RuntimeError(f"{v.label}: {count} handler calls for {n} messages")
    assert a is not None and b is not None
    handled, window = b.handled - a.handled, b.at - a.at
    cpu_us = (b.ours - a.ours) / handled * 1e6 if handled else float("nan")
    others = max(0.0, (b.others - a.others) / window) if window > 0 else float("nan")
    return Run(n / (last - first), first - run.t0, cpu_us, others, scrapes)


# -- idle memory -----------------------------------------------------------------------------------
@dataclass
class Memory:
    rss: float  # KiB, mean per worker
    pss: float
    parent_rss: int
    workers: int


async def idle_memory(broker: Broker, v: Variant, workers: int, prefetch: int,
                      tmp: pathlib.Path, env: dict[str, str]) -> Memory:
    queue = unique_queue(f"{v.key}-idle")
    await broker.declare(queue)
    run = launch(v, queue, workers, prefetch, tmp, env)
    try:
        deadline = time.monotonic() + 60
        while (await broker.depth(queue))[1] < workers:
            if run.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{v.label}: workers never all consumed\n{run.log_tail()}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # settle: first heartbeat/beat, lazy imports done
        pids = children(run.proc.pid)
        if len(pids) != workers:
            raise RuntimeError(f"{v.label}: {len(pids)} child processes, expected {workers}")
        mems = [memory_kib(p) for p in pids]
        parent_rss, _ = memory_kib(run.proc.pid)
    finally:
        stop(run)
    await broker.delete(all_queues(queue))
    return Memory(statistics.mean(m[0] for m in mems), statistics.mean(m[1] for m in mems),
                  parent_rss, len(pids))


# -- (c) the per-message cost of recording metrics, in-process -------------------------------------
def scoreboard_cost_us() -> float:
    """µs per message of what rmqpool writes to the scoreboard for one delivery
    (start + settle + finish + message key): paid whether /metrics is served or not."""
    from types import SimpleNamespace

    from rmqpool.message import identify
    from rmqpool.outcome import Action
    from rmqpool.scoreboard import Scoreboard

    board = Scoreboard(1)
    # Fresh bytes objects, as deliveries are: their hash is not cached yet.
    raws = [SimpleNamespace(body=BODY[:-2] + i.to_bytes(2, "big"),
                            header=SimpleNamespace(properties=SimpleNamespace(message_id=f"{i:032x}")))
            for i in range(20000)]
    started = time.perf_counter()
    for raw in raws:
        key, skey = identify(raw, 1)  # type: ignore[arg-type]
        board.start(0, key, raw.header.properties.message_id)
        board.settle(Action.ACK, None, 0.0001, True, skey)
        board.finish(0)
    elapsed = time.perf_counter() - started
    board.close()
    return elapsed / len(raws) * 1e6


# -- (d) /metrics after many worker restarts -------------------------------------------------------
@dataclass
class ScrapeResult:
    restarts: int
    restart_seconds: float
    killed_counter: float
    before_ms: list[float]
    after_ms: list[float]
    body_bytes: int
    ready_seconds: float
    leaked: int
    scrape_cpu_ms: float


def health(port: int) -> dict[str, Any]:
    import json

    status, body = http_get(port, "/healthz")
    return json.loads(body) if status == 200 else {}


def time_scrapes(port: int, n: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(n):
        started = time.perf_counter()
        status, body = http_get(port, "/metrics")
        times.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        size = len(body)
        time.sleep(0.05)
    return times, size


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


async def scrape_after_restarts(broker: Broker, workers: int, restarts: int, tmp: pathlib.Path,
                                env: dict[str, str], budget: float,
                                max_starting: int) -> ScrapeResult:
    """Kill workers with SIGKILL one at a time, round-robin over the slots, each only
    once it has lived MIN_UPTIME + 0.5 s (its age from /proc) and is ready, so no slot ever
    enters the supervisor's restart backoff; at most `max_starting` replacements may
    still be starting at a time.
    Then time the scrapes of /metrics."""
    queue = unique_queue("restarts")
    await broker.declare(queue)
    v = Variant("d", "rmqpool 32 workers", "rmqpool", "noop", metrics=True)
    run = launch(v, queue, workers, 10, tmp, env)
    port = run.port

    def all_ready() -> bool:
        if run.proc.poll() is not None:
            raise RuntimeError(f"rmqpool exited\n{run.log_tail()}")
        try:
            return http_get(port, "/readyz")[0] == 200
        except OSError:
            return False

    try:
        ready_seconds = wait_until(all_ready, 180, f"{workers} workers ready")
        before, _ = time_scrapes(port, 20)
        killed: set[int] = set()
        kills, started = 0, time.monotonic()
        while kills < restarts and time.monotonic() - started < budget:
            ws = health(port).get("workers", [])
            starting = sum(1 for w in ws if not w["ready"]) + workers - len(ws)
            slot = kills % workers
            target = [w for w in ws if w["slot"] == slot and w["state"] == "ready"
                      and w["pid"] not in killed]
            if (starting < max_starting and target
                    and process_age(target[0]["pid"]) >= MIN_UPTIME + 0.5):
                os.kill(target[0]["pid"], signal.SIGKILL)
                killed.add(target[0]["pid"])
                kills += 1
                if kills % 100 == 0:
                    log(f"(d) {kills} restarts after {time.monotonic() - started:.0f}s")
                continue
            time.sleep(0.02)
        wait_until(all_ready, 120, "every replacement ready")
        restart_seconds = time.monotonic() - started
        time.sleep(1.0)
        after, size = time_scrapes(port, 20)
        leaked = leaked_http_sockets(port, children(run.proc.pid))
        # The supervisor's CPU per scrape: 200 back-to-back scrapes minus as long idle.
        sup = run.proc.pid
        c0, t0 = cpu_seconds(sup), time.monotonic()
        for _ in range(200):
            http_get(port, "/metrics")
        c1, t1 = cpu_seconds(sup), time.monotonic()
        time.sleep(t1 - t0)
        c2 = cpu_seconds(sup)
        scrape_cpu_ms = max(0.0, (c1 - c0) - (c2 - c1)) / 200 * 1000
        text = http_get(port, "/metrics")[1].decode()
        killed = 'rmqpool_worker_restarts_total{reason="killed"}'
        killed_counter = next((float(line.split()[-1]) for line in text.splitlines()
                               if line.startswith(killed)), float("nan"))
    finally:
        stop(run)
        await broker.delete(all_queues(queue))
    return ScrapeResult(kills, restart_seconds, killed_counter, before, after, size,
                        ready_seconds, leaked, scrape_cpu_ms)


# -- the report ------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def calibrate_cpu(target_s: float = 0.005) -> tuple[int, float]:
    """Iterations of handlers.burn() for `target_s` seconds, and their duration."""
    probe = 50_000
    per_iter = min(_timed(lambda: handlers.burn(probe)) for _ in range(15)) / probe
    iters = max(1000, round(target_s / per_iter))
    return iters, iters * per_iter


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def main_async(args: argparse.Namespace) -> int:
    import aio_pika
    import uvloop

    import rmqpool

    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    n_noop = args.messages or (4000 if quick else 20000)
    n_cpu = args.cpu_messages or (300 if quick else 1000)
    restarts = args.restarts if args.restarts is not None else (64 if quick else 500)
    workers, prefetch = args.workers, args.prefetch
    iters, cpu_s = calibrate_cpu()
    env = {"BENCH_CPU_ITERS": str(iters)}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rmqpool-bench-logs-"))
    t_start = time.monotonic()

    broker = Broker(URL)
    await broker.open()
    print(f"rmqpool {rmqpool.__version__} benchmark | python {platform.python_version()}, "
          f"aio-pika {aio_pika.__version__}, aiormq {_version('aiormq')}, "
          f"uvloop {uvloop.__version__} | {os.cpu_count()} CPUs, broker {URL.split('@')[-1]}")
    print(f"messages: {n_noop} no-op / {n_cpu} CPU-bound, persistent, {len(BODY)} bytes, "
          f"published with confirms; prefetch {prefetch}; {repeats} run(s) each, order "
          f"alternated; CPU handler {iters} iterations ({cpu_s * 1e3:.1f} ms)")
    sys.stdout.flush()

    hand_noop = Variant("a-noop", "hand-written, sync no-op inline", "hand", "noop")
    rmq_noop = Variant("b-noop", "rmqpool, sync no-op", "rmqpool", "noop")
    rmq_noop_m = Variant("c-noop-m", "rmqpool, sync no-op, metrics on", "rmqpool", "noop",
                         metrics=True)
    rmq_async = Variant("b-async", "rmqpool, async no-op", "rmqpool", "noop_async")
    hand_cpu = Variant("a-cpu", "hand-written, CPU in 1 executor thread", "hand", "cpu",
                       threaded=True)
    rmq_cpu = Variant("b-cpu", "rmqpool, CPU (sync)", "rmqpool", "cpu")

    res = Results()
    noop_set = [hand_noop, rmq_noop, rmq_noop_m, rmq_async]
    for r in range(repeats):
        for v in (noop_set if r % 2 == 0 else noop_set[::-1]):
            run = await throughput(broker, v, n_noop, workers, prefetch, tmp, env, 300)
            res.add(v.key, run)
            log(f"{v.label} ({workers} workers): {run.rate:,.0f} msg/s, start-up "
                f"{run.startup:.2f}s, {run.cpu_us:.0f} us CPU/msg, others {run.others:.2f} cores")
    cpu_set = [hand_cpu, rmq_cpu]
    for r in range(repeats):
        for v in (cpu_set if r % 2 == 0 else cpu_set[::-1]):
            run = await throughput(broker, v, n_cpu, 2, prefetch, tmp, env, 300)
            res.add(v.key, run)
            log(f"{v.label} (2 workers): {run.rate:,.0f} msg/s, start-up {run.startup:.2f}s, "
                f"{run.cpu_us:.0f} us CPU/msg, others {run.others:.2f} cores")

    mem_hand = await idle_memory(broker, hand_noop, workers, prefetch, tmp, env)
    mem_rmq = await idle_memory(broker, rmq_noop, workers, prefetch, tmp, env)
    log("idle memory measured")

    scrape = None
    if restarts:
        log(f"(d) 32 workers, {restarts} SIGKILL restarts")
        scrape = await scrape_after_restarts(broker, 32, restarts, tmp, env,
                                             budget=args.restart_budget, max_starting=4)
    await broker.close()

    # -- print -------------------------------------------------------------------------------------
    def row(label: str, key: str, base: str | None, target: float | None) -> None:
        ratio = res.best(key) / res.best(base) if base else None
        ratio_txt = f"{ratio:5.2f}" if ratio is not None else "     "
        tgt = f">= {target:.2f} {verdict(ratio >= target)}" if ratio is not None and target else ""
        print(f"  {label:<42} {res.best(key):>9,.0f} {res.median(key):>9,.0f}  {ratio_txt}  "
              f"{tgt:<14} {res.startup(key):>7.2f} {res.cpu_us(key):>8,.0f} "
              f"{res.others(key):>7.2f}")

    print()
    print("(a)/(b) throughput, first message handled -> last; start-up = launch -> first "
          "handled (median)")
    print(f"  {'msg/s':<42} {'best':>9} {'median':>9}  {'ratio':>5}  {'target':<14} "
          f"{'start-up':>7} {'CPU/msg':>8} {'others':>7}")
    print(f"  no-op, {workers} workers, prefetch {prefetch}")
    row("(a) hand-written aio-pika, inline", "a-noop", None, None)
    row("(b) rmqpool, sync no-op (thread pool)", "b-noop", "a-noop", TARGETS["noop"])
    row("(b) rmqpool, async no-op", "b-async", "a-noop", TARGETS["noop"])
    print(f"  CPU-bound ~5 ms/message, 2 workers, prefetch {prefetch}")
    row("(a) hand-written, run_in_executor (1 thread)", "a-cpu", None, None)
    row("(b) rmqpool, sync handler", "b-cpu", "a-cpu", TARGETS["cpu"])
    print("  ratio = best rmqpool / best hand-written msg/s; start-up s (median); CPU/msg = us of "
          "CPU the launched processes used per message while consuming (median); others = "
          "cores other processes on this machine kept busy meanwhile (worst run)")

    print()
    print(f"idle memory per worker ({workers} workers, after consuming an empty queue)")
    r_rss, r_pss = mem_rmq.rss / mem_hand.rss, mem_rmq.pss / mem_hand.pss
    print(f"  {'':<42} {'RSS MiB':>9} {'PSS MiB':>9}  parent RSS MiB")
    print(f"  {'(a) hand-written':<42} {mem_hand.rss / 1024:>9.1f} {mem_hand.pss / 1024:>9.1f}  "
          f"{mem_hand.parent_rss / 1024:.1f}")
    print(f"  {'(b) rmqpool':<42} {mem_rmq.rss / 1024:>9.1f} {mem_rmq.pss / 1024:>9.1f}  "
          f"{mem_rmq.parent_rss / 1024:.1f}")
    print(f"  {'ratio rmqpool / hand-written':<42} {r_rss:>9.2f} {r_pss:>9.2f}  "
          f"target RSS <= {TARGETS['rss']:.1f}x {verdict(r_rss <= TARGETS['rss'])}")

    print()
    on, off = res.best("c-noop-m"), res.best("b-noop")
    cost = (off - on) / off * 100
    cost_med = (res.median("b-noop") - res.median("c-noop-m")) / res.median("b-noop") * 100
    scrapes = sum(r.scrapes for r in res.runs["c-noop-m"])
    per_msg_us = workers / off * 1e6
    sb_us = scoreboard_cost_us()
    print(f"(c) metrics cost, rmqpool sync no-op, {workers} workers")
    print(f"  metrics off (--metrics-port 0)   {off:>9,.0f} msg/s best, "
          f"{res.median('b-noop'):,.0f} median")
    print(f"  metrics on, scraped every {SCRAPE_EVERY:g} s {on:>8,.0f} msg/s best, "
          f"{res.median('c-noop-m'):,.0f} median ({scrapes} scrapes)")
    cpu_off, cpu_on = res.cpu_us("b-noop"), res.cpu_us("c-noop-m")
    print(f"  CPU per message (workers + supervisor, median): off {cpu_off:.0f} us, on "
          f"{cpu_on:.0f} us ({(cpu_on - cpu_off) / cpu_off * 100:+.1f}%)")
    print(f"  cost {cost:+.1f}% (best), {cost_med:+.1f}% (median)   target <= "
          f"{TARGETS['metrics_cost']:.0f}% {verdict(cost <= TARGETS['metrics_cost'])}")
    print(f"  scoreboard writes per message (paid on and off): {sb_us:.2f} us = "
          f"{sb_us / per_msg_us * 100:.1f}% of a worker's {per_msg_us:.0f} us per message")

    if scrape is not None:
        print()
        med, mx = statistics.median(scrape.after_ms), max(scrape.after_ms)
        print(f"(d) /metrics with 32 workers after {scrape.restarts} SIGKILL restarts "
              f"(round-robin, each worker >= {MIN_UPTIME + 0.5:g}s old when killed, "
              f"<= 4 starting at once)")
        print(f"  32 workers ready after start: {scrape.ready_seconds:.1f}s; restarts took "
              f"{scrape.restart_seconds:.0f}s; rmqpool_worker_restarts_total{{reason=killed}} "
              f"= {scrape.killed_counter:g}; body {scrape.body_bytes} bytes")
        print(f"  before restarts: median {statistics.median(scrape.before_ms):.1f} ms, "
              f"max {max(scrape.before_ms):.1f} ms (20 scrapes)")
        print(f"  after restarts:  median {med:.1f} ms, max {mx:.1f} ms (20 scrapes)   "
              f"target < {TARGETS['scrape_ms']:.0f} ms {verdict(mx < TARGETS['scrape_ms'])}")
        print(f"  supervisor CPU per scrape: {scrape.scrape_cpu_ms:.2f} ms (200 back-to-back "
              f"scrapes, idle baseline subtracted)")
        print(f"  worker fds still holding /metrics or /healthz connections the supervisor had "
              f"closed: {scrape.leaked}")
        if scrape.restarts < restarts:
            print(f"  NOTE: only {scrape.restarts} of {restarts} restarts fitted in the "
                  f"{args.restart_budget:g}s budget")

    print()
    print(f"total {time.monotonic() - t_start:.0f}s; logs in {tmp}")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, help="messages per no-op run "
                        "(default 20000, quick 4000)")
    parser.add_argument("--cpu-messages", type=int, help="messages per CPU-bound run "
                        "(default 1000, quick 300)")
    parser.add_argument("--workers", type=int, default=2, help="workers for the no-op "
                        "scenarios and idle memory (default 2; CPU-bound always uses 2)")
    parser.add_argument("--prefetch", type=int, default=20, help="prefetch for both (default 20)")
    parser.add_argument("--repeats", type=int, help="runs of each variant (default 3, quick 1)")
    parser.add_argument("--restarts", type=int, help="(d) worker kills (default 500, quick 64; "
                        "0 skips (d))")
    parser.add_argument("--restart-budget", type=float, default=240.0,
                        help="(d) stop killing after this many seconds (default 240)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
