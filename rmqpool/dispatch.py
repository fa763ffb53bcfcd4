"""One delivery: read it -> call the handler -> decide its outcome. No I/O but the ask.

Sync handlers run in the worker's handler threads (run_sync) so the event loop
keeps the connection's heartbeats flowing; async handlers run on the loop
(run_async). Both return an Attempt whose outcome is decided; the consumer's
Settler publishes copies and acks (settle.py). Nothing flows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from .control import Verdict
from .exceptions import MalformedMessage, TimeLimitExceeded
from .frames import undecodable
from .handler import Handler
from .log import message_event
from .message import Message, attempt_of, decode_body, identify, lenient_attempt
from .outcome import Outcome, Policy, charge, decide
from .outgoing import Outgoing, reply
from .scoreboard import Scoreboard
from .settings import Settings

log = logging.getLogger("rmqpool.dispatch")

# Asks the supervisor what it knows of a redelivered message (message key, settled key).
Ask = Callable[[int, int], Coroutine[Any, Any, Verdict]]


def deliver_frame(raw: DeliveredMessage) -> spec.Basic.Deliver:
    """A consumed message's Basic.Deliver frame (aiormq types it as a union with get/return)."""
    return cast(spec.Basic.Deliver, raw.delivery)


class _GateState:
    """Handlers run side by side, but a suspect message (one that was running when a
    worker died beside others) runs alone, so that if it kills this worker too, the death
    is charged to it and not to its neighbours. Waiting suspects go first."""

    def __init__(self) -> None:
        self._running = 0
        self._alone = False
        self._waiting_alone = 0

    def _may_enter(self, alone: bool) -> bool:
        if alone:
            return not self._running
        return not (self._alone or self._waiting_alone)

    def _enter(self, alone: bool) -> None:
        self._running += 1
        self._alone = alone

    def _leave(self) -> None:
        self._running -= 1
        self._alone = False


