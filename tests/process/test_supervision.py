"""The supervisor watching its workers: crashes, kills, blocked loops, backoff,
orphaned workers, process titles and log identity. Real processes, real signals."""

from __future__ import annotations

import collections
import os
import re
import signal
import time

import pytest

from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.pool import ROOT, Pool, is_gone, proc_args, proc_state, wait_for


def _env(record_file) -> dict[str, str]:
    return {"RECORD_FILE": str(record_file)}


@pytest.mark.timeout(60)
def test_sigkill_worker_under_load_is_replaced_and_nothing_is_lost(queue, record_file,
                                                                    tmp_path, request):
    request.addfinalizer(lambda: amqp.delete(amqp.pool_queues(queue, (0.5,))))
    n = 1000
    with Pool("tests.support.handlers:timed", "--queue", queue, "--workers", "2",
              "--retry-delays", "0.5", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        ids = amqp.publish(queue, [{"sleep": 0.005, "n": i} for i in range(n)])
        wait_for(lambda: len(read_records(record_file)) >= 150, 30, "150 handled")
        before = pool.worker_pids()
        victim = before[0]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        def replaced() -> list[int] | None:
            pids = pool.worker_pids()
            return pids if len(pids) == 2 and victim not in pids else None

        after = wait_for(replaced, 3, "a replacement worker")
        replaced_in = time.monotonic() - t0
        assert replaced_in < 1.5, f"replacement took {replaced_in:.2f}s"
        new = set(after) - set(before)
        assert len(new) == 1
        handled_before = len(read_records(record_file))
        assert handled_before < n, "the queue was empty before the kill: proves nothing"
        wait_for(lambda: set(mid for mid, *_ in read_records(record_file)) >= set(ids), 40,
                 "every message handled")
        wait_for(lambda: all(amqp.count(q) == 0 for q in amqp.pool_queues(queue, (0.5,))),
                 10, "the work queue and the retry tier empty")
        assert pool.is_ready()
        assert pool.metric("rmqpool_worker_restarts_total", reason="killed") == 1
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert re.search(rf"worker \d \(pid {victim}\) killed by signal SIGKILL", log), log
    records = read_records(record_file)
    by_pid = collections.Counter(pid for _, _, pid, _ in records)
    assert by_pid[new.pop()] > 0, "the replacement never handled anything"
    assert amqp.count(f"{queue}.dlq") == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("handler", "body"), [
    ("behave", {"sleep": 60}),  # handler threads sleeping
    ("cpu", {"seconds": 60}),  # handler threads burning CPU (GIL contention)
    ("block_loop", {"block": 60}),  # the event loop itself blocked
    ("gil", {"size": 3 * 10**9}),  # one C call holding the GIL: no Python code runs at all
])
def test_sigkill_supervisor_takes_workers_down(queue, record_file, tmp_path, handler, body):
    amqp.declare(queue)
    amqp.publish(queue, [{**body, "n": i} for i in range(4)])
    with Pool(f"tests.support.handlers:{handler}", "--queue", queue, "--workers", "2",
              "--prefetch", "1", tmp_path=tmp_path, env=_env(record_file)) as pool:
        if handler != "gil":  # a GIL-holding handler can starve the READY message itself
            pool.wait_ready()
        if handler == "cpu":  # it records when done: wait for both to be busy instead
            wait_for(lambda: pool.metric("rmqpool_messages_in_progress", queue=queue) == 2, 20,
                     "two handlers running")
        else:
            wait_for(lambda: len(read_records(record_file)) >= 2, 20, "two handlers running")
        workers = pool.worker_pids()
        assert len(workers) == 2 and all(not is_gone(p) for p in workers)
        t0 = time.monotonic()
        pool.signal(signal.SIGKILL)
        pool.wait(5)
        deadline = t0 + 5.0
        while time.monotonic() < deadline and not all(is_gone(p) for p in workers):
            time.sleep(0.05)
        alive = {p: proc_state(p) for p in workers if not is_gone(p)}
        elapsed = time.monotonic() - t0
        assert not alive, (f"workers {alive} still alive {elapsed:.1f}s after the supervisor "
                           f"was SIGKILLed\n{pool.log()}")
    wait_for(lambda: amqp.count(queue) == 4, 10, "the in-flight messages back in the queue")


