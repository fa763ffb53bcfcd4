"""Signals to the supervisor, end to end: the real CLI, real signals, the real broker.

TERM/INT drain (a second one kills), QUIT stops at once, HUP reloads code with a
rolling restart, TTIN/TTOU scale by one.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import time

import pytest

from tests.support import amqp
from tests.support.handlers import read_records
from tests.support.pool import ROOT, Pool, wait_for

BEHAVE = "tests.support.handlers:behave"


def _started(record_file: pathlib.Path) -> list[str]:
    return [mid for mid, _, _, tag in read_records(record_file) if tag == "start"]


def _done(record_file: pathlib.Path) -> list[str]:
    return [mid for mid, _, _, tag in read_records(record_file) if tag == "done"]


def _env(record_file: pathlib.Path, **extra: str) -> dict[str, str]:
    return {"RECORD_FILE": str(record_file), **extra}


# -- TERM / INT ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_and_leaves_the_rest_in_the_queue(queue, record_file,
                                                                   tmp_path):
    graceful = 8.0
    amqp.declare(queue)
    ids = amqp.publish(queue, [{"sleep": 1.5, "n": i} for i in range(10)])
    with Pool(BEHAVE, "--queue", queue, "--workers", "2", "--prefetch", "5",
              "--graceful-timeout", f"{graceful:g}", tmp_path=tmp_path,
              env=_env(record_file)) as pool:
        # Both workers hold 5 prefetched messages each, one of them in the handler.
        wait_for(lambda: len(_started(record_file)) >= 2, 20, "two handlers running")
        code, elapsed = pool.stop_with(signal.SIGTERM, graceful + 10)
        log = pool.log()
    assert code == 0, log
    assert elapsed < graceful, f"took {elapsed:.1f}s, graceful timeout {graceful}s\n{log}"
    started, done = _started(record_file), _done(record_file)
    assert sorted(started) == sorted(done), f"a started handler did not finish: {log}"
    assert len(done) == 2, (done, log)
    # Finished ones were acked, every unstarted prefetched one went back to the queue.
    left = amqp.count(queue)
    assert left == len(ids) - len(done), (left, log)

    # A new pool on the same queue handles the rest: each message exactly once overall.
    second = tmp_path / "second.txt"
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "2",
              tmp_path=tmp_path, env=_env(second)) as pool2:
        wait_for(lambda: len(read_records(second)) >= len(ids) - len(done), 20,
                 "the rest handled by the second pool")
        wait_for(lambda: amqp.count(queue) == 0, 10, "queue empty")
        pool2.signal(signal.SIGTERM)
        assert pool2.wait(15) == 0, pool2.log()
    handled = collections.Counter(done + [mid for mid, *_ in read_records(second)])
    assert set(handled) == set(ids), "a message was lost"
    assert max(handled.values()) == 1, [m for m, n in handled.items() if n > 1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second, group", [(signal.SIGTERM, False), (signal.SIGINT, False),
                                           (signal.SIGINT, True)],
                         ids=["TERM", "INT", "ctrl-c-to-the-process-group"])
def test_second_stop_signal_kills_workers_and_requeues(queue, record_file, tmp_path, second,
                                                       group):
    amqp.declare(queue)
    ids = amqp.publish(queue, [{"sleep": 30, "n": i} for i in range(6)])
    with Pool(BEHAVE, "--queue", queue, "--workers", "2", "--prefetch", "3",
              "--graceful-timeout", "60", tmp_path=tmp_path, env=_env(record_file)) as pool:
        wait_for(lambda: len(_started(record_file)) >= 2, 20, "two handlers running")
        assert pool.proc is not None
        # Ctrl-C in a terminal signals the whole process group, workers included.
        send = (lambda sig: os.killpg(pool.proc.pid, sig)) if group else pool.signal
        send(signal.SIGINT if group else signal.SIGTERM)
        wait_for(lambda: pool.log().count("draining:") >= 2, 10, "both workers draining")
        assert pool.proc.poll() is None, "exited on the first signal with handlers running"
        assert len(pool.worker_pids()) == 2, "a worker died on the first signal"
        t0 = time.monotonic()
        send(second)
        code = pool.wait(10)
        elapsed = time.monotonic() - t0
        log = pool.log()
    assert code == 1, log
    assert elapsed < 5, f"second signal took {elapsed:.1f}s to stop the pool"
    assert "second stop signal" in log
    assert _done(record_file) == []
    wait_for(lambda: amqp.count(queue) == len(ids), 10,
             f"all {len(ids)} messages back in the queue (have {amqp.count(queue)})")


@pytest.mark.timeout(60)
def test_graceful_timeout_exceeded_exits_1_and_requeues(queue, record_file, tmp_path):
    amqp.declare(queue)
    ids = amqp.publish(queue, [{"sleep": 10, "n": i} for i in range(4)])
    with Pool(BEHAVE, "--queue", queue, "--workers", "2", "--prefetch", "2",
              "--graceful-timeout", "1", tmp_path=tmp_path, env=_env(record_file)) as pool:
        wait_for(lambda: len(_started(record_file)) >= 2, 20, "two handlers running")
        code, elapsed = pool.stop_with(signal.SIGTERM, 15)
        log = pool.log()
    assert code == 1, log
    assert elapsed < 1 + 5, f"took {elapsed:.1f}s with --graceful-timeout 1\n{log}"
    assert "graceful timeout" in log, log
    assert _done(record_file) == []
    wait_for(lambda: amqp.count(queue) == len(ids), 10,
             f"all {len(ids)} messages back in the queue (have {amqp.count(queue)})")


# -- QUIT ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigquit_stops_at_once_and_acks_nothing_unfinished(queue, record_file, tmp_path):
    amqp.declare(queue)
    ids = amqp.publish(queue, [{"sleep": 0.2, "n": i} for i in range(40)])
    with Pool(BEHAVE, "--queue", queue, "--workers", "2", "--prefetch", "5",
              "--graceful-timeout", "60", tmp_path=tmp_path, env=_env(record_file)) as pool:
        wait_for(lambda: len(_done(record_file)) >= 6, 20, "some messages done")
        code, elapsed = pool.stop_with(signal.SIGQUIT, 10)
        log = pool.log()
    assert code == 1, log
    assert elapsed < 2, f"SIGQUIT took {elapsed:.1f}s"
    assert "SIGQUIT" in log
    done = set(_done(record_file))
    assert len(done) < len(ids), "everything finished: the test proves nothing"
    # Acked messages are a subset of finished ones, so at least this many are back.
    need = len(ids) - len(done)
    wait_for(lambda: (amqp.count(queue) or 0) >= need, 10,
             f">= {need} messages back in the queue: an unfinished message was acked "
             f"(have {amqp.count(queue)})")
    in_queue = {m.message_id for m in amqp.get_all(queue)}
    missing = set(ids) - done - in_queue
    assert not missing, f"{len(missing)} message(s) neither finished nor in the queue"


# -- HUP ----------------------------------------------------------------------------------------
# Longest pause in the message stream tolerated during a rolling restart. A worker
# connects and consumes in ~0.1 s; normally the stream pauses < 0.05 s.
GAP = 0.5


@pytest.mark.timeout(90)
def test_sighup_under_load_rolls_workers_without_a_gap(queue, record_file, tmp_path):
    n = 1500
    amqp.declare(queue)
    ids = amqp.publish(queue, [{"sleep": 0.004, "n": i} for i in range(n)])
    with Pool("tests.support.handlers:timed", "--queue", queue, "--workers", "2",
              tmp_path=tmp_path, env=_env(record_file)) as pool:
        pool.wait_ready()
        old = set(pool.worker_pids())
        assert len(old) == 2
        wait_for(lambda: len(read_records(record_file)) >= 200, 30, "200 handled")
        t_hup = time.time()
        pool.signal(signal.SIGHUP)
        samples: list[tuple[float, float]] = []
        readiness: list[bool] = []

        def rolled() -> bool:
            samples.append((time.time(), pool.metric("rmqpool_messages_processed_total",
                                                     queue=queue, outcome="acked")))
            readiness.append(pool.is_ready())
            pids = set(pool.worker_pids())
            return len(pids) == 2 and not pids & old and readiness[-1]

        wait_for(rolled, 20, "both workers replaced", interval=0.2)
        t_rolled = time.time()
        new = set(pool.worker_pids())
        wait_for(lambda: len(read_records(record_file)) >= n, 60, f"{n} handled")
        wait_for(lambda: amqp.count(queue) == 0, 10, "queue empty")
        log = pool.log()
        reloads = pool.metric("rmqpool_worker_restarts_total", reason="reload")
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    records = read_records(record_file)
    handled = collections.Counter(mid for mid, *_ in records)
    assert set(handled) == set(ids), "a message was lost"
    assert max(handled.values()) == 1, "a message was handled twice"
    by_pid = collections.Counter(pid for _, _, pid, _ in records)
    assert set(by_pid) <= old | new and all(by_pid[p] for p in new), by_pid
    # The reload finished while there was still work, so the stream must not stop.
    times = sorted(float(tag) for *_, tag in records)
    assert times[-1] > t_rolled, "the queue ran dry before the reload finished"
    window = [t for t in times if t_hup <= t <= t_rolled]
    gaps = [b - a for a, b in zip([t_hup, *window], [*window, t_rolled], strict=True)]
    assert max(gaps) < GAP, f"no message handled for {max(gaps):.3f}s during the reload"
    # Rolling, not stop-the-world: the new generation handled messages while the old
    # one still did (a new worker consumes before the old one of its slot drains).
    old_last = max(float(tag) for _, _, pid, tag in records if pid in old)
    new_first = min(float(tag) for _, _, pid, tag in records if pid in new)
    assert new_first < old_last, \
        f"the old workers stopped {new_first - old_last:.3f}s before the new ones started"
    assert all(readiness), f"/readyz went down during the rolling restart: {readiness}"
    deltas = [b[1] - a[1] for a, b in zip(samples, samples[1:], strict=False)]
    assert len(deltas) >= 1 and all(d > 0 for d in deltas), \
        f"acked counter stalled during the reload: {samples}"
    assert "SIGHUP" in log and log.count("reload:") == 2, log
    assert reloads == 2


_RELOADABLE = """\
import time

