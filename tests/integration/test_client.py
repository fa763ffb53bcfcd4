"""The client side against a real broker: Publisher (asyncio) and SyncPublisher (threads),
every method and every error they raise, reconnects through a TCP proxy and a broker
restart. RPC calls against a real pool are in tests/process/test_rpc_and_output.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import aio_pika
import pytest

import rmqpool
from rmqpool.client import RECONNECT_TIMEOUT, default_url
from tests.support import amqp
from tests.support.broker import PrivateBroker, private_broker  # noqa: F401 - fixture
from tests.support.pool import ROOT, wait_for
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture
def declared(queue: str) -> str:
    """The `queue` fixture's name, declared (durable) on the shared broker."""
    amqp.declare(queue)
    return queue


def bodies_of(queue: str, url: str = amqp.URL) -> list[aio_pika.abc.AbstractIncomingMessage]:
    return amqp.get_all(queue, url)


# -- URL and lifecycle -------------------------------------------------------------------

def test_default_url_follows_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_url({}) == "amqp://guest:guest@localhost:5672/"
    assert default_url({"RABBITMQ_URL": "amqp://a@h1/"}) == "amqp://a@h1/"
    assert default_url({"RMQPOOL_URL": "amqp://b@h2/, amqp://b@h3/",
                        "RABBITMQ_URL": "amqp://a@h1/"}) == "amqp://b@h2/"
    monkeypatch.setenv("RMQPOOL_URL", amqp.URL)
    assert rmqpool.Publisher().url == amqp.URL
    assert rmqpool.Publisher("amqp://x@y/").url == "amqp://x@y/"
    assert "secret" not in repr(rmqpool.Publisher("amqp://u:secret@h/"))
    assert rmqpool.Publisher().reconnect_timeout == RECONNECT_TIMEOUT


def test_connect_close_and_context_manager(declared: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """connect()/close() by hand and `async with`; with no URL, the environment's."""
    monkeypatch.delenv("RMQPOOL_URL", raising=False)
    monkeypatch.setenv("RABBITMQ_URL", amqp.URL)

    async def go() -> list[str]:
        pub = rmqpool.Publisher()
        assert not pub.is_connected
        assert await pub.connect() is pub
        assert pub.is_connected
        first = await pub.publish("by hand", routing_key=declared)
        await pub.close()
        assert not pub.is_connected
        async with rmqpool.Publisher() as pub2:
            assert pub2.is_connected
            second = await pub2.publish("in a with block", routing_key=declared)
        assert not pub2.is_connected
        return [first, second]

    ids = run(go())
    assert [m.message_id for m in bodies_of(declared)] == ids


def test_refused_credentials_are_named() -> None:
    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL.replace("guest:guest", "guest:wrong")):
            pass

    with pytest.raises(rmqpool.PublishError, match="refused the credentials") as info:
        run(go())
    assert "wrong" not in str(info.value)


# -- publish -----------------------------------------------------------------------------

def test_publish_encodes_bodies_and_sets_properties(declared: str) -> None:
    bodies: list[Any] = [{"n": 1, "s": "é"}, [1, 2], "text", 42, 1.5, True, None, b"\x00raw"]

    async def go() -> tuple[list[str], str]:
        async with rmqpool.Publisher(amqp.URL) as pub:
            ids = [await pub.publish(body, routing_key=declared) for body in bodies]
            mine = await pub.publish(
                {"k": "v"}, routing_key=declared, headers={"h": "x", "n": 3},
                message_id="my-id", correlation_id="corr", reply_to="replies", priority=5,
                expiration=60, persistent=False)
            return ids, mine

    ids, mine = run(go())
    assert mine == "my-id"
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)  # uuid4 hex
    got = bodies_of(declared)
    assert [m.message_id for m in got] == [*ids, "my-id"]
    for body, m in zip(bodies, got, strict=False):
        if isinstance(body, bytes):
            assert m.body == body and m.content_type is None
        else:
            assert json.loads(m.body) == body
            assert m.content_type == "application/json" and m.content_encoding == "utf-8"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.timestamp is not None
    last = got[-1]
    assert json.loads(last.body) == {"k": "v"}
    assert last.headers == {"h": "x", "n": 3}
    assert (last.correlation_id, last.reply_to, last.priority) == ("corr", "replies", 5)
    assert last.expiration == 60.0  # aio-pika reads the broker's "60000" ms as seconds
    assert last.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


