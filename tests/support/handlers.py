"""Handlers the process tests run. Each records what it handled in RECORD_FILE
(one line per call: message id, attempt, pid, tag, time, and for `behave` the body's
"token" when it has one), appended atomically."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import Any

import rmqpool


def _record(message: rmqpool.Message, extra: str = "", token: str = "") -> None:
    # The token (one per published message, chosen by the test) tells apart two messages
    # that share a message id; it is a sixth field, only when there is one.
    line = f"{message.message_id} {message.attempt} {os.getpid()} {extra} {time.time()}"
    data = (f"{line} {token}\n" if token else f"{line}\n").encode()
    fd = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def record(body: Any, message: rmqpool.Message) -> None:
    _record(message)


async def record_async(body: Any, message: rmqpool.Message) -> None:
    _record(message)


def slow(body: Any, message: rmqpool.Message) -> None:
    """Sleeps body["sleep"] seconds, then records."""
    time.sleep(float(body.get("sleep", 0)))
    _record(message)


def cpu(body: Any, message: rmqpool.Message) -> None:
    """Burns pure-Python CPU for body["seconds"], then records."""
    deadline = time.monotonic() + float(body.get("seconds", 0))
    n = 0
    while time.monotonic() < deadline:
        n += sum(i * i for i in range(1000))
    _record(message, str(n % 7))


def _token(body: Any) -> str:
    token = body.get("token") if isinstance(body, dict) else None
    return token if isinstance(token, str) and token.isalnum() else ""


def behave(body: Any, message: rmqpool.Message) -> None:
    """Does what the body says: fail_until (attempt), reject, retry_delay, die, hang, sleep.
    Records "start" and "done" with the body's token (see read_tokens)."""
    token = _token(body)
    _record(message, "start", token)
    if body.get("die"):
        time.sleep(float(body.get("die_after", 0)))
        os._exit(int(body.get("exit_code", 13)))
    if body.get("hang"):
        time.sleep(3600)
    if body.get("sleep"):
        time.sleep(float(body["sleep"]))
    if body.get("reject"):
        raise rmqpool.Reject(body["reject"])
    if body.get("retry_delay") and message.attempt == 1:
        raise rmqpool.Retry(delay=float(body["retry_delay"]))
    if message.attempt < int(body.get("fail_until", 0)):
        raise ValueError(f"failing attempt {message.attempt}")
    if body.get("fail"):
        raise RuntimeError(f"always fails: {body['fail']}")
    _record(message, "done", token)


async def behave_async(body: Any, message: rmqpool.Message) -> None:
    if body.get("hang"):
        _record(message, "start")
        await asyncio.sleep(3600)
    behave(body, message)


def _lines(path: os.PathLike[str] | str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:  # nothing recorded yet
        return []


def read_records(path: os.PathLike[str] | str) -> list[tuple[str, int, int, str]]:
    out = []
    for line in _lines(path):
        mid, attempt, pid, *extra = line.split(" ")
        out.append((mid, int(attempt), int(pid), extra[0] if extra else ""))
    return out


def read_times(path: os.PathLike[str] | str, tag: str = "start") -> dict[str, list[float]]:
    """message id -> wall-clock times of its records with `tag`, in order."""
    out: dict[str, list[float]] = {}
    for line in _lines(path):
        mid, _, _, extra, ts, *_ = line.split(" ")
        if extra == tag:
            out.setdefault(mid, []).append(float(ts))
    return out


def read_tokens(path: os.PathLike[str] | str, tag: str = "done") -> collections.Counter[str]:
    """token -> how many records with `tag` carry it (lines without a token are skipped)."""
    out: collections.Counter[str] = collections.Counter()
    for line in _lines(path):
        fields = line.split(" ")
        if len(fields) == 6 and fields[3] == tag:
            out[fields[5]] += 1
    return out


def timed(body: Any, message: rmqpool.Message) -> None:
    """Sleeps body["sleep"] seconds, then records with the wall-clock time as its tag."""
    time.sleep(float(body.get("sleep", 0)))
    _record(message, f"{time.time():.6f}")


async def block_loop(body: Any, message: rmqpool.Message) -> None:
    """An async handler that wrongly blocks its event loop: time.sleep(body["block"])
    on the loop (no beats, no heartbeats meanwhile), then records."""
    if body.get("block"):
        _record(message, "blocking")
        time.sleep(float(body["block"]))
    _record(message, "done")


class CustomBase(BaseException):
    pass


def base_exc(body: Any, message: rmqpool.Message) -> None:
    """A sync handler letting a CancelledError out of an asyncio.run() inside it."""
    _record(message, "start")

    async def inner() -> None:
        task = asyncio.ensure_future(asyncio.sleep(10))
        task.cancel()
        await task
    asyncio.run(inner())


async def base_exc_async(body: Any, message: rmqpool.Message) -> None:
    _record(message, "start")
    raise CustomBase("not an Exception")


def gil(body: Any, message: rmqpool.Message) -> None:
    """Holds the GIL in one C call for a long time (sum over a huge range)."""
    _record(message, "start")
    sum(range(int(body["size"])))


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of this exception fails")


def unprintable(body: Any, message: rmqpool.Message) -> None:
    """Raises an exception whose str() raises."""
    _record(message, "start")
    raise UnprintableError()


def retry_exact(body: Any, message: rmqpool.Message) -> None:
    """Retry(delay=body["delay"]) on attempt 1 (the delay may be anything the body says:
    "nan" and "inf" are floats); records done after."""
    _record(message, "start")
    if message.attempt == 1:
        raise rmqpool.Retry(delay=float(body["delay"]))
    _record(message, "done")


def tagged(body: Any, message: rmqpool.Message) -> None:
    """Records the body's "tag" (to tell apart messages that share a message id)."""
    time.sleep(float(body.get("sleep", 0)))
    _record(message, str(body["tag"]))


def echo(body: Any, message: rmqpool.Message) -> Any:
    """Returns what it got (an RPC reply); body {"fail": "..."} raises, {"reject": ...}
    rejects, {"unsendable": true} returns what cannot be sent."""
    _record(message, "echo")
    if isinstance(body, dict):
        if body.get("fail"):
            raise ValueError(body["fail"])
        if body.get("reject"):
            raise rmqpool.Reject(body["reject"])
        if body.get("unsendable"):
            return {1, 2}
    return {"echo": body, "attempt": message.attempt}


async def echo_async(body: Any, message: rmqpool.Message) -> Any:
    return echo(body, message)


def forward(body: Any, message: rmqpool.Message) -> None:
    """Publishes body["to"] <- body["out"] (several if a list), then fails until attempt
    body["fail_until"] (handler output must be published only on success)."""
    outs = body["out"] if isinstance(body["out"], list) else [body["out"]]
    for out in outs:
        message.publish(out, routing_key=body["to"])
    _record(message, "published")
    if message.attempt < int(body.get("fail_until", 0)):
        raise RuntimeError(f"failing attempt {message.attempt} after publishing")
    _record(message, "done")


async def forward_async(body: Any, message: rmqpool.Message) -> None:
    forward(body, message)
