import socket

from rmqpool import control
from rmqpool.process import WorkerProcess
from rmqpool.scoreboard import LOOP_LAG, Scoreboard


def make_worker() -> WorkerProcess:
    a, b = socket.socketpair()
    b.close()
    return WorkerProcess(0, 0, 12345, control.SupervisorEnd(a), Scoreboard(1))


def test_states_starting_ready_reconnecting_draining():
    w = make_worker()
    assert w.state == "starting"
    w.ready = w.was_ready = True
    assert w.state == "ready"
    w.ready = False
    assert w.state == "reconnecting"
    w.draining_since = 1.0
    assert w.state == "draining"
    w.end.close()
    w.board.close()


def test_loop_lag_grows_while_beats_are_overdue():
    w = make_worker()
    w.board.floats[LOOP_LAG] = 0.25
    assert w.loop_lag(w.last_beat + 0.5, 1.0) == 0.25  # beats on time: what it reported
    assert w.loop_lag(w.last_beat + 4.0, 1.0) == 3.0  # silent for 4 s: 3 s late and growing
    w.end.close()
    w.board.close()