def test_publish_with_content_type_keeps_bytes_as_they_are(declared: str) -> None:
    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            await pub.publish(b"<a/>", routing_key=declared, content_type="text/xml")

    run(go())
    [m] = bodies_of(declared)
    assert (m.body, m.content_type) == (b"<a/>", "text/xml")


def test_publish_to_an_exchange(declared: str) -> None:
    exchange = amqp.unique("ex")

    async def go() -> None:
        connection = await aio_pika.connect(amqp.URL)
        async with connection:
            channel = await connection.channel()
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT)
            q = await channel.get_queue(declared)
            await q.bind(ex, routing_key="rk")
        async with rmqpool.Publisher(amqp.URL) as pub:
            await pub.publish({"via": "exchange"}, routing_key="rk", exchange=exchange)

    try:
        run(go())
        [m] = bodies_of(declared)
        assert json.loads(m.body) == {"via": "exchange"}
    finally:
        amqp.delete([], exchanges=[exchange])


def test_unroutable_raises_unless_not_mandatory() -> None:
    nowhere = amqp.unique("nowhere")

    async def go() -> str:
        async with rmqpool.Publisher(amqp.URL) as pub:
            with pytest.raises(rmqpool.Unroutable) as info:
                await pub.publish({"n": 1}, routing_key=nowhere)
            assert isinstance(info.value, rmqpool.PublishError)
            assert f"no queue is bound to routing key {nowhere!r}" in str(info.value)
            assert "the default exchange" in str(info.value)
            assert "mandatory=False" in str(info.value)  # the way out, named
            # The publisher is still usable, and mandatory=False drops it silently.
            return await pub.publish({"n": 2}, routing_key=nowhere, mandatory=False)

    assert len(run(go())) == 32


def test_nack_raises_publish_error(queue: str) -> None:
    """A real nack: the queue is full and refuses publishes (x-overflow=reject-publish)."""
    amqp.declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})

    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            await pub.publish({"n": 1}, routing_key=queue)
            with pytest.raises(rmqpool.PublishError) as info:
                await pub.publish({"n": 2}, routing_key=queue, message_id="second")
            assert not isinstance(info.value, rmqpool.Unroutable)
            message = str(info.value)
            assert "did not accept message second" in message, message
            assert "x-overflow=reject-publish" in message, message
            # The publisher survives a nack: once there is room, the next one goes in.
            await asyncio.to_thread(amqp.get_all, queue)
            await pub.publish({"n": 3}, routing_key=queue)

    run(go())
    assert [json.loads(m.body) for m in bodies_of(queue)] == [{"n": 3}]


def test_missing_exchange_is_named_and_the_publisher_recovers(declared: str) -> None:
    missing = amqp.unique("no-such-exchange")

    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            with pytest.raises(rmqpool.PublishError) as info:
                await pub.publish({"n": 1}, routing_key="rk", exchange=missing)
            message = str(info.value)
            assert f"exchange {missing!r} does not exist" in message, message
            assert "declare it before publishing" in message
            # The broker closed the channel (404); the next publish gets a new one.
            await pub.publish({"n": 2}, routing_key=declared)

    run(go())
    assert [json.loads(m.body) for m in bodies_of(declared)] == [{"n": 2}]


