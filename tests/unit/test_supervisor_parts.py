"""The supervisor's bookkeeping, each part on its own (no fork, no broker)."""

import os
import signal

import pytest

from rmqpool.outcome import Action
from rmqpool.process import ExitKind, ExitVerdict, Kill, Restart, classify_exit
from rmqpool.scoreboard import RING, Scoreboard
from rmqpool.supervisor import MIN_UPTIME, Backoff, PoisonLedger, Reload, SettledIndex

EXITED_0 = 0  # wait statuses, as os.waitpid returns them
EXITED_70 = 70 << 8
KILLED_9 = signal.SIGKILL


def test_wait_status_encoding_is_what_the_table_assumes():
    assert os.WIFEXITED(EXITED_0) and os.WEXITSTATUS(EXITED_70) == 70
    assert os.WIFSIGNALED(KILLED_9) and os.WTERMSIG(KILLED_9) == signal.SIGKILL


@pytest.mark.parametrize(("status", "drain", "kill", "fatal", "expected"), [
    # asked to drain: never restarted; clean only when it exited 0 on its own
    (EXITED_0, True, None, False, ExitVerdict(ExitKind.DRAINED)),
    (EXITED_70, True, None, False, ExitVerdict(ExitKind.DRAIN_LOST)),
    (KILLED_9, True, None, False, ExitVerdict(ExitKind.DRAIN_LOST)),  # OOM while draining
    (KILLED_9, True, Kill.DRAIN_TIMEOUT, False, ExitVerdict(ExitKind.DRAIN_LOST)),
    (KILLED_9, False, Kill.SHUTDOWN, False, ExitVerdict(ExitKind.DRAIN_LOST)),
    (KILLED_9, True, Kill.SHUTDOWN, False, ExitVerdict(ExitKind.DRAIN_LOST)),
    # it said the pool cannot work
    (3 << 8, False, None, True, ExitVerdict(ExitKind.FATAL)),
    (3 << 8, True, None, True, ExitVerdict(ExitKind.FATAL)),
    # unexpected: restart, with the reason the metric counts
    (EXITED_70, False, None, False, ExitVerdict(ExitKind.RESTART, Restart.CRASH)),
    (3 << 8, False, None, False, ExitVerdict(ExitKind.RESTART, Restart.CRASH)),  # no FATAL sent
    (EXITED_0, False, None, False, ExitVerdict(ExitKind.RESTART, Restart.CRASH)),
    (KILLED_9, False, None, False, ExitVerdict(ExitKind.RESTART, Restart.KILLED)),
    (KILLED_9, False, Kill.HEARTBEAT, False, ExitVerdict(ExitKind.RESTART, Restart.HEARTBEAT)),
    (KILLED_9, False, Kill.TIME_LIMIT, False,
     ExitVerdict(ExitKind.RESTART, Restart.TIME_LIMIT)),
])
def test_classify_exit(status, drain, kill, fatal, expected):
    assert classify_exit(status, asked_to_drain=drain, kill=kill, fatal=fatal) == expected


def test_poison_ledger_charges_the_only_running_message():
    ledger = PoisonLedger()
    ledger.charge([9], "crash", certain=True)
    ledger.charge([9], "heartbeat", certain=True)
    assert ledger.get(9) == (2, "heartbeat", False)
    assert ledger.get(10) == (0, "", False)


def test_poison_ledger_makes_suspects_of_neighbours():
    ledger = PoisonLedger()
    ledger.charge([9, 10, 11], "crash", certain=False)
    assert [ledger.get(k) for k in (9, 10, 11)] == [(0, "crash", True)] * 3


def test_poison_ledger_is_bounded_oldest_first():
    ledger = PoisonLedger(limit=3)
    for key in range(1, 6):
        ledger.charge([key], "crash", certain=True)
    assert [ledger.get(k)[0] for k in range(1, 6)] == [0, 0, 1, 1, 1]


def test_settled_index_reads_only_what_is_new():
    board = Scoreboard(1)
    index = SettledIndex()
    board.settle(Action.ACK, None, 0.0, True, settled_key=77)
    index.absorb(1, board, now=0.0)
    assert 77 in index and 78 not in index
    assert board.settled_since(1) == (1, [])  # nothing new since position 1
    board.settle(Action.ACK, None, 0.0, True, settled_key=78)
    index.absorb(1, board, now=1.0)
    assert 78 in index
    index.forget(1)
    assert 77 in index  # remembered after its worker is gone
    board.close()


