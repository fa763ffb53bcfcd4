"""One message, one client or one dying process never takes the pool down, never makes
it loop, and never loses a message. Each test names the finding it covers (issue 8's
numbering). Real CLI, real broker, real signals."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import struct
import sys
import uuid
from typing import Any

import pika
import pytest
from pamqp import encode

from rmqpool import topology
from tests.support import amqp
from tests.support.broker import PrivateBroker
from tests.support.handlers import read_records
from tests.support.pool import ROOT, Pool, wait_for
from tests.support.proxy import TcpProxy


def _env(record_file: pathlib.Path) -> dict[str, str]:
    return {"RECORD_FILE": str(record_file)}


def publish_pika(queue: str, body: bytes, url: str = amqp.URL, **properties: Any) -> None:
    """Publish with pika, which sends what aio-pika can't (doubles in headers, a
    user_id of its own), confirmed."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2,
                                                                    **properties),
                              mandatory=True)


def restarts(pool: Pool) -> float:
    return sum(v for (name, _), v in pool.metrics().items()
               if name == "rmqpool_worker_restarts_total")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A private node: its log is read, and a second user is created on it."""
    node = PrivateBroker(tmp_path_factory.mktemp("broker"))
    node.start()
    yield node
    node.close()


# -- 1: anything unreadable is malformed, never a crash loop -------------------------------
class Double(float):
    """A header value sent as an AMQP double ('d'), as Java and .NET clients send
    floats; pamqp and pika only send singles, so the test's own encoder is taught."""


BAD_ATTEMPTS = ["junk", Double(1.7e308), -1, 0, [1, 2], 2**62, {"a": 1}]


@pytest.fixture
def doubles(monkeypatch):
    plain = encode.encode_table_value

    def encode_value(value):
        if isinstance(value, Double):
            return b"d" + struct.pack(">d", value)
        return plain(value)

    monkeypatch.setattr(encode, "encode_table_value", encode_value)


@pytest.mark.timeout(60)
def test_unreadable_messages_are_dead_lettered_as_malformed_without_a_restart(
        queue, record_file, tmp_path, doubles):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        ids = [f"attempt-{i}" for i in range(len(BAD_ATTEMPTS))]
        for value, mid in zip(BAD_ATTEMPTS, ids, strict=True):
            amqp.publish(queue, [b"{}"], ids=[mid], headers={"x-rmqpool-attempt": value,
                                                              "price": Double(1e300)})
        deep = b"[" * 50_000 + b"]" * 50_000
        amqp.publish(queue, [deep], ids=["deep"])
        ids.append("deep")
        [good] = amqp.publish(queue, [{"after": "the bad ones"}])
        wait_for(lambda: any(r[0] == good for r in read_records(record_file)), 20,
                 "the good message after the bad ones")
        dlq = topology.dlq_name(queue)
        wait_for(lambda: amqp.count(dlq) == len(ids), 10, "every bad message in the DLQ")
        assert restarts(pool) == 0, pool.log()
        assert pool.metric("rmqpool_dead_letters_total", queue=queue,
                           reason="malformed") == len(ids)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    dead = {m.message_id: m for m in amqp.get_all(dlq)}
    assert set(dead) == set(ids)
    for mid in ids:
        headers = dead[mid].headers
        assert headers["x-rmqpool-reason"] == "malformed", headers
        assert headers["x-rmqpool-attempt"] == 1
    assert "x-rmqpool-attempt" in str(dead["attempt-0"].headers["x-rmqpool-exception-message"])
    assert "nested too deeply" in str(dead["deep"].headers["x-rmqpool-exception-message"])
    assert "1e+300" in str(dead["attempt-0"].headers["x-rmqpool-unencodable-headers"])
    assert dead["deep"].body == deep
    assert [r for r in read_records(record_file) if r[0] != good] == []