def test_missing_exchange_fails_only_its_own_publish(declared: str) -> None:
    """The broker closes the whole channel for a missing exchange; the publishes in flight
    beside it on that channel are sent again, not failed with its error."""
    missing = amqp.unique("no-such-exchange")

    async def go() -> tuple[list[Any], Any]:
        # The broker may close the whole connection too (504: aiormq still writes to the
        # closed channel), so reconnect quickly.
        async with rmqpool.Publisher(amqp.URL + "?reconnect_interval=0.2") as pub:
            sends: list[Coroutine[Any, Any, str]] = [
                pub.publish({"i": i}, routing_key=declared) for i in range(2000)]
            sends.insert(1000, pub.publish({"bad": 1}, routing_key="rk", exchange=missing))
            results = await asyncio.gather(*sends, return_exceptions=True)
            return results[:1000] + results[1001:], results[1000]

    good, bad = run(go())
    assert isinstance(bad, rmqpool.PublishError) and repr(missing) in str(bad), bad
    failed = [r for r in good if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} others failed, e.g. {failed[0]}"
    assert {str(m.message_id) for m in bodies_of(declared)} == set(good)


@pytest.mark.parametrize(("body", "named"), [
    (object(), "cannot publish a body of type object"),
    ({1, 2}, "cannot publish a body of type set"),
    ({"when": 1j}, "cannot publish this dict as JSON"),
    (float("nan"), "cannot publish this float as JSON"),
], ids=["object", "set", "complex-in-dict", "nan"])
def test_unencodable_body_raises_type_error_before_sending(declared: str, body: Any,
                                                           named: str) -> None:
    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            with pytest.raises(TypeError, match=named):
                await pub.publish(body, routing_key=declared)
            with pytest.raises(TypeError, match=named):  # the good ones are not sent either
                await pub.publish_many([{"ok": 1}, body, {"ok": 2}], routing_key=declared)

    run(go())
    assert amqp.count(declared) == 0


def test_concurrent_first_use_opens_one_connection(declared: str) -> None:
    """Publishes started together on a publisher not yet connected share one connection."""
    with TcpProxy("127.0.0.1", 5672) as proxy:
        async def go() -> list[str]:
            pub = rmqpool.Publisher(proxy.url())
            try:
                return await asyncio.gather(*(pub.publish(i, routing_key=declared)
                                              for i in range(20)))
            finally:
                await pub.close()

        ids = run(go())
        assert proxy.accepted == 1, f"{proxy.accepted} connections opened"
    assert sorted(str(m.message_id) for m in bodies_of(declared)) == sorted(ids)


# -- publish_many --------------------------------------------------------------------------

def test_publish_many_returns_ids_in_order(declared: str) -> None:
    n = 2000

    async def go() -> list[str]:
        async with rmqpool.Publisher(amqp.URL, window=100) as pub:
            return await pub.publish_many(({"i": i} for i in range(n)), routing_key=declared,
                                          headers={"batch": "b1"})

    ids = run(go())
    assert len(ids) == n == len(set(ids))
    got = bodies_of(declared)
    assert [m.message_id for m in got] == ids
    assert [json.loads(m.body)["i"] for m in got] == list(range(n))
    assert all(m.headers == {"batch": "b1"} for m in got)


def test_publish_many_raises_the_first_failure() -> None:
    nowhere = amqp.unique("nowhere")

    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            with pytest.raises(rmqpool.Unroutable, match=repr(nowhere)):
                await pub.publish_many([1, 2, 3], routing_key=nowhere)
            assert await pub.publish_many([], routing_key=nowhere) == []

    run(go())


# -- reconnects ----------------------------------------------------------------------------