class Gate(_GateState):
    """For sync handlers, in their threads (with --concurrency > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def enter(self, alone: bool) -> Iterator[None]:
        with self._cond:
            self._waiting_alone += alone
            self._cond.wait_for(lambda: self._may_enter(alone))
            self._waiting_alone -= alone
            self._enter(alone)
        try:
            yield
        finally:
            with self._cond:
                self._leave()
                self._cond.notify_all()


class AsyncGate(_GateState):
    """For async handlers, on the loop (with --concurrency > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_alone += alone
            await self._cond.wait_for(lambda: self._may_enter(alone))
            self._waiting_alone -= alone
            self._enter(alone)
        try:
            yield
        finally:
            async with self._cond:
                self._leave()
                self._cond.notify_all()


@dataclass(slots=True)
class Attempt:
    """One run (or skip) of the handler on one delivery, with its outcome decided."""

    raw: DeliveredMessage
    number: int  # the attempt number, 1-based
    key: int  # see message.identify()
    settled_key: int
    exc: BaseException | None  # what the handler raised (or why it did not run)
    duration: float  # seconds in the handler; -1 when it did not run
    outcome: Outcome | None  # None: a dead worker had settled it; only ack it
    # Published, and confirmed, before the ack: the handler's output and the RPC reply.
    outputs: list[Outgoing] = field(default_factory=list)
    # Called once a failed attempt is settled: its executor waits for that before the
    # next message, so a worker that dies soon after never leaves two copies in flight.
    settled: Callable[[], None] | None = None

    @property
    def failed(self) -> bool:
        """It publishes before its ack: a retry or dead-letter copy, output or a reply."""
        return self.outcome is not None and (self.exc is not None or bool(self.outputs))


@dataclass(slots=True)
class _Start:
    """What is known of a delivery before its handler runs."""

    number: int
    key: int
    settled_key: int
    args: tuple[Any, ...] = ()
    skip: BaseException | None = None  # why the handler must not run (malformed, poison)
    settled: bool = False  # a dead worker settled it already
    alone: bool = False  # run it with no neighbours (a suspect)


class Dispatcher:
    """Runs the handler on a delivery: run_sync in a handler thread, run_async on the loop."""

    def __init__(self, handler: Handler, settings: Settings, board: Scoreboard, ask: Ask):
        self.handler = handler
        self.queue = settings.queue
        self.board = board
        self.ask = ask
        self.policy = Policy.from_settings(settings)
        self.time_limit = settings.time_limit or None
        several = settings.concurrency > 1
        self.gate = Gate() if several and not handler.is_async else None
        self.async_gate = AsyncGate() if several and handler.is_async else None

    # -- the two ways to run -------------------------------------------------------
    def run_sync(self, raw: DeliveredMessage, index: int,
                 loop: asyncio.AbstractEventLoop) -> Attempt:
        """In a handler thread. The supervisor enforces --time-limit: threads can't be
        interrupted, so it kills the worker."""
        start = self._begin(raw)
        if deliver_frame(raw).redelivered:
            self._judge(start, asyncio.run_coroutine_threadsafe(
                self.ask(start.key, start.settled_key), loop).result())
        self._read(raw, start)
        if start.settled or start.skip is not None:
            return self._finish(raw, start, start.skip, -1.0)
        with self.gate.enter(start.alone) if self.gate else contextlib.nullcontext():
            self.board.start(index, start.key, raw.header.properties.message_id)
            started = time.monotonic()
            try:
                result = self.handler.fn(*start.args)
            except BaseException as exc:
                # A failing handler is an outcome, not a crash: sys.exit(), a
                # CancelledError escaping an asyncio.run() inside it, anything.
                return self._finish(raw, start, exc, time.monotonic() - started)
            finally:
                self.board.finish(index)
            return self._finish(raw, start, None, time.monotonic() - started, result)

    async def run_async(self, raw: DeliveredMessage, index: int) -> Attempt:
        """On the loop; cancelled at --time-limit."""
        start = self._begin(raw)
        if deliver_frame(raw).redelivered:
            self._judge(start, await self.ask(start.key, start.settled_key))
        self._read(raw, start)
        if start.settled or start.skip is not None:
            return self._finish(raw, start, start.skip, -1.0)
        gate = self.async_gate.enter(start.alone) if self.async_gate else None
        async with gate or contextlib.nullcontext():
            self.board.start(index, start.key, raw.header.properties.message_id)
            started = time.monotonic()
            limit = asyncio.timeout(self.time_limit)
            try:
                async with limit:
                    result = await self.handler.fn(*start.args)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                    raise  # the worker itself is stopping: not the handler's outcome
                if isinstance(exc, TimeoutError) and limit.expired():
                    log.error("handler ran past --time-limit %gs; cancelled", self.time_limit,
                              extra={"event": message_event(raw, self.queue, "time_limit")})
                    exc = TimeLimitExceeded(f"handler ran past --time-limit {self.time_limit:g}s")
                return self._finish(raw, start, exc, time.monotonic() - started)
            finally:
                self.board.finish(index)
            return self._finish(raw, start, None, time.monotonic() - started, result)

    def mark_failing(self, raw: DeliveredMessage, index: int) -> None:
        """rmqpool itself failed on this delivery (a bug) and the worker is about to exit:
        show the message as running, so the supervisor charges the death to it and the
        poison rule ends it instead of a crash loop."""
        key, _ = identify(raw, lenient_attempt(raw.header.properties.headers))
        self.board.start(index, key, raw.header.properties.message_id)

    # -- the steps they share ---------------------------------------------------------
    @staticmethod
    def _begin(raw: DeliveredMessage) -> _Start:
        number = lenient_attempt(raw.header.properties.headers)
        key, settled_key = identify(raw, number)
        return _Start(max(1, number), key, settled_key)

    def _judge(self, start: _Start, verdict: Verdict) -> None:
        """A redelivered message: what the supervisor knows of it."""
        start.settled = verdict.settled
        start.skip = charge(verdict.deaths, verdict.reason, self.policy)
        start.alone = bool(verdict.deaths or verdict.suspect)

    def _read(self, raw: DeliveredMessage, start: _Start) -> None:
        """The handler's arguments; anything unreadable is malformed."""
        if start.settled or start.skip is not None:
            return
        props = raw.header.properties
        try:
            if (why := undecodable(props.headers)) is not None:
                raise MalformedMessage(f"its properties cannot be decoded ({why}); they are "
                                       "lost, the body is kept")
            attempt_of(props.headers)
            body = decode_body(raw.body, props.content_type, props.content_encoding)
        except MalformedMessage as exc:
            start.skip = exc
            return
        start.args = (body, Message(raw, start.number)) if self.handler.wants_message else (body,)

    def _finish(self, raw: DeliveredMessage, start: _Start, exc: BaseException | None,
                duration: float, result: Any = None) -> Attempt:
        outputs: list[Outgoing] = []
        if exc is None and not start.settled:
            if self.handler.wants_message:
                outputs = start.args[1].outputs
            if raw.header.properties.reply_to:
                try:  # a return value that cannot be sent is the handler's failure
                    outputs = [*outputs, reply(raw.header.properties, result, "ok")]
                except TypeError as bad:
                    exc, outputs = bad, []
        outcome = None if start.settled else decide(exc, start.number, self.policy)
        return Attempt(raw, start.number, start.key, start.settled_key, exc, duration, outcome,
                       outputs)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