# -- 4, 14: messages that share a message_id are two messages ------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sighup", "sigkill"])
def test_two_messages_with_one_id_both_run_across_a_drain_or_a_kill(
        queue, record_file, tmp_path, how):
    """A runs and is settled; B, with A's id and another body, waits in the prefetch
    buffer; the worker drains (SIGHUP) or dies (SIGKILL) and B is redelivered: it was
    taken for A (settled already) and acked without running."""
    with Pool("tests.support.handlers:tagged", "--queue", queue, "--workers", "1",
              "--prefetch", "10", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"tag": "A", "sleep": 0.0}, {"tag": "B", "sleep": 3.0},
                             {"tag": "C", "sleep": 0.0}], ids=["same", "other", "same"])
        wait_for(lambda: any(r[3] == "A" for r in read_records(record_file)), 10, "A ran")
        worker = pool.worker_pids()[0]
        if how == "sighup":
            pool.signal(signal.SIGHUP)  # old worker drains: C goes back unstarted
        else:
            os.kill(worker, signal.SIGKILL)  # C goes back with the connection
        wait_for(lambda: any(r[3] == "C" for r in read_records(record_file)), 30,
                 "C (same id as A, another body) ran after the redelivery")
        pool.signal(signal.SIGTERM)
        pool.wait(20)
    tags = [r[3] for r in read_records(record_file)]
    assert tags.count("A") == 1 and tags.count("C") == 1, tags


# -- 5: acks in decision order under concurrency and failures -------------------------------
@pytest.mark.timeout(120)
def test_ack_stress_never_confuses_the_broker(broker, tmp_path):
    """prefetch 50, concurrency 4, 10 % failing messages: no 'unknown delivery tag' in the
    broker's log, no channel closed, every message handled or retried to the DLQ."""
    queue, record_file = amqp.unique("acks"), tmp_path / "records.txt"
    n = 3000
    bodies = [{"fail": "x"} if i % 10 == 0 else {"i": i} for i in range(n)]
    try:
        with Pool("tests.support.handlers:behave_async", "--queue", queue, "--workers", "2",
                  "--prefetch", "50", "--concurrency", "4", "--max-retries", "1",
                  "--retry-delays", "0.1", "--url", broker.url, tmp_path=tmp_path,
                  env=_env(record_file)) as pool:
            pool.wait_ready()
            amqp.publish(queue, bodies, url=broker.url)
            failing = n // 10
            wait_for(lambda: amqp.count(topology.dlq_name(queue), broker.url) == failing, 90,
                     "every failing message in the DLQ")
            wait_for(lambda: pool.metric("rmqpool_messages_processed_total", queue=queue,
                                         outcome="acked") == n - failing, 30, "all acked")
            assert pool.metric("rmqpool_broker_reconnects_total") == 0
            log = pool.log()
            pool.signal(signal.SIGTERM)
            assert pool.wait(20) == 0, pool.log()
        broker_log = broker.log_file.read_text(errors="replace")
        assert "unknown delivery tag" not in broker_log
        assert "PRECONDITION_FAILED" not in broker_log
        assert "connection lost" not in log and "restarting" not in log
    finally:
        amqp.delete(amqp.pool_queues(queue, (0.1,)), url=broker.url)


# -- 6: a message published by another user can still be retried and dead-lettered ----------
@pytest.mark.timeout(60)
def test_copies_of_another_users_message_keep_its_user_id_in_a_header(broker, tmp_path):
    queue, record_file = amqp.unique("uid"), tmp_path / "records.txt"
    user = f"alice-{uuid.uuid4().hex[:6]}"
    broker.ctl("add_user", user, "secret")
    broker.ctl("set_permissions", user, ".*", ".*", ".*")
    alice = broker.url.replace("guest:guest", f"{user}:secret")
    try:
        with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "1",
                  "--max-retries", "1", "--retry-delays", "0.1", "--url", broker.url,
                  tmp_path=tmp_path, env=_env(record_file)) as pool:
            pool.wait_ready()
            publish_pika(queue, json.dumps({"fail": "always"}).encode(), url=alice,
                         user_id=user, expiration="600000", message_id="from-alice",
                         content_type="application/json")
            dlq = topology.dlq_name(queue)
            wait_for(lambda: amqp.count(dlq, broker.url) == 1, 20, "the dead letter")
            assert restarts(pool) == 0
            assert "PRECONDITION_FAILED" not in pool.log()
            pool.signal(signal.SIGTERM)
            assert pool.wait(15) == 0
        [dead] = amqp.get_all(dlq, broker.url)
        assert dead.user_id is None and dead.expiration is None
        assert dead.headers["x-rmqpool-original-user-id"] == user
        assert dead.headers["x-rmqpool-original-expiration"] == "600000"
        assert dead.headers["x-rmqpool-attempt"] == 2  # it was retried once, too
    finally:
        amqp.delete(amqp.pool_queues(queue, (0.1,)), url=broker.url)
        broker.ctl("delete_user", user)


