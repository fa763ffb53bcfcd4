"""The supervisor process: synchronous, no event loop, no AMQP connection.

Its main loop waits for events, then runs named steps, in this order, at least
every LOOP_INTERVAL seconds:

    wait (collect only) -> signals -> control messages -> reap -> answer asks
    -> http -> health -> reconcile

Only `_wait` touches the selector's ready list; each step handles what it
collected. Workers are reaped in one place, and questions about redelivered
messages are answered after it, so a death in the same batch is already known.
Signal handlers only record the signal (signals.py).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import setproctitle

from . import control, exitcodes
from . import handler as handler_mod
from .outcome import Death
from .process import ExitKind, Kill, Restart, WorkerProcess, classify_exit, describe_exit, spawn
from .scoreboard import N_INT, Running, Scoreboard
from .settings import Settings
from .signals import SignalQueue

if TYPE_CHECKING:
    from .metrics import MetricsServer

log = logging.getLogger("rmqpool.supervisor")

LOOP_INTERVAL = 0.25
MIN_UPTIME = 5.0  # a worker that dies sooner than this is "dying soon after start"
MAX_BACKOFF = 30.0
KILL_GRACE = 5.0  # beyond --graceful-timeout, for the worker to close its connection
MAX_CHARGES = 10_000  # poison-tracking entries kept (oldest dropped first)
ASK_DEFER = 1.0  # seconds an ask waits for the death of a worker still showing its key
SETTLED_MEMORY = 600.0  # seconds a settled message is remembered after it was seen

RUNNING, STOPPING = "running", "stopping"
_WAKEUP, _HTTP = "wakeup", "http"  # selector tags; a worker's tag is its WorkerProcess


class PoisonLedger:
    """Worker deaths charged to messages, by message key (bounded, oldest dropped)."""

    def __init__(self, limit: int = MAX_CHARGES) -> None:
        self._limit = limit
        self._charges: dict[int, tuple[int, str, bool]] = {}  # key -> deaths, reason, suspect

    def charge(self, keys: list[int], reason: str, certain: bool) -> None:
        """A worker died running `keys`. When several ran and any may have done it, none is
        charged: each becomes a suspect and runs alone next time, where a death is certain."""
        for key in keys:
            deaths, _, _ = self._charges.pop(key, (0, "", False))
            self._charges[key] = (deaths + certain, reason, not certain)
        while len(self._charges) > self._limit:
            del self._charges[next(iter(self._charges))]

    def get(self, key: int) -> tuple[int, str, bool]:
        return self._charges.get(key, (0, "", False))


class SettledIndex:
    """Settled keys of every worker, read incrementally from their scoreboards' rings, so
    that asking about a message costs O(1) however many workers and asks there are. A
    key is remembered SETTLED_MEMORY seconds after it was read (MAX_CHARGES at most)."""

    def __init__(self) -> None:
        self._keys: dict[int, float] = {}  # key -> when read, oldest first
        self._read_to: dict[int, int] = {}  # pid -> ring position read up to

    def absorb(self, pid: int, board: Scoreboard, now: float) -> None:
        position, keys = board.settled_since(self._read_to.get(pid, 0))
        self._read_to[pid] = position
        for key in keys:
            if key:
                self._keys.pop(key, None)
                self._keys[key] = now
        while self._keys and (len(self._keys) > MAX_CHARGES
                              or now - next(iter(self._keys.values())) > SETTLED_MEMORY):
            del self._keys[next(iter(self._keys))]

    def forget(self, pid: int) -> None:
        self._read_to.pop(pid, None)

    def __contains__(self, key: int) -> bool:
        return key in self._keys


class Backoff:
    """Restart delays for slots whose workers cannot start: a worker that dies within
    MIN_UPTIME of its start, with no message to blame, makes the next start wait
    (0.5 s doubling to MAX_BACKOFF). A death charged to a message (poison, time limit,
    a blocked loop while one message ran) is the message's fault: no backoff."""

    def __init__(self) -> None:
        self._quick_deaths: dict[int, int] = {}
        self._not_before: dict[int, float] = {}

    def died(self, slot: int, uptime: float, blamed_message: bool, now: float) -> float:
        quick = uptime < MIN_UPTIME and not blamed_message
        deaths = self._quick_deaths.get(slot, 0) + 1 if quick else 0
        self._quick_deaths[slot] = deaths
        delay = 0.0 if deaths <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (deaths - 2))
        self._not_before[slot] = now + delay
        return delay

    def quick_deaths(self, slot: int) -> int:
        return self._quick_deaths.get(slot, 0)

    def may_start(self, slot: int, now: float) -> bool:
        return now >= self._not_before.get(slot, 0.0)


