"""Message outcomes end to end: retries through the broker, the DLQ and its headers,
Reject/Retry, malformed bodies, poison messages and time limits, on classic and quorum
queues."""

from __future__ import annotations

import collections
import signal
import time

import pytest

from rmqpool import topology as t
from tests.support import amqp
from tests.support.handlers import read_records, read_times
from tests.support.pool import Pool, wait_for

DELAYS = (0.3, 0.6)


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request):
    return request.param


def run_pool(queue, record_file, tmp_path, *extra, handler="behave", workers="2",
             queue_type="classic"):
    return Pool(f"tests.support.handlers:{handler}", "--queue", queue, "--workers", workers,
                "--max-retries", "2", "--retry-delays", ",".join(map(str, DELAYS)),
                "--queue-type", queue_type, *extra, tmp_path=tmp_path,
                env={"RECORD_FILE": str(record_file)})


def stop(pool):
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0, pool.log()


@pytest.mark.timeout(90)
def test_failures_retries_and_dead_letters(queue, record_file, tmp_path, queue_type):
    with run_pool(queue, record_file, tmp_path, queue_type=queue_type) as pool:
        pool.wait_ready()
        [always] = amqp.publish(queue, [{"fail": "boom"}])
        [twice] = amqp.publish(queue, [{"fail_until": 3}])
        [rejected] = amqp.publish(queue, [{"reject": "no thanks"}])
        [delayed] = amqp.publish(queue, [{"retry_delay": 0.5}])
        [malformed] = amqp.publish(queue, [b"{not json"])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 3, 30, "three dead letters")
        wait_for(lambda: pool.metric("rmqpool_messages_processed_total", queue=queue,
                                     outcome="acked") == 2, 10, "two acks")
        metrics = pool.metrics()
        stop(pool)

    starts = read_times(record_file, "start")
    done = collections.Counter(mid for mid, _, _, tag in read_records(record_file)
                               if tag == "done")
    # Always fails: exactly max_retries + 1 attempts, spaced at least by the delays.
    assert len(starts[always]) == 3
    gaps = [b - a for a, b in zip(starts[always], starts[always][1:], strict=False)]
    assert gaps[0] >= DELAYS[0] * 0.95 and gaps[1] >= DELAYS[1] * 0.95, gaps
    # Fails twice then succeeds on attempt 3; nothing of it in the DLQ.
    attempts = [a for mid, a, _, tag in read_records(record_file) if mid == twice]
    assert attempts[-1] == 3 and done[twice] == 1
    # Reject: one attempt. Retry(delay): honoured. Malformed: handler never called.
    assert len(starts[rejected]) == 1
    assert len(starts[delayed]) == 2 and starts[delayed][1] - starts[delayed][0] >= 0.5 * 0.95
    assert done[delayed] == 1
    assert malformed not in starts

    dead = {m.message_id: m for m in amqp.get_all(t.dlq_name(queue))}
    assert set(dead) == {always, rejected, malformed}
    h = dead[always].headers
    assert dead[always].body == b'{"fail": "boom"}'  # byte-identical
    assert h[t.H_REASON] == "max_retries" and h[t.H_ATTEMPT] == 3
    assert h[t.H_EXC_TYPE] == "RuntimeError" and h[t.H_EXC_MESSAGE] == "always fails: boom"
    assert "RuntimeError: always fails: boom" in str(h[t.H_TRACEBACK])
    assert h[t.H_QUEUE] == queue and h[t.H_ROUTING_KEY] == queue
    assert str(h[t.H_FAILED_AT]).startswith("20") and h[t.H_WORKER] in (0, 1)
    assert dead[rejected].headers[t.H_REASON] == "rejected"
    assert dead[rejected].headers[t.H_EXC_MESSAGE] == "no thanks"
    assert dead[malformed].headers[t.H_REASON] == "malformed"
    assert "not valid JSON" in str(dead[malformed].headers[t.H_EXC_MESSAGE])

    def value(name, **labels):
        return metrics.get((name, tuple(sorted({"queue": queue, **labels}.items()))), 0)
    assert value("rmqpool_messages_received_total") == 5
    assert value("rmqpool_messages_processed_total", outcome="acked") == 2
    assert value("rmqpool_messages_processed_total", outcome="dead_lettered") == 3
    assert value("rmqpool_messages_processed_total", outcome="retried") == 2 + 2 + 1
    assert value("rmqpool_dead_letters_total", reason="max_retries") == 1
    assert value("rmqpool_dead_letters_total", reason="rejected") == 1
    assert value("rmqpool_dead_letters_total", reason="malformed") == 1
    assert amqp.count(queue) == 0