def test_publish_waits_for_a_cut_connection_and_sends_again(declared: str) -> None:
    """A cut connection in the middle of publish_many: every id returned is in the queue."""
    with TcpProxy("127.0.0.1", 5672) as proxy:
        async def go() -> list[str]:
            url = proxy.url() + "?reconnect_interval=0.2"
            async with rmqpool.Publisher(url, window=20) as pub:
                task = asyncio.ensure_future(
                    pub.publish_many([{"i": i} for i in range(3000)], routing_key=declared))
                while (await asyncio.to_thread(amqp.count, declared) or 0) < 300:
                    assert not task.done(), "finished before the cut: proves nothing"
                await asyncio.to_thread(proxy.cut)
                ids = await task
                # And a publish after the reconnect goes through.
                ids.append(await pub.publish({"after": True}, routing_key=declared))
                return ids

        ids = run(go())
    got = [m.message_id for m in bodies_of(declared)]
    assert set(got) == set(ids)  # duplicates allowed, nothing missing
    assert proxy.accepted >= 2


def test_publish_while_disconnected_waits_for_the_reconnect(declared: str) -> None:
    with TcpProxy("127.0.0.1", 5672) as proxy:
        async def go() -> str:
            url = proxy.url() + "?reconnect_interval=0.2"
            async with rmqpool.Publisher(url, reconnect_timeout=30) as pub:
                proxy.pause()
                await asyncio.to_thread(proxy.cut)
                publishing = asyncio.ensure_future(pub.publish({"n": 1}, routing_key=declared))
                # Let it meet the broker down (a reconnect attempt refused), then bring
                # the broker back.
                await asyncio.to_thread(wait_for, lambda: proxy.refused >= 2, 20,
                                        "reconnect attempts")
                assert not publishing.done()
                proxy.resume()
                return await publishing

        mid = run(go())
    assert [m.message_id for m in bodies_of(declared)] == [mid]


def test_reconnect_timeout_bounds_publish_many(declared: str) -> None:
    """publish_many waits for the connection at most reconnect_timeout too (not once per
    window of messages)."""
    with TcpProxy("127.0.0.1", 5672) as proxy:
        async def go() -> float:
            url = proxy.url() + "?reconnect_interval=0.2"
            async with rmqpool.Publisher(url, reconnect_timeout=1, window=10) as pub:
                proxy.pause()
                await asyncio.to_thread(proxy.cut)
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(rmqpool.PublishError, match="within 1s"):
                    await pub.publish_many(range(100), routing_key=declared)
                took = loop.time() - started
                proxy.resume()
                return took

        took = run(go())
    assert took < 4, f"publish_many gave up after {took:.1f}s, reconnect_timeout=1"


def test_reconnect_timeout_bounds_the_wait(declared: str) -> None:
    with TcpProxy("127.0.0.1", 5672) as proxy:
        async def go() -> float:
            url = proxy.url() + "?reconnect_interval=0.2"
            async with rmqpool.Publisher(url, reconnect_timeout=1.5) as pub:
                await pub.publish({"n": 1}, routing_key=declared)
                proxy.pause()
                await asyncio.to_thread(proxy.cut)
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(rmqpool.PublishError) as info:
                    await pub.publish({"n": 2}, routing_key=declared)
                took = loop.time() - started
                message = str(info.value)
                assert "within 1.5s" in message, message
                assert "secret" not in message and f":{proxy.port}" in message
                proxy.resume()
                return took

        took = run(go())
    assert 1.4 <= took < 10, took


