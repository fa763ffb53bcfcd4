"""What `rmqpool publish` sends, and how fast: bodies from --body, from a file of JSON
lines or from a stream (stdin), paced by a token bucket, published through a bounded
window of confirms in flight. Runs in the CLI's process, on its event loop.

Invariants: a file is checked to its last line before the first message is sent; a
stream is sent as it is read, and a bad line ends it (what came before is published,
nothing after). The first failed publish stops sending; the publishes already in
flight settle before it is raised, so `Window.confirmed` is exact. Every message of
a run goes to the same exchange with the same properties: when the broker refuses
one (PublishRefused), it refuses them all, so the others in flight are cancelled
rather than sent again after the channel comes back.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .exceptions import PublishError, PublishRefused


class BadInput(ValueError):
    """A body or line that is no JSON; the message names where, the problem and the fix."""


BODY_FIX = ("quote it for the shell, e.g. --body '{\"n\": 1}' or --body '\"text\"', "
            "or send the text as it is with --raw")
LINE_FIX = "write one JSON value per line, or send each line as it is with --raw"
FILE_LINE = "nothing was sent"  # every line is checked first
STREAM_LINE = "nothing from it on was sent"  # the lines before it were


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(data: str | bytes, where: str, fix: str) -> Any:
    """`data` parsed as JSON (strictly: no NaN or Infinity, which cannot be sent again)."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        place = f"line {exc.lineno} column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        problem = f"{exc.msg} at {place}"
    except UnicodeDecodeError:
        problem = "not UTF-8"
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as exc:  # NaN, Infinity
        problem = str(exc)
    raise BadInput(f"{where} is not valid JSON ({problem}); {fix}")


def body(text: str, raw: bool) -> Any:
    """The --body value: JSON, or with `raw` its bytes as the shell gave them."""
    return os.fsencode(text) if raw else decode(text, "--body", BODY_FIX)


@dataclass(frozen=True)
class Bodies:
    items: AsyncIterator[Any]
    total: int | None  # None: a stream, counted as it goes


def repeated(value: Any, count: int) -> Bodies:
    async def items() -> AsyncIterator[Any]:
        for _ in range(count):
            yield value

    return Bodies(items(), count)


class Lines:
    """Splits chunks (cut anywhere) into numbered lines; blank ones are counted, not
    returned. An empty chunk is the end."""

    def __init__(self) -> None:
        self.number = 0
        self._rest = b""

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        if chunk:
            *lines, self._rest = (self._rest + chunk).split(b"\n")
        else:
            lines, self._rest = [self._rest], b""
        out = []
        for line in lines:
            self.number += 1
            if line.strip():
                out.append((self.number, line.removesuffix(b"\r")))
        return out


def _line_body(number: int, line: bytes, raw: bool, name: str, sent: str) -> Any:
    return line if raw else decode(line, f"{name} line {number}", f"{sent}; {LINE_FIX}")


def from_file(path: str, raw: bool) -> Bodies:
    """Every line checked before anything is sent."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read --file {path!r} ({exc.strerror}); check the path") from None
    lines = Lines()
    bodies = [_line_body(number, line, raw, path, FILE_LINE)
              for number, line in [*lines.feed(data), *lines.feed(b"")]]

    async def items() -> AsyncIterator[Any]:
        for item in bodies:
            yield item

    return Bodies(items(), len(bodies))


def from_stream(stream: BinaryIO, raw: bool, name: str = "stdin") -> Bodies:
    """Lines sent as they are read."""
    async def items() -> AsyncIterator[Any]:
        lines = Lines()
        async for chunk in _chunks(stream, name):
            for number, line in lines.feed(chunk):
                yield _line_body(number, line, raw, name, STREAM_LINE)

    return Bodies(items(), None)


async def _chunks(stream: BinaryIO, name: str) -> AsyncIterator[bytes]:
    """What `stream` has, as it comes, ending with b"". A daemon thread reads, so a
    stream that never ends does not keep the process from exiting (an executor's
    thread would be joined at exit)."""
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=4)
    loop = asyncio.get_running_loop()

    def read() -> None:
        while True:
            try:
                chunk: bytes | OSError = _read_some(stream)
            except OSError as exc:
                chunk = exc
            try:  # waits while the queue is full: the publisher sets the pace
                asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
            except RuntimeError:  # the loop is closed: nobody reads on
                return
            if not chunk or isinstance(chunk, OSError):
                return

    threading.Thread(target=read, name="rmqpool-stdin", daemon=True).start()
    while True:
        chunk = await chunks.get()
        if isinstance(chunk, OSError):
            raise BadInput(f"cannot read {name} ({chunk.strerror or chunk})")
        yield chunk
        if not chunk:
            return


def _read_some(stream: BinaryIO) -> bytes:
    """Up to 64 KiB of what the stream has, without waiting for more."""
    read1 = getattr(stream, "read1", None)
    return bytes(read1(65536) if read1 is not None else stream.read(65536))


class Pace:
    """A token bucket: `rate` messages a second on average, at most `burst` (a tenth of a
    second's worth, at least 1) at once after a pause. It waits by sleeping, never by
    spinning. No rate: no waiting."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._credit = (max(1.0, rate / 10) - 1) * self._interval if rate else 0.0
        self._clock = clock
        self._due = -math.inf  # when the next message may go

    def delay(self) -> float:
        """Seconds until the next message may go; books its place."""
        if not self._interval:
            return 0.0
        now = self._clock()
        due = max(self._due, now - self._credit)
        self._due = due + self._interval
        return max(0.0, due - now)

    async def wait(self) -> None:
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)


class Window:
    """Publishes `send(body)` for each body, at most `size` awaiting their confirms."""

    def __init__(self, send: Callable[[Any], Awaitable[object]], size: int, pace: Pace,
                 on_confirm: Callable[[], object] = lambda: None) -> None:
        self._send = send
        self._slots = asyncio.Semaphore(size)
        self._pace = pace
        self._on_confirm = on_confirm
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: list[tuple[int, PublishError]] = []
        self.confirmed = 0

    async def run(self, bodies: AsyncIterator[Any]) -> None:
        """Until `bodies` ends or a publish fails (raised, the earliest sent first)."""
        try:
            number = 0
            async for item in bodies:
                await self._slots.acquire()
                await self._pace.wait()
                if self._failures:
                    break
                task = asyncio.create_task(self._one(number, item))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                number += 1
        finally:  # also on a bad line or a cancel: what was sent settles first
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        if self._failures:
            raise min(self._failures, key=lambda failure: failure[0])[1]

    async def _one(self, number: int, item: Any) -> None:
        try:
            await self._send(item)
        except PublishRefused as exc:
            self._failures.append((number, exc))
            for task in self._tasks - {asyncio.current_task()}:
                # None can be confirmed: the broker discarded them with the channel, and
                # the acks of any before this one came first (their tasks resumed first).
                task.cancel()
        except PublishError as exc:
            self._failures.append((number, exc))
        else:
            self.confirmed += 1
            self._on_confirm()
        finally:
            self._slots.release()