def test_settled_index_keeps_the_last_ring_when_it_fell_behind():
    board = Scoreboard(1)
    for key in range(1, RING + 50):
        board.settle(Action.ACK, None, 0.0, True, settled_key=key)
    position, keys = board.settled_since(0)
    assert position == RING + 49 and keys == list(range(50, RING + 50))
    board.close()


def test_settled_index_forgets_after_its_memory():
    board = Scoreboard(1)
    index = SettledIndex()
    board.settle(Action.ACK, None, 0.0, True, settled_key=5)
    index.absorb(1, board, now=0.0)
    index.absorb(1, board, now=10_000.0)
    assert 5 not in index
    board.close()


def test_backoff_is_for_workers_that_cannot_start_not_for_poison():
    backoff = Backoff()
    # deaths blamed on a message never back off, however quick
    for _ in range(5):
        assert backoff.died(0, uptime=0.1, blamed_message=True, now=0.0) == 0.0
    assert backoff.may_start(0, 0.0)
    # quick deaths with nothing to blame: 0, 0.5, 1, 2 ...
    delays = [backoff.died(1, uptime=0.1, blamed_message=False, now=0.0) for _ in range(4)]
    assert delays == [0.0, 0.5, 1.0, 2.0]
    assert not backoff.may_start(1, 1.0) and backoff.may_start(1, 2.0)
    # a worker that ran a while resets the count
    assert backoff.died(1, uptime=MIN_UPTIME + 1, blamed_message=False, now=0.0) == 0.0
    assert backoff.quick_deaths(1) == 0


def test_reload_generations_and_stale_replacements():
    reload = Reload()
    assert reload.begin([2, 0, 1]) == [] and list(reload.slots) == [0, 1, 2]
    assert reload.generation == 1
    stale = object()
    reload.replacing[0] = stale  # type: ignore[assignment]
    assert reload.begin([0, 1]) == [stale] and reload.generation == 2 and not reload.replacing
    reload.cancel()
    assert not reload.slots


def test_a_death_and_a_question_in_one_pass_neither_crash_nor_go_stale():
    """Issue 8 item 2: a worker's EOF and another worker's ASK ready in the same select
    batch. The old loop reaped from inside the ASK's callback, closed the dead worker's
    socket, then ran its stale key and crashed (the supervisor exiting took every worker
    with it). Now a pass collects first, charges the death, reaps, then answers."""
    import json
    import socket

    from rmqpool import control
    from rmqpool.handler import Handler
    from rmqpool.process import WorkerProcess
    from rmqpool.settings import resolve
    from rmqpool.supervisor import Supervisor

    sup = Supervisor(resolve("m:f", {"metrics_port": 0, "workers": 1}, {}),
                     Handler("m:f", print, False, False))
    sup.state = "stopping"  # reconcile must not fork real workers here
    asker_ours, asker_theirs = socket.socketpair()
    dead_ours, dead_theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the worker that dies: it was running message key 42 alone
        os._exit(13)
    asker = WorkerProcess(0, 0, os.getpid(), control.SupervisorEnd(asker_ours), Scoreboard(1))
    dead = WorkerProcess(1, 0, pid, control.SupervisorEnd(dead_ours), Scoreboard(1))
    dead.board.start(0, 42, "poison")
    sup.adopt(asker)
    sup.adopt(dead)
    dead_theirs.sendall(control.encode({"t": "beat", "lag": 0.0}))  # its last beat...
    dead_theirs.close()  # ...and its exit, in the same batch as the question:
    asker_theirs.sendall(control.encode({"t": "ask", "key": 42, "skey": 0}))
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # it has exited (not reaped yet)
    sup.step(0.5)
    assert pid not in sup.workers  # reaped
    verdict = json.loads(asker_theirs.recv(4096).decode().splitlines()[0])
    assert verdict["deaths"] == 1 and verdict["reason"] == "crash"  # the death was known
    asker_theirs.close()
    asker.end.close()
    asker.board.close()