@pytest.mark.timeout(180)
def test_broker_restart_during_publish_many(private_broker: PrivateBroker,  # noqa: F811
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of messages in flight when the broker restarts: every id publish_many
    returned is in the queue afterwards (a duplicate is allowed, a loss never)."""
    url = private_broker.url
    queue = amqp.unique("restart")
    amqp.declare(queue, url)
    caplog.set_level(logging.INFO, logger="rmqpool.client")
    n = 4000
    restarted = threading.Event()

    def restart_once_publishing() -> None:
        wait_for(lambda: (amqp.count(queue, url) or 0) >= 400, 60, "400 messages in")
        private_broker.restart()
        restarted.set()

    async def go() -> list[str]:
        async with rmqpool.Publisher(url + "?reconnect_interval=0.5", window=50) as pub:
            restarter = asyncio.ensure_future(asyncio.to_thread(restart_once_publishing))
            ids = await pub.publish_many([{"i": i, "pad": "x" * 512} for i in range(n)],
                                         routing_key=queue)
            await restarter
            return ids

    ids = run(go())
    assert restarted.is_set()
    assert "connection lost while publishing" in caplog.text, "no publish was interrupted"
    got = [m.message_id for m in amqp.get_all(queue, url)]
    assert len(ids) == n == len(set(ids))
    missing = set(ids) - set(got)
    assert not missing, f"{len(missing)} confirmed messages lost"
    assert set(got) == set(ids)


# -- SyncPublisher -------------------------------------------------------------------------

def test_sync_publisher_methods(declared: str) -> None:
    with rmqpool.SyncPublisher(amqp.URL) as pub:
        one = pub.publish({"n": 0}, routing_key=declared, headers={"h": 1}, message_id="m0")
        many = pub.publish_many([{"n": 1}, {"n": 2}], routing_key=declared)
        with pytest.raises(rmqpool.Unroutable, match="no queue is bound"):
            pub.publish(b"x", routing_key=amqp.unique("nowhere"))
        with pytest.raises(TypeError, match="type set"):
            pub.publish({1}, routing_key=declared)
    assert one == "m0"
    got = bodies_of(declared)
    assert [m.message_id for m in got] == ["m0", *many]
    assert [json.loads(m.body) for m in got] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_sync_publisher_from_16_threads(declared: str) -> None:
    """16 threads x 500 publishes through one SyncPublisher: one background thread, one
    connection (counted by a proxy), every id unique and in the queue."""
    threads, each = 16, 500
    ids: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    with TcpProxy("127.0.0.1", 5672) as proxy:
        pub = rmqpool.SyncPublisher(proxy.url())

        def work(t: int) -> None:
            try:
                for i in range(each):
                    ids[t].append(pub.publish({"t": t, "i": i}, routing_key=declared))
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(50)
        assert [t.name for t in threading.enumerate()].count("rmqpool-publisher") == 1
        pub.close()
        assert proxy.accepted == 1, f"{proxy.accepted} connections opened"
    assert not errors, errors
    assert not any(w.is_alive() for w in workers)
    sent = [i for per in ids for i in per]
    assert len(sent) == threads * each == len(set(sent))
    got = [str(m.message_id) for m in bodies_of(declared)]
    assert sorted(got) == sorted(sent)
    assert "rmqpool-publisher" not in [t.name for t in threading.enumerate()]


def test_sync_publisher_close_waits_and_then_refuses(declared: str) -> None:
    pub = rmqpool.SyncPublisher(amqp.URL, window=20)
    result: list[list[str]] = []
    sending = threading.Thread(
        target=lambda: result.append(pub.publish_many(range(3000), routing_key=declared)))
    sending.start()
    wait_for(lambda: (amqp.count(declared) or 0) > 0, 20, "publishing under way")
    pub.close()  # waits for the publish_many in flight
    assert result and len(result[0]) == 3000, "close() returned before the pending call"
    sending.join(10)
    assert amqp.count(declared) == 3000
    for call in (lambda: pub.publish(1, routing_key=declared),
                 lambda: pub.publish_many([1], routing_key=declared),
                 lambda: pub.call(1, routing_key=declared)):
        with pytest.raises(RuntimeError, match="this SyncPublisher is closed; create a new one"):
            call()
    pub.close()  # twice is fine
    with rmqpool.SyncPublisher(amqp.URL) as fresh:
        assert fresh.publish(1, routing_key=declared)
    with pytest.raises(RuntimeError, match="is closed"):
        fresh.publish(1, routing_key=declared)


def test_sync_publisher_never_used_can_be_closed() -> None:
    pub = rmqpool.SyncPublisher(amqp.URL)
    pub.close()
    with pytest.raises(RuntimeError, match="is closed"):
        pub.publish(1, routing_key="x")


FORK_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys, threading, time
    import rmqpool

    queue, url, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    inherited = rmqpool.SyncPublisher(url)
    if mode == "used":
        inherited.publish({"from": "parent"}, routing_key=queue)
    elif mode == "busy":
        # Other threads keep calling it while the process forks.
        stop = threading.Event()
        def hammer():
            while not stop.is_set():
                inherited.publish({"from": "hammer"}, routing_key=queue)
        hammers = [threading.Thread(target=hammer) for _ in range(4)]
        for h in hammers:
            h.start()
    children = 1 if mode != "busy" else 20
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(8)  # where a child hangs, if it does
            try:
                inherited.publish({"from": "child"}, routing_key=queue)
            except RuntimeError as exc:
                print("child:", exc, flush=True)
            else:
                print("child: the inherited publisher published", flush=True)
                os._exit(1)
            inherited.close()  # nothing to close here; must not hang either
            with rmqpool.SyncPublisher(url) as mine:  # created lazily, in the child
                mine.publish({"from": "child", "pid": os.getpid()}, routing_key=queue)
            print("child: own publisher ok", flush=True)
            os._exit(0)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                print("a child hung calling the inherited publisher", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.01)
        status = done[1]
        assert os.waitstatus_to_exitcode(status) == 0, status
    if mode == "busy":
        stop.set()
        for h in hammers:
            h.join()
    inherited.publish({"from": "parent", "after": True}, routing_key=queue)
    inherited.close()
    print("parent: ok", flush=True)
""")


