"""What a worker declares at start: --queue-arg on the work queue, the exchange and its
bindings (declared on a channel that forgets them, then on the robust one), and what
an exchange that exists as another type gets as advice."""

from __future__ import annotations

import signal

import aiormq
import pytest

from tests.process.test_bad_input import run_cli
from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.pool import Pool, wait_for

HANDLER = "tests.support.handlers:record"


@pytest.fixture
def exchange():
    name = amqp.unique("ex")
    yield name
    amqp.delete([], exchanges=[name])


@pytest.mark.timeout(30)
def test_queue_args_from_the_environment_are_declared(queue, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"RMQPOOL_QUEUE_ARG": "x-max-length=3, x-overflow=reject-publish",
                   "RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready(15)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    amqp.declare(queue, arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):  # it has both
        amqp.declare(queue, arguments={"x-max-length": 3})


@pytest.mark.timeout(30)
def test_the_queue_is_bound_to_the_exchange(queue, exchange, record_file, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "2", "--exchange", exchange,
              "--exchange-type", "topic", "--routing-key", "a.*", "--routing-key", "b.#",
              tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(15)
        ids = amqp.publish(queue, [{"n": 1}], exchange=exchange, routing_key="a.x")
        ids += amqp.publish(queue, [{"n": 2}], exchange=exchange, routing_key="b.y.z")
        wait_for(lambda: {m for m, *_ in read_records(record_file)} == set(ids), 10, "both")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()


@pytest.mark.timeout(30)
def test_an_exchange_of_another_type_is_named_and_nothing_is_left(queue, exchange, tmp_path):
    with Pool(HANDLER, "--queue", queue, "--workers", "1", "--exchange", exchange,
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready(15)  # a direct exchange
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    amqp.delete(amqp.pool_queues(queue))
    code, out, _ = run_cli(HANDLER, "--queue", queue, "--workers", "1", "--exchange", exchange,
                           "--exchange-type", "fanout")
    assert code == 4, out
    assert (f"exchange '{exchange}' is a direct exchange; use --exchange-type direct or another "
            "--exchange") in out, out
    assert all(amqp.count(name) is None for name in amqp.pool_queues(queue)), out