@pytest.mark.timeout(120)
def test_poison_and_hanging_messages_end_in_the_dlq(queue, record_file, tmp_path, queue_type):
    with run_pool(queue, record_file, tmp_path, "--time-limit", "1", "--max-worker-deaths", "3",
                  queue_type=queue_type) as pool:
        pool.wait_ready()
        [dies] = amqp.publish(queue, [{"die": True}])
        [hangs] = amqp.publish(queue, [{"hang": True}])
        normal = amqp.publish(queue, [{"n": i} for i in range(30)])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 2, 90, "both in the DLQ")
        wait_for(lambda: all(m in read_times(record_file, "done") for m in normal), 30,
                 "every normal message handled")
        wait_for(pool.is_ready, 15, "the pool ready again")
        restarts = pool.metrics()
        stop(pool)

    starts = read_times(record_file, "start")
    assert len(starts[dies]) == 3, starts[dies]  # --max-worker-deaths
    assert len(starts[hangs]) == 3, starts[hangs]
    dead = {m.message_id: m.headers for m in amqp.get_all(t.dlq_name(queue))}
    assert dead[dies][t.H_REASON] == "poison"
    assert dead[hangs][t.H_REASON] == "time_limit"
    assert dead[dies][t.H_DEATHS] == 3
    log = pool.log()
    assert "past --time-limit 1s" in log
    labels = {k[1]: v for k, v in restarts.items() if k[0] == "rmqpool_worker_restarts_total"}
    assert labels[(("reason", "time_limit"),)] >= 3
    assert labels[(("reason", "crash"),)] >= 3


@pytest.mark.timeout(60)
def test_async_handler_is_cancelled_at_the_time_limit(queue, record_file, tmp_path):
    with run_pool(queue, record_file, tmp_path, "--time-limit", "0.5",
                  handler="behave_async", workers="1") as pool:
        pool.wait_ready()
        pids = pool.worker_pids()
        [hangs] = amqp.publish(queue, [{"hang": True}])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 30, "the DLQ")
        assert pool.worker_pids() == pids, "the worker must not be killed"
        stop(pool)
    dead = amqp.get_all(t.dlq_name(queue))[0]
    assert dead.headers[t.H_REASON] == "time_limit"
    assert dead.headers[t.H_ATTEMPT] == 3
    assert "cancelled" in pool.log()


@pytest.mark.timeout(120)
def test_sigkill_while_retrying_under_load_loses_nothing(queue, record_file, tmp_path):
    with run_pool(queue, record_file, tmp_path, "--prefetch", "20") as pool:
        pool.wait_ready()
        failing = amqp.publish(queue, [{"fail_until": 2, "sleep": 0.005} for _ in range(150)])
        fine = amqp.publish(queue, [{"sleep": 0.005} for _ in range(150)])
        wait_for(lambda: len(read_records(record_file)) > 100, 30, "work under way")
        victim = pool.worker_pids()[0]
        import os
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in pool.worker_pids() and len(pool.worker_pids()) == 2, 10,
                 "the worker replaced")
        done = lambda: set(read_times(record_file, "done"))  # noqa: E731
        wait_for(lambda: set(failing + fine) <= done(), 60, "every message handled")
        stop(pool)
    assert amqp.count(t.dlq_name(queue)) == 0
    assert amqp.count(queue) == 0


@pytest.mark.timeout(30)
def test_warns_when_the_time_limit_reaches_the_consumer_timeout(queue, record_file, tmp_path):
    with run_pool(queue, record_file, tmp_path, "--time-limit", "1800", workers="1") as pool:
        pool.wait_ready()
        wait_for(lambda: "consumer_timeout" in pool.log(), 10, "the warning")
        stop(pool)