@pytest.mark.parametrize("mode", ["unused", "used", "busy"])
def test_sync_publisher_across_fork(declared: str, tmp_path: Any, mode: str) -> None:
    """An inherited SyncPublisher says so in the child (and never hangs, even when the
    parent's threads were using it at the fork); one created in the child works."""
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    out = subprocess.run([sys.executable, str(script), declared, amqp.URL, mode],
                         capture_output=True, text=True, timeout=45, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == "", out.stderr  # no task destroyed pending, nothing ignored
    children = 20 if mode == "busy" else 1
    inherited = [line for line in out.stdout.splitlines() if "inherited across a fork" in line]
    assert len(inherited) == children, out.stdout
    assert "create one in each process (lazily, after the fork)" in inherited[0]
    assert out.stdout.count("child: own publisher ok") == children, out.stdout
    assert "parent: ok" in out.stdout
    froms = [json.loads(m.body)["from"] for m in bodies_of(declared)]
    assert froms.count("child") == children


# -- call, without a pool ------------------------------------------------------------------

def test_call_without_a_consumer_times_out(declared: str) -> None:
    async def go() -> None:
        async with rmqpool.Publisher(amqp.URL) as pub:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError) as info:
                await pub.call({"q": 1}, routing_key=declared, timeout=0.5)
            assert loop.time() - started >= 0.5
            message = str(info.value)
            assert f"no reply to {declared!r} within 0.5s" in message, message
            assert "is a pool consuming that queue?" in message

    run(go())
    [request] = bodies_of(declared)  # the request is in the queue, as a call
    assert str(request.reply_to).startswith("amq.rabbitmq.reply-to.")
    assert request.correlation_id and request.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


def test_call_to_an_unbound_routing_key_is_unroutable() -> None:
    nowhere = amqp.unique("nowhere")
    with rmqpool.SyncPublisher(amqp.URL) as pub, \
            pytest.raises(rmqpool.Unroutable, match=repr(nowhere)):
        pub.call({"q": 1}, routing_key=nowhere, timeout=5)



@pytest.mark.timeout(30)
def test_header_names_must_be_strings(declared: str) -> None:
    async def go() -> None:
        async with rmqpool.Publisher() as pub:
            with pytest.raises(TypeError, match="header names must be str, not int"):
                await pub.publish(1, routing_key=declared,
                                  headers={1: "a"})  # type: ignore[dict-item]
    run(go())
