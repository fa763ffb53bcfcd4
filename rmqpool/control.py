"""The supervisor <-> worker control channel: one socketpair per worker process.

Newline-delimited JSON objects, each with a "t" (type) field; every message type
is one TypedDict below, shared by both ends, and checked when decoded (a line
that is not one of them is dropped and logged, never raised). Counters and the
messages a worker is running travel through its Scoreboard (shared memory);
this channel carries events and commands.

worker -> supervisor
    beat      {lag}            every second, from the worker's event loop
    ready     {}               connected and consuming
    notready  {why}            connection lost; reconnecting
    fatal     {code, why}      the pool cannot work (bad credentials, topology clash)
    ask       {key, skey}      a redelivered message: how many workers has it killed,
                               and did a worker settle it already (skey)?
    charge    {key, reason}    rmqpool failed on this message (a bug): count it like a
                               worker death, so the poison rule ends it
supervisor -> worker
    drain     {}               stop consuming, finish in-flight work, exit 0
    verdict   {key, deaths, reason, settled, suspect}   answer to ask
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import typing
from typing import Any, Literal, NamedTuple, TypedDict

log = logging.getLogger("rmqpool.control")

BEAT_INTERVAL = 1.0  # seconds between a worker's beats
MAX_LINE = 65536  # a longer line is not ours: dropped


class Beat(TypedDict):
    t: Literal["beat"]
    lag: float


class Ready(TypedDict):
    t: Literal["ready"]


class NotReady(TypedDict):
    t: Literal["notready"]
    why: str


class Fatal(TypedDict):
    t: Literal["fatal"]
    code: int
    why: str


class Ask(TypedDict):
    t: Literal["ask"]
    key: int
    skey: int


class Charge(TypedDict):
    t: Literal["charge"]
    key: int
    reason: str


class Drain(TypedDict):
    t: Literal["drain"]


class VerdictMessage(TypedDict):
    t: Literal["verdict"]
    key: int
    deaths: int
    reason: str
    settled: bool
    suspect: bool


ToSupervisor = Beat | Ready | NotReady | Fatal | Ask | Charge
ToWorker = Drain | VerdictMessage
Message = ToSupervisor | ToWorker


class Verdict(NamedTuple):
    """What the supervisor knows about a redelivered message."""

    deaths: int = 0  # workers it was running in when they died (or rmqpool failed on it)
    reason: str = ""  # why the last of them died: crash, heartbeat, time_limit, internal
    settled: bool = False  # a worker had settled it; only its ack was lost
    suspect: bool = False  # running beside others when a worker died: run it alone


def _fields(cls: type) -> tuple[str, dict[str, type]]:
    hints = typing.get_type_hints(cls)
    kind = typing.get_args(hints.pop("t"))[0]
    return kind, hints


SCHEMAS: dict[str, dict[str, type]] = dict(
    _fields(cls) for cls in (Beat, Ready, NotReady, Fatal, Ask, Charge, Drain, VerdictMessage))


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Any:
    """The message on `line`, or None (logged) when it is not a valid one."""
    try:
        message = json.loads(line)
        schema = SCHEMAS[message["t"]]
        if set(message) - {"t"} == set(schema) and all(
                _is(message[name], kind) for name, kind in schema.items()):
            return message
    except (ValueError, RecursionError, KeyError, TypeError):
        pass
    log.warning("dropped an invalid control message: %.200r", line)
    return None


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind  # bool is not an int here, nor an int a bool


def pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


class LineBuffer:
    """Splits a byte stream into decoded messages; bounded."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Any]:
        *lines, self._buf = (self._buf + data).split(b"\n")
        if len(self._buf) > MAX_LINE:
            log.warning("dropped %d bytes of control data without a line end", len(self._buf))
            self._buf = b""
        return [m for m in map(decode, lines) if m is not None]


class SupervisorEnd:
    """The supervisor's non-blocking end of one worker's channel."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._lines = LineBuffer()

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> tuple[list[ToSupervisor], bool]:
        """(every message now readable, whether the worker has closed its end). Reads
        until the socket is empty, so a worker's last messages and its EOF are seen in
        the same pass: a death must be known before any question asked after it is
        answered."""
        messages: list[ToSupervisor] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return messages, False
            except OSError:
                return messages, True
            if not data:
                return messages, True
            messages += self._lines.feed(data)

    def send(self, message: ToWorker) -> bool:
        """Best effort: False when the worker is gone or not reading (it will be killed)."""
        try:
            self.sock.sendall(encode(message))
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class WorkerEnd:
    """The worker's end, on its event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(
            sock=self._sock, limit=MAX_LINE)

    def send(self, message: ToSupervisor) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    async def receive(self) -> ToWorker | None:
        """The next command, or None when the supervisor is gone."""
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readline()
            except (ConnectionError, OSError):
                return None
            except ValueError:  # a line over the limit: not ours
                continue
            if not line:
                return None
            message = decode(line)
            if message is not None:
                return typing.cast(ToWorker, message)
