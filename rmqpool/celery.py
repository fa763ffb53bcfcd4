"""Celery message protocol v2 tasks, built without Celery (rmqpool does not depend on it).

What a Celery 5 worker needs to run a task as if `app.send_task(...)` had been called:
headers `lang`, `task`, `id` (and the rest Celery itself sends), a JSON body
`[args, kwargs, embed]` with the three-element form (a two-element body crashes the
worker), content type application/json, encoding utf-8, correlation id = task id,
persistent. See https://docs.celeryq.dev/en/stable/internals/protocol.html.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    task_id: str
    headers: dict[str, Any]
    body: list[Any]


def task_message(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 task_id: str | None = None, countdown: float | None = None,
                 eta: datetime.datetime | None = None,
                 expires: float | datetime.datetime | None = None,
                 now: datetime.datetime | None = None) -> Task:
    if not name:
        raise ValueError("send_task needs the task's registered name, e.g. 'proj.tasks.add'")
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    now = now or datetime.datetime.now(datetime.UTC)
    if countdown is not None:
        eta = now + datetime.timedelta(seconds=countdown)
    if isinstance(expires, int | float):
        expires = now + datetime.timedelta(seconds=expires)
    task_id = task_id or str(uuid.uuid4())
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": None,
        "eta": _iso(eta), "expires": _iso(expires), "group": None, "group_index": None,
        "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": repr(kwargs),
        "origin": f"{os.getpid()}@{socket.gethostname()}", "ignore_result": False,
        "stamped_headers": None, "stamps": {},
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return Task(task_id, headers, [list(args), kwargs, embed])


def _iso(when: datetime.datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.isoformat()