# -- 7: settling is total --------------------------------------------------------------------
def dead_letter_of(handler: str, body: dict[str, Any], queue: str, tmp_path: pathlib.Path,
                   record_file: pathlib.Path) -> Any:
    """Run `handler` on one message with no retries; the message's dead letter."""
    with Pool(handler, "--queue", queue, "--workers", "1", "--max-retries", "0",
              tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [body])
        dlq = topology.dlq_name(queue)
        wait_for(lambda: amqp.count(dlq) == 1, 15, "the dead letter")
        assert restarts(pool) == 0
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    [dead] = amqp.get_all(dlq)
    return dead


@pytest.mark.timeout(60)
def test_an_exception_whose_str_raises_is_dead_lettered(queue, record_file, tmp_path):
    dead = dead_letter_of("tests.support.handlers:unprintable", {}, queue, tmp_path,
                          record_file)
    assert dead.headers["x-rmqpool-exception-type"] == "UnprintableError"
    assert "str() failed" in dead.headers["x-rmqpool-exception-message"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", ["nan", "inf", "-1"])
def test_a_bad_retry_delay_is_the_handlers_error(queue, record_file, tmp_path, delay):
    dead = dead_letter_of("tests.support.handlers:retry_exact", {"delay": delay}, queue,
                          tmp_path, record_file)
    assert dead.headers["x-rmqpool-exception-type"] == "ValueError"
    assert "Retry(delay=" in dead.headers["x-rmqpool-exception-message"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("foreign", [
    {"x-message-ttl": 300, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"},
    {"x-max-length": 0, "x-overflow": "reject-publish"},  # full: every copy refused
    {},  # no TTL: a copy would wait there forever
])
def test_a_retry_tier_that_exists_with_other_arguments_is_not_used(
        queue, record_file, tmp_path, request, foreign):
    """A 406 declaring the tier closed the consuming channel (and reran in-flight work); a
    foreign tier used as it was could refuse every copy or never bring one back (found by
    the review). The tier is declared on a channel of its own; when the broker will not
    make it rmqpool's, the retry waits in the nearest configured tier instead."""
    tier = topology.retry_queue_name(queue, 5)
    request.addfinalizer(lambda: amqp.delete([tier, topology.retry_queue_name(queue, 0.5)]))
    amqp.declare(tier, arguments=foreign)
    with Pool("tests.support.handlers:retry_exact", "--queue", queue, "--workers", "1",
              "--retry-delays", "0.5", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        [mid] = amqp.publish(queue, [{"delay": 4.2}])  # rounds up to the 5 s tier
        wait_for(lambda: (mid, 2, pool.worker_pids()[0], "done") in read_records(record_file),
                 15, "attempt 2 done, after waiting in the configured 0.5 s tier")
        assert "cannot be rmqpool's" in pool.log()
        assert pool.metric("rmqpool_broker_reconnects_total") == 0 and restarts(pool) == 0
        assert "retrying in 0.5s" in pool.log()  # the delay it really waits
        assert pool.log().count("PRECONDITION_FAILED") <= 1  # the warning's own words
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert amqp.count(tier) == 0  # nothing was left in the foreign queue


# -- 8: exit codes after lost work -------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_draining_worker_killed_from_outside_makes_the_exit_code_1(queue, record_file,
                                                                      tmp_path):
    with Pool("tests.support.handlers:slow", "--queue", queue, "--workers", "1",
              "--graceful-timeout", "20", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"sleep": 30}])
        wait_for(lambda: pool.metric("rmqpool_messages_in_progress", queue=queue) == 1, 10,
                 "the message running")
        worker = pool.worker_pids()[0]
        pool.signal(signal.SIGTERM)
        wait_for(lambda: "graceful shutdown" in pool.log(), 5, "the drain to start")
        os.kill(worker, signal.SIGKILL)  # the OOM killer, say
        code = pool.wait(15)
    assert code == 1, pool.log()
    assert "went back to the queue" in pool.log()
    assert amqp.count(queue) == 1  # the message is back, unacked


@pytest.mark.timeout(60)
def test_a_drain_overrun_during_a_reload_is_not_a_restart(queue, record_file, tmp_path):
    """The old worker's loop is blocked, so it cannot drain: it is killed after
    --graceful-timeout + 5 s. That is not a restart (no count, no backoff): its slot
    already has its new worker."""
    with Pool("tests.support.handlers:block_loop", "--queue", queue, "--workers", "1",
              "--graceful-timeout", "1", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"block": 25}])
        wait_for(lambda: any(r[3] == "blocking" for r in read_records(record_file)), 10,
                 "the loop blocked")
        pool.signal(signal.SIGHUP)
        wait_for(lambda: "did not finish draining" in pool.log(), 20, "the drain overrun")
        wait_for(lambda: "exited" in pool.log().split("did not finish draining")[1]
                 or "while draining" in pool.log(), 10, "the old worker reaped")
        assert pool.is_ready()
        assert restarts(pool) == 1  # the reload itself
        assert pool.metric("rmqpool_worker_restarts_total", reason="reload") == 1
        pool.signal(signal.SIGTERM)
        pool.wait(40)
    log = pool.log()
    assert "restarting" not in log and "graceful_timeout" not in log, log


