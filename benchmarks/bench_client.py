"""rmqpool's client side (Publisher, SyncPublisher, call) against hand-written aio-pika
publishers, in one run against the real broker.

    .venv/bin/python benchmarks/bench_client.py [--messages N] [--rounds R] [--quick]

See benchmarks/README.md ("bench_client.py") for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rmqpool  # noqa: E402
from benchmarks import bench  # noqa: E402
from rmqpool.client import WINDOW  # noqa: E402

TARGETS = {"vs_pipelined": 0.9, "vs_serial": 5.0, "sync_vs_async": 0.7, "call_p50_ms": 2.0}
THREADS = 8  # SyncPublisher threads, and the async tasks it is compared with
WARMUP = 200  # messages (or calls) before each timed part, on the same connection
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


# -- measuring -------------------------------------------------------------------------------------
@dataclass
class Timing:
    rate: float  # msg/s
    cpu_us: float  # CPU of this process (all its threads) per message
    broker_us: float  # CPU of the broker per message
    others: float  # cores other processes kept busy meanwhile


async def timed(go: Callable[[int], Awaitable[Any]], n: int) -> Timing:
    """go(WARMUP), then go(n) timed, with the CPU used meanwhile."""
    await go(WARMUP)
    cpu0, broker0, busy0 = time.process_time(), _broker_cpu(), bench.machine_busy()
    started = time.perf_counter()
    await go(n)
    elapsed = time.perf_counter() - started
    cpu, broker = time.process_time() - cpu0, _broker_cpu() - broker0
    others = max(0.0, (bench.machine_busy() - busy0 - cpu - broker) / elapsed)
    return Timing(n / elapsed, cpu / n * 1e6, broker / n * 1e6, others)


def _broker_cpu() -> float:
    return bench.cpu_seconds(bench.BROKER_PID) if bench.BROKER_PID else 0.0


def shares(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- publishing: each variant connects, warms up, times n messages, closes -----------------------
async def aio_pika_pipelined(queue: str, n: int) -> Timing:
    """The hand-written equal of publish_many: WINDOW confirms awaited at once."""
    async with await aio_pika.connect_robust(bench.URL) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = channel.default_exchange

        async def go(count: int) -> None:
            window = asyncio.Semaphore(WINDOW)

            async def one() -> None:
                try:
                    await exchange.publish(aio_pika.Message(bench.BODY, delivery_mode=PERSISTENT),
                                           routing_key=queue)
                finally:
                    window.release()

            tasks = []
            for _ in range(count):
                await window.acquire()
                tasks.append(asyncio.ensure_future(one()))
            await asyncio.gather(*tasks)

        return await timed(go, n)


async def aio_pika_serial(queue: str, n: int) -> Timing:
    """One awaited confirm per message."""
    async with await aio_pika.connect_robust(bench.URL) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = channel.default_exchange

        async def go(count: int) -> None:
            for _ in range(count):
                await exchange.publish(aio_pika.Message(bench.BODY, delivery_mode=PERSISTENT),
                                       routing_key=queue)

        return await timed(go, n)


async def publish_many(queue: str, n: int) -> Timing:
    async with rmqpool.Publisher(bench.URL) as publisher:
        async def go(count: int) -> None:
            await publisher.publish_many([bench.BODY] * count, routing_key=queue)

        return await timed(go, n)


async def publish_tasks(queue: str, n: int) -> Timing:
    """THREADS tasks, each awaiting Publisher.publish() for one message at a time."""
    async with rmqpool.Publisher(bench.URL) as publisher:
        async def task(count: int) -> None:
            for _ in range(count):
                await publisher.publish(bench.BODY, routing_key=queue)

        async def go(count: int) -> None:
            await asyncio.gather(*(task(k) for k in shares(count, THREADS)))

        return await timed(go, n)


async def sync_threads(queue: str, n: int) -> Timing:
    """THREADS threads, each calling SyncPublisher.publish() for one message at a time."""
    with rmqpool.SyncPublisher(bench.URL) as publisher:
        def go_sync(count: int) -> None:
            failures: list[BaseException] = []

            def thread(k: int) -> None:
                try:
                    for _ in range(k):
                        publisher.publish(bench.BODY, routing_key=queue)
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=thread, args=(k,)) for k in shares(count, THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]

        return await timed(lambda count: asyncio.to_thread(go_sync, count), n)


@dataclass
class Variant:
    key: str
    label: str
    run: Callable[[str, int], Awaitable[Timing]]
    share: float = 1.0  # of --messages (the serial baseline is slow)


PUBLISHERS = [
    Variant("a", f"(a) aio-pika, confirms pipelined (window {WINDOW})", aio_pika_pipelined),
    Variant("b", "(b) aio-pika, one awaited confirm per message", aio_pika_serial, 0.25),
    Variant("c", "(c) rmqpool Publisher.publish_many", publish_many),
    Variant("d", f"(d) rmqpool Publisher.publish, {THREADS} tasks", publish_tasks, 0.5),
    Variant("e", f"(e) rmqpool SyncPublisher.publish, {THREADS} threads", sync_threads, 0.5),
]


async def publish_round(broker: bench.Broker, v: Variant, n: int) -> Timing:
    queue = bench.unique_queue(f"client-{v.key}")
    await broker.declare(queue)
    try:
        timing = await v.run(queue, n)
        ready, _ = await broker.depth(queue)
        if ready != n + WARMUP:  # every confirmed message is in the queue
            raise RuntimeError(f"{v.label}: {ready} messages in the queue, expected {n + WARMUP}")
    finally:
        await broker.delete([queue])
    return timing


# -- call() ----------------------------------------------------------------------------------------
async def aio_pika_calls(queue: str, n: int) -> list[float]:
    """The hand-written equal of Publisher.call: direct reply-to, the request confirmed."""
    async with await aio_pika.connect_robust(bench.URL) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        replies: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = replies.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message)

        reply_to = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_to.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()

        async def call(body: Any) -> Any:
            correlation_id = uuid.uuid4().hex
            replies[correlation_id] = future = loop.create_future()
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 correlation_id=correlation_id, reply_to=reply_to.name),
                routing_key=queue)
            return json.loads((await asyncio.wait_for(future, 10)).body)

        return await latencies(call, n)


async def rmqpool_calls(queue: str, n: int) -> list[float]:
    async with rmqpool.Publisher(bench.URL) as publisher:
        async def call(body: Any) -> Any:
            return await publisher.call(body, routing_key=queue, timeout=10)

        return await latencies(call, n)


async def latencies(call: Callable[[Any], Awaitable[Any]], n: int) -> list[float]:
    """Seconds of each of n sequential calls, after WARMUP untimed ones."""
    for i in range(WARMUP):
        await call({"n": i})
    out = []
    for i in range(n):
        started = time.perf_counter()
        reply = await call({"n": i})
        out.append(time.perf_counter() - started)
        if reply != {"n": i}:
            raise RuntimeError(f"wrong reply {reply!r} to {{'n': {i}}}")
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class IdlePool:
    """`rmqpool benchmarks.handlers:echo` with one worker, as a subprocess."""

    def __init__(self, queue: str, log_path: pathlib.Path) -> None:
        self.queue, self.log_path = queue, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, broker: bench.Broker) -> None:
        await broker.declare(self.queue)  # durable, as the pool declares it
        argv = [*bench.rmqpool_cmd(), "benchmarks.handlers:echo", "--url", bench.URL,
                "--queue", self.queue, "--workers", "1", "--metrics-port", "0"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while (await broker.depth(self.queue))[1] < 1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not start:\n{self.log_path.read_text()}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Results:
    publish: dict[str, list[Timing]] = field(default_factory=dict)
    calls: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    def rate(self, key: str) -> float:
        return statistics.median(t.rate for t in self.publish[key])

    def cpu(self, key: str, attr: str) -> float:
        return float(statistics.median(getattr(t, attr) for t in self.publish[key]))

    def others(self, key: str) -> float:
        return max(t.others for t in self.publish[key])

    def call(self, key: str, i: int) -> float:
        """Median over the rounds of p50 (0), p99 (1) or mean (2), in ms."""
        return statistics.median(r[i] for r in self.calls[key]) * 1e3


async def run(args: argparse.Namespace) -> Results:
    res = Results()
    broker = bench.Broker(bench.URL)
    await broker.open()
    try:
        for r in range(args.rounds):
            for v in PUBLISHERS if r % 2 == 0 else PUBLISHERS[::-1]:
                n = max(1000, round(args.messages * v.share))
                timing = await publish_round(broker, v, n)
                res.publish.setdefault(v.key, []).append(timing)
                bench.log(f"round {r + 1} {v.label}: {n} in {n / timing.rate:.2f}s = "
                    f"{timing.rate:,.0f} msg/s, {timing.cpu_us:.0f} us CPU/msg, "
                    f"others {timing.others:.2f} cores")
        pool = IdlePool(bench.unique_queue("client-call"),
                        pathlib.Path(tempfile.gettempdir()) / f"bench-client-{os.getpid()}.log")
        callers = [("f", aio_pika_calls), ("g", rmqpool_calls)]
        try:
            await pool.start(broker)
            for r in range(args.rounds):
                for key, caller in callers if r % 2 == 0 else callers[::-1]:
                    times = await caller(pool.queue, args.calls)
                    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
                    res.calls.setdefault(key, []).append((p50, p99, statistics.mean(times)))
                    bench.log(f"round {r + 1} call ({key}): p50 {p50 * 1e3:.2f} ms, "
                              f"p99 {p99 * 1e3:.2f} ms")
        finally:
            pool.stop()
            await broker.delete(bench.all_queues(pool.queue))
    finally:
        await broker.close()
    return res


def report(res: Results, args: argparse.Namespace) -> None:
    def row(key: str, label: str, n: int, ratios: list[tuple[str, float | None]]) -> None:
        first = True
        for base, target in ratios or [("", None)]:
            ratio = res.rate(key) / res.rate(base) if base else None
            ratio_txt = f"{ratio:5.2f} vs ({base})" if ratio is not None else ""
            target_txt = (f">= {target:.2f} {bench.verdict(ratio >= target)}"
                          if ratio is not None and target else "")
            if first:
                print(f"  {label:<48} {n:>6} {res.rate(key):>8,.0f}  {ratio_txt:<12} "
                      f"{target_txt:<12} {res.cpu(key, 'cpu_us'):>6.0f} "
                      f"{res.cpu(key, 'broker_us'):>6.0f} {res.others(key):>6.2f}")
                first = False
            else:
                print(f"  {'':<48} {'':>6} {'':>8}  {ratio_txt:<12} {target_txt:<12}")

    counts = {v.key: max(1000, round(args.messages * v.share)) for v in PUBLISHERS}
    labels = {v.key: v.label for v in PUBLISHERS}
    print()
    print(f"publishing persistent {len(bench.BODY)}-byte messages with confirms, median of "
          f"{args.rounds} rounds (order alternated), {WARMUP} warm-up messages per run")
    print(f"  {'':<48} {'msgs':>6} {'msg/s':>8}  {'ratio':<12} {'target':<12} "
          f"{'CPU/msg':>6} {'broker':>6} {'others':>6}")
    row("a", labels["a"], counts["a"], [("b", None)])  # what pipelining can gain here
    row("b", labels["b"], counts["b"], [])
    row("c", labels["c"], counts["c"], [("a", TARGETS["vs_pipelined"]),
                                        ("b", TARGETS["vs_serial"])])
    row("d", labels["d"], counts["d"], [("c", None)])
    row("e", labels["e"], counts["e"], [("d", TARGETS["sync_vs_async"]), ("c", None)])
    print("  CPU/msg: us of this process's CPU per message (median); broker: the broker's; "
          "others: cores other processes kept busy (worst round)")
    print()
    print(f"call() round trip to an idle pool (1 worker, benchmarks.handlers:echo), "
          f"{args.calls} sequential calls after {WARMUP}, median of {args.rounds} rounds")
    print(f"  {'':<48} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>7}  target")
    for key, label in (("f", "(f) aio-pika, direct reply-to, request confirmed"),
                       ("g", "(g) rmqpool Publisher.call")):
        target = ""
        if key == "g":
            limit = TARGETS["call_p50_ms"]
            target = f"p50 < {limit:g} ms {bench.verdict(res.call('g', 0) < limit)}"
        print(f"  {label:<48} {res.call(key, 0):>7.2f} {res.call(key, 1):>7.2f} "
              f"{res.call(key, 2):>7.2f}  {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, help="messages per publish_many run (default "
                        "20000, quick 2000; the serial baseline publishes a quarter, the "
                        f"{THREADS}-way ones half)")
    parser.add_argument("--calls", type=int, help="timed call()s per round (default 1000, "
                        "quick 200)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (default: asyncio)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (~10 s)")
    args = parser.parse_args()
    args.messages = args.messages or (2000 if args.quick else 20000)
    args.calls = args.calls or (200 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"rmqpool {rmqpool.__version__} client benchmark | python "
          f"{platform.python_version()}, aio-pika {aio_pika.__version__}, aiormq "
          f"{bench._version('aiormq')}, {loop} loop | {os.cpu_count()} CPUs, broker "
          f"{bench.URL.split('@')[-1]}")
    sys.stdout.flush()
    started = time.monotonic()
    if args.uvloop:
        import uvloop

        res = uvloop.run(run(args))
    else:
        res = asyncio.run(run(args))
    report(res, args)
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
