"""RPC and handler output against a real pool (the CLI as a subprocess): replies to
calls, error replies for every dead-letter reason, no replies for retries, a requester
that has gone away, and messages a handler publishes (only on success, all of them,
confirmed before the ack; unroutable output is the attempt's failure)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import pytest

import rmqpool
from rmqpool import topology as t
from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.pool import Pool, wait_for

pytestmark = pytest.mark.timeout(90)
FAST = ("--retry-delays", "0.1")  # every retry tier: 100 ms


@pytest.fixture
def cleanup() -> Iterator[Callable[..., None]]:
    """cleanup(name, ...) deletes those queues after the test."""
    names: list[str] = []
    yield lambda *more: names.extend(more)
    amqp.delete(names)


def start(handler: str, queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path,
          *args: str, cleanup: Callable[..., None]) -> Pool:
    delays = args[args.index("--retry-delays") + 1] if "--retry-delays" in args else None
    if delays is not None:
        cleanup(*amqp.pool_queues(queue, [float(d) for d in delays.split(",")]))
    pool = Pool(f"tests.support.handlers:{handler}", "--queue", queue, "--workers", "1",
                *args, tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}).start()
    try:
        pool.wait_ready()
    except BaseException:
        pool.close()
        raise
    return pool


def stop(pool: Pool) -> None:
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0, pool.log()


def settled(pool: Pool, queue: str, outcome: str) -> float:
    return pool.metric("rmqpool_messages_processed_total", queue=queue, outcome=outcome)


def reply_queue(cleanup: Callable[..., None]) -> str:
    name = amqp.unique("replies")
    amqp.declare(name)
    cleanup(name)
    return name


def request(queue: str, body: Any, reply_to: str, correlation_id: str, *,
            content_type: str | None = None) -> str:
    """A request with a named reply queue (to see every reply, and its properties)."""
    async def go() -> str:
        async with rmqpool.Publisher(amqp.URL) as pub:
            return await pub.publish(body, routing_key=queue, reply_to=reply_to,
                                     correlation_id=correlation_id, content_type=content_type)
    return asyncio.run(go())


def error_of(reply: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    assert reply.headers == {"x-rmqpool-status": "error"}, reply.headers
    assert reply.content_type == "application/json"
    body: dict[str, Any] = json.loads(reply.body)
    return body


HANDLERS = pytest.mark.parametrize("suffix", ["", "_async"], ids=["sync", "async"])


# -- replies -------------------------------------------------------------------------------

@HANDLERS
@pytest.mark.timeout(120)
def test_calls_get_replies(suffix: str, queue: str, record_file: pathlib.Path,
                           tmp_path: pathlib.Path, cleanup: Callable[..., None]) -> None:
    """100 calls in flight at once on one Publisher, each gets its own reply; and from
    8 threads through one SyncPublisher."""
    pool = start(f"echo{suffix}", queue, record_file, tmp_path, "--workers", "2",
                 "--concurrency", "4", cleanup=cleanup)
    try:
        async def calls() -> list[Any]:
            async with rmqpool.Publisher(amqp.URL) as pub:
                return await asyncio.gather(*(pub.call({"i": i}, routing_key=queue,
                                                       timeout=60) for i in range(100)))

        replies = asyncio.run(calls())
        assert replies == [{"echo": {"i": i}, "attempt": 1} for i in range(100)]

        got: dict[tuple[int, int], Any] = {}
        with rmqpool.SyncPublisher(amqp.URL) as pub:
            def work(n: int) -> None:
                for i in range(5):
                    got[n, i] = pub.call(f"{n}-{i}", routing_key=queue, timeout=60)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert pub.call([1, "two"], routing_key=queue) == {"echo": [1, "two"], "attempt": 1}
        assert got == {(n, i): {"echo": f"{n}-{i}", "attempt": 1}
                       for n in range(8) for i in range(5)}
        wait_for(lambda: settled(pool, queue, "acked") == 141, 10, "141 acks")
        stop(pool)
    finally:
        pool.close()


def test_reply_properties(queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path,
                          cleanup: Callable[..., None]) -> None:
    """A reply: default exchange, routing key = reply_to, the request's correlation id,
    x-rmqpool-status: ok, JSON; published before the request is acked."""
    replies = reply_queue(cleanup)
    pool = start("echo", queue, record_file, tmp_path, cleanup=cleanup)
    try:
        request(queue, {"q": 1}, replies, "corr-1")
        wait_for(lambda: settled(pool, queue, "acked") == 1, 20, "the request acked")
        [reply] = amqp.get_all(replies)  # acked after its reply was confirmed: it is there
        assert json.loads(reply.body) == {"echo": {"q": 1}, "attempt": 1}
        assert reply.headers == {"x-rmqpool-status": "ok"}
        assert reply.correlation_id == "corr-1"
        assert (reply.exchange, reply.routing_key) == ("", replies)
        assert reply.content_type == "application/json"
        stop(pool)
    finally:
        pool.close()


# -- error replies -------------------------------------------------------------------------

@HANDLERS
def test_error_replies(suffix: str, queue: str, record_file: pathlib.Path,
                       tmp_path: pathlib.Path, cleanup: Callable[..., None]) -> None:
    """Dead-lettered requests get an error reply: RemoteError(reason, type, message)."""
    replies = reply_queue(cleanup)
    pool = start(f"echo{suffix}", queue, record_file, tmp_path, "--max-retries", "0",
                 cleanup=cleanup)
    try:
        with rmqpool.SyncPublisher(amqp.URL) as pub:
            with pytest.raises(rmqpool.RemoteError) as failed:
                pub.call({"fail": "boom"}, routing_key=queue, timeout=30)
            with pytest.raises(rmqpool.RemoteError) as rejected:
                pub.call({"reject": "no thanks"}, routing_key=queue, timeout=30)
            with pytest.raises(rmqpool.RemoteError) as unsendable:
                pub.call({"unsendable": True}, routing_key=queue, timeout=30)
            # It still answers.
            assert pub.call("ok?", routing_key=queue) == {"echo": "ok?", "attempt": 1}
        assert (failed.value.reason, failed.value.type, failed.value.message) == (
            "max_retries", "ValueError", "boom")
        assert str(failed.value) == "max_retries: ValueError: boom"
        assert (rejected.value.reason, rejected.value.type, rejected.value.message) == (
            "rejected", "Reject", "no thanks")
        assert (unsendable.value.reason, unsendable.value.type) == ("max_retries", "TypeError")
        assert "cannot publish a body of type set" in unsendable.value.message

        # Malformed: JSON that isn't. call() only sends what it encodes itself, so this
        # one is published with a named reply queue.
        request(queue, b"{not json", replies, "corr-bad", content_type="application/json")
        wait_for(lambda: amqp.count(replies) == 1, 20, "the error reply")
        [reply] = amqp.get_all(replies)
        assert reply.correlation_id == "corr-bad"
        error = error_of(reply)
        assert (error["reason"], error["type"]) == ("malformed", "MalformedMessage")
        assert error["message"].startswith("body is not valid JSON"), error
        dead = {m.headers[t.H_REASON] for m in amqp.get_all(t.dlq_name(queue))}
        assert dead == {"max_retries", "rejected", "malformed"}
        stop(pool)
    finally:
        pool.close()


@HANDLERS
@pytest.mark.timeout(120)
def test_error_replies_for_poison_and_time_limit(suffix: str, queue: str,
                                                 record_file: pathlib.Path,
                                                 tmp_path: pathlib.Path,
                                                 cleanup: Callable[..., None]) -> None:
    pool = start(f"behave{suffix}", queue, record_file, tmp_path, "--max-retries", "0",
                 "--max-worker-deaths", "1", "--time-limit", "1", cleanup=cleanup)
    try:
        with rmqpool.SyncPublisher(amqp.URL) as pub:
            with pytest.raises(rmqpool.RemoteError) as poison:
                pub.call({"die": True}, routing_key=queue, timeout=60)
            with pytest.raises(rmqpool.RemoteError) as slow:
                pub.call({"hang": True}, routing_key=queue, timeout=60)
            assert pub.call({}, routing_key=queue, timeout=30) is None  # still answering
        assert (poison.value.reason, poison.value.type) == ("poison", "WorkerDied")
        assert "the message was running when its worker died (crash)" in poison.value.message
        assert slow.value.reason == "time_limit", slow.value
        if suffix:  # cancelled on the loop
            assert slow.value.type == "TimeLimitExceeded"
            assert slow.value.message == "handler ran past --time-limit 1s"
        else:  # the supervisor killed the worker
            assert slow.value.type == "WorkerDied"
            assert "worker died (time_limit)" in slow.value.message
        stop(pool)
    finally:
        pool.close()


def test_retries_do_not_reply(queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path,
                              cleanup: Callable[..., None]) -> None:
    """Failing once then succeeding: exactly one reply, the ok one. Failing every time:
    exactly one reply, the error one."""
    replies = reply_queue(cleanup)
    pool = start("behave", queue, record_file, tmp_path, "--max-retries", "2", *FAST,
                 cleanup=cleanup)
    try:
        once = request(queue, {"fail_until": 2}, replies, "once")
        always = request(queue, {"fail": "always"}, replies, "always")
        wait_for(lambda: settled(pool, queue, "acked") == 1
                 and settled(pool, queue, "dead_lettered") == 1, 30, "both settled")
        # Every reply was confirmed before its request's ack: all of them are there.
        got = amqp.get_all(replies)
        assert sorted(m.correlation_id or "" for m in got) == ["always", "once"], [
            (m.correlation_id, m.headers) for m in got]
        by = {m.correlation_id: m for m in got}
        assert by["once"].headers == {"x-rmqpool-status": "ok"}
        assert json.loads(by["once"].body) is None
        assert error_of(by["always"])["reason"] == "max_retries"
        attempts = sorted((mid, a) for mid, a, _, tag in read_records(record_file)
                          if tag == "start")
        assert attempts == sorted([(once, 1), (once, 2), (always, 1), (always, 2), (always, 3)])
        with rmqpool.SyncPublisher(amqp.URL) as pub:  # and with direct reply-to
            assert pub.call({"fail_until": 2}, routing_key=queue, timeout=30) is None
        stop(pool)
    finally:
        pool.close()


LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s", re.M)


def test_requester_gone_is_logged_at_debug(queue: str, record_file: pathlib.Path,
                                           tmp_path: pathlib.Path,
                                           cleanup: Callable[..., None]) -> None:
    gone = amqp.unique("gone")
    amqp.declare(gone)
    amqp.delete([gone])  # the requester's reply queue, deleted before the reply
    pool = start("echo", queue, record_file, tmp_path, "--log-level", "debug",
                 "--max-retries", "0", cleanup=cleanup)
    try:
        request(queue, {"q": 1}, gone, "c1")
        wait_for(lambda: settled(pool, queue, "acked") == 1, 20, "the request acked")
        wait_for(lambda: "its reply was unroutable" in pool.log(), 10, "the debug line")
        log = pool.log()
        [line] = [ln for ln in log.splitlines() if "its reply was unroutable" in ln]
        assert re.match(r"^\S+ \S+ DEBUG ", line), line
        assert "the requester has gone" in line
        levels = set(LEVEL.findall(log))
        assert "ERROR" not in levels and "CRITICAL" not in levels and "WARNING" not in levels, log

        request(queue, {"reject": "no"}, gone, "c2")  # an error reply nobody takes
        wait_for(lambda: "its error reply was unroutable" in pool.log(), 20, "the debug line")
        # the dead letter's own line comes after the reply (its outcome is logged last)
        wait_for(lambda: "dead-lettered to" in pool.log(), 10, "the dead letter's line")
        log = pool.log()
        [line] = [ln for ln in log.splitlines() if "its error reply was unroutable" in ln]
        assert re.match(r"^\S+ \S+ DEBUG ", line), line
        errors = [ln for ln in log.splitlines() if re.match(r"^\S+ \S+ (ERROR|CRITICAL)", ln)]
        assert len(errors) == 1 and "dead-lettered to" in errors[0], errors  # the dead letter
        assert "not published" not in log
        assert pool.proc is not None and pool.proc.poll() is None
        stop(pool)
    finally:
        pool.close()


# -- handler output ------------------------------------------------------------------------

@HANDLERS
def test_output_only_on_success(suffix: str, queue: str, record_file: pathlib.Path,
                                tmp_path: pathlib.Path, cleanup: Callable[..., None]) -> None:
    """An attempt that fails publishes nothing: after two failures and a success the
    output is there exactly once; several outputs of one message all arrive."""
    one, several = amqp.unique("out1"), amqp.unique("out3")
    for name in (one, several):
        amqp.declare(name)
    cleanup(one, several)
    pool = start(f"forward{suffix}", queue, record_file, tmp_path, *FAST, cleanup=cleanup)
    try:
        [first] = amqp.publish(queue, [{"to": one, "out": {"n": 1}, "fail_until": 3}])
        amqp.publish(queue, [{"to": several, "out": ["a", "b", "c"]}])
        wait_for(lambda: settled(pool, queue, "acked") == 2, 30, "both acked")
        # Acked only once all output was confirmed: it is all there, now.
        [out] = amqp.get_all(one)
        assert json.loads(out.body) == {"n": 1}
        assert out.content_type == "application/json"
        assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert sorted(json.loads(m.body) for m in amqp.get_all(several)) == ["a", "b", "c"]
        published = [a for mid, a, _, tag in read_records(record_file)
                     if mid == first and tag == "published"]
        assert published == [1, 2, 3]  # it asked to publish on every attempt
        assert settled(pool, queue, "retried") == 2
        stop(pool)
    finally:
        pool.close()


@HANDLERS
def test_unroutable_output_fails_the_attempt(suffix: str, queue: str,
                                             record_file: pathlib.Path,
                                             tmp_path: pathlib.Path,
                                             cleanup: Callable[..., None]) -> None:
    """Output no queue is bound to: retried, then dead-lettered (max_retries, Unroutable);
    the pool keeps running."""
    nowhere, out = amqp.unique("nowhere"), amqp.unique("out")
    amqp.declare(out)
    cleanup(out)
    pool = start(f"forward{suffix}", queue, record_file, tmp_path, "--max-retries", "1",
                 *FAST, cleanup=cleanup)
    try:
        pids = pool.worker_pids()
        [lost] = amqp.publish(queue, [{"to": nowhere, "out": "x"}])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 30, "the dead letter")
        [dead] = amqp.get_all(t.dlq_name(queue))
        assert dead.message_id == lost
        assert dead.headers[t.H_REASON] == "max_retries"
        assert dead.headers[t.H_EXC_TYPE] == "Unroutable"
        assert repr(nowhere) in str(dead.headers[t.H_EXC_MESSAGE])
        assert "unroutable (no queue is bound to it)" in str(dead.headers[t.H_EXC_MESSAGE])
        assert dead.headers[t.H_ATTEMPT] == 2
        # Still running, same worker: the next message's output arrives.
        amqp.publish(queue, [{"to": out, "out": "after"}])
        wait_for(lambda: amqp.count(out) == 1, 20, "output after the dead letter")
        assert pool.worker_pids() == pids and pool.is_ready()
        stop(pool)
    finally:
        pool.close()


@HANDLERS
def test_call_whose_output_is_unroutable_gets_only_the_error_reply(
        suffix: str, queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path,
        cleanup: Callable[..., None]) -> None:
    """A request whose handler returns but whose output nobody takes has failed: no ok
    reply for that attempt (it is retried), one error reply when dead-lettered."""
    replies = reply_queue(cleanup)
    nowhere = amqp.unique("nowhere")
    pool = start(f"forward{suffix}", queue, record_file, tmp_path, "--max-retries", "1",
                 *FAST, cleanup=cleanup)
    try:
        with rmqpool.SyncPublisher(amqp.URL) as pub, \
                pytest.raises(rmqpool.RemoteError) as info:
            pub.call({"to": nowhere, "out": "x"}, routing_key=queue, timeout=30)
        assert (info.value.reason, info.value.type) == ("max_retries", "Unroutable")
        request(queue, {"to": nowhere, "out": "x"}, replies, "c1")
        wait_for(lambda: settled(pool, queue, "dead_lettered") == 2, 30, "two dead letters")
        [reply] = amqp.get_all(replies)
        assert error_of(reply)["type"] == "Unroutable"
        stop(pool)
    finally:
        pool.close()


def test_direct_reply_to_a_requester_that_timed_out(queue: str, record_file: pathlib.Path,
                                                    tmp_path: pathlib.Path,
                                                    cleanup: Callable[..., None]) -> None:
    """The caller gave up and closed its connection before the reply: the reply to its
    direct reply-to address goes nowhere, quietly, and the worker's channel stays up."""
    pool = start("behave", queue, record_file, tmp_path, "--log-level", "debug",
                 cleanup=cleanup)
    try:
        with rmqpool.SyncPublisher(amqp.URL) as pub, pytest.raises(TimeoutError):
            pub.call({"sleep": 1.5}, routing_key=queue, timeout=0.2)
        wait_for(lambda: settled(pool, queue, "acked") == 1, 20, "the request acked")
        with rmqpool.SyncPublisher(amqp.URL) as pub:  # and the next call is answered
            assert pub.call({}, routing_key=queue, timeout=30) is None
        log = pool.log()
        assert not {"WARNING", "ERROR", "CRITICAL"} & set(LEVEL.findall(log)), log
        assert pool.metric("rmqpool_broker_reconnects_total") == 0, log
        stop(pool)
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_a_call_in_flight_when_the_connection_drops_fails_at_once(queue, tmp_path):
    """Its reply can never reach the new connection (direct reply-to): a ConnectionError
    saying so, not a timeout after the full wait (found by the review)."""
    from tests.support.proxy import TcpProxy

    with Pool("tests.support.handlers:slow", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready()
        with TcpProxy("127.0.0.1", 5672) as proxy:
            async def go() -> float:
                url = proxy.url() + "?reconnect_interval=0.2"
                async with rmqpool.Publisher(url) as pub:
                    loop = asyncio.get_running_loop()
                    call = asyncio.ensure_future(pub.call({"sleep": 2}, routing_key=queue,
                                                          timeout=20))
                    await asyncio.sleep(0)
                    await asyncio.to_thread(wait_for, lambda: proxy.active >= 1, 5, "link")
                    started = loop.time()
                    await asyncio.to_thread(proxy.cut)
                    with pytest.raises(ConnectionError):  # at once, not after the 20 s
                        await call
                    return loop.time() - started
            took = asyncio.run(go())
        assert took < 15, took
        pool.signal(signal.SIGTERM)
        pool.wait(15)
