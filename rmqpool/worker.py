"""The worker process: one uvloop event loop, one connection, one consumer.

worker_main() runs in the child right after fork. Nothing here runs in the
supervisor. Order of a worker's life:
    connect (with backoff) -> declare topology -> consume -> [beat every second]
    -> drain on command/SIGTERM/orphaning -> close -> exit code
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

import aio_pika
import aiormq
import setproctitle
import uvloop

from . import control, exitcodes, frames, topology
from .broker_errors import BROKER_ERRORS, translated
from .consumer import Consumer
from .declare import TopologyRefused, declare_topology
from .dispatch import Dispatcher
from .handler import Handler
from .outcome import Death
from .publisher import ChannelPublisher
from .scoreboard import RECONNECTS, Scoreboard
from .settings import BROKER_CONSUMER_TIMEOUT, Settings
from .settle import Settler, Tiers

log = logging.getLogger("rmqpool.worker")

DEPTH_INTERVAL = 5.0  # seconds between polls of the queues' depths (for metrics)
ORPHAN_DEADLINE = 2.5  # seconds an orphaned worker gives in-flight handlers
ASK_TIMEOUT = 5.0


class Fatal(Exception):
    """The pool cannot work with this configuration; restarting will not help."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def worker_main(settings: Settings, slot: int, handler: Handler, sock: Any,
                board: Scoreboard, supervisor_pid: int) -> int:
    """Entry point in the forked child. Returns the process's exit code."""
    setproctitle.setproctitle(f"rmqpool: worker {slot} [{handler.spec} on {settings.queue}]")
    frames.install()  # a delivery with undecodable properties is malformed, not a crash loop
    worker = Worker(settings, slot, handler, sock, board, supervisor_pid)
    # Not closed: closing a Runner cancels and joins every task, and a connection
    # handshake may ignore the cancel. The caller exits the process right after.
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return runner.run(worker.run())


