"""One worker process as the supervisor sees it: fork it, talk to it, kill it,
and say why it exited.

Start method: os.fork from the single-threaded supervisor. The handler module
is imported once, in the supervisor, so workers start in milliseconds and share
its pages; the supervisor never holds an event loop, a thread or a connection
when it forks, which is what makes fork safe here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from . import control, exitcodes, topology
from . import log as rlog
from .handler import Handler
from .scoreboard import LOOP_LAG, Running, Scoreboard
from .settings import Settings

# Imported (not run) in the supervisor so forked workers share these pages and
# start faster; importing creates no loop, thread or connection.
from .worker import worker_main

log = logging.getLogger("rmqpool.supervisor")

PR_SET_PDEATHSIG = 1
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


class Kill(StrEnum):
    """Why the supervisor killed a worker."""

    HEARTBEAT = "heartbeat"  # its event loop stopped beating
    TIME_LIMIT = "time_limit"  # a sync handler overran --time-limit
    DRAIN_TIMEOUT = "drain_timeout"  # it did not finish draining in time
    SHUTDOWN = "shutdown"  # second stop signal or SIGQUIT


class Restart(StrEnum):
    """Why a slot's worker was replaced (rmqpool_worker_restarts_total{reason})."""

    CRASH = "crash"  # it exited on its own
    KILLED = "killed"  # a signal from outside (OOM killer, kill -9)
    HEARTBEAT = "heartbeat"
    TIME_LIMIT = "time_limit"
    RELOAD = "reload"


class ExitKind(StrEnum):
    DRAINED = "drained"  # asked to drain; finished and acked everything
    DRAIN_LOST = "drain_lost"  # asked to drain (or to stop), but unfinished work went back
    FATAL = "fatal"  # it reported a configuration the pool cannot work with
    RESTART = "restart"  # unexpected: its slot gets a new worker


@dataclass(frozen=True)
class ExitVerdict:
    kind: ExitKind
    restart: Restart | None = None  # for RESTART


def classify_exit(status: int, *, asked_to_drain: bool, kill: Kill | None,
                  fatal: bool) -> ExitVerdict:
    """What a worker's exit means, from its wait status and what the supervisor knows.

    A worker that was asked to drain is never restarted (its slot has been replaced or
    the pool is stopping); it drained only if it exited 0 on its own: a non-zero code,
    a signal (OOM, kill -9) or a kill for overrunning the drain sent work back."""
    if fatal:
        return ExitVerdict(ExitKind.FATAL)
    if asked_to_drain or kill in (Kill.DRAIN_TIMEOUT, Kill.SHUTDOWN):
        clean = kill is None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        return ExitVerdict(ExitKind.DRAINED if clean else ExitKind.DRAIN_LOST)
    if kill is Kill.HEARTBEAT:
        return ExitVerdict(ExitKind.RESTART, Restart.HEARTBEAT)
    if kill is Kill.TIME_LIMIT:
        return ExitVerdict(ExitKind.RESTART, Restart.TIME_LIMIT)
    if os.WIFSIGNALED(status):
        return ExitVerdict(ExitKind.RESTART, Restart.KILLED)
    return ExitVerdict(ExitKind.RESTART, Restart.CRASH)


class WorkerProcess:
    def __init__(self, slot: int, generation: int, pid: int, end: control.SupervisorEnd,
                 board: Scoreboard) -> None:
        self.slot = slot
        self.generation = generation
        self.pid = pid
        self.end = end
        self.board = board
        self.started_at = time.monotonic()
        self.last_beat = self.started_at
        self.ready = False
        self.was_ready = False  # consumed at least once: not ready now means reconnecting
        self.draining_since: float | None = None
        self.kill_reason: Kill | None = None  # why the supervisor killed it, if it did
        self.fatal: tuple[int, str] | None = None
        self.charged: bool | None = None  # its death charged to messages: to one (True)
        self.died_running: list[Running] = []  # what it was running when it died

    def __repr__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    @property
    def state(self) -> str:
        if self.draining_since is not None:
            return "draining"
        if self.ready:
            return "ready"
        return "reconnecting" if self.was_ready else "starting"

    def loop_lag(self, now: float, beat_interval: float) -> float:
        """How late its event loop is: what it last reported, or, while it is blocked
        and silent, how overdue its next beat is (so a blocked loop shows *now*)."""
        reported = float(self.board.floats[LOOP_LAG])
        return max(reported, now - self.last_beat - beat_interval)

    def drain(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.ready = False
            self.end.send({"t": "drain"})

    def kill(self, reason: Kill) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(settings: Settings, slot: int, generation: int, handler: Handler,
          close_in_child: Iterable[int]) -> WorkerProcess:
    parent_end, child_end = control.pair()
    board = Scoreboard(settings.concurrency, len(topology.all_queues(settings)))
    supervisor_pid = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        code = exitcodes.INTERNAL
        try:
            _become_worker(slot, close_in_child, parent_end.fileno(), supervisor_pid)
            code = worker_main(settings, slot, handler, child_end, board, supervisor_pid)
        except BaseException:
            log.exception("worker crashed")
        finally:
            logging.shutdown()
            os._exit(code)
    child_end.close()
    return WorkerProcess(slot, generation, pid, control.SupervisorEnd(parent_end), board)


def _become_worker(slot: int, close_fds: Iterable[int], parent_end_fd: int,
                   supervisor_pid: int) -> None:
    # The supervisor's wakeup fd and handlers must not fire in the worker.
    signal.set_wakeup_fd(-1)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group; the supervisor coordinates the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in (*close_fds, parent_end_fd):
        try:
            os.close(fd)
        except OSError:
            pass
    rlog.set_identity("worker", slot)
    _die_with_parent(supervisor_pid)


def _die_with_parent(supervisor_pid: int) -> None:
    """The kernel kills the worker the moment the supervisor dies. SIGKILL, not a signal
    Python handles: a handler holding the GIL in a long C call would delay any Python-level
    reaction past the 5 s promise. Its unacked messages go back to the queue. (Without
    prctl, the beat's getppid() check and the control channel's EOF drain it instead.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os._exit(exitcodes.FORCED)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        hint = " (killed: OOM killer or kill -9?)" if sig == signal.SIGKILL else ""
        return f"killed by signal {name}{hint}"
    return f"exit code {os.WEXITSTATUS(status)}"