@pytest.mark.timeout(60)
def test_cpu_bound_sync_handler_keeps_the_connection(queue, record_file, tmp_path):
    seconds = 9  # > 2 x the broker's heartbeat timeout (2 missed 2 s beats) and aiormq's 6 s
    with Pool("tests.support.handlers:cpu", "--queue", queue, "--workers", "2",
              "--heartbeat", "2", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        ids = amqp.publish(queue, [{"seconds": seconds, "n": i} for i in range(2)])
        wait_for(lambda: len(read_records(record_file)) >= 2, seconds + 20, "both handled")
        wait_for(lambda: pool.metric("rmqpool_messages_processed_total", queue=queue,
                                     outcome="acked") >= 2, 10, "both acked")
        reconnects = pool.metric("rmqpool_broker_reconnects_total")
        restarts = sum(v for (name, _), v in pool.metrics().items()
                       if name == "rmqpool_worker_restarts_total")
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert reconnects == 0, log
    assert restarts == 0, log
    assert "lost" not in log and "reconnect" not in log and "blocked" not in log, log
    handled = collections.Counter(mid for mid, *_ in read_records(record_file))
    assert handled == collections.Counter(ids), handled
    assert amqp.count(queue) == 0


@pytest.mark.timeout(60)
def test_blocked_event_loop_gets_worker_killed_and_restarted(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:block_loop", "--queue", queue, "--workers", "2",
              "--prefetch", "1", "--worker-timeout", "3", "--max-worker-deaths", "1",
              tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        before = set(pool.worker_pids())
        [blocker] = amqp.publish(queue, [{"block": 60}])
        wait_for(lambda: any(t == "blocking" for *_, t in read_records(record_file)), 10,
                 "the loop blocked")
        blocked_pid = next(p for _, _, p, t in read_records(record_file) if t == "blocking")
        others = amqp.publish(queue, [{"n": i} for i in range(20)])
        # The other worker keeps handling while one is stuck.
        wait_for(lambda: {m for m, *_ in read_records(record_file)} >= set(others), 10,
                 "the other messages handled while one worker is blocked")
        wait_for(lambda: is_gone(blocked_pid), 10, "the blocked worker killed")
        wait_for(lambda: len(pool.worker_pids()) == 2 and pool.is_ready(), 10,
                 "the slot restarted")
        assert blocked_pid not in pool.worker_pids()
        assert set(pool.worker_pids()) - before, "no new worker"
        assert pool.metric("rmqpool_worker_restarts_total", reason="heartbeat") >= 1
        # --max-worker-deaths 1: the message that blocked the loop is poison, dead-lettered.
        wait_for(lambda: amqp.count(f"{queue}.dlq") == 1, 10, "the blocker dead-lettered")
        more = amqp.publish(queue, [{"n": i} for i in range(5)])
        wait_for(lambda: {m for m, *_ in read_records(record_file)} >= set(more), 10,
                 "messages handled after the restart")
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    assert re.search(rf"worker \d \(pid {blocked_pid}\) event loop blocked", log), log
    assert blocker not in {m for m, _, _, t in read_records(record_file) if t == "done"}
    assert amqp.count(queue) == 0


@pytest.mark.timeout(60)
def test_worker_crashing_right_after_start_restarts_with_backoff(queue, tmp_path):
    """Backoff is for workers that cannot start: here every forked worker exits at once,
    with no message to blame (a death charged to a message restarts at once; see
    test_hardening.py)."""
    (tmp_path / "dies_at_fork.py").write_text(
        "import os\nos.register_at_fork(after_in_child=lambda: os._exit(13))\n"
        "def handle(body):\n    pass\n")
    with Pool("dies_at_fork:handle", "--queue", queue, "--workers", "1", tmp_path=tmp_path,
              env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}) as pool:

        def delays() -> list[float]:
            return [float(d) for d in re.findall(r"restarting in ([\d.]+)s", pool.log())]

        wait_for(lambda: len(delays()) >= 3, 30, "three backoff restarts")
        got = delays()
        assert got == sorted(got) and len(set(got)) == len(got), f"delays not growing: {got}"
        assert pool.proc is not None
        assert pool.proc.poll() is None, "the supervisor gave up"
        assert pool.get("/healthz")[0] == 200
        assert pool.metric("rmqpool_worker_restarts_total", reason="crash") >= 4
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) in (0, 1), pool.log()
    assert "exit code 13" in log, log


@pytest.mark.timeout(60)
def test_process_titles_and_log_identity(queue, record_file, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "2",
              "--log-level", "debug", tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        amqp.publish(queue, [{"n": i} for i in range(5)])
        wait_for(lambda: len(read_records(record_file)) >= 5, 10, "handled")
        assert pool.proc is not None
        sup = pool.proc.pid
        assert proc_args(sup).startswith("rmqpool: supervisor"), proc_args(sup)
        workers = {w["slot"]: w["pid"] for w in pool.health()["workers"]}
        assert sorted(workers) == [0, 1]
        for slot, pid in workers.items():
            assert proc_args(pid).startswith(f"rmqpool: worker {slot}"), proc_args(pid)
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
        log = pool.log()
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) >= 8
    marker = re.compile(r"\[(supervisor|worker (\d+)) pid (\d+)\]")
    seen = set()
    for line in lines:
        m = marker.search(line)
        assert m, f"log line without the slot/pid marker: {line!r}"
        pid = int(m.group(3))
        if m.group(1) == "supervisor":
            assert pid == sup, line
        else:
            assert workers[int(m.group(2))] == pid, line
        seen.add(m.group(1))
    assert seen == {"supervisor", "worker 0", "worker 1"}
