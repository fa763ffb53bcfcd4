"""/metrics, /healthz, /readyz and logs, from the outside of a real pool."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from rmqpool import topology as t
from tests.support import amqp
from tests.support.handlers import read_records, read_times
from tests.support.pool import Pool, wait_for


@pytest.mark.timeout(120)
def test_counters_are_exact_across_a_worker_kill(queue, record_file, tmp_path):
    n, k, retries = 600, 60, 2
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "3",
              "--max-retries", str(retries), "--retry-delays", "0.2", tmp_path=tmp_path,
              env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        bad = amqp.publish(queue, [{"fail": "x", "sleep": 0.005} for _ in range(k)])
        good = amqp.publish(queue, [{"sleep": 0.005} for _ in range(n - k)])
        # Several kills in the middle of the run, each while acks are in flight: the
        # acks a killed process had written but not sent are lost with it.
        for round_ in range(1, 5):
            def done(r: int = round_) -> bool:
                return len(read_times(record_file, "done")) > 100 * r

            wait_for(done, 30, f"{100 * round_} messages done")
            before = pool.metric("rmqpool_messages_processed_total", queue=queue,
                                 outcome="acked")
            victim = pool.worker_pids()[round_ % 3]
            os.kill(victim, signal.SIGKILL)

            def replaced(v: int = victim) -> bool:
                return v not in pool.worker_pids() and pool.is_ready()

            wait_for(replaced, 10, "the worker replaced")
            after = pool.metric("rmqpool_messages_processed_total", queue=queue,
                                outcome="acked")
            assert after >= before, "a counter went backwards across a worker restart"

        def dead_letters() -> int:
            count = amqp.count(t.dlq_name(queue))
            assert count is not None, "no DLQ"
            return count

        wait_for(lambda: dead_letters() >= k, 60, "every bad one dead-lettered")
        wait_for(lambda: set(good) <= set(read_times(record_file, "done")), 30, "good ones done")

        def settled():
            m = pool.metrics()
            return m if m[("rmqpool_messages_processed_total",
                           (("outcome", "acked"), ("queue", queue)))] == n - k else None
        m = wait_for(settled, 10, "the acked counter to settle")
        pool.signal(signal.SIGTERM)
        assert pool.wait(30) == 0
    q = ("queue", queue)
    kills = 4
    assert m[("rmqpool_messages_received_total", (q,))] == n
    # A kill while the broker has a retry or dead-letter copy but the worker not yet its
    # confirm leaves that copy AND redelivers the original (at-least-once): the message
    # is retried or dead-lettered twice, and counted as it happened. At most once a kill.
    dead_lettered = m[("rmqpool_messages_processed_total", (("outcome", "dead_lettered"), q))]
    retried = m[("rmqpool_messages_processed_total", (("outcome", "retried"), q))]
    assert k <= dead_lettered <= k + kills
    assert k * retries <= retried <= k * retries + kills
    assert m[("rmqpool_dead_letters_total", (q, ("reason", "max_retries")))] == dead_lettered
    assert amqp.count(t.dlq_name(queue)) == dead_lettered, "counted = copies in the DLQ"
    assert m[("rmqpool_handler_duration_seconds_count", (q,))] \
        == n - k + retried + dead_lettered
    assert m[("rmqpool_worker_restarts_total", (("reason", "killed"),))] == kills
    assert m[("rmqpool_messages_in_progress", (q,))] == 0
    # Workers are labelled by slot, never by pid.
    assert not [key for key in m if any(name == "pid" for name, _ in key[1])]
    assert {dict(key[1])["slot"] for key in m if key[0] == "rmqpool_event_loop_lag_seconds"} \
        == {"0", "1", "2"}
    assert set(bad).isdisjoint(read_times(record_file, "done"))


@pytest.mark.timeout(60)
def test_health_readiness_and_gauges(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:slow", "--queue", queue, "--workers", "2", "--prefetch", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        status, body = pool.get("/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok"
        assert sorted(w["slot"] for w in health["workers"]) == [0, 1]
        assert all(w["state"] == "ready" for w in health["workers"])
        status, body = pool.get("/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert pool.get("/nope")[0] == 404
        amqp.publish(queue, [{"sleep": 3} for _ in range(6)])
        wait_for(lambda: pool.metric("rmqpool_messages_in_progress", queue=queue) == 2, 10,
                 "two handlers in progress")
        wait_for(lambda: pool.metric("rmqpool_queue_messages", queue=queue) >= 1, 15,
                 "queue depth polled")
        assert pool.metric("rmqpool_queue_messages", queue=t.dlq_name(queue)) == 0
        assert pool.metric("rmqpool_workers", state="desired") == 2
        assert pool.metric("rmqpool_workers", state="ready") == 2
        assert pool.metric("rmqpool_info", version="0.1.0") == 1
        pool.signal(signal.SIGQUIT)
        pool.wait(10)


@pytest.mark.timeout(30)
def test_readyz_is_503_while_the_broker_is_unreachable(queue, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              "--url", f"amqp://guest:guest@127.0.0.1:{dead_port}/", tmp_path=tmp_path) as pool:
        wait_for(lambda: pool.get("/healthz")[0] == 200, 10, "healthz")
        wait_for(lambda: pool.log().count("cannot reach the broker") >= 2, 10, "retries logged")
        status, body = pool.get("/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0


@pytest.mark.timeout(30)
def test_json_logs_carry_slot_pid_and_message_fields(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:behave", "--queue", queue, "--workers", "1",
              "--log-format", "json", "--log-level", "debug", "--max-retries", "0",
              tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        [ok] = amqp.publish(queue, [{"n": 1}])
        [bad] = amqp.publish(queue, [{"reject": "nope"}])
        wait_for(lambda: amqp.count(t.dlq_name(queue)) == 1 and ok in pool.log(), 10, "both")
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0
    lines = [json.loads(line) for line in pool.log().splitlines()]
    assert all({"ts", "level", "pid", "slot", "role", "msg"} <= set(line) for line in lines)
    events = {line["message_id"]: line for line in lines if line.get("message_id")}
    assert events[ok]["outcome"] == "acked" and events[ok]["queue"] == queue
    assert events[ok]["slot"] == 0 and events[ok]["role"] == "worker"
    assert events[ok]["duration"] >= 0
    assert events[bad]["outcome"] == "dead_lettered" and events[bad]["reason"] == "rejected"


@pytest.mark.timeout(30)
def test_metrics_port_zero_disables_the_endpoint(queue, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, metrics=False) as pool:
        wait_for(lambda: "consuming" in pool.log(), 15, "the worker consuming")
        assert "serving /metrics" not in pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0


@pytest.mark.timeout(60)
def test_a_blocked_loop_shows_in_the_lag_gauge_while_it_is_blocked(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:block_loop", "--queue", queue, "--workers", "1",
              "--worker-timeout", "20", tmp_path=tmp_path,
              env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        [mid] = amqp.publish(queue, [{"block": 6}])
        wait_for(lambda: any(r[0] == mid for r in read_records(record_file)), 10, "blocking")
        lag = wait_for(lambda: pool.metric("rmqpool_event_loop_lag_seconds", slot="0") >= 2,
                       6, "the lag gauge to grow during the block")
        assert lag
        assert not any(r[0] == mid and r[3] == "done" for r in read_records(record_file)), \
            "the gauge must show the block while it lasts, not after"
        pool.signal(signal.SIGTERM)
        assert pool.wait(20) == 0
