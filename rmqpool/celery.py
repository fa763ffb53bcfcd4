"""Celery message protocol v2 tasks, built without Celery (rmqpool does not depend on it).

What a Celery 5 worker needs to run a task as if `app.send_task(...)` had been called:
headers `lang`, `task`, `id` (and the rest Celery itself sends), a JSON body
`[args, kwargs, embed]` with the three-element form (a two-element body crashes the
worker), content type application/json, encoding utf-8, correlation id = task id,
persistent. See https://docs.celeryq.dev/en/stable/internals/protocol.html; the
fields follow `AMQP.as_task_v2` and `Celery.send_task` of Celery 5.7, and
tests/integration/test_celery.py runs them on a real worker.

Times: `eta` and `expires` go as ISO 8601 with their offset; a naive datetime is
taken as UTC, which is also what a Celery worker makes of a naive one.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Celery's own limits for the argsrepr/kwargsrepr headers (AMQP.argsrepr_maxsize). They
# are for logs and monitors only; the arguments travel in the body. Without a bound a
# large argument would make the header frame larger than the broker's frame_max
# (128 KiB), and RabbitMQ closes the whole connection (FRAME_ERROR frame_too_large).
REPR_MAXSIZE = 1024


@dataclass(frozen=True)
class Task:
    task_id: str
    headers: dict[str, Any]
    body: list[Any]
    # Seconds the broker may keep it queued (AMQP per-message TTL), from `expires`, as
    # Celery's send_task sets it: an expired task is dropped even while no worker runs.
    ttl: float | None


def task_message(name: str, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 *, task_id: str | None = None, countdown: float | None = None,
                 eta: datetime.datetime | None = None,
                 expires: float | datetime.datetime | None = None,
                 now: datetime.datetime | None = None) -> Task:
    """`countdown` and a number for `expires` are seconds from now."""
    if not name:
        raise ValueError("send_task needs the task's registered name, e.g. 'proj.tasks.add'")
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    args, kwargs = _arguments(args, kwargs)
    now = _aware(now or datetime.datetime.now(datetime.UTC))
    if countdown is not None:
        eta = now + datetime.timedelta(seconds=countdown)
    if isinstance(expires, int | float):
        expires = now + datetime.timedelta(seconds=expires)
    expires = None if expires is None else _aware(expires)
    ttl = None if expires is None else max(0.0, (expires - now).total_seconds())
    task_id = task_id or str(uuid.uuid4())
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": None,
        "eta": _iso(eta), "expires": _iso(expires), "group": None, "group_index": None,
        "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": _repr(args), "kwargsrepr": _repr(kwargs),
        "origin": f"{os.getpid()}@{socket.gethostname()}", "ignore_result": False,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return Task(task_id, headers, [list(args), kwargs, embed], ttl)


def _arguments(args: Iterable[Any], kwargs: Mapping[str, Any] | None,
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # A str is iterable: send_task("t", args=("x")) would quietly become ["x"], and
    # args="ab" ["a", "b"]. Celery refuses anything but a list or tuple; so do we.
    if isinstance(args, str | bytes | bytearray | Mapping):
        raise TypeError(f"args must be a list or tuple of positional arguments, not a "
                        f"{type(args).__name__} (one argument: args=(value,))")
    kwargs = dict(kwargs or {})
    bad = [key for key in kwargs if not isinstance(key, str)]
    if bad:
        raise TypeError(f"kwargs keys must be str (they become keyword arguments): {bad!r}")
    return tuple(args), kwargs


def _repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_MAXSIZE else text[:REPR_MAXSIZE - 3] + "..."


def _aware(when: datetime.datetime) -> datetime.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _iso(when: datetime.datetime | None) -> str | None:
    return None if when is None else _aware(when).isoformat()