# -- 9: the connection lost after the work was done -------------------------------------------
@pytest.mark.timeout(60)
def test_work_done_before_a_lost_connection_is_not_run_again(queue, record_file, tmp_path):
    with TcpProxy("127.0.0.1", 5672) as proxy:
        with Pool("tests.support.handlers:slow", "--queue", queue, "--workers", "1",
                  "--url", proxy.url(), tmp_path=tmp_path, env=_env(record_file)) as pool:
            pool.wait_ready()
            [mid] = amqp.publish(queue, [{"sleep": 3}])
            wait_for(lambda: pool.metric("rmqpool_messages_in_progress", queue=queue) == 1,
                     10, "the message running")
            proxy.cut()  # while the handler runs; it finishes after the reconnect
            wait_for(lambda: pool.metric("rmqpool_broker_reconnects_total") >= 1, 20,
                     "the reconnect")
            wait_for(lambda: amqp.count(queue) == 0 and pool.metric(
                "rmqpool_messages_in_progress", queue=queue) == 0, 20, "the queue empty")
            wait_for(lambda: "acked without running" in pool.log(), 10, "the redelivery acked")
            assert pool.metric("rmqpool_messages_received_total", queue=queue) == 1
            pool.signal(signal.SIGTERM)
            assert pool.wait(15) == 0, pool.log()
    assert [r[0] for r in read_records(record_file)] == [mid], "ran twice"


# -- 11: poison messages don't put a one-worker pool into backoff -----------------------------
@pytest.mark.timeout(90)
def test_poison_messages_do_not_back_off_a_one_worker_pool(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "1",
              "--max-worker-deaths", "2", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"die": True}] * 3)
        [ok] = amqp.publish(queue, [{}])
        dlq = topology.dlq_name(queue)
        wait_for(lambda: amqp.count(dlq) == 3, 40, "the three poison messages in the DLQ")
        wait_for(lambda: any(r[0] == ok and r[3] == "done"
                             for r in read_records(record_file)), 10, "the good one")
        assert not re.search(r"restarting in \d", pool.log()), pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0


