"""The supervisor's answers about redelivered messages (no fork, no broker)."""

import json
import socket
from types import SimpleNamespace

import pytest

from rmqpool import control
from rmqpool.dispatch import keys
from rmqpool.handler import Handler
from rmqpool.outcome import Action
from rmqpool.process import WorkerProcess
from rmqpool.scoreboard import Scoreboard
from rmqpool.settings import resolve
from rmqpool.supervisor import Supervisor


@pytest.fixture
def sup():
    sup = Supervisor(resolve("m:f", {"metrics_port": 0, "concurrency": 3, "prefetch": 3}, {}),
                     Handler("m:f", print, False, False))
    sockets = []

    def make(pid: int) -> tuple[WorkerProcess, socket.socket]:
        ours, theirs = socket.socketpair()
        sockets.append(theirs)
        worker = WorkerProcess(0, 0, pid, control.SupervisorEnd(ours), Scoreboard(3))
        sup.workers[pid] = worker
        return worker, theirs

    sup.make = make
    yield sup
    for worker in sup.workers.values():
        worker.end.close()
        worker.board.close()
    for s in sockets:
        s.close()


def ask(sup, worker, theirs, **fields):
    sup._on_ask(worker, {"t": control.ASK, **fields})
    return json.loads(theirs.recv(4096).decode().splitlines()[0])


def test_settled_messages_are_recognised(sup):
    asker, theirs = sup.make(111)
    other, _ = sup.make(222)
    assert ask(sup, asker, theirs, key=5, skey=77) == {
        "t": "verdict", "key": 5, "deaths": 0, "reason": "", "settled": False,
        "suspect": False}
    other.board.settle(Action.ACK, "", 0.01, True, settled_key=77)  # its ack was lost
    assert ask(sup, asker, theirs, key=5, skey=77)["settled"] is True
    assert ask(sup, asker, theirs, key=5, skey=0)["settled"] is False  # no message id
    sup.workers.pop(222)
    sup._retire(other)  # remembered after it died, too
    assert ask(sup, asker, theirs, key=5, skey=77)["settled"] is True


def test_a_crash_charges_the_only_running_message(sup):
    asker, theirs = sup.make(111)
    dead, _ = sup.make(222)
    dead.board.start(0, 9, "poison-id")
    sup.workers.pop(222)
    sup._retire(dead)
    verdict = ask(sup, asker, theirs, key=9, skey=0)
    assert (verdict["deaths"], verdict["reason"], verdict["suspect"]) == (1, "crash", False)


def test_a_crash_beside_others_charges_nobody_and_makes_suspects(sup):
    asker, theirs = sup.make(111)
    dead, _ = sup.make(222)
    for index, key in enumerate((9, 10, 11)):
        dead.board.start(index, key, f"m{key}")
    sup.workers.pop(222)
    sup._retire(dead)
    for key in (9, 10, 11):
        verdict = ask(sup, asker, theirs, key=key, skey=0)
        assert (verdict["deaths"], verdict["suspect"]) == (0, True)


def test_keys_are_per_attempt():
    raw = SimpleNamespace(body=b"{}", header=SimpleNamespace(
        properties=SimpleNamespace(message_id="abc")))
    assert keys(raw, 1)[0] != keys(raw, 2)[0]
    assert keys(raw, 1)[1] == keys(raw, 1)[0]
    anonymous = SimpleNamespace(body=b"{}", header=SimpleNamespace(
        properties=SimpleNamespace(message_id=None)))
    assert keys(anonymous, 1)[1] == 0 and keys(anonymous, 1)[0] != 0
