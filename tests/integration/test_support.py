"""Tests of the test helpers themselves (tests/support) against real processes."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable

import aio_pika
import pytest

from tests.support import broker as support_broker
from tests.support.broker import PrivateBroker, _pid_alive, _port_open, amqp_handshake_ok
from tests.support.proxy import TcpProxy

private_broker = support_broker.private_broker  # the fixture (also importable from conftest)

# The shared broker (never stopped by tests); same variable as tests/support/amqp.py.
_SHARED = urllib.parse.urlsplit(
    os.environ.get("RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/"))
SHARED_HOST, SHARED_PORT = _SHARED.hostname or "127.0.0.1", _SHARED.port or 5672


async def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _on_lost(conn: aio_pika.abc.AbstractConnection) -> asyncio.Event:
    """An event set when the connection is closed or lost.  (aio-pika's
    ``is_closed`` only reflects an explicit close(); a lost transport shows in
    ``close_callbacks`` and ``connected``.)"""
    lost = asyncio.Event()
    conn.close_callbacks.add(lambda *_: lost.set())
    return lost


def _via(proxy: TcpProxy) -> str:
    """The shared broker's URL, rerouted through the proxy."""
    user, password = _SHARED.username or "guest", _SHARED.password or "guest"
    return f"amqp://{user}:{password}@127.0.0.1:{proxy.port}{_SHARED.path or '/'}"


def _require_shared_broker() -> None:
    if not amqp_handshake_ok(SHARED_PORT, SHARED_HOST):
        pytest.fail(f"no RabbitMQ on {SHARED_HOST}:{SHARED_PORT}; run .ci/ensure-broker")


