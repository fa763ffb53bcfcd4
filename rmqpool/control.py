"""The supervisor <-> worker control channel: one socketpair per worker process.

Newline-delimited JSON objects, each with a "t" (type) field. Counters and the
messages a worker is running travel through its Scoreboard (shared memory);
this channel carries events and commands.

worker -> supervisor
    beat      {lag}            every second, from the worker's event loop
    ready     {}               connected and consuming
    notready  {why}            connection lost; reconnecting
    fatal     {code, why}      the pool cannot work (bad credentials, topology clash)
    ask       {key, skey}      a redelivered message: how many workers has it killed,
                               and did a dead worker settle it already (skey)?
supervisor -> worker
    drain     {}               stop consuming, finish in-flight work, exit 0
    verdict   {key, deaths, reason, settled, suspect}   answer to ask
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, NamedTuple

BEAT, READY, NOTREADY, FATAL, ASK = "beat", "ready", "notready", "fatal", "ask"
BEAT_INTERVAL = 1.0  # seconds between a worker's beats
DRAIN, VERDICT = "drain", "verdict"


class Verdict(NamedTuple):
    """What the supervisor knows about a redelivered message."""

    deaths: int = 0  # workers it was running in when they died
    reason: str = ""  # why the last of them died: crash, heartbeat, time_limit
    settled: bool = False  # a worker that died had settled it; only its ack was lost
    suspect: bool = False  # running beside others when a worker died: run it alone


def encode(kind: str, **fields: Any) -> bytes:
    fields["t"] = kind
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


class SupervisorEnd:
    """The supervisor's non-blocking end of one worker's channel."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[dict[str, Any]] | None:
        """Messages now readable, or None at EOF (the worker is gone)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def send(self, kind: str, **fields: Any) -> bool:
        """Best effort: False when the worker is gone or not reading (it will be killed)."""
        try:
            self.sock.sendall(encode(kind, **fields))
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
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)

    def send(self, kind: str, **fields: Any) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(kind, **fields))

    async def receive(self) -> dict[str, Any] | None:
        """The next command, or None when the supervisor is gone."""
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ConnectionError, OSError):
            return None
        return json.loads(line) if line else None