class Worker:
    def __init__(self, settings: Settings, slot: int, handler: Handler, sock: Any,
                 board: Scoreboard, supervisor_pid: int):
        self.settings = settings
        self.slot = slot
        self.handler = handler
        self.board = board
        self.supervisor_pid = supervisor_pid
        self.control = control.WorkerEnd(sock)
        self.drain_deadline: float | None = None  # seconds to drain, once asked to stop
        self._stop = asyncio.Event()
        self._lost = False  # stopping on our own (consumer cancelled by the broker)
        self._consuming = False  # so a lost connection is logged once, not per retry
        self._verdicts: dict[int, asyncio.Future[control.Verdict]] = {}
        self._tiers: Tiers | None = None
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None

    # -- lifecycle -------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop,
                                self.settings.graceful_timeout)
        await self.control.open()
        side = [asyncio.create_task(self._beat()), asyncio.create_task(self._commands())]
        try:
            while True:
                connection = await self._connect()
                if connection is None:
                    return exitcodes.OK  # asked to stop before the broker was reachable
                try:
                    with translated():
                        consumer = await self._start_consuming(connection)
                    break
                except BROKER_ERRORS as exc:
                    log.warning("connection to %s lost while setting up (%s: %s); connecting "
                                "again", self.settings.safe_url, type(exc).__name__, exc)
                    await self._close()
                    self._connection = None
            side.append(asyncio.create_task(self._poll_depths(connection)))
            await self._stop.wait()
            drained = await consumer.drain(self.drain_deadline or 0.0)
            await self._close()
            if self._lost:
                return exitcodes.INTERNAL  # not asked to stop: the supervisor restarts us
            return exitcodes.OK if drained else exitcodes.FORCED
        except Fatal as fatal:
            self._stop.set()  # so closing is not mistaken for a lost connection
            log.error("%s", fatal)
            self.control.send({"t": "fatal", "code": fatal.code, "why": str(fatal)})
            await self._close()
            return fatal.code
        finally:
            for task in side:
                task.cancel()

    async def _start_consuming(self, connection: aio_pika.abc.AbstractRobustConnection
                               ) -> Consumer:
        channel = await self._open_channel(connection)
        self._tiers = Tiers(self.settings, connection)
        dispatcher = Dispatcher(self.handler, self.settings, self.board, self._ask)
        settler = Settler(self.settings, self.slot, self.board, ChannelPublisher(channel),
                          self._tiers, self._redeclare, self._charge)
        consumer = Consumer(channel, self.settings.queue, dispatcher, settler,
                            self.settings.concurrency, self._ready, self._consumer_lost)
        await consumer.start()
        return consumer

    def request_stop(self, deadline: float) -> None:
        if self.drain_deadline is None or deadline < self.drain_deadline:
            self.drain_deadline = deadline
        self._stop.set()

    def _consumer_lost(self, why: str) -> None:
        log.error("%s; restarting this worker", why)
        self._consuming = False
        self.control.send({"t": "notready", "why": why})
        self._lost = True
        self.request_stop(self.settings.graceful_timeout)

    def _ready(self) -> None:
        self._consuming = True
        self.control.send({"t": "ready"})
        log.info("consuming %r (prefetch %d, concurrency %d)", self.settings.queue,
                 self.settings.prefetch, self.settings.concurrency)

    def _not_ready(self, _sender: Any = None, exc: BaseException | None = None) -> None:
        was_consuming, self._consuming = self._consuming, False
        if self._stop.is_set() or not was_consuming:
            return  # log the loss once, not on every failed reconnect attempt
        why = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
        self.control.send({"t": "notready", "why": why})
        log.warning("connection to %s lost (%s); reconnecting", self.settings.safe_url, why)

    def _reconnected(self, _sender: Any = None) -> None:
        self.board.ints[RECONNECTS] += 1

    # -- connection --------------------------------------------------------------
    async def _connect(self) -> aio_pika.abc.AbstractRobustConnection | None:
        s, delay = self.settings, 0.5
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            connecting = asyncio.ensure_future(aio_pika.connect_robust(
                s.url, heartbeat=s.heartbeat, reconnect_interval=1.0, timeout=10,
                client_properties={"connection_name":
                                   f"rmqpool worker {self.slot} pid {os.getpid()}"}))
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                # Asked to stop mid-handshake. aio-pika may not honour the cancel; the
                # process exits without waiting for it (worker_main never joins tasks).
                connecting.cancel()
                return None
            try:
                connection = connecting.result()
            except aiormq.exceptions.ProbableAuthenticationError as exc:
                raise Fatal(exitcodes.BROKER_REFUSED,
                            f"the broker at {s.safe_url} refused the credentials ({exc.args[0]}); "
                            "fix the user or password in --url") from None
            except aiormq.exceptions.ProtocolSyntaxError as exc:
                if "Connection.Close" not in str(exc):
                    raise
                raise Fatal(exitcodes.BROKER_REFUSED,
                            f"the broker at {s.safe_url} refused to open the virtual host: it "
                            "does not exist or the user may not use it; fix the vhost in --url "
                            "or grant access (rabbitmqctl set_permissions)") from None
            except (TimeoutError, aiormq.exceptions.AMQPConnectionError, OSError) as exc:
                log.warning("cannot reach the broker at %s (attempt %d: %s); retrying in %.1fs",
                            s.safe_url, attempt, str(exc) or type(exc).__name__, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 15.0)
                continue
            self._connection = connection
            connection.close_callbacks.add(self._not_ready)
            connection.reconnect_callbacks.add(self._reconnected)
            return connection
        return None

    async def _open_channel(self, connection: aio_pika.abc.AbstractRobustConnection
                            ) -> aio_pika.abc.AbstractRobustChannel:
        """One channel consumes and publishes (confirms on, returns raise)."""
        s = self.settings
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        await channel.set_qos(prefetch_count=s.prefetch)
        try:
            await declare_topology(connection, channel, s)
        except TopologyRefused as refused:
            raise Fatal(refused.code, str(refused)) from None
        if s.time_limit >= BROKER_CONSUMER_TIMEOUT and self.slot == 0:
            log.warning("--time-limit %gs is at or above the broker's consumer_timeout (%gs): "
                        "the broker closes the channel before the limit fires; lower it",
                        s.time_limit, BROKER_CONSUMER_TIMEOUT)
        return channel

    async def _redeclare(self) -> None:
        """Declare the queues again (after a publish found one missing), on a channel of
        its own: a refusal (a queue someone re-created with other arguments) closes the
        channel it happens on, and must not close the consuming one."""
        assert self._connection is not None
        specs = topology.all_queues(self.settings)
        if self._tiers is not None:
            specs += [topology.retry_queue(self.settings, d) for d in self._tiers.extra()]
        channel = await self._connection.channel(publisher_confirms=False)
        async with channel:
            raw = await channel.get_underlay_channel()
            for spec in specs:
                await raw.queue_declare(spec.name, durable=True, arguments=spec.arguments)

    async def _close(self) -> None:
        self._consuming = False
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5.0)

    # -- control channel -----------------------------------------------------------
    async def _beat(self) -> None:
        """Liveness from inside the loop: if a handler blocks the loop, beats stop."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(control.BEAT_INTERVAL)
            lag = max(0.0, loop.time() - before - control.BEAT_INTERVAL)
            self.board.set_lag(lag)
            self.control.send({"t": "beat", "lag": round(lag, 4)})
            if os.getppid() != self.supervisor_pid:
                self._orphaned("the supervisor is gone (parent pid changed)")

    async def _poll_depths(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        """Ready messages in the work queue, its retry tiers and its DLQ, for metrics.
        The supervisor has no broker connection of its own: it reports the freshest poll.
        On a channel of its own (a passive declare of a deleted queue closes its channel),
        opened here: a side path whose failures are logged, never raised."""
        names = [spec.name for spec in topology.all_queues(self.settings)]
        channel: aio_pika.abc.AbstractChannel | None = None
        while True:
            try:
                if channel is None or channel.is_closed:
                    channel = await connection.channel(publisher_confirms=False)
                raw = await channel.get_underlay_channel()
                depths = []
                for name in names:
                    ok = await raw.queue_declare(name, passive=True)
                    depths.append(ok.message_count or 0)
                self.board.set_depths(depths)
            except Exception as exc:  # a side path for metrics: never raised
                log.debug("polling queue depths failed: %s", exc)
            await asyncio.sleep(DEPTH_INTERVAL)

    async def _commands(self) -> None:
        while True:
            msg = await self.control.receive()
            if msg is None:
                self._orphaned("the supervisor is gone (control channel closed)")
                return
            if msg["t"] == "drain":
                self.request_stop(self.settings.graceful_timeout)
            elif msg["t"] == "verdict":
                future = self._verdicts.pop(msg["key"], None)
                if future is not None and not future.done():
                    future.set_result(control.Verdict(
                        msg["deaths"], msg["reason"], msg["settled"], msg["suspect"]))

    def _charge(self, key: int) -> None:
        self.control.send({"t": "charge", "key": key, "reason": Death.INTERNAL})

    def _orphaned(self, why: str) -> None:
        if self.drain_deadline is None or self.drain_deadline > ORPHAN_DEADLINE:
            log.warning("%s; stopping within %gs", why, ORPHAN_DEADLINE)
        self.request_stop(min(ORPHAN_DEADLINE, self.settings.graceful_timeout))

    async def _ask(self, key: int, settled_key: int) -> control.Verdict:
        """What the supervisor knows of a redelivered message (nothing, if it is gone)."""
        future = self._verdicts.get(key)
        if future is None:
            future = self._verdicts[key] = asyncio.get_running_loop().create_future()
            self.control.send({"t": "ask", "key": key, "skey": settled_key})
        try:
            return await asyncio.wait_for(asyncio.shield(future), ASK_TIMEOUT)
        except TimeoutError:
            self._verdicts.pop(key, None)
            return control.Verdict()
