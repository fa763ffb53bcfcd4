"""The pool end to end: the real CLI as a subprocess against the real broker."""

from __future__ import annotations

import collections
import signal
import time

import pytest

from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.pool import Pool, wait_for


@pytest.mark.timeout(120)
def test_2000_messages_4_workers_each_handled_once(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "4",
              "--prefetch", "20", tmp_path=tmp_path,
              env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        ids = amqp.publish(queue, [{"n": i} for i in range(2000)])
        wait_for(lambda: len(read_records(record_file)) >= 2000, 90, "2000 messages handled")
        wait_for(lambda: pool.metric("rmqpool_messages_processed_total", queue=queue,
                                     outcome="acked") >= 2000, 10, "acks counted")
        pids = pool.worker_pids()
        pool.signal(signal.SIGTERM)
        assert pool.wait(30) == 0, pool.log()
    records = read_records(record_file)
    handled = collections.Counter(mid for mid, *_ in records)
    assert set(handled) == set(ids)
    assert max(handled.values()) == 1, "a message was handled twice"
    by_pid = collections.Counter(pid for _, _, pid, _ in records)
    assert set(by_pid) == set(pids) and len(pids) == 4, (by_pid, pids)
    assert all(n > 0 for n in by_pid.values())
    assert amqp.count(queue) == 0


@pytest.mark.timeout(60)
def test_queue_deleted_under_the_pool_is_declared_again(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        [old_pid] = pool.worker_pids()
        amqp.delete([queue])
        wait_for(lambda: "cancelled the consumer" in pool.log(), 10, "the cancel noticed")
        def new_worker_consuming():
            workers = pool.health().get("workers", [])
            return [(w["pid"] != old_pid, w["state"]) for w in workers] == [(True, "ready")]
        wait_for(new_worker_consuming, 15, "a new worker consuming")
        [mid] = amqp.publish(queue, [{"n": 1}])
        wait_for(lambda: [r for r in read_records(record_file) if r[0] == mid], 10, "handled")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0


@pytest.mark.timeout(60)
def test_idle_workers_keep_beating_past_the_worker_timeout(queue, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "2",
              "--worker-timeout", "2", tmp_path=tmp_path) as pool:
        pool.wait_ready()
        pids = sorted(pool.worker_pids())
        ready_at = time.monotonic()

        def fresh_beats_after_three_timeouts():
            ages = [w["last_beat_age"] for w in pool.health()["workers"]]
            return (time.monotonic() - ready_at > 6 and len(ages) == 2 and max(ages) < 1.5
                    and pool.metric("rmqpool_event_loop_lag_seconds", slot="0") < 1)
        wait_for(fresh_beats_after_three_timeouts, 20, "three worker timeouts of fresh beats")
        assert sorted(pool.worker_pids()) == pids
        assert "event loop blocked" not in pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0
