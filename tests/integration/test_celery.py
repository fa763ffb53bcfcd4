"""send_task against an unmodified Celery worker: a task rmqpool publishes runs as if
Celery's own `app.send_task` had been called.

One real worker (celery is a test-only dependency; rmqpool never imports it) consumes a
unique queue on the shared broker, with no result backend: its task appends what it got
(args, kwargs, request id, eta, expires, delivery info, when it ran) to a JSON-lines
file, which the tests read. Every wait polls with a deadline."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest

from rmqpool import Publisher, SyncPublisher, Unroutable
from tests.support import amqp
from tests.support.pool import ROOT, terminate, wait_for

pytestmark = pytest.mark.timeout(90)

TASK = "rmqpool_test.record"
MODULE = "rmqpool_celery_app"
# The worker's timer fires an eta task once time.time() has passed the eta (same
# machine, same clock); this covers rounding (float timestamps, ISO microseconds) only.
CLOCK_SLACK = 0.05

APP = '''
import json
import time

from celery import Celery

app = Celery("rmqpool_celery_test", broker=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    worker_enable_remote_control=False,  # no pidbox queue or exchange on the shared broker
    broker_connection_retry_on_startup=True,  # said, so Celery does not warn about it
)


@app.task(bind=True, name=TASK)
def record(self, *args, **kwargs):
    line = {"args": args, "kwargs": kwargs, "id": self.request.id, "eta": self.request.eta,
            "expires": self.request.expires, "delivery_info": self.request.delivery_info,
            "ran_at": time.time()}
    with open(RECORDS, "a") as out:
        out.write(json.dumps(line, default=str) + "\\n")
'''


@dataclass
class Worker:
    queue: str
    records: pathlib.Path
    log_path: pathlib.Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ran(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        # Only whole lines: a large record is written in several pieces, and the last
        # line may still be on its way.
        *lines, _partial = self.records.read_text().split("\n")
        return [json.loads(line) for line in lines]

    def wait_ran(self, token: str, timeout: float = 30) -> dict[str, Any]:
        """The record of the task whose first argument is `token`, once it has run."""
        return self._wait_record(lambda r: r["args"][:1] == [token], timeout, token)

    def wait_ran_id(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        return self._wait_record(lambda r: r["id"] == task_id, timeout, task_id)

    def _wait_record(self, match: Callable[[dict[str, Any]], bool], timeout: float,
                     what: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            self.check_alive()
            return next((r for r in self.ran() if match(r)), None)

        record: dict[str, Any] = wait_for(find, timeout, f"the task {what} to run")
        return record

    def wait_logged(self, line: str, timeout: float = 10) -> None:
        wait_for(lambda: line in self.log(), timeout, f"the worker to log {line!r}")

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"the Celery worker exited with {code}:\n{self.log()}")

    def ready(self) -> bool:
        self.check_alive()
        return " ready." in self.log() and bool(amqp.consumers(self.queue))

    def stop(self) -> None:
        terminate(self.proc)  # SIGTERM is Celery's warm shutdown


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("celery")
    queue = amqp.unique("celery")
    records, log_path = home / "records.jsonl", home / "worker.log"
    constants = (f"BROKER = {amqp.URL!r}\nQUEUE = {queue!r}\nTASK = {TASK!r}\n"
                 f"RECORDS = {str(records)!r}\n")
    (home / f"{MODULE}.py").write_text(constants + APP)
    argv = [sys.executable, "-m", "celery", "-A", MODULE, "worker", "-Q", queue,
            "-n", f"{queue}@%h", "--pool", "solo", "--concurrency", "1",
            "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=home, env={**os.environ, "PYTHONPATH": str(home)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    w = Worker(queue, records, log_path, proc)
    try:
        wait_for(w.ready, 60, "the Celery worker to consume its queue")
        yield w
    finally:
        w.stop()
        # Celery declares the queue and a direct exchange of the same name.
        amqp.delete([queue], exchanges=[queue])


def token() -> str:
    return f"token-{uuid.uuid4().hex[:12]}"


def send(**options: Any) -> tuple[str, float, float]:
    """Publisher.send_task(TASK, ...): (task id, wall clock before, after)."""
    async def go() -> str:
        async with Publisher(amqp.URL) as pub:
            return await pub.send_task(TASK, **options)

    before = time.time()
    task_id = asyncio.run(go())
    return task_id, before, time.time()


def at(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


# Several JSON types, nested, and text that is not ASCII.
ARGS = (7, -2.5, "zwölf ☃ \"quoted\"", None, True, False, [1, [2, "x"], {}],
        {"nested": {"k": [None, 0.125]}})
KWARGS = {"int": -3, "big": 2**53, "float": 1e-9, "str": "ü", "none": None, "bool": True,
          "list": [], "dict": {"a": {"b": [1, "2"]}}}


def test_args_and_kwargs_arrive_intact_and_the_returned_id_is_the_tasks(worker):
    t = token()
    task_id, _, _ = send(args=(t, *ARGS), kwargs=KWARGS, queue=worker.queue)
    got = worker.wait_ran(t)
    assert got["args"] == [t, *ARGS] and got["kwargs"] == KWARGS
    assert got["id"] == task_id
    assert got["eta"] is None and got["expires"] is None
    # Published to the default exchange with the queue's name as routing key.
    assert got["delivery_info"]["exchange"] == ""
    assert got["delivery_info"]["routing_key"] == worker.queue


def test_sync_publisher_sends_a_task_with_the_given_id(worker):
    t, given = token(), f"given-{uuid.uuid4()}"
    with SyncPublisher(amqp.URL) as pub:
        returned = pub.send_task(TASK, [t, {"x": [1, 2]}], {"k": "v", "n": None},
                                 queue=worker.queue, task_id=given)
        t2 = token()
        generated = pub.send_task(TASK, (t2,), queue=worker.queue)
    assert returned == given
    got = worker.wait_ran(t)
    assert got["id"] == given
    assert got["args"] == [t, {"x": [1, 2]}] and got["kwargs"] == {"k": "v", "n": None}
    got2 = worker.wait_ran(t2)
    assert got2["id"] == generated != given and got2["kwargs"] == {}


def test_countdown_runs_the_task_no_earlier_than_its_eta(worker):
    t = token()
    task_id, before, after = send(args=(t,), queue=worker.queue, countdown=2)
    got = worker.wait_ran(t)
    assert got["id"] == task_id
    eta = at(got["eta"])
    assert before + 2 - CLOCK_SLACK <= eta <= after + 2 + CLOCK_SLACK
    assert got["ran_at"] >= eta - CLOCK_SLACK
    assert got["ran_at"] >= before + 2 - CLOCK_SLACK


def test_eta_datetime_with_any_offset_runs_the_task_no_earlier_than_it(worker):
    t = token()
    plus5 = datetime.timezone(datetime.timedelta(hours=5))
    eta = datetime.datetime.now(plus5) + datetime.timedelta(seconds=2)
    with SyncPublisher(amqp.URL) as pub:
        task_id = pub.send_task(TASK, (t,), queue=worker.queue, eta=eta)
    got = worker.wait_ran(t)
    assert got["id"] == task_id
    assert datetime.datetime.fromisoformat(got["eta"]) == eta
    assert got["ran_at"] >= eta.timestamp() - CLOCK_SLACK


def test_expires_in_the_future_is_carried_and_the_task_runs(worker):
    t = token()
    _, before, after = send(args=(t,), queue=worker.queue, expires=60)
    got = worker.wait_ran(t)
    assert before + 60 - CLOCK_SLACK <= at(got["expires"]) <= after + 60 + CLOCK_SLACK


def test_expires_in_the_past_is_discarded_by_the_worker_never_run(worker):
    """Celery 5 logs "Discarding revoked task: <name>[<id>]" and acks it without running
    it (Request.revoked: expired counts as revoked). Its TTL is 0, so the broker hands
    it over only because a consumer with room is waiting (an idle worker is; see the
    next test for the broker's side). A task sent after them on the same queue has run,
    so the worker has seen them (one solo worker takes the queue in order)."""
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    expired = [send(args=(token(),), queue=worker.queue, expires=-5)[0],
               send(args=(token(),), queue=worker.queue, expires=past)[0]]
    last = token()
    send(args=(last,), queue=worker.queue)
    worker.wait_ran(last)
    for task_id in expired:
        worker.wait_logged(f"Discarding revoked task: {TASK}[{task_id}]")
    assert not [r for r in worker.ran() if r["id"] in expired]


def test_expires_is_also_the_ttl_so_the_broker_drops_what_expired_while_queued():
    """As Celery's send_task does: the AMQP expiration is the seconds left (0 when past),
    so a task that expired while no worker consumed never reaches one."""
    queue = amqp.unique("celery-ttl")
    amqp.declare(queue)
    try:
        send(args=(token(),), queue=queue, expires=-5)
        send(args=(token(),), queue=queue,
             expires=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1))
        kept, before, after = send(args=(token(),), queue=queue, expires=60)
        [message] = amqp.get_all(queue)  # TTL 0 and no consumer: dropped on arrival
        assert message.message_id == message.correlation_id == kept
        ttl = message.expiration  # aio-pika gives it in seconds
        assert isinstance(ttl, int | float) and 59 <= ttl <= 60
        assert message.headers["expires"] is not None
        assert before + 60 - CLOCK_SLACK <= at(str(message.headers["expires"])) <= after + 60
    finally:
        amqp.delete([queue])


def test_a_large_argument_arrives_and_the_repr_headers_stay_small(worker):
    """argsrepr/kwargsrepr are cut at 1024 characters as Celery cuts them: in full, a
    200 kB argument would not fit the broker's 128 KiB header frame, and RabbitMQ would
    close the connection (frame_too_large)."""
    t, big = token(), "x" * 200_000
    task_id, _, _ = send(args=(t, big), kwargs={"big": big}, queue=worker.queue)
    got = worker.wait_ran(t)
    assert got["id"] == task_id
    assert got["args"] == [t, big] and got["kwargs"] == {"big": big}


def test_exchange_and_routing_key_route_through_a_matching_binding(worker):
    exchange, routing_key = amqp.unique("celery-x"), f"rk-{uuid.uuid4().hex[:8]}"

    async def bind() -> None:
        connection = await aio_pika.connect(amqp.URL)
        async with connection:
            channel = await connection.channel()
            x = await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT,
                                               auto_delete=False)
            queue = await channel.declare_queue(worker.queue, passive=True)
            await queue.bind(x, routing_key)

    try:
        asyncio.run(bind())
        t = token()
        task_id, _, _ = send(args=(t,), queue=worker.queue, exchange=exchange,
                             routing_key=routing_key)
        got = worker.wait_ran(t)
        assert got["id"] == task_id
        assert got["delivery_info"]["exchange"] == exchange
        assert got["delivery_info"]["routing_key"] == routing_key
        # Celery's own binding: an exchange named after the queue, routing key = queue.
        t = token()
        send(args=(t,), queue=worker.queue, exchange=worker.queue)
        got = worker.wait_ran(t)
        assert got["delivery_info"] == {**got["delivery_info"], "exchange": worker.queue,
                                        "routing_key": worker.queue}
        # No binding matches: the broker returns it, and send_task says so.
        with pytest.raises(Unroutable):
            send(args=(token(),), queue=worker.queue, exchange=exchange,
                 routing_key="nobody-binds-this")
    finally:
        amqp.delete([], exchanges=[exchange])


def test_readme_example_runs_on_the_worker(worker, tmp_path):
    """The README's example, pointed at this worker's queue and task."""
    m = re.search(r"```python\n(# send_tasks.py.*?)```", (ROOT / "README.md").read_text(),
                  re.S)
    assert m is not None
    code = m.group(1).replace('"proj.tasks.add"', repr(TASK))
    code = code.replace('queue="celery"', f"queue={worker.queue!r}")
    (tmp_path / "send_tasks.py").write_text(code)
    out = subprocess.run([sys.executable, "send_tasks.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "RMQPOOL_URL": amqp.URL})
    assert out.returncode == 0, out.stderr
    first, given = re.findall(r"^sent (\S+)$", out.stdout, re.M)
    assert given == "add-8-9"
    assert worker.wait_ran_id(first)["args"] == [2, 3]
    assert worker.wait_ran_id(given)["args"] == [8, 9]