from tests.support.handlers import _record

VERSION = {version!r}


def handle(body, message):
    time.sleep(float(body.get("sleep", 0)))
    _record(message, VERSION)
"""


def _reloadable(tmp_path: pathlib.Path, version: str, broken: bool = False) -> None:
    text = _RELOADABLE.format(version=version)
    if broken:
        text += "\ndef oops(:\n"
    (tmp_path / "hupmod.py").write_text(text)


def _hup_pool(queue: str, record_file: pathlib.Path, tmp_path: pathlib.Path,
              workers: int = 2) -> Pool:
    env = _env(record_file, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}",
               PYTHONDONTWRITEBYTECODE="1")
    return Pool("hupmod:handle", "--queue", queue, "--workers", str(workers),
                tmp_path=tmp_path, env=env)


@pytest.mark.timeout(60)
def test_sighup_reloads_handler_code(queue, record_file, tmp_path):
    _reloadable(tmp_path, "v1")
    with _hup_pool(queue, record_file, tmp_path) as pool:
        pool.wait_ready()
        first = amqp.publish(queue, [{"n": i} for i in range(10)])
        wait_for(lambda: len(read_records(record_file)) >= 10, 20, "first batch handled")
        old = set(pool.worker_pids())
        _reloadable(tmp_path, "version-two")
        pool.signal(signal.SIGHUP)
        wait_for(lambda: not set(pool.worker_pids()) & old and pool.is_ready(), 20,
                 "workers replaced")
        new = set(pool.worker_pids())
        second = amqp.publish(queue, [{"n": i} for i in range(10)])
        wait_for(lambda: len(read_records(record_file)) >= 20, 20, "second batch handled")
        log = pool.log()
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    versions = {mid: tag for mid, _, _, tag in read_records(record_file)}
    assert {versions[m] for m in first} == {"v1"}
    assert {versions[m] for m in second} == {"version-two"}, log
    assert {pid for mid, _, pid, _ in read_records(record_file) if mid in second} <= new
    assert "reload failed" not in log


@pytest.mark.timeout(60)
def test_sighup_with_broken_code_keeps_old_workers(queue, record_file, tmp_path):
    _reloadable(tmp_path, "v1")
    with _hup_pool(queue, record_file, tmp_path) as pool:
        pool.wait_ready()
        old = sorted(pool.worker_pids())
        _reloadable(tmp_path, "v2", broken=True)
        pool.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in pool.log(), 10, "'reload failed' logged")
        line = next(x for x in pool.log().splitlines() if "reload failed" in x)
        assert "SyntaxError" in line and "hupmod.py" in line, line
        ids = amqp.publish(queue, [{"n": i} for i in range(10)])
        wait_for(lambda: len(read_records(record_file)) >= 10, 20, "handled after the bad HUP")
        assert sorted(pool.worker_pids()) == old, "workers were replaced despite the failure"
        assert pool.is_ready()
        assert pool.metric("rmqpool_worker_restarts_total", reason="reload") == 0
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
    records = read_records(record_file)
    assert sorted(mid for mid, *_ in records) == sorted(ids)
    assert {tag for *_, tag in records} == {"v1"}
    assert {pid for _, _, pid, _ in records} <= set(old)


@pytest.mark.timeout(60)
def test_second_sighup_during_a_rolling_restart_ends_on_the_latest_code(queue, record_file,
                                                                         tmp_path):
    _reloadable(tmp_path, "v1")
    with _hup_pool(queue, record_file, tmp_path, workers=3) as pool:
        pool.wait_ready()
        _reloadable(tmp_path, "v2")
        pool.signal(signal.SIGHUP)
        # The first reload is under way (slot 0's new worker is starting): HUP again.
        wait_for(lambda: "SIGHUP: reloaded" in pool.log(), 5, "first reload", interval=0.005)
        _reloadable(tmp_path, "v3-latest")
        pool.signal(signal.SIGHUP)
        wait_for(lambda: pool.log().count("SIGHUP: reloaded") == 2, 5, "second reload")

        def all_on_latest() -> bool:
            before = len(read_records(record_file))
            amqp.publish(queue, [{"n": i} for i in range(30)])
            wait_for(lambda: len(read_records(record_file)) >= before + 30, 10, "a batch")
            batch = read_records(record_file)[before:]
            return ({tag for *_, tag in batch} == {"v3-latest"}
                    and len({pid for _, _, pid, _ in batch}) == 3)

        stale = None
        try:
            wait_for(all_on_latest, 8, "every worker on the latest code", interval=0.2)
        except AssertionError:
            stale = collections.Counter((tag, pid) for _, _, pid, tag in
                                        read_records(record_file)[-30:])
        assert stale is None, f"workers still run old code after the last SIGHUP: {stale}"
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()


# -- TTIN / TTOU ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigttin_sigttou_scale_by_one(queue, tmp_path):
    with Pool("tests.support.handlers:record", "--queue", queue, "--workers", "1",
              tmp_path=tmp_path, env={"RECORD_FILE": str(tmp_path / "r.txt")}) as pool:
        pool.wait_ready()

        def state() -> tuple[int, int, int]:
            h = pool.health()
            return (len(h.get("workers", [])), h.get("desired", -1),
                    int(pool.metric("rmqpool_workers", state="desired")))

        assert state() == (1, 1, 1)
        for want in (2, 3):
            pool.signal(signal.SIGTTIN)
            def grown(w: int = want) -> bool:
                return state() == (w, w, w) and pool.is_ready()

            wait_for(grown, 15, f"{want} workers after SIGTTIN (have {state()})")
        assert int(pool.metric("rmqpool_workers", state="ready")) == 3
        for want in (2, 1):
            pool.signal(signal.SIGTTOU)
            def shrunk(w: int = want) -> bool:
                return state() == (w, w, w)

            wait_for(shrunk, 15, f"{want} workers after SIGTTOU (have {state()})")
        # Never below one.
        pool.signal(signal.SIGTTOU)
        wait_for(lambda: pool.log().count("SIGTTOU") >= 3, 5, "third SIGTTOU handled")
        assert state() == (1, 1, 1)
        assert pool.is_ready()
        body = json.loads(pool.get("/healthz")[1])
        assert [w["slot"] for w in body["workers"]] == [0]
        pool.signal(signal.SIGTERM)
        assert pool.wait(15) == 0, pool.log()