# -- 13: signals during the handler's import ----------------------------------------------------
SLOW_IMPORT = """
import os, time
open(os.environ["IMPORT_MARK"], "w").close()
time.sleep(float(os.environ.get("IMPORT_SLEEP", "2")))

def handle(body):
    pass
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "expect_running"), [(signal.SIGHUP, True),
                                                     (signal.SIGTERM, False),
                                                     (signal.SIGTTIN, True)])
def test_a_signal_during_the_handler_import_waits_for_the_loop(queue, tmp_path, sig,
                                                               expect_running):
    (tmp_path / "slow_import.py").write_text(SLOW_IMPORT)
    mark = tmp_path / "importing"
    with Pool("slow_import:handle", "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
                   "IMPORT_MARK": str(mark)}) as pool:
        wait_for(mark.exists, 20, "the import to start")
        pool.signal(sig)
        if expect_running:
            pool.wait_ready()
            assert pool.proc is not None and pool.proc.poll() is None
            pool.signal(signal.SIGTERM)
        assert pool.wait(20) == 0, pool.log()
    if not expect_running:
        assert "starting 1 worker" in pool.log() and "graceful shutdown" in pool.log()


# -- 18: small ones -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_sigttou_at_one_worker_says_it_does_nothing(queue, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "r")}) as pool:
        pool.wait_ready()
        pool.signal(signal.SIGTTOU)
        wait_for(lambda: "already at 1 worker" in pool.log(), 5, "the log line")
        assert "1 worker(s) wanted" not in pool.log()
        assert pool.is_ready()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0



@pytest.mark.timeout(60)
def test_a_message_without_an_id_keeps_it_absent_on_its_copies(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "1",
              "--max-retries", "1", "--retry-delays", "0.1", tmp_path=tmp_path,
              env=_env(record_file)) as pool:
        pool.wait_ready()
        publish_pika(queue, json.dumps({"fail": "always"}).encode(),
                     content_type="application/json")  # pika sets no message id
        dlq = topology.dlq_name(queue)
        wait_for(lambda: amqp.count(dlq) == 1, 15, "the dead letter")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    [dead] = amqp.get_all(dlq)
    assert dead.message_id is None and dead.headers["x-rmqpool-attempt"] == 2
    assert [r[0] for r in read_records(record_file)] == ["None", "None"]  # both attempts
    amqp.delete([topology.retry_queue_name(queue, 0.1)])


@pytest.mark.timeout(60)
def test_the_time_limit_holds_while_a_worker_drains(queue, record_file, tmp_path):
    """A hung sync handler does not hold a shutdown for --graceful-timeout: the time limit
    still kills it (and charges the message), found by the soak test's review."""
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "1",
              "--time-limit", "2", "--graceful-timeout", "40", tmp_path=tmp_path,
              env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"hang": True}])
        wait_for(lambda: pool.metric("rmqpool_messages_in_progress", queue=queue) == 1, 10,
                 "the message running")
        pool.signal(signal.SIGTERM)
        code = pool.wait(30)  # well before --graceful-timeout + 5 s
    log = pool.log()
    assert code == 1, log
    assert "past --time-limit 2s" in log and "did not finish draining" not in log
    assert amqp.count(queue) == 1  # back in the queue, charged one attempt


@pytest.mark.timeout(60)
def test_undecodable_properties_are_malformed_not_a_reconnect_loop(queue, record_file,
                                                                    tmp_path):
    """A timestamp out of datetime's range, or a header table nested deeper than the
    recursion limit, fails to decode inside the AMQP library: the connection closed, the
    message came back, forever, and stalled the queue (found by the review)."""
    nested: dict[str, Any] = {}
    deep = nested
    for _ in range(3000):
        deep["n"] = {}
        deep = deep["n"]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # for pika, to encode it in this test process
    try:
        with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
                  tmp_path=tmp_path, env=_env(record_file)) as pool:
            pool.wait_ready()
            publish_pika(queue, b"{}", content_type="application/json", message_id="ts",
                         timestamp=2**62)
            publish_pika(queue, b"{}", content_type="application/json", message_id="deep",
                         headers={"nested": nested})
            [good] = amqp.publish(queue, [{"after": "them"}])
            wait_for(lambda: any(r[0] == good for r in read_records(record_file)), 20,
                     "the good message after the undecodable ones")
            dlq = topology.dlq_name(queue)
            wait_for(lambda: amqp.count(dlq) == 2, 10, "both in the DLQ")
            assert pool.metric("rmqpool_broker_reconnects_total") == 0
            assert "reconnecting" not in pool.log(), pool.log()
            pool.signal(signal.SIGTERM)
            assert pool.wait(15) == 0, pool.log()
    finally:
        sys.setrecursionlimit(limit)
    dead = amqp.get_all(dlq)
    assert {str(m.headers["x-rmqpool-reason"]) for m in dead} == {"malformed"}
    whys = sorted(str(m.headers["x-rmqpool-undecodable-properties"]) for m in dead)
    assert "RecursionError" in whys[0] and "out of range" in whys[1] or \
        "RecursionError" in whys[1] and "range" in whys[0], whys
    assert all(m.body == b"{}" for m in dead)
