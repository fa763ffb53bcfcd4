"""The broker going away under load: a restart of a private node, and a network cut
through a TCP proxy. Workers reconnect on their own and nothing is lost."""

from __future__ import annotations

import collections
import signal
import time

import pytest

from tests.support import amqp
from tests.support.broker import PrivateBroker, private_broker  # noqa: F401 - fixture
from tests.support.handlers import read_records
from tests.support.pool import Pool, wait_for
from tests.support.proxy import TcpProxy


def _handled(record_file) -> set[str]:
    return {mid for mid, *_ in read_records(record_file)}


@pytest.mark.timeout(150)
def test_broker_restart_under_load(private_broker: PrivateBroker, queue,  # noqa: F811
                                   record_file, tmp_path):
    url = private_broker.url
    n = 600
    amqp.declare(queue, url)
    ids = amqp.publish(queue, [{"sleep": 0.01, "n": i} for i in range(n)], url)
    with Pool("tests.support.handlers:timed", "--queue", queue, "--url", url,
              "--workers", "2", "--heartbeat", "5", tmp_path=tmp_path,
              env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(30)
        pids = sorted(pool.worker_pids())
        wait_for(lambda: len(read_records(record_file)) >= 100, 30, "100 handled")
        private_broker.restart()
        assert len(_handled(record_file)) < n, "all handled before the restart: proves nothing"
        wait_for(lambda: pool.metric("rmqpool_broker_reconnects_total") >= 2, 30,
                 "both workers reconnected")
        wait_for(pool.is_ready, 30, "/readyz 200 again")
        # Consumers are back: new messages, published after the restart, are handled too.
        later = amqp.publish(queue, [{"n": i} for i in range(20)], url)
        wait_for(lambda: _handled(record_file) >= set(ids) | set(later), 60,
                 "every message handled")
        wait_for(lambda: amqp.count(queue, url) == 0, 10, "queue empty")
        assert sorted(pool.worker_pids()) == pids, "workers were restarted, not reconnected"
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(20) == 0, pool.log()
    assert "lost" in log and "reconnecting" in log, log
    handled = collections.Counter(mid for mid, *_ in read_records(record_file))
    assert set(handled) == set(ids) | set(later)
    assert amqp.count(f"{queue}.dlq", url) == 0


@pytest.mark.timeout(60)
def test_network_cut_while_messages_are_in_flight(queue, record_file, tmp_path):
    with TcpProxy("127.0.0.1", 5672) as proxy, \
            Pool("tests.support.handlers:behave", "--queue", queue, "--url", proxy.url(),
                 "--workers", "2", "--prefetch", "4", "--heartbeat", "5", tmp_path=tmp_path,
                 env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(20)
        proxy.wait_active(2, 10)
        pids = sorted(pool.worker_pids())
        ids = amqp.publish(queue, [{"sleep": 0.3, "n": i} for i in range(30)])

        def in_flight() -> bool:
            recs = read_records(record_file)
            started = {m for m, _, _, t in recs if t == "start"}
            done = {m for m, _, _, t in recs if t == "done"}
            return len(started - done) >= 2

        wait_for(in_flight, 20, "two handlers in flight")
        t_cut = time.monotonic()
        assert proxy.cut() == 2
        wait_for(lambda: pool.metric("rmqpool_broker_reconnects_total") >= 2, 20,
                 "both workers reconnected")
        wait_for(pool.is_ready, 20, "/readyz 200 again")
        reconnected_in = time.monotonic() - t_cut
        done = lambda: {m for m, _, _, t in read_records(record_file) if t == "done"}  # noqa: E731
        wait_for(lambda: done() >= set(ids), 40, "every message done")
        wait_for(lambda: amqp.count(queue) == 0, 10, "queue empty")
        assert sorted(pool.worker_pids()) == pids, "workers were restarted, not reconnected"
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert reconnected_in < 10, f"reconnecting took {reconnected_in:.1f}s"
    assert "lost" in log, log
    assert amqp.count(f"{queue}.dlq") == 0


@pytest.mark.timeout(90)
def test_network_partition_is_detected_by_heartbeats(queue, record_file, tmp_path):
    """Traffic silently dropped (no FIN, no RST): only AMQP heartbeats notice."""
    heartbeat = 2
    with TcpProxy("127.0.0.1", 5672) as proxy, \
            Pool("tests.support.handlers:behave", "--queue", queue, "--url", proxy.url(),
                 "--workers", "2", "--prefetch", "4", "--heartbeat", str(heartbeat),
                 tmp_path=tmp_path, env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready(20)
        proxy.wait_active(2, 10)
        pids = sorted(pool.worker_pids())
        ids = amqp.publish(queue, [{"sleep": 0.3, "n": i} for i in range(30)])
        wait_for(lambda: len(read_records(record_file)) >= 4, 20, "handling started")
        t0 = time.monotonic()
        proxy.blackhole()
        wait_for(lambda: pool.metric("rmqpool_broker_reconnects_total") >= 2, 30,
                 "both workers reconnected")
        detected_in = time.monotonic() - t0
        wait_for(pool.is_ready, 20, "/readyz 200 again")
        done = lambda: {m for m, _, _, t in read_records(record_file) if t == "done"}  # noqa: E731
        wait_for(lambda: done() >= set(ids), 60, "every message done")
        wait_for(lambda: amqp.count(queue) == 0, 30, "queue empty")
        assert sorted(pool.worker_pids()) == pids, "workers were restarted, not reconnected"
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    # aiormq gives up after ~3 missed heartbeats; allow scheduling slack.
    assert detected_in < 4 * heartbeat + 5, f"partition noticed after {detected_in:.1f}s"
    assert "lost" in log, log
    assert amqp.count(f"{queue}.dlq") == 0


@pytest.mark.timeout(60)
def test_old_worker_dying_mid_reload_does_not_leak_a_worker(queue, record_file, tmp_path):
    with TcpProxy("127.0.0.1", 5672) as proxy, \
            Pool("tests.support.handlers:record", "--queue", queue, "--workers", "2",
                 "--url", f"amqp://guest:guest@127.0.0.1:{proxy.port}/", tmp_path=tmp_path,
                 env={"RECORD_FILE": str(record_file)}) as pool:
        pool.wait_ready()
        old = {w["slot"]: w["pid"] for w in pool.health()["workers"]}
        proxy.pause()  # the replacement for slot 0 cannot connect
        pool.signal(signal.SIGHUP)
        wait_for(lambda: len(pool.health()["workers"]) == 3, 10, "a replacement starting")
        import os
        os.kill(old[0], signal.SIGKILL)  # the old worker of slot 0 dies mid-reload
        wait_for(lambda: old[0] not in pool.worker_pids(), 10, "the old worker gone")
        proxy.resume()

        def settled():
            workers = pool.health()["workers"]
            return (len(workers) == 2 and all(w["state"] == "ready" for w in workers)
                    and not set(old.values()) & {w["pid"] for w in workers})
        wait_for(settled, 30, "two new workers, no more")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0