# --------------------------------------------------------------------------
# PrivateBroker


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_private_broker_is_separate_from_shared_node(private_broker: PrivateBroker) -> None:
    b = private_broker
    assert b.nodename != "rabbit@localhost" and b.nodename.endswith("@localhost")
    assert b.port not in (5672, 25672) and b.dist_port not in (5672, 25672)
    assert b.port != b.dist_port
    assert b.url == f"amqp://guest:guest@127.0.0.1:{b.port}/"
    assert amqp_handshake_ok(b.port)
    assert b.pid is not None and _pid_alive(b.pid)
    assert b.last_start_seconds is not None
    # Everything it writes lives under its own directory.
    assert (b.dir / ".erlang.cookie").exists()
    assert b.log_file.exists()
    print(f"private broker start took {b.last_start_seconds:.2f}s")

    async def roundtrip() -> bytes:
        conn = await aio_pika.connect(b.url, timeout=10)
        async with conn:
            ch = await conn.channel()
            q = await ch.declare_queue(exclusive=True)
            await ch.default_exchange.publish(aio_pika.Message(b"hi"), routing_key=q.name)
            msg = await q.get(no_ack=True, timeout=10)
            assert msg is not None
            return msg.body

    assert asyncio.run(roundtrip()) == b"hi"
    assert "rmqpool-test-" in b.ctl("eval", "node().")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_persistent_message_survives_restart(private_broker: PrivateBroker) -> None:
    b = private_broker
    queue = f"support-restart-{uuid.uuid4().hex[:8]}"
    port, pid = b.port, b.pid

    async def publish() -> None:
        conn = await aio_pika.connect(b.url, timeout=10)
        async with conn:
            ch = await conn.channel()  # publisher confirms on
            await ch.declare_queue(queue, durable=True)
            await ch.default_exchange.publish(
                aio_pika.Message(b"keep me", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue,
            )

    async def consume() -> bytes | None:
        conn = await aio_pika.connect(b.url, timeout=10)
        async with conn:
            ch = await conn.channel()
            q = await ch.declare_queue(queue, durable=True, passive=True)
            msg = await q.get(no_ack=True, fail=False, timeout=10)
            return None if msg is None else msg.body

    asyncio.run(publish())
    b.restart()
    assert b.port == port and b.pid != pid
    assert b.last_stop_seconds is not None and b.last_start_seconds is not None
    print(f"stop {b.last_stop_seconds:.2f}s, start {b.last_start_seconds:.2f}s")
    assert asyncio.run(consume()) == b"keep me"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_start_close_and_no_leftovers(tmp_path: pathlib.Path) -> None:
    shared_up = amqp_handshake_ok(SHARED_PORT)
    b = PrivateBroker(tmp_path)
    try:
        b.start()
        first_pid = b.pid
        assert first_pid is not None
        b.kill()  # crash
        assert not _pid_alive(first_pid)
        assert not b.running and not _port_open(b.port)
        b.start()  # recovers from the crash on the same port
        assert amqp_handshake_ok(b.port) and b.pid != first_pid
        second_pid = b.pid
    finally:
        b.close()
    b.close()  # idempotent
    assert second_pid is not None and not _pid_alive(second_pid)
    assert not _port_open(b.port) and not _port_open(b.dist_port)
    assert not b.running
    # No process of that node remains.
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert b.nodename.encode() not in cmdline, f"leftover pid {proc.name}"
    if shared_up:
        assert amqp_handshake_ok(SHARED_PORT), "the shared broker must be left alone"


# --------------------------------------------------------------------------
# TcpProxy (against the shared broker: nothing here stops it)


@pytest.mark.timeout(60)
def test_proxy_forwards_and_cut_breaks_connection() -> None:
    _require_shared_broker()
    with TcpProxy(SHARED_HOST, SHARED_PORT) as proxy:
        assert proxy.port not in (SHARED_PORT, 0)

        async def scenario() -> None:
            conn = await aio_pika.connect(_via(proxy), timeout=10)
            lost = _on_lost(conn)
            try:
                ch = await conn.channel()
                q = await ch.declare_queue(exclusive=True)
                await ch.default_exchange.publish(aio_pika.Message(b"via proxy"), q.name)
                msg = await q.get(no_ack=True, timeout=10)
                assert msg is not None and msg.body == b"via proxy"
                assert proxy.active == 1 and proxy.accepted == 1

                assert proxy.cut() == 1
                await asyncio.wait_for(lost.wait(), 10)
                assert not conn.connected.is_set()
                assert proxy.active == 0
                with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
                    await ch.declare_queue(exclusive=True)
            finally:
                await conn.close()

            # Still listening: a new connection works.
            conn2 = await aio_pika.connect(_via(proxy), timeout=10)
            async with conn2:
                ch2 = await conn2.channel()
                await ch2.declare_queue(exclusive=True)
                assert proxy.active == 1
            await _wait_for(lambda: proxy.active == 0, 10, "proxy to drop the closed link")

        asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_proxy_cut_with_reset() -> None:
    _require_shared_broker()
    with TcpProxy(SHARED_HOST, SHARED_PORT) as proxy:

        async def scenario() -> None:
            conn = await aio_pika.connect(_via(proxy), timeout=10)
            lost = _on_lost(conn)
            try:
                await conn.channel()
                assert proxy.cut(reset=True) == 1
                await asyncio.wait_for(lost.wait(), 10)
            finally:
                await conn.close()

        asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_proxy_pause_refuses_new_connections_until_resume() -> None:
    _require_shared_broker()
    with TcpProxy(SHARED_HOST, SHARED_PORT) as proxy:

        async def scenario() -> None:
            proxy.pause()
            with pytest.raises((aio_pika.exceptions.AMQPConnectionError, ConnectionError, OSError)):
                conn = await aio_pika.connect(_via(proxy), timeout=5)
                await conn.close()  # pragma: no cover - only if it wrongly connected
            assert proxy.refused >= 1 and proxy.active == 0
            proxy.resume()
            conn = await aio_pika.connect(_via(proxy), timeout=10)
            async with conn:
                await conn.channel()
                assert proxy.active == 1

        asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_proxy_blackhole_is_detected_by_heartbeat() -> None:
    _require_shared_broker()
    with TcpProxy(SHARED_HOST, SHARED_PORT) as proxy:

        async def scenario() -> None:
            conn = await aio_pika.connect(_via(proxy) + "?heartbeat=1", timeout=10)
            lost = _on_lost(conn)
            try:
                await conn.channel()
                proxy.blackhole()
                t0 = time.monotonic()
                await asyncio.wait_for(lost.wait(), 30)
                # Nothing closed the sockets: only the missed heartbeats did it.
                assert time.monotonic() - t0 >= 1.0
            finally:
                await conn.close()

        asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_proxy_to_closed_port_resets_clients() -> None:
    # A port that nothing listens on: the proxy itself stays up.
    with TcpProxy("127.0.0.1", _closed_port()) as proxy:

        async def scenario() -> None:
            with pytest.raises((aio_pika.exceptions.AMQPConnectionError, ConnectionError, OSError)):
                conn = await aio_pika.connect(_via(proxy), timeout=5)
                await conn.close()  # pragma: no cover

        asyncio.run(scenario())
        assert proxy.refused >= 1 and proxy.active == 0
    assert not _port_open(proxy.port)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port

