"""Declaring a worker's topology at start, and saying how to fix a refusal. Runs in
the worker process.

The queues, the exchange and the bindings are declared twice. First on a plain
aiormq channel that forgets them: if the broker refuses one (a 406: it exists with
other arguments), the queues this start created are deleted again, and no robust
channel re-declares them behind our back (a robust channel reopens itself after
the broker closes it and declares what it remembers). Then on the robust channel,
which declares them again after every reconnect. Queues that existed before the
start are never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import aio_pika
import aiormq

from . import exitcodes, topology
from .settings import INTEGER, ArgValue, Settings, arg_text, arg_value

log = logging.getLogger("rmqpool.declare")

# The broker's answer to an argument mismatch (rabbit_misc:equivalence_fail/4).
_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<key>[^']*)' for (?P<kind>queue|exchange) "
                           r"'(?P<name>.*)' in vhost '.*': received .*? but current is "
                           r"(?P<current>.*)$")
# ... and to an argument it does not accept (rabbit_amqqueue:check_arguments/3).
_INVALID = re.compile(r"invalid arg '(?P<key>[^']*)' for queue '(?P<name>.*)' in vhost '.*': "
                      r"(?P<why>.*)$")
_TYPED = re.compile(r"the value '(?P<value>.*)' of type '(?P<type>\w+)'")
_INT_TYPES = {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort",
              "unsignedint"}


class TopologyRefused(Exception):
    """The broker refused to declare the topology; the message says what to do, `code`
    is the exit code (restarting will not help)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


async def declare_topology(connection: aio_pika.abc.AbstractRobustConnection,
                           channel: aio_pika.abc.AbstractRobustChannel,
                           settings: Settings) -> None:
    """Declare the work queue (first), its DLQ, its retry tiers, the exchange and the
    bindings; raise TopologyRefused, after deleting what this start created, if the
    broker refuses one."""
    if connection.transport is None:
        raise ConnectionError("the connection closed before the queues were declared")
    raw = connection.transport.connection
    created: list[str] = []
    try:
        await _declare_forgetting(raw, settings, created)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        await delete_created(raw, created)
        reply = _reply_text(exc)
        actual = await _actual_type(raw, settings, reply)
        raise TopologyRefused(exitcodes.TOPOLOGY,
                              explain_precondition(reply, settings, actual)) from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        await delete_created(raw, created)
        raise TopologyRefused(exitcodes.BROKER_REFUSED,
                              f"the broker refused to declare the topology ({_reply_text(exc)}); "
                              "grant the user configure permission on the vhost") from None
    await _declare_remembered(channel, settings)


async def _declare_forgetting(connection: aiormq.abc.AbstractConnection, settings: Settings,
                              created: list[str]) -> None:
    """Declare everything on a plain channel, noting in `created` each queue that did
    not exist before. What exists is declared first (a refusal there creates nothing),
    then the exchange, then what is missing, the work queue first. So with N workers
    starting at once, an existing queue or exchange that disagrees stops each of them
    before any creates a queue: none can delete a queue another one takes for old."""
    specs = topology.all_queues(settings)
    existed = await _existing(connection, [spec.name for spec in specs])
    channel = await connection.channel()
    for spec in specs:
        if spec.name in existed:
            await channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    if settings.exchange:
        await channel.exchange_declare(settings.exchange, exchange_type=settings.exchange_type,
                                       durable=True, passive=_builtin(settings))
    for spec in specs:
        if spec.name not in existed:
            await channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
            created.append(spec.name)
    for key in settings.binding_keys if settings.exchange else ():
        await channel.queue_bind(settings.queue, settings.exchange, routing_key=key)
    await channel.close()


async def _declare_remembered(channel: aio_pika.abc.AbstractRobustChannel,
                              settings: Settings) -> None:
    """The same on the robust channel, which declares it all again after a reconnect."""
    queues = {}
    for spec in topology.all_queues(settings):
        queues[spec.name] = await channel.declare_queue(spec.name, durable=True,
                                                        arguments=spec.arguments)
    if not settings.exchange:
        return
    if _builtin(settings):
        exchange = await channel.get_exchange(settings.exchange, ensure=True)
    else:
        exchange = await channel.declare_exchange(settings.exchange, durable=True,
                                                  type=settings.exchange_type)
    for key in settings.binding_keys:
        await queues[settings.queue].bind(exchange, routing_key=key)


def _reply_text(exc: BaseException) -> str:
    return str(exc.args[-1] if exc.args else exc)


def _builtin(settings: Settings) -> bool:
    return settings.exchange.startswith("amq.")  # the broker's own: used as they are


async def _existing(connection: aiormq.abc.AbstractConnection, names: list[str]) -> set[str]:
    """Which of `names` exist, by passive declares on a channel of their own (a 404
    closes the channel it happens on)."""
    found = set()
    channel = await connection.channel()
    for name in names:
        try:
            await channel.queue_declare(name, passive=True)
            found.add(name)
        except aiormq.exceptions.ChannelNotFoundEntity:
            channel = await connection.channel()
    await channel.close()
    return found


