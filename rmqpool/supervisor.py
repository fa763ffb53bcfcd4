"""The supervisor process: synchronous, no event loop, no AMQP connection.

Its main loop is five named steps, run at least every LOOP_INTERVAL seconds and
whenever a signal, a worker message or an HTTP request arrives:

    handle signals -> reap dead workers -> check health -> reconcile slots -> serve http

Signal handlers only record the signal (a wakeup fd wakes the loop); all work,
logging included, happens in the loop.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import setproctitle

from . import control, exitcodes
from . import handler as handler_mod
from .process import WorkerProcess, describe_exit, spawn
from .scoreboard import N_INT, Running
from .settings import Settings

log = logging.getLogger("rmqpool.supervisor")

LOOP_INTERVAL = 0.25
MIN_UPTIME = 5.0  # a worker that dies sooner than this is "dying soon after start"
MAX_BACKOFF = 30.0
KILL_GRACE = 5.0  # beyond --graceful-timeout, for the worker to close its connection
MAX_CHARGES = 10_000  # poison-tracking entries kept (oldest dropped first)
SETTLED_MEMORY = 600.0  # seconds a dead worker's settled messages are remembered
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)

RUNNING, STOPPING = "running", "stopping"


class Supervisor:
    def __init__(self, settings: Settings, handler: handler_mod.Handler) -> None:
        self.settings = settings
        self.handler = handler
        self.desired = settings.workers
        self.state = RUNNING
        self.exit_code = exitcodes.OK
        self.workers: dict[int, WorkerProcess] = {}  # pid -> process (all, incl. draining)
        self.active: dict[int, WorkerProcess] = {}  # slot -> the process serving it
        self.replacing: dict[int, WorkerProcess] = {}  # slot -> new process during a reload
        self.reload_queue: deque[int] = deque()
        self.generation = 0
        self.failures: dict[int, int] = {}  # slot -> consecutive quick deaths
        self.not_before: dict[int, float] = {}  # slot -> earliest restart time
        # Counters of dead worker processes, per slot, so totals never go backwards.
        self.retired: dict[int, list[int]] = {}
        self.retired_duration_sum: dict[int, float] = {}
        self.restarts: dict[str, int] = {}
        # message key -> (deaths charged, reason of the last, a suspect of an uncharged one)
        self.charges: dict[int, tuple[int, str, bool]] = {}
        self.settled_by_dead: dict[int, float] = {}  # settled key -> when its worker died
        self.started_at = time.monotonic()
        self.last_loop = self.started_at
        self._signals: deque[int] = deque()
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._extra_fds: list[int] = []  # closed in every forked worker
        self._http: Any = None

    # -- the main loop --------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self._start_http()
        self._title()
        log.info("rmqpool %s starting %d worker(s) for %s on queue %r at %s",
                 _version(), self.desired, self.handler.spec, self.settings.queue,
                 self.settings.safe_url)
        self._reconcile()  # start the workers now, not after the first wait
        while self.state == RUNNING or self.workers:
            self._wait(LOOP_INTERVAL)
            self.last_loop = time.monotonic()
            self._handle_signals()
            self._reap()
            self._check_health()
            self._reconcile()
            self._serve_http()
        if self._http is not None:
            self._http.close()
        log.info("supervisor exiting: %s", exitcodes.DESCRIPTIONS.get(self.exit_code, ""))
        return self.exit_code

    def _wait(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            key.data()

    # -- signals ----------------------------------------------------------------------
    def _install_signals(self) -> None:
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)
        self._extra_fds += [self._wakeup_r, self._wakeup_w, self._selector.fileno()]

    def _record_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)  # NO logging, no work: the loop does it

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
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
        self.generation += 1
        for stale in self.replacing.values():  # started for the previous reload: old code
            stale.drain()
        self.replacing.clear()
        self.reload_queue = deque(sorted(self.active))
        log.info("SIGHUP: reloaded %s (%d module(s)); rolling restart of %d worker(s)",
                 self.handler.spec, len(forgotten), len(self.reload_queue))

    def _on_ttin(self) -> None:
        self.desired += 1
        log.info("SIGTTIN: %d worker(s) wanted", self.desired)
        self._title()

    def _on_ttou(self) -> None:
        if self.desired > 1:
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
            self.reload_queue.clear()
            for worker in self.workers.values():
                worker.drain()

    def kill_all(self, code: int) -> None:
        self.state = STOPPING
        self.exit_code = max(self.exit_code, code)
        for worker in self.workers.values():
            worker.kill("shutdown")

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
        while messages := worker.end.receive():  # a FATAL sent just before exiting
            self._dispatch_control(worker, messages)
        self._retire(worker)
        slot = worker.slot
        if self.active.get(slot) is worker:
            del self.active[slot]
            if slot in self.replacing:  # mid-reload: its replacement takes the slot now
                self.active[slot] = self.replacing.pop(slot)
        if self.replacing.get(slot) is worker:
            del self.replacing[slot]
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        how = (f"killed by the supervisor ({worker.kill_reason})" if worker.kill_reason
               else describe_exit(status))
        expected = worker.draining_since is not None and worker.kill_reason is None
        if worker.fatal is not None:  # said so itself; a bare exit code 3 is a crash
            if self.state == RUNNING:
                log.error("%s cannot work (%s): stopping the pool", worker, worker.fatal[1])
            self.stop(worker.fatal[0])
            return
        if expected:
            log.info("%s exited after draining (%s)", worker, how)
            if code not in (exitcodes.OK, None) and self.state == STOPPING:
                self.exit_code = max(self.exit_code, exitcodes.FORCED)
            return
        if self.state == STOPPING:
            log.warning("%s %s during shutdown", worker, how)
            self.exit_code = max(self.exit_code, exitcodes.FORCED)
            return
        reason = worker.kill_reason or ("killed" if os.WIFSIGNALED(status) else "crash")
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        uptime = time.monotonic() - worker.started_at
        failures = self.failures.get(slot, 0) + 1 if uptime < MIN_UPTIME else 1
        self.failures[slot] = failures
        delay = 0.0 if failures <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (failures - 2))
        self.not_before[slot] = time.monotonic() + delay
        log.error("%s %s after %.1fs; restarting%s", worker, how, uptime,
                  f" in {delay:g}s ({failures} quick deaths in a row)" if delay else "")

    def _retire(self, worker: WorkerProcess) -> None:
        """Fold a dead process's counters into its slot and charge what it was running."""
        cells = worker.board.counters()
        totals = self.retired.setdefault(worker.slot, [0] * N_INT)
        for i, value in enumerate(cells):
            totals[i] += value
        self.retired_duration_sum[worker.slot] = (
            self.retired_duration_sum.get(worker.slot, 0.0) + worker.board.duration_sum())
        if worker.kill_reason is None and worker.draining_since is None:  # it crashed
            running = worker.board.running()
            self._charge(running, "crash", certain=len(running) == 1)
        # Its last acks may not have reached the broker (a killed process's unsent socket
        # data is dropped): remember what it settled, so redeliveries are not run twice.
        now = time.monotonic()
        for key in worker.board.recently_settled():
            self.settled_by_dead.pop(key, None)  # keep the dict in time order
            self.settled_by_dead[key] = now
        while self.settled_by_dead and (
                len(self.settled_by_dead) > MAX_CHARGES
                or now - next(iter(self.settled_by_dead.values())) > SETTLED_MEMORY):
            del self.settled_by_dead[next(iter(self.settled_by_dead))]
        try:
            self._selector.unregister(worker.end.fileno())
        except KeyError:
            pass  # already unregistered at EOF
        worker.end.close()
        worker.board.close()

    def _charge(self, culprits: list[Running], reason: str, certain: bool) -> None:
        """Count a worker death against the message that caused it (poison tracking).
        When several were running and any of them may have done it, none is charged:
        each becomes a suspect and runs alone next time, where a death is certain."""
        for running in culprits:
            deaths, _, _ = self.charges.pop(running.key, (0, "", False))
            self.charges[running.key] = (deaths + certain, reason, not certain)
        while len(self.charges) > MAX_CHARGES:
            del self.charges[next(iter(self.charges))]

    def _kill(self, worker: WorkerProcess, reason: str, culprits: list[Running],
              certain: bool) -> None:
        """Charge now, not at reap: the broker may redeliver before waitpid sees it."""
        self._charge(culprits, reason, certain)
        worker.kill(reason)

    # -- health -----------------------------------------------------------------------------
    def _check_health(self) -> None:
        now = time.monotonic()
        s = self.settings
        for worker in list(self.workers.values()):
            if worker.kill_reason is not None:
                continue
            if worker.draining_since is not None:
                if now - worker.draining_since > s.graceful_timeout + KILL_GRACE:
                    log.error("%s did not finish draining within %gs; killing it", worker,
                              s.graceful_timeout + KILL_GRACE)
                    worker.kill("graceful_timeout")
                    self.exit_code = max(self.exit_code, exitcodes.FORCED
                                         if self.state == STOPPING else exitcodes.OK)
                continue
            silent = now - worker.last_beat
            if silent > s.worker_timeout:
                running = worker.board.running()
                log.error("%s event loop blocked: no heartbeat for %.1fs (--worker-timeout %gs); "
                          "a handler is holding the loop or the GIL; killing it (running: %s)",
                          worker, silent, s.worker_timeout, _ids(running))
                self._kill(worker, "heartbeat", running, certain=len(running) == 1)
                continue
            if s.time_limit and not self.handler.is_async:
                overdue = [r for r in worker.board.running() if now - r.started > s.time_limit]
                if overdue:
                    log.error("%s: message %s has run %.1fs, past --time-limit %gs; killing the "
                              "worker (sync handlers cannot be interrupted)", worker,
                              _ids(overdue), now - overdue[0].started, s.time_limit)
                    self._kill(worker, "time_limit", overdue, certain=True)

    # -- reconciling ---------------------------------------------------------------------------
    def _reconcile(self) -> None:
        if self.state != RUNNING:
            return
        now = time.monotonic()
        for slot in range(self.desired):
            if slot not in self.active and now >= self.not_before.get(slot, 0.0):
                self.active[slot] = self._spawn(slot)
        for slot in [s for s in self.active if s >= self.desired]:
            log.info("scaling down: draining %s", self.active[slot])
            self.active.pop(slot).drain()
            if slot in self.replacing:
                self.replacing.pop(slot).drain()
        self._continue_reload()

    def _continue_reload(self) -> None:
        """One slot at a time: start its new worker, and drain the old one only once
        the new one consumes, so throughput never drops to zero."""
        while self.reload_queue:
            slot = self.reload_queue[0]
            old = self.active.get(slot)
            if old is None or old.generation == self.generation:
                self.reload_queue.popleft()
                continue
            new = self.replacing.get(slot)
            if new is None:
                if time.monotonic() >= self.not_before.get(slot, 0.0):
                    self.replacing[slot] = self._spawn(slot)
                return
            if not new.ready:
                return
            log.info("reload: %s is consuming; draining %s", new, old)
            self.restarts["reload"] = self.restarts.get("reload", 0) + 1
            old.drain()
            self.active[slot] = self.replacing.pop(slot)
            self.reload_queue.popleft()

    def _spawn(self, slot: int) -> WorkerProcess:
        close = [*self._extra_fds, *(w.end.fileno() for w in self.workers.values())]
        if self._http is not None:  # its listener and open requests must not live on in a worker
            close += self._http.fds()
        worker = spawn(self.settings, slot, self.generation, self.handler, close)
        worker.generation = self.generation
        self.workers[worker.pid] = worker
        self._selector.register(worker.end.fileno(), selectors.EVENT_READ,
                                lambda w=worker: self._on_control(w))
        log.debug("spawned %s (generation %d)", worker, self.generation)
        return worker

    # -- control channel --------------------------------------------------------------------
    def _on_control(self, worker: WorkerProcess) -> None:
        messages = worker.end.receive()
        if messages is None:  # EOF: it is exiting; the reaper will say why
            self._selector.unregister(worker.end.fileno())
            return
        self._dispatch_control(worker, messages)

    def _dispatch_control(self, worker: WorkerProcess, messages: list[dict[str, Any]]) -> None:
        for msg in messages:
            handle = self._control_actions.get(msg.get("t", ""))
            if handle is not None:
                handle(self, worker, msg)

    def _on_beat(self, worker: WorkerProcess, _msg: dict[str, Any]) -> None:
        worker.last_beat = time.monotonic()

    def _on_ready(self, worker: WorkerProcess, _msg: dict[str, Any]) -> None:
        worker.last_beat = time.monotonic()
        if worker.draining_since is None:
            worker.ready = worker.was_ready = True

    def _on_notready(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        worker.ready = False

    def _on_fatal(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        worker.fatal = (int(msg["code"]), str(msg["why"]))

    def _on_ask(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        self._reap()  # a worker that just died may hold the charge being asked for
        deaths, reason, suspect = self.charges.get(int(msg["key"]), (0, "", False))
        # Settled, yet redelivered: its ack was lost with a connection (a worker killed
        # just after acking may not even be reaped yet). Its outcome stands; skip it.
        skey = int(msg.get("skey") or 0)
        settled = bool(skey) and (skey in self.settled_by_dead or any(
            skey in w.board.recently_settled() for w in self.workers.values()))
        worker.end.send(control.VERDICT, key=msg["key"], deaths=deaths, reason=reason,
                        settled=settled, suspect=suspect)

    _control_actions: dict[str, Callable[[Supervisor, WorkerProcess, dict[str, Any]], None]] = {
        control.BEAT: _on_beat,
        control.READY: _on_ready,
        control.NOTREADY: _on_notready,
        control.FATAL: _on_fatal,
        control.ASK: _on_ask,
    }

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
        self._selector.register(self._http.fileno(), selectors.EVENT_READ, self._http.serve)

    def _serve_http(self) -> None:
        """Also when nothing is ready: serve() closes connections past their deadline."""
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
