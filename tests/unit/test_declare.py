"""What a 406 from the broker is turned into: the fix first, then the broker's words.
The texts are the broker's own (RabbitMQ 3.10)."""

import pytest

from rmqpool.declare import explain_precondition
from rmqpool.settings import resolve


def _reply(key: str, received: str, current: str, queue: str = "jobs",
           kind: str = "queue") -> str:
    return (f"PRECONDITION_FAILED - inequivalent arg '{key}' for {kind} '{queue}' in vhost '/': "
            f"received {received} but current is {current}")


def _explain(reply: str, *flags: tuple[str, object], actual_type: str | None = None) -> str:
    settings = resolve("m:f", {"queue": "jobs", **dict(flags)}, {})
    return explain_precondition(reply, settings, actual_type)


@pytest.mark.parametrize(("reply", "flags", "fix"), [
    # the queue has an argument we did not ask for: the --queue-arg that matches it
    (_reply("x-max-length", "none", "the value '5' of type 'byte'"), [],
     "queue 'jobs' has x-max-length=5: run with --queue-arg x-max-length=5 to use it as it is, "
     "or delete it to change it"),
    (_reply("x-single-active-consumer", "none", "the value 'true' of type 'bool'"), [],
     "--queue-arg x-single-active-consumer=true "),
    (_reply("x-queue-mode", "none", "the value 'lazy' of type 'longstr'"), [],
     "--queue-arg x-queue-mode=lazy "),
    (_reply("x-dead-letter-exchange", "none", "the value '' of type 'longstr'"), [],
     "--queue-arg x-dead-letter-exchange= "),
    (_reply("x-dead-letter-exchange", "none", "the value '42' of type 'longstr'"), [],
     "--queue-arg x-dead-letter-exchange=str:42 "),
    # both sides have a value (the broker names no type)
    (_reply("x-max-length", "'6'", "'5'"), [("queue_arg", ["x-max-length=6"])],
     "has x-max-length=5: run with --queue-arg x-max-length=5 "),
    (_reply("x-dead-letter-exchange", "'123'", "'123'"),
     [("queue_arg", ["x-dead-letter-exchange=123"])],
     "--queue-arg x-dead-letter-exchange=str:123 "),
    (_reply("x-dead-letter-exchange", "'123'", "'123'"),
     [("queue_arg", ["x-dead-letter-exchange=str:123"])],
     "--queue-arg x-dead-letter-exchange=123 "),
    # we asked for an argument it lacks
    (_reply("x-max-length", "the value '6' of type 'byte'", "none"),
     [("queue_arg", ["x-max-length=6"])], "queue 'jobs' has no x-max-length: drop --queue-arg "
                                          "x-max-length"),
    # a type --queue-arg cannot give
    (_reply("x-foo", "none", "the value '1.5' of type 'double'"), [],
     "queue 'jobs' has x-foo=1.5 (of type double), which --queue-arg cannot give"),
    # the queue type
    (_reply("x-queue-type", "'quorum'", "'classic'"), [("queue_type", "quorum")],
     "queue 'jobs' is a classic queue; --queue-type quorum needs a new queue (delete it or use "
     "another --queue)"),
    (_reply("x-queue-type", "the value 'quorum' of type 'longstr'", "none"),
     [("queue_type", "quorum")], "queue 'jobs' is a classic queue; --queue-type quorum needs"),
    (_reply("x-queue-type", "none", "the value 'stream' of type 'longstr'"), [],
     "queue 'jobs' is a stream queue; --queue-type classic needs a new queue"),
    # a quorum argument missing, the type unknown
    (_reply("x-dead-letter-strategy", "the value 'at-least-once' of type 'longstr'", "none"),
     [("queue_type", "quorum")], "queue 'jobs' has no x-dead-letter-strategy, which rmqpool "
                                 "sets on quorum queues: it is a classic queue or a quorum queue "
                                 "made otherwise; --queue-type quorum needs a new queue"),
    # arguments rmqpool sets, and queues of its own
    (_reply("x-delivery-limit", "'20'", "'5'"), [("queue_type", "quorum")],
     "queue 'jobs' has x-delivery-limit=5, but rmqpool declares it with x-delivery-limit=20: "
     "delete it or use another --queue"),
    (_reply("x-max-length", "none", "the value '5' of type 'byte'", queue="jobs.dlq"), [],
     "queue 'jobs.dlq' has x-max-length=5, but rmqpool declares it without x-max-length"),
    (_reply("x-message-ttl", "'1000'", "'2000'", queue="jobs.retry.1s"), [],
     "queue 'jobs.retry.1s' has x-message-ttl=2000, but rmqpool declares it with "
     "x-message-ttl=1000"),
    (_reply("durable", "'true'", "'false'"), [],
     "queue 'jobs' was declared with durable=false; rmqpool needs a durable queue"),
    (_reply("type", "'topic'", "'direct'", queue="ex", kind="exchange"),
     [("exchange", "ex"), ("exchange_type", "topic")],
     "exchange 'ex' is a direct exchange; use --exchange-type direct or another --exchange"),
])
def test_a_406_says_what_to_do(reply, flags, fix):
    message = _explain(reply, *flags)
    assert message.startswith("the broker refused the topology: ")
    assert fix in message, message
    assert message.endswith(f"(broker: {reply})")


def test_the_type_found_by_declaring_it_as_the_other_type_wins():
    # The broker names x-dead-letter-exchange before x-queue-type; the worker then
    # declares the queue as the other type, which is accepted.
    reply = _reply("x-dead-letter-exchange", "the value '' of type 'longstr'", "none")
    message = _explain(reply, ("queue_type", "quorum"), actual_type="classic")
    assert "queue 'jobs' is a classic queue; --queue-type quorum needs a new queue" in message
    reply = _reply("x-dead-letter-exchange", "none", "the value '' of type 'longstr'")
    message = _explain(reply, actual_type="quorum")
    assert "queue 'jobs' is a quorum queue; --queue-type classic needs a new queue" in message


def test_a_queue_arg_the_broker_does_not_accept():
    reply = ("PRECONDITION_FAILED - invalid arg 'x-max-length' for queue 'jobs' in vhost '/': "
             "{value_negative,-1}")
    message = _explain(reply, ("queue_arg", ["x-max-length=-1"]))
    assert message.startswith("the broker refused the topology: the broker does not accept "
                              "--queue-arg x-max-length=-1 for queue 'jobs' ({value_negative,-1}); "
                              "fix or drop it (broker: PRECONDITION_FAILED")


def test_a_406_it_cannot_read_keeps_the_general_advice():
    message = _explain("PRECONDITION_FAILED - something new")
    assert "delete it (rabbitmqctl delete_queue NAME) or use the options" in message
    assert message.endswith("(broker: PRECONDITION_FAILED - something new)")