async def delete_created(connection: aiormq.abc.AbstractConnection, names: list[str]) -> None:
    """Delete queues this start created. Only while empty and unused: a message
    published into one meanwhile is never dropped."""
    for name in names:
        channel = await connection.channel()
        try:
            await channel.queue_delete(name, if_unused=True, if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:  # closes the channel
            log.warning("left queue %r in place: it received a message or a consumer", name)
            continue
        except aiormq.exceptions.ChannelNotFoundEntity:  # another worker deleted it
            continue
        await channel.close()
        log.info("deleted queue %r again: this start had created it", name)


async def _actual_type(connection: aiormq.abc.AbstractConnection, settings: Settings,
                       reply: str) -> str | None:
    """The other queue type, if the refused queue is what rmqpool declares under it.

    The broker names the first argument that differs in its own order, and
    x-dead-letter-exchange comes before x-queue-type: a classic queue run with
    --queue-type quorum is refused for lacking a dead-letter exchange. Declaring it
    as the other type tells. (It exists, the refusal says so: this creates nothing.)"""
    m = _INEQUIVALENT.search(reply)
    if m is None or m["kind"] != "queue":
        return None
    other = "quorum" if settings.queue_type == "classic" else "classic"
    as_other = topology.all_queues(dataclasses.replace(settings, queue_type=other))
    spec = next((spec for spec in as_other if spec.name == m["name"]), None)
    if spec is None:
        return None
    channel = await connection.channel()
    try:
        await channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:  # closes the channel
        return None
    await channel.close()
    return other


# -- translating a 406 into the fix -----------------------------------------------------------
def explain_precondition(reply: str, settings: Settings, actual_type: str | None = None) -> str:
    """The broker's 406 text, preceded by what to do about it. `actual_type`: the type
    the refused queue was found to have, when not --queue-type."""
    fix = _fix(reply, settings, actual_type) or (
        "a queue or exchange already exists with other arguments: delete it (rabbitmqctl "
        "delete_queue NAME) or use the options it was created with")
    return f"the broker refused the topology: {fix} (broker: {reply})"


def _fix(reply: str, settings: Settings, actual_type: str | None) -> str | None:
    invalid = _INVALID.search(reply)
    if invalid is not None:
        key, given = invalid["key"], settings.queue_arguments.get(invalid["key"])
        if invalid["name"] != settings.queue or given is None:
            return None
        return (f"the broker does not accept --queue-arg {key}={arg_text(given)} for "
                f"queue {invalid['name']!r} ({invalid['why']}); fix or drop it")
    m = _INEQUIVALENT.search(reply)
    if m is None:
        return None
    key, name, current = m["key"], m["name"], _parse_current(m["current"])
    if m["kind"] == "exchange":
        if key != "type" or current is None:
            return None
        return (f"exchange {name!r} is a {current[0]} exchange; use --exchange-type "
                f"{current[0]} or another --exchange")
    if key == "x-queue-type" or actual_type is not None:
        kind = actual_type or (current[0] if current is not None else "classic")
        return (f"queue {name!r} is a {kind} queue; --queue-type {settings.queue_type} needs a "
                "new queue (delete it or use another --queue)")
    if key in ("durable", "exclusive", "auto_delete"):
        return (f"queue {name!r} was declared with {key}={current and current[0]}; rmqpool "
                "needs a durable queue: delete it or use another --queue")
    return _argument_fix(settings, name, key, current)


def _argument_fix(settings: Settings, name: str, key: str,
                  current: tuple[str, str | None] | None) -> str:
    """For an x-argument: the --queue-arg that matches the queue as it is, when
    --queue-arg may set that key on that queue."""
    sent = next((spec.arguments.get(key) for spec in topology.all_queues(settings)
                 if spec.name == name), None)
    have = f"has {key}={current[0]}" if current is not None else f"has no {key}"
    own = topology.own_work_queue_args(settings.queue_type, settings.queue)
    if key in own and current is None and settings.queue_type == "quorum":
        return (f"queue {name!r} {have}, which rmqpool sets on quorum queues: it is a classic "
                "queue or a quorum queue made otherwise; --queue-type quorum needs a new queue "
                "(delete it or use another --queue)")
    if name != settings.queue or key in own:  # not for --queue-arg
        want = f"with {key}={arg_text(sent)}" if sent is not None else f"without {key}"
        return (f"queue {name!r} {have}, but rmqpool declares it {want}: delete it or use "
                "another --queue")
    if current is None:
        return f"queue {name!r} {have}: drop --queue-arg {key}"
    value = _current_value(*current, sent)
    if value is None:
        return (f"queue {name!r} {have} (of type {current[1]}), which --queue-arg cannot "
                "give: delete it or use another --queue")
    return (f"queue {name!r} {have}: run with --queue-arg {key}={arg_text(value)} to use it "
            "as it is, or delete it to change it")


def _parse_current(text: str) -> tuple[str, str | None] | None:
    """(value, type) of the broker's "current is ..." text; None for "none". The broker
    names the type only when the other side has none."""
    if text == "none":
        return None
    typed = _TYPED.fullmatch(text)
    if typed:
        return typed["value"], typed["type"]
    return text.strip("'"), None


def _current_value(value: str, kind: str | None, sent: ArgValue | None) -> ArgValue | None:
    """The existing argument as a Python value --queue-arg can give; None if it cannot."""
    if kind is None:
        # The broker names no type when both sides have a value. The same text yet
        # unequal means another type than was sent; a different text, the same type.
        sent_text = str(sent).lower() if isinstance(sent, bool) else str(sent)
        if isinstance(sent, str) != (sent_text == value):
            return value
        return arg_value(value)  # a number or a bool, by its look
    if kind in _INT_TYPES and INTEGER.fullmatch(value):
        return int(value)
    if kind == "bool" and value in ("true", "false"):
        return value == "true"
    if kind == "longstr":
        return value
    return None
