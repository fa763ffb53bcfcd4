"""Putting messages in: Publisher (asyncio) and SyncPublisher (any thread).

Runs in applications, not in the pool. One robust connection, publisher confirms
always on: a publish returns only once the broker confirmed the message. While the
connection is lost, a publish waits for the reconnect (up to `reconnect_timeout`
seconds) and sends again what was not confirmed, with the same message id: a
broker restart may give a duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import os
import threading
import uuid
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from . import celery as celery_protocol
from .broker_errors import translated
from .exceptions import BrokerRefused, PublishError, PublishRefused, RemoteError, Unroutable
from .outgoing import DIRECT_REPLY_TO, STATUS_HEADER, Outgoing, outgoing
from .publisher import send_batch
from .settings import DEFAULT_URL, redact_url

log = logging.getLogger("rmqpool.client")

CONFIRM_TIMEOUT = 30.0  # seconds the broker has to confirm one message
RECONNECT_TIMEOUT = 60.0  # seconds a publish waits for a lost connection to come back
WINDOW = 500  # publish_many: messages awaiting their confirms at once
_CONNECTION_ERRORS = (aiormq.exceptions.ChannelInvalidStateError,
                      aiormq.exceptions.AMQPConnectionError, ConnectionError)
BATCH = 100  # publish_many: messages sent in one write
_UNSENT: Any = object()
T = TypeVar("T")


def default_url(env: Mapping[str, str] = os.environ) -> str:
    """Like the pool: RMQPOOL_URL, else RABBITMQ_URL, else guest on localhost (the first
    of a comma-separated list)."""
    url = env.get("RMQPOOL_URL") or env.get("RABBITMQ_URL") or DEFAULT_URL
    return url.split(",")[0].strip()


def decode_reply(message: DeliveredMessage) -> Any:
    from .message import decode_body  # the pool's own rules for bodies

    props = message.header.properties
    body = decode_body(message.body, props.content_type, props.content_encoding)
    headers = props.headers or {}
    if headers.get(STATUS_HEADER) == "error":
        info = body if isinstance(body, dict) else {}
        raise RemoteError(str(info.get("reason", "")), str(info.get("type", "")),
                          str(info.get("message", "")))
    return body


class Publisher:
    """`async with Publisher() as pub: await pub.publish({"n": 1}, routing_key="jobs")`."""

    def __init__(self, url: str | None = None, *, confirm_timeout: float = CONFIRM_TIMEOUT,
                 reconnect_timeout: float = RECONNECT_TIMEOUT, window: int = WINDOW,
                 connection_name: str | None = None) -> None:
        self.url = url or default_url()
        self.confirm_timeout = confirm_timeout
        self.reconnect_timeout = reconnect_timeout
        self.window = window
        self._name = connection_name or f"rmqpool publisher pid {os.getpid()}"
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._replies: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self._reply_consumer: aiormq.abc.AbstractChannel | None = None
        self._reply_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Publisher {redact_url(self.url)}>"

    # -- lifecycle ---------------------------------------------------------------------
    async def connect(self) -> Publisher:
        async with self._connect_lock:  # publishes that start together share one connection
            if self._connection is None:
                connection = await self._connect()
                channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
                channel.reopen_callbacks.add(self._reopened)
                self._connection, self._channel = connection, channel
        return self

    async def _connect(self) -> aio_pika.abc.AbstractRobustConnection:
        """The first connection; its refusals translated (later ones are the robust
        connection's to retry)."""
        url = redact_url(self.url)
        try:
            return await aio_pika.connect_robust(
                self.url, client_properties={"connection_name": self._name})
        except aiormq.exceptions.ProbableAuthenticationError:
            raise BrokerRefused(f"the broker at {url} refused the credentials; fix the user "
                                "or password in the URL") from None
        except aiormq.exceptions.ProtocolSyntaxError as exc:
            if "Connection.Close" not in str(exc):
                raise
            raise BrokerRefused(f"the broker at {url} refused to open the virtual host: it "
                                "does not exist or the user may not use it; fix the vhost in "
                                "the URL or grant access (rabbitmqctl set_permissions)") from None
        except (aiormq.exceptions.AMQPConnectionError, OSError, TimeoutError) as exc:
            raise PublishError(f"cannot reach the broker at {url} ({str(exc) or type(exc).__name__}"
                               "); is it running, and are the host and port right?") from None

    async def close(self) -> None:
        for future in self._replies.values():
            future.cancel()
        self._replies.clear()
        if self._connection is not None:
            connection, self._connection, self._channel = self._connection, None, None
            await connection.close()

    async def __aenter__(self) -> Publisher:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed and bool(
            self._connection.connected.is_set())

    # -- publishing --------------------------------------------------------------------
    async def publish(self, body: Any, *, routing_key: str, exchange: str = "",
                      headers: Mapping[str, Any] | None = None, message_id: str | None = None,
                      correlation_id: str | None = None, reply_to: str | None = None,
                      priority: int | None = None, expiration: float | str | None = None,
                      persistent: bool = True, mandatory: bool = True,
                      content_type: str | None = None) -> str:
        """Publish one message; returns its message id once the broker confirmed it."""
        message = outgoing(body, routing_key=routing_key, exchange=exchange, headers=headers,
                           message_id=message_id, correlation_id=correlation_id,
                           reply_to=reply_to, priority=priority, expiration=expiration,
                           persistent=persistent, mandatory=mandatory,
                           content_type=content_type)
        await self._send(message)
        return message.message_id

    async def publish_many(self, bodies: Iterable[Any], *, routing_key: str,
                           exchange: str = "", headers: Mapping[str, Any] | None = None,
                           persistent: bool = True, mandatory: bool = True) -> list[str]:
        """Publish many messages with their confirms pipelined (at most `window` awaiting
        at once, sent in batches of BATCH frames per write); returns their ids in order,
        once every one is confirmed. The first failure is raised once the others in
        flight have settled; after it, no more are sent (each send may wait
        reconnect_timeout: not once per window)."""
        messages = [outgoing(body, routing_key=routing_key, exchange=exchange, headers=headers,
                             persistent=persistent, mandatory=mandatory)
                    for body in bodies]  # encode every body before sending any
        deadline = asyncio.get_running_loop().time() + self.reconnect_timeout
        batch = max(1, min(BATCH, self.window))
        in_flight = asyncio.Semaphore(max(1, self.window // batch))
        failed = False

        async def send(chunk: list[Outgoing]) -> None:
            nonlocal failed
            try:
                errors = await self._send_batch(chunk, deadline)
            finally:
                in_flight.release()
            for error in errors:
                if error is not None:
                    failed = True
                    raise error

        tasks = []
        for i in range(0, len(messages), batch):
            await in_flight.acquire()
            if failed:
                in_flight.release()
                break
            tasks.append(asyncio.ensure_future(send(messages[i:i + batch])))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [message.message_id for message in messages]

    async def _send_batch(self, chunk: list[Outgoing], deadline: float
                          ) -> list[BaseException | None]:
        """One write for the chunk, then each confirm; what is not confirmed goes the
        single-message way (errors named, sent again after a lost connection)."""
        results: list[Any]
        try:
            channel = await self._ready_channel(deadline)
            with translated():
                futures = await send_batch(channel, chunk)
        except _CONNECTION_ERRORS as exc:
            results = [exc] * len(chunk)
        else:
            try:
                async with asyncio.timeout(self.confirm_timeout):
                    results = await asyncio.gather(*futures, return_exceptions=True)
            except TimeoutError:  # what came, and a timeout for the rest
                results = [f.exception() or f.result() if f.done() and not f.cancelled()
                           else TimeoutError() for f in futures]
        errors: list[BaseException | None] = [None] * len(chunk)
        for i, (message, result) in enumerate(zip(chunk, results, strict=True)):
            if not isinstance(result, spec.Basic.Ack):
                try:
                    await self._send(message, result, deadline)
                except Exception as exc:  # reported per message, to its caller
                    errors[i] = exc
        return errors

    async def call(self, body: Any, *, routing_key: str, exchange: str = "",
                   timeout: float = 30.0, headers: Mapping[str, Any] | None = None) -> Any:
        """Send a request through RabbitMQ's direct reply-to and return the decoded reply.
        An error reply raises RemoteError; no reply within `timeout` raises TimeoutError."""
        await self._consume_replies()
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = future
        try:
            await self._send(outgoing(body, routing_key=routing_key, exchange=exchange,
                                      headers=headers, correlation_id=correlation_id,
                                      reply_to=DIRECT_REPLY_TO, persistent=False))
            try:
                reply = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise TimeoutError(f"no reply to {routing_key!r} within {timeout:g}s "
                                   "(is a pool consuming that queue?)") from None
        finally:
            self._replies.pop(correlation_id, None)
        return decode_reply(reply)

    async def send_task(self, name: str, args: Iterable[Any] = (),
                        kwargs: Mapping[str, Any] | None = None, *, queue: str = "celery",
                        exchange: str | None = None, routing_key: str | None = None,
                        task_id: str | None = None, countdown: float | None = None,
                        eta: datetime.datetime | None = None,
                        expires: float | datetime.datetime | None = None) -> str:
        """Publish a Celery (message protocol v2) task that a Celery worker runs as if
        `app.send_task(name, args, kwargs, ...)` had been called; returns the task id.

        To the default exchange with routing key `queue`, unless `exchange` and/or
        `routing_key` say otherwise. `countdown` and a number for `expires` are seconds;
        a naive datetime is UTC. An `expires` also becomes the message's TTL, as Celery
        sets it: the broker drops the task once it has expired in the queue."""
        task = celery_protocol.task_message(name, args, kwargs, task_id=task_id,
                                            countdown=countdown, eta=eta, expires=expires)
        await self.publish(task.body, routing_key=routing_key or queue,
                           exchange=exchange if exchange is not None else "",
                           headers=task.headers, message_id=task.task_id,
                           correlation_id=task.task_id, expiration=task.ttl,
                           content_type="application/json")
        return task.task_id

    # -- internals --------------------------------------------------------------------
    async def _send(self, message: Outgoing, first: Any = _UNSENT,
                    deadline: float | None = None) -> None:
        """Until the broker confirms: sent again (same id) after a lost connection, until
        `deadline` (reconnect_timeout from now by default). `first`: what a batch's try
        already got for it (a confirm frame or an error)."""
        data, props, exchange = message.data, message.properties, message.exchange
        routing_key, mandatory = message.routing_key, message.mandatory
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.reconnect_timeout
        while True:
            try:
                if first is _UNSENT:
                    channel = await self._ready_channel(deadline)
                    with translated():
                        confirm = await channel.basic_publish(
                            data, exchange=exchange, routing_key=routing_key,
                            properties=props, mandatory=mandatory,
                            timeout=self.confirm_timeout)
                else:
                    confirm, first = first, _UNSENT
                    if isinstance(confirm, BaseException):
                        raise confirm
            except aiormq.exceptions.PublishError:
                raise Unroutable(f"no queue is bound to routing key {routing_key!r} on "
                                 f"{_exchange(exchange)}: declare and bind one, or publish "
                                 "with mandatory=False") from None
            except aiormq.exceptions.DeliveryError as exc:  # aiormq raises a nack
                raise _not_accepted(props.message_id, exc.frame) from None
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                if not (exchange and f"exchange {exchange!r}" in _reply(exc)):
                    # Another publish on this channel named a missing exchange: the broker
                    # closed the channel and dropped this message unseen. Send it again.
                    await self._lost(exc, deadline, props.message_id)
                    continue
                raise PublishRefused(f"{_exchange(exchange)} does not exist ({_reply(exc)}); "
                                     "declare it before publishing") from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise PublishRefused(f"the broker refused the publish to {_exchange(exchange)} "
                                     f"({_reply(exc)}); grant the user write permission") from None
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise PublishRefused(f"the broker refused the message ({_reply(exc)})") from None
            except TimeoutError:
                raise PublishError(f"the broker did not confirm the message within "
                                   f"{self.confirm_timeout:g}s (it may still arrive; the "
                                   f"message id is {props.message_id})") from None
            except _CONNECTION_ERRORS as exc:
                await self._lost(exc, deadline, props.message_id)
                continue
            if not isinstance(confirm, spec.Basic.Ack):
                raise _not_accepted(props.message_id, confirm)
            return

    async def _lost(self, exc: BaseException, deadline: float, message_id: str | None) -> None:
        """The channel or connection went while publishing: wait to send again, unless
        reconnect_timeout has passed."""
        if asyncio.get_running_loop().time() >= deadline:
            raise PublishError(f"the connection to {redact_url(self.url)} was lost and "
                               f"did not come back within {self.reconnect_timeout:g}s "
                               f"({type(exc).__name__}); message {message_id} "
                               "may or may not have arrived") from None
        log.info("connection lost while publishing (%s); sending again after the "
                 "reconnect", type(exc).__name__)
        await asyncio.sleep(0.1)

    async def _ready_channel(self, deadline: float) -> aiormq.abc.AbstractChannel:
        if self._channel is None:
            await self.connect()
        assert self._channel is not None
        if self.is_connected and not self._channel.is_closed:
            # The usual case, answered without suspending: wait_for would wrap ready() in
            # a task and a timer for every message (~10% of publish_many's CPU).
            return await self._channel.get_underlay_channel()
        left = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self._channel.ready(), max(left, 0.01))
            return await self._channel.get_underlay_channel()
        except TimeoutError:
            raise PublishError(f"no connection to {redact_url(self.url)} within "
                               f"{self.reconnect_timeout:g}s; nothing was published") from None

    async def _consume_replies(self) -> None:
        """Direct reply-to: consumed, no_ack, on the channel that publishes the requests
        (again after a reconnect: see _reopened)."""
        async with self._reply_lock:
            deadline = asyncio.get_running_loop().time() + self.reconnect_timeout
            channel = await self._ready_channel(deadline)
            if self._reply_consumer is not channel:
                await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                self._reply_consumer = channel

    async def _reopened(self, _sender: Any = None) -> None:
        """A new channel: a direct reply-to address belongs to the channel that sent the
        request, so replies to calls in flight can never arrive. Say so at once instead
        of letting them time out."""
        self._reply_consumer = None
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError(
                    "the connection was lost while waiting for the reply; the request may "
                    "still be handled, but its reply cannot reach the new connection "
                    "(direct reply-to): call again if it is safe to"))

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self._replies.get(message.header.properties.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)


class SyncPublisher:
    """The same methods, blocking until confirmed, safe from any number of threads.

    One background thread runs an event loop with one Publisher; calls are handed to it.
    close() (and leaving the `with` block) waits for what is pending. Create it in the
    process that uses it: one inherited across a fork says so instead of hanging."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._publisher = Publisher(url, **options)
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._outbox: list[tuple[Outgoing, concurrent.futures.Future[None]]] = []
        self._woken = False  # the loop has been asked to send the outbox

    def __repr__(self) -> str:
        return f"<SyncPublisher {redact_url(self._publisher.url)}>"

    def __enter__(self) -> SyncPublisher:
        self._submit(self._publisher.connect())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, body: Any, **options: Any) -> str:
        """Encoded here, in the calling thread (a bad body is a TypeError at once); sent
        with whatever other threads publish meanwhile, in one write (one loop wake-up
        for all of them), each call returning once its own message is confirmed."""
        message = outgoing(body, **options)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._entered() as loop:
            self._outbox.append((message, done))
            wake, self._woken = not self._woken, True
            self._pending.add(done)
        done.add_done_callback(self._pending.discard)
        if wake:
            loop.call_soon_threadsafe(self._send_outbox)
        done.result()
        return message.message_id

    def _send_outbox(self) -> None:
        """On the loop: take every message the threads queued, send them as batches."""
        with self._lock:
            taken, self._outbox = self._outbox, []
            self._woken = False
        loop_time = asyncio.get_running_loop().time()
        deadline = loop_time + self._publisher.reconnect_timeout
        for i in range(0, len(taken), BATCH):
            chunk = taken[i:i + BATCH]
            task = asyncio.ensure_future(self._publisher._send_batch([m for m, _ in chunk],
                                                                     deadline))
            task.add_done_callback(lambda t, c=chunk: _resolve_all(t, c))  # type: ignore[misc]

    def publish_many(self, bodies: Iterable[Any], **options: Any) -> list[str]:
        return self._submit(self._publisher.publish_many(list(bodies), **options))

    def call(self, body: Any, **options: Any) -> Any:
        return self._submit(self._publisher.call(body, **options))

    def send_task(self, name: str, args: Iterable[Any] = (),
                  kwargs: Mapping[str, Any] | None = None, **options: Any) -> str:
        return self._submit(self._publisher.send_task(name, args, kwargs, **options))

    def close(self) -> None:
        """Wait for pending calls, then close the connection and stop the thread."""
        if os.getpid() != self._pid:
            return  # inherited: its thread is not here (and its lock may be held forever)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        concurrent.futures.wait(list(self._pending))
        asyncio.run_coroutine_threadsafe(self._publisher.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            with self._entered() as loop:
                future = asyncio.run_coroutine_threadsafe(coroutine, loop)
                self._pending.add(future)
        except RuntimeError:
            coroutine.close()
            raise
        future.add_done_callback(self._pending.discard)
        return future.result()

    @contextlib.contextmanager
    def _entered(self) -> Iterator[asyncio.AbstractEventLoop]:
        """The running loop, under the lock; a clear error when closed or inherited."""
        # Before taking the lock: a thread of the parent may have held it at the fork.
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"this SyncPublisher was created in process {self._pid} and inherited "
                f"across a fork by process {os.getpid()}; create one in each process "
                "(lazily, after the fork)")
        with self._lock:
            if self._closed:
                raise RuntimeError("this SyncPublisher is closed; create a new one")
            yield self._start()

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()
                loop.close()

            self._thread = threading.Thread(target=run, name="rmqpool-publisher", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop


def _resolve_all(task: asyncio.Task[list[BaseException | None]],
                 chunk: list[tuple[Outgoing, concurrent.futures.Future[None]]]) -> None:
    if task.cancelled():
        errors: list[BaseException | None] = [PublishError("the publisher was closed")] * len(
            chunk)
    elif task.exception() is not None:
        errors = [task.exception()] * len(chunk)
    else:
        errors = task.result()
    for (_, done), error in zip(chunk, errors, strict=True):
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _not_accepted(message_id: str | None, confirm: object) -> PublishError:
    return PublishError(f"the broker did not accept message {message_id} "
                        f"({type(confirm).__name__}): it may be out of resources "
                        "or the queue full (x-overflow=reject-publish)")


def _exchange(name: str) -> str:
    return f"exchange {name!r}" if name else "the default exchange"


def _reply(exc: BaseException) -> str:
    return str(exc.args[-1] if exc.args else exc)