class Reload:
    """A rolling restart in progress: the slots still to replace, and the new worker of
    the slot being replaced (consuming before the old one drains)."""

    def __init__(self) -> None:
        self.generation = 0
        self.slots: deque[int] = deque()
        self.replacing: dict[int, WorkerProcess] = {}  # slot -> its new worker

    def begin(self, slots: list[int]) -> list[WorkerProcess]:
        """Start a new generation; returns the replacements started for the previous one
        (running old code), to be drained."""
        self.generation += 1
        stale = list(self.replacing.values())
        self.replacing.clear()
        self.slots = deque(sorted(slots))
        return stale

    def cancel(self) -> None:
        self.slots.clear()


class Retired:
    """Counters of dead worker processes, per slot, so totals never go backwards."""

    def __init__(self) -> None:
        self.cells: dict[int, list[int]] = {}
        self.duration_sum: dict[int, float] = {}

    def add(self, slot: int, board: Scoreboard) -> None:
        totals = self.cells.setdefault(slot, [0] * N_INT)
        for i, value in enumerate(board.counters()):
            totals[i] += value
        self.duration_sum[slot] = self.duration_sum.get(slot, 0.0) + board.duration_sum()


class Supervisor:
    def __init__(self, settings: Settings, handler: handler_mod.Handler,
                 signals: SignalQueue | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.desired = settings.workers
        self.state = RUNNING
        self.exit_code = exitcodes.OK
        self.workers: dict[int, WorkerProcess] = {}  # pid -> process (all, incl. draining)
        self.active: dict[int, WorkerProcess] = {}  # slot -> the process serving it
        self.reload = Reload()
        self.backoff = Backoff()
        self.poison = PoisonLedger()
        self.settled = SettledIndex()
        self.retired = Retired()
        self.restarts: dict[str, int] = {}
        self.started_at = time.monotonic()
        self.last_loop = self.started_at
        self.signals = signals or SignalQueue()
        self._selector = selectors.DefaultSelector()
        self._asks: list[tuple[WorkerProcess, control.Ask]] = []
        self._asked_at: dict[int, float] = {}  # key -> when a deferred ask first came
        self._http: MetricsServer | None = None

    # -- the main loop --------------------------------------------------------------
    def run(self) -> int:
        self.signals.install()  # again: harmless if the CLI did it before the import
        self._selector.register(self.signals.fileno(), selectors.EVENT_READ, _WAKEUP)
        self._start_http()
        self._title()
        log.info("rmqpool %s starting %d worker(s) for %s on queue %r at %s",
                 _version(), self.desired, self.handler.spec, self.settings.queue,
                 self.settings.safe_url)
        self._handle_signals()  # any that arrived while the handler was imported
        self._reconcile()  # start the workers now, not after the first wait
        while self.state == RUNNING or self.workers:
            self.step(LOOP_INTERVAL)
        if self._http is not None:
            self._http.close()
        log.info("supervisor exiting: %s", exitcodes.DESCRIPTIONS.get(self.exit_code, ""))
        return self.exit_code

    def step(self, timeout: float) -> None:
        """One pass of the main loop: wait up to `timeout` for events, then each step."""
        ready = self._wait(timeout)
        self.last_loop = time.monotonic()
        self._handle_signals()
        self._read_control(ready)
        self._reap()
        self._answer_asks()
        self._serve_http()
        self._check_health()
        self._reconcile()

    def adopt(self, worker: WorkerProcess) -> None:
        """Watch `worker` (a process this supervisor forked)."""
        self.workers[worker.pid] = worker
        self._selector.register(worker.end.fileno(), selectors.EVENT_READ, worker)

    def _wait(self, timeout: float) -> list[WorkerProcess]:
        """Collect what is ready; handle nothing. Returns the workers with control data."""
        workers = []
        for key, _ in self._selector.select(timeout):
            if key.data is _WAKEUP:
                self.signals.clear_wakeup()
            elif key.data is _HTTP:
                pass  # served every pass (_serve_http)
            else:
                workers.append(key.data)
        return workers

    # -- signals ----------------------------------------------------------------------
    def _handle_signals(self) -> None:
        for signum in self.signals.pop_all():
            action = self._signal_actions.get(signum)
            if action is not None:
                action(self)

    def _on_stop_signal(self) -> None:
        if self.state == RUNNING:
            log.info("graceful shutdown: draining %d worker(s), up to %gs",
                     len(self.workers), self.settings.graceful_timeout)
            self.stop(exitcodes.OK)
        else:
            log.warning("second stop signal: killing workers; unfinished messages go back "
                        "to the queue")
            self.kill_all(exitcodes.FORCED)

    def _on_quit(self) -> None:
        log.warning("SIGQUIT: immediate stop; unfinished messages go back to the queue")
        self.kill_all(exitcodes.FORCED)

    def _on_hup(self) -> None:
        if self.state != RUNNING:
            return
        try:
            forgotten = handler_mod.forget_user_modules()
            self.handler = handler_mod.load(self.handler.spec)
        except handler_mod.HandlerError as exc:
            log.error("reload failed, keeping the running workers: %s", exc)
            return
        for stale in self.reload.begin(list(self.active)):  # old code: drain
            stale.drain()
        log.info("SIGHUP: reloaded %s (%d module(s)); rolling restart of %d worker(s)",
                 self.handler.spec, len(forgotten), len(self.reload.slots))

    def _on_ttin(self) -> None:
        self.desired += 1
        log.info("SIGTTIN: %d worker(s) wanted", self.desired)
        self._title()

    def _on_ttou(self) -> None:
        if self.desired <= 1:
            log.info("SIGTTOU: already at 1 worker; not scaling down (SIGTERM stops the pool)")
            return
        self.desired -= 1
        log.info("SIGTTOU: %d worker(s) wanted", self.desired)
        self._title()

    _signal_actions: dict[int, Callable[[Supervisor], None]] = {
        signal.SIGTERM: _on_stop_signal,
        signal.SIGINT: _on_stop_signal,
        signal.SIGQUIT: _on_quit,
        signal.SIGHUP: _on_hup,
        signal.SIGTTIN: _on_ttin,
        signal.SIGTTOU: _on_ttou,
    }

    # -- commands -----------------------------------------------------------------------
    def stop(self, code: int) -> None:
        if self.state == RUNNING:
            self.state = STOPPING
            self.exit_code = max(self.exit_code, code)
            self.reload.cancel()
            for worker in self.workers.values():
                worker.drain()

    def kill_all(self, code: int) -> None:
        self.state = STOPPING
        self.exit_code = max(self.exit_code, code)
        for worker in self.workers.values():
            self._kill(worker, Kill.SHUTDOWN)

    # -- control channel ----------------------------------------------------------------
    def _read_control(self, ready: list[WorkerProcess]) -> None:
        for worker in ready:
            if worker.pid not in self.workers:
                continue  # reaped since (cannot happen within one pass; cheap to check)
            messages, closed = worker.end.receive()
            self._dispatch_control(worker, messages)
            if closed:  # it is exiting; the reaper will say why
                self._selector.unregister(worker.end.fileno())
                self._charge_death(worker)  # before its messages are redelivered and asked

    def _dispatch_control(self, worker: WorkerProcess,
                          messages: list[control.ToSupervisor]) -> None:
        for msg in messages:
            action = self._control_actions.get(msg["t"])  # a valid message, maybe not for us
            if action is not None:
                action(self, worker, msg)

    def _on_beat(self, worker: WorkerProcess, _msg: Any) -> None:
        worker.last_beat = time.monotonic()

    def _on_ready(self, worker: WorkerProcess, _msg: Any) -> None:
        worker.last_beat = time.monotonic()
        if worker.draining_since is None:
            worker.ready = worker.was_ready = True

    def _on_notready(self, worker: WorkerProcess, _msg: Any) -> None:
        worker.ready = False

    def _on_fatal(self, worker: WorkerProcess, msg: control.Fatal) -> None:
        worker.fatal = (msg["code"], msg["why"])

    def _on_ask(self, worker: WorkerProcess, msg: control.Ask) -> None:
        self._asks.append((worker, msg))  # answered after reaping

    def _on_charge(self, worker: WorkerProcess, msg: control.Charge) -> None:
        log.error("%s: rmqpool failed settling a message; charged to it like a worker death",
                  worker)
        self.poison.charge([msg["key"]], msg["reason"], certain=True)

    _control_actions: dict[str, Callable[[Supervisor, WorkerProcess, Any], None]] = {
        "beat": _on_beat,
        "ready": _on_ready,
        "notready": _on_notready,
        "fatal": _on_fatal,
        "ask": _on_ask,
        "charge": _on_charge,
    }

    def _answer_asks(self) -> None:
        if not self._asks:
            return
        now = time.monotonic()
        for worker in self.workers.values():  # O(settled since the last ask), not O(ring)
            self.settled.absorb(worker.pid, worker.board, now)
        later = []
        for worker, msg in self._asks:
            if worker.pid not in self.workers:
                continue
            if self._still_running_elsewhere(worker, msg, now):
                later.append((worker, msg))  # its last worker is dying: know it first
                continue
            deaths, reason, suspect = self.poison.get(msg["key"])
            # Settled, yet redelivered: its ack was lost with a connection or a worker.
            settled = bool(msg["skey"]) and msg["skey"] in self.settled
            worker.end.send({"t": "verdict", "key": msg["key"], "deaths": deaths,
                             "reason": reason, "settled": settled, "suspect": suspect})
        self._asks = later

    def _still_running_elsewhere(self, asker: WorkerProcess, msg: control.Ask,
                                 now: float) -> bool:
        """A redelivered message another worker still shows as running: that worker is
        dying (its connection closed first, its control socket not yet). Answer once its
        death is charged, at most ASK_DEFER seconds later (it may only have lost its
        connection and still be running the handler)."""
        first = self._asked_at.setdefault(msg["key"], now)
        if now - first > ASK_DEFER:
            self._asked_at.pop(msg["key"], None)
            return False
        for worker in self.workers.values():
            if worker is not asker and worker.charged is None and any(
                    r.key == msg["key"] for r in worker.board.running()):
                return True
        self._asked_at.pop(msg["key"], None)
        return False

    # -- reaping --------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._on_exit(worker, status)

    def _on_exit(self, worker: WorkerProcess, status: int) -> None:
        self._dispatch_control(worker, worker.end.receive()[0])  # a FATAL sent before exiting
        self._charge_death(worker)
        self._retire(worker)
        slot = worker.slot
        if self.active.get(slot) is worker:
            del self.active[slot]
            if slot in self.reload.replacing:  # mid-reload: its replacement takes the slot
                self.active[slot] = self.reload.replacing.pop(slot)
        if self.reload.replacing.get(slot) is worker:
            del self.reload.replacing[slot]
        how = (f"killed by the supervisor ({worker.kill_reason})" if worker.kill_reason
               else describe_exit(status))
        verdict = classify_exit(status, asked_to_drain=worker.draining_since is not None,
                                kill=worker.kill_reason, fatal=worker.fatal is not None)
        if verdict.kind is ExitKind.FATAL:
            assert worker.fatal is not None
            if self.state == RUNNING:
                log.error("%s cannot work (%s): stopping the pool", worker, worker.fatal[1])
            self.stop(worker.fatal[0])
        elif verdict.kind is ExitKind.DRAINED:
            log.info("%s exited after draining", worker)
        elif verdict.kind is ExitKind.DRAIN_LOST or self.state == STOPPING:
            log.warning("%s %s while draining: its unfinished messages went back to the "
                        "queue unacked", worker, how)
            if self.state == STOPPING:
                self.exit_code = max(self.exit_code, exitcodes.FORCED)
        else:
            assert verdict.restart is not None
            self._count_restart(verdict.restart)
            uptime = time.monotonic() - worker.started_at
            delay = self.backoff.died(slot, uptime, bool(worker.charged), time.monotonic())
            log.error("%s %s after %.1fs (running: %s); restarting%s", worker, how, uptime,
                      _ids(worker.died_running),
                      f" in {delay:g}s ({self.backoff.quick_deaths(slot)} quick deaths in a "
                      "row)" if delay else "")

    def _charge_death(self, worker: WorkerProcess, reason: Death = Death.CRASH,
                      running: list[Running] | None = None) -> None:
        """Charge a death to the messages it was running (poison tracking), once: at the
        first sign of it (a kill, EOF on its channel, or the reap), so the broker cannot
        redeliver them and have them asked about before the charge. A worker that dies
        while draining charges what it was still running (a clean drain runs nothing)."""
        if worker.charged is not None:
            return
        if reason is Death.CRASH and worker.kill_reason is not None:
            worker.charged = False  # killed by us: charged then, if it was a message's fault
            return
        running = worker.board.running() if running is None else running
        certain = len(running) == 1 or reason is Death.TIME_LIMIT
        self.poison.charge([r.key for r in running], reason, certain)
        worker.charged = bool(running) and certain
        worker.died_running = running

    def _retire(self, worker: WorkerProcess) -> None:
        """Fold a dead process's counters into its slot and keep what it settled: a killed
        process's last acks may not have reached the broker, so redeliveries of them must
        be recognised and not run twice."""
        self.retired.add(worker.slot, worker.board)
        self.settled.absorb(worker.pid, worker.board, time.monotonic())
        self.settled.forget(worker.pid)
        try:
            self._selector.unregister(worker.end.fileno())
        except KeyError:
            pass  # already unregistered at EOF
        worker.end.close()
        worker.board.close()

    def _kill(self, worker: WorkerProcess, reason: Kill, culprits: list[Running] | None = None,
              death: Death | None = None) -> None:
        """Charge now, not at reap: the broker may redeliver before waitpid sees it."""
        if death is not None:
            self._charge_death(worker, death, culprits)
        worker.kill(reason)

    def _count_restart(self, reason: Restart) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1

    # -- health -----------------------------------------------------------------------------
    def _check_health(self) -> None:
        now = time.monotonic()
        s = self.settings
        for worker in list(self.workers.values()):
            if worker.kill_reason is not None:
                continue
            if s.time_limit and not self.handler.is_async:  # draining or not: a hard limit
                overdue = [r for r in worker.board.running() if now - r.started > s.time_limit]
                if overdue:
                    log.error("%s: message %s has run %.1fs, past --time-limit %gs; killing the "
                              "worker (sync handlers cannot be interrupted)", worker,
                              _ids(overdue), now - overdue[0].started, s.time_limit)
                    self._kill(worker, Kill.TIME_LIMIT, overdue, Death.TIME_LIMIT)
                    continue
            if worker.draining_since is not None:
                if now - worker.draining_since > s.graceful_timeout + KILL_GRACE:
                    log.error("%s did not finish draining within %gs; killing it", worker,
                              s.graceful_timeout + KILL_GRACE)
                    self._kill(worker, Kill.DRAIN_TIMEOUT)
                continue
            silent = now - worker.last_beat
            if silent > s.worker_timeout:
                running = worker.board.running()
                log.error("%s event loop blocked: no heartbeat for %.1fs (--worker-timeout %gs); "
                          "a handler is holding the loop or the GIL; killing it (running: %s)",
                          worker, silent, s.worker_timeout, _ids(running))
                self._kill(worker, Kill.HEARTBEAT, running, Death.HEARTBEAT)

    # -- reconciling ---------------------------------------------------------------------------
    def _reconcile(self) -> None:
        if self.state != RUNNING:
            return
        now = time.monotonic()
        for slot in range(self.desired):
            if slot not in self.active and self.backoff.may_start(slot, now):
                self.active[slot] = self._spawn(slot)
        for slot in [s for s in self.active if s >= self.desired]:
            log.info("scaling down: draining %s", self.active[slot])
            self.active.pop(slot).drain()
            if slot in self.reload.replacing:
                self.reload.replacing.pop(slot).drain()
        self._continue_reload()

    def _continue_reload(self) -> None:
        """One slot at a time: start its new worker, and drain the old one only once
        the new one consumes, so throughput never drops to zero."""
        reload = self.reload
        while reload.slots:
            slot = reload.slots[0]
            old = self.active.get(slot)
            if old is None or old.generation == reload.generation:
                reload.slots.popleft()
                continue
            new = reload.replacing.get(slot)
            if new is None:
                if self.backoff.may_start(slot, time.monotonic()):
                    reload.replacing[slot] = self._spawn(slot)
                return
            if not new.ready:
                return
            log.info("reload: %s is consuming; draining %s", new, old)
            self._count_restart(Restart.RELOAD)
            old.drain()
            self.active[slot] = reload.replacing.pop(slot)
            reload.slots.popleft()

    def _spawn(self, slot: int) -> WorkerProcess:
        close = [*self.signals.fds(), self._selector.fileno(),
                 *(w.end.fileno() for w in self.workers.values())]
        if self._http is not None:  # the listener and any open request stay here
            close += self._http.fds()
        worker = spawn(self.settings, slot, self.reload.generation, self.handler, close)
        self.adopt(worker)
        log.debug("spawned %s (generation %d)", worker, self.reload.generation)
        return worker

    # -- http ---------------------------------------------------------------------------------
    def _start_http(self) -> None:
        if not self.settings.metrics_port:
            return
        from .metrics import MetricsServer
        from .settings import SettingsError

        s = self.settings
        try:
            self._http = MetricsServer(self)
        except OSError as exc:
            raise SettingsError(
                f"cannot serve metrics on {s.metrics_host}:{s.metrics_port} ({exc}); use "
                "another --metrics-host/--metrics-port, or --metrics-port 0 to disable") from None
        self._selector.register(self._http.fileno(), selectors.EVENT_READ, _HTTP)

    def _serve_http(self) -> None:
        """Every pass, ready or not: serve() also closes connections past their deadline
        (an idle connection never makes the server's fd readable)."""
        if self._http is not None:
            self._http.serve()

    def _title(self) -> None:
        setproctitle.setproctitle(
            f"rmqpool: supervisor [{self.handler.spec} on {self.settings.queue}] "
            f"workers={self.desired}")


def _ids(running: list[Running]) -> str:
    return ", ".join(repr(r.message_id or "(no message id)") for r in running) or "nothing"


def _version() -> str:
    from . import __version__

    return __version__
