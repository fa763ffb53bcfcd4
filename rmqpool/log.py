"""Logging: every line carries the role, the worker slot and the pid.

Text by default, one JSON object per line with --log-format json. Message
events pass their fields through ``extra={"event": {...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("rmqpool")

# The process's identity; set once after fork by set_identity().
_identity: dict[str, Any] = {"role": "supervisor", "slot": None}


def set_identity(role: str, slot: int | None = None) -> None:
    _identity["role"] = role
    _identity["slot"] = slot


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _identity["role"]
        record.slot = _identity["slot"]
        record.who = (f"worker {_identity['slot']}" if _identity["role"] == "worker"
                      else _identity["role"])
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": getattr(record, "role", None),
            "slot": getattr(record, "slot", None),
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event:
            out.update(event)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s [%(who)s pid %(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        event = getattr(record, "event", None)
        if event:
            line += " " + " ".join(f"{k}={v}" for k, v in event.items())
        return line


# The AMQP libraries under rmqpool, set apart by --library-log-level so that
# --log-level debug shows one line per message, not every frame. Their warnings and
# errors are mostly about reconnects rmqpool logs itself (a lost connection gives
# tracebacks and failed channel-restore callbacks per worker), hence the default
# critical. asyncio stays at rmqpool's level: it reports rmqpool's own failed tasks.
LIBRARIES = ("aio_pika", "aiormq", "pamqp")


def setup(level: str, fmt: str, library_level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level.upper())
    os.environ.setdefault("SPT_NOENV", "1")  # setproctitle must not clobber environ


def message_event(raw: Any, queue: str, outcome: str, duration: float = -1.0) -> dict[str, Any]:
    """The fields of a log line about one delivery (`raw`: aiormq's DeliveredMessage)."""
    return {"message_id": raw.header.properties.message_id, "queue": queue,
            "outcome": outcome, "duration": round(duration, 6) if duration >= 0 else None}