@pytest.mark.timeout(60)
def test_retry_jitter_spreads_delays_over_broker_queues(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "2",
              "--max-retries", "1", "--retry-delays", "0.8", "--retry-jitter", "0.5",
              tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        ids = amqp.publish(queue, [{"fail_until": 2} for _ in range(40)])
        wait_for(lambda: len(read_times(record_file, "done")) == 40, 30, "all retried once")
        stop(pool)
    starts = read_times(record_file, "start")
    gaps = [starts[m][1] - starts[m][0] for m in ids]
    assert min(gaps) >= 0.4 * 0.95 and max(gaps) < 0.8 + 1.0, gaps
    assert max(gaps) - min(gaps) > 0.1, "delays were not spread"
    tiers = [t.retry_queue_name(queue, d) for d in t.jittered(0.8, 0.5)]
    assert len(tiers) == 4 and all(amqp.count(q) == 0 for q in tiers)
    amqp.delete(tiers)


@pytest.mark.timeout(60)
def test_a_time_limit_kill_charges_only_the_overdue_message(queue, record_file, tmp_path):
    with run_pool(queue, record_file, tmp_path, "--time-limit", "3", "--concurrency", "2",
                  "--max-retries", "0", workers="1") as pool:
        pool.wait_ready()
        [hangs] = amqp.publish(queue, [{"hang": True}])
        started = wait_for(lambda: read_times(record_file, "start").get(hangs), 10, "hang")[0]
        # The innocent one runs 2 s and starts 1.8 s into the hang: the kill at 3 s hits it.
        wait_for(lambda: time.time() - started > 1.8, 5, "the hang to be 1.8 s old")
        [innocent] = amqp.publish(queue, [{"sleep": 2}])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 30, "the hang dead-lettered")
        wait_for(lambda: innocent in read_times(record_file, "done"), 20, "innocent done")
        stop(pool)
    assert len(read_times(record_file, "start")[innocent]) == 2, "it was interrupted once"
    assert {a for m, a, _, _ in read_records(record_file) if m == innocent} == {1}
    [dead] = amqp.get_all(t.dlq_name(queue))
    assert dead.message_id == hangs and dead.headers[t.H_REASON] == "time_limit"
    assert f"message '{hangs}' has run" in pool.log()


@pytest.mark.timeout(60)
def test_a_handler_exiting_with_a_fatal_looking_code_is_a_crash(queue, record_file, tmp_path):
    with run_pool(queue, record_file, tmp_path) as pool:
        pool.wait_ready()
        [dies] = amqp.publish(queue, [{"die": True, "exit_code": 3}])
        others = amqp.publish(queue, [{"n": i} for i in range(10)])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 30, "the poison message")
        wait_for(lambda: set(others) <= set(read_times(record_file, "done")), 20, "the rest")
        assert pool.proc.poll() is None, "exit code 3 from a handler must not stop the pool"
        stop(pool)
    assert "cannot work" not in pool.log()
    assert amqp.get_all(t.dlq_name(queue))[0].message_id == dies


@pytest.mark.timeout(90)
@pytest.mark.parametrize("handler", ["behave", "behave_async"])
def test_a_poison_message_does_not_take_its_neighbours_down(queue, record_file, tmp_path,
                                                           handler):
    with run_pool(queue, record_file, tmp_path, "--concurrency", "3", handler=handler,
                  workers="1") as pool:
        pool.wait_ready()
        innocents = amqp.publish(queue, [{"sleep": 1.5}, {"sleep": 1.5}])
        [poison] = amqp.publish(queue, [{"die": True, "die_after": 0.5}])
        fast = amqp.publish(queue, [{"n": i} for i in range(10)])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 60, "the poison dead-lettered")
        wait_for(lambda: set(innocents + fast) <= set(read_times(record_file, "done")), 30,
                 "every other message done")
        stop(pool)
    [dead] = amqp.get_all(t.dlq_name(queue))
    assert dead.message_id == poison and dead.headers[t.H_REASON] == "poison"
    assert dead.headers[t.H_DEATHS] == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", ["base_exc", "base_exc_async"])
def test_a_base_exception_from_a_handler_is_a_failure(queue, record_file, tmp_path, handler):
    with run_pool(queue, record_file, tmp_path, handler=handler, workers="1") as pool:
        pool.wait_ready()
        [mid] = amqp.publish(queue, [{"n": 1}])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1, 30, "dead-lettered")
        pids = pool.worker_pids()
        stop(pool)
    assert len(read_times(record_file, "start")[mid]) == 3  # max-retries 2
    assert len(pids) == 1 and "restarting" not in pool.log()
    [dead] = amqp.get_all(t.dlq_name(queue))
    assert dead.headers[t.H_EXC_TYPE] in ("CancelledError", "CustomBase")
